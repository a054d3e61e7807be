"""What the training models of the phases share: the loss, the weight step and evaluation.

`NetworkTrainer` is a Keras model that trains (some variables of) a network on
(images, labels) batches with `fit()`. The bilevel search, the masking and the
fine-tuning models subclass it and write their own `train_step`; the weight
step (SGD as in DARTS: global-norm clip, coupled L2 decay) and the
inference-mode `test_step` are here, once.
"""

import keras
import tensorflow as tf
from keras import ops


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def _global_gradients(grads):
    """Sums per-replica gradients, so that clipping sees the whole batch's gradient."""
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    return grads


def replica_scale() -> float:
    """1 / replicas: optimizers sum what each replica passes, so each hands over its share."""
    return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync


def apply_weight_gradients(optimizer, grads, variables, weight_decay, grad_clip_norm):
    """One SGD-style update as in DARTS: global-norm clip, coupled L2 decay, apply.

    Under a distribution strategy the per-replica gradients are summed first,
    so that the clip sees the global gradient; the optimizer then sums what each
    replica passes, so each hands it 1/replicas of the total.
    """
    scale = replica_scale()
    grads = [g * scale for g in _global_gradients(grads)]
    if grad_clip_norm > 0:
        grads, _ = tf.clip_by_global_norm(grads, grad_clip_norm)
    grads = [(g + weight_decay * v.value) * scale for g, v in zip(grads, variables, strict=True)]
    optimizer.apply(grads, variables)


class NetworkTrainer(keras.Model):
    """A Keras model that trains (some variables of) `network` on (images, labels) batches.

    Args:
        network: the network to train.
        weight_decay: L2 decay added to the weight gradients of `weight_step`
            (coupled, as in PyTorch's SGD).
        grad_clip_norm: global-norm clip of those gradients (0 disables).

    Subclasses write `train_step`; calling, the loss/accuracy metrics, the
    weight step and the inference-mode `test_step` are here.
    """

    def __init__(
        self, network: keras.Model, weight_decay: float = 0.0, grad_clip_norm: float = 0.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.network = network
        self.weight_decay = weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.loss_metric = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_metric, self.accuracy_metric]

    def call(self, images, training=None):
        return self.network(images, training=training)

    def update_metrics(self, loss, labels, logits) -> dict:
        """Adds a batch to the loss and accuracy; returns every metric's result."""
        self.loss_metric.update_state(loss)
        self.accuracy_metric.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def weight_step(self, images, labels, variables, optimizer):
        """Trains `variables` one step on the training-mode loss; updates the metrics."""
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)
            loss = cross_entropy(labels, logits)
        apply_weight_gradients(
            optimizer,
            tape.gradient(loss, variables),
            variables,
            self.weight_decay,
            self.grad_clip_norm,
        )
        return self.update_metrics(loss, labels, logits)

    def test_step(self, data):
        """Inference-mode loss and accuracy (the only metrics `evaluate()` reports)."""
        images, labels = data
        logits = self.network(images, training=False)
        self.update_metrics(cross_entropy(labels, logits), labels, logits)
        return {m.name: m.result() for m in (self.loss_metric, self.accuracy_metric)}
