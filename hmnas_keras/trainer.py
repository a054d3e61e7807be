"""What the training models of the phases share: the loss and the evaluation step."""

import keras
from keras import ops


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


class NetworkTrainer(keras.Model):
    """A Keras model that trains (some variables of) `network` on (images, labels) batches.

    Subclasses write `train_step`; calling, the loss/accuracy metrics and the
    inference-mode `test_step` are here.
    """

    def __init__(self, network: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.loss_metric = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_metric, self.accuracy_metric]

    def call(self, images, training=None):
        return self.network(images, training=training)

    def update_metrics(self, loss, labels, logits) -> dict:
        self.loss_metric.update_state(loss)
        self.accuracy_metric.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        images, labels = data
        logits = self.network(images, training=False)
        return self.update_metrics(cross_entropy(labels, logits), labels, logits)
