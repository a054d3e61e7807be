"""Fine-tuning of the searched network (paper §3.4): only its weights train.

`FineTune` trains a `SearchedNetwork` with Keras `fit()`: SGD with coupled
weight decay and a global-norm clip, as the supernet's weights are trained.
α*, β* and the masks are fixed: the network's op and edge weights are
constants, and with constant 0/1 weight masks (`SearchedNetwork.apply_weight_masks`)
pruned weights get zero gradients and stay exactly zero.
"""

from hmnas_keras.training.trainer import NetworkTrainer


class FineTune(NetworkTrainer):
    """Trains a `SearchedNetwork`'s weights with `fit()` (α*, β*, masks stay fixed)."""

    def __init__(self, network, weight_decay=3e-4, grad_clip_norm=5.0, **kwargs):
        super().__init__(
            network, weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, **kwargs
        )

    def compile(self, optimizer, jit_compile=False, **kwargs):
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def build_finetune(self):
        """Creates the optimizer's slots; call after `compile()`, before `fit()` or a restore."""
        self.optimizer.build(self.network.trainable_variables)
        self.built = True

    @property
    def state_variables(self) -> list:
        """Every variable of the training state, in a fixed order (what a checkpoint holds)."""
        return (
            list(self.network.variables)
            + list(self.optimizer.variables)
            + list(self.metrics_variables)
        )

    def train_step(self, data):
        images, labels = data
        return self.weight_step(images, labels, self.network.trainable_variables, self.optimizer)
