"""Hierarchical masking (paper §3.3, Eq. 3–4, Algorithm 1; DESIGN.md §2).

`MaskedSearch` wraps a trained `Supernet` and gives every α, every β and every
convolution and dense kernel a real-valued mask M^r of the same shape. The
forward pass uses the binary masks M = H(M^r − τ):

    op weight   = M_α ⊙ softmax(α*)
    edge weight = M_β ⊙ softmax(β*)
    kernel      = M_w ⊙ w*

and the backward pass is straight-through (BinaryConnect): the gradient w.r.t.
M is used as the gradient of M^r. Only the masks train (Adam, one optimizer for
the weight masks, one for the α/β masks); w*, α*, β* stay frozen. Batch
normalisation runs in training mode, so its moving statistics follow the
masked network (they are what the searched network is evaluated with).
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.trainer import NetworkTrainer, cross_entropy, replica_scale


@tf.custom_gradient
def binarize(shifted):
    """Heaviside H(x) = 1 where x >= 0, else 0; the gradient passes straight through.

    Pass a tensor (such as `mask - tau`), not a Keras Variable: a variable
    captured by `tf.custom_gradient` demands a `variables` argument.
    """

    def grad(upstream):
        return upstream

    return tf.cast(shifted >= 0, shifted.dtype), grad


def _variable_name(path: str) -> str:
    """A Keras variable name for the mask of the variable at `path` ('/' is not allowed)."""
    return "mask." + path.split("/", 1)[-1].replace("/", ".")


class MaskedSearch(NetworkTrainer):
    """Trains hierarchical masks on a frozen, built `Supernet` with Keras `fit()`.

    Args:
        supernet: the trained supernet (built). Its layers carry the masks
            (`hmnas_keras.space.maskable`) while this object exists;
            `detach()` removes them.
        threshold: τ of the binariser.
        initial_value: the value every real-valued mask starts at.
    """

    def __init__(
        self,
        supernet: Supernet,
        threshold: float = 5e-3,
        initial_value: float = 1e-2,
        **kwargs,
    ):
        if not supernet.built:
            raise ValueError("MaskedSearch needs a built supernet (call it on a batch first).")
        super().__init__(supernet, **kwargs)
        self.threshold = threshold
        self.initial_value = initial_value
        init = keras.initializers.Constant(initial_value)
        self.weight_masks = {}
        for layer in self.kernel_layers:
            self.weight_masks[layer.kernel.path] = self.add_weight(
                shape=tuple(layer.kernel.shape),
                initializer=init,
                name=_variable_name(layer.kernel.path),
            )
        self.alpha_masks, self.beta_masks = {}, {}
        for cell_type, alpha in supernet.alphas.items():
            self.alpha_masks[cell_type] = self.add_weight(
                shape=tuple(alpha.shape), initializer=init, name=f"mask_alpha_{cell_type}"
            )
        for cell_type, beta in supernet.betas.items():
            self.beta_masks[cell_type] = self.add_weight(
                shape=tuple(beta.shape), initializer=init, name=f"mask_beta_{cell_type}"
            )
        self.attach()

    # ---------------------------------------------------------------- masks

    @property
    def kernel_layers(self) -> list:
        """The supernet's layers with maskable kernels, by kernel path (not tracked here)."""
        return sorted(self.supernet.kernel_layers(), key=lambda layer: layer.kernel.path)

    def _binary(self, mask):
        """M = H(M^r − τ), straight-through; a callable, as the mask hooks take."""
        return lambda: binarize(mask - self.threshold)

    def attach(self):
        """Makes the supernet use the binary masks in its forward pass."""
        for layer in self.kernel_layers:
            layer.set_kernel_mask(self._binary(self.weight_masks[layer.kernel.path]))
        self.supernet.set_arch_masks(self._arch_masks)

    def detach(self):
        """Removes the masks: the supernet computes its unmasked function again."""
        for layer in self.kernel_layers:
            layer.set_kernel_mask(None)
        self.supernet.set_arch_masks(None)

    def _arch_masks(self, cell_type):
        alpha = binarize(self.alpha_masks[cell_type] - self.threshold)
        beta = self.beta_masks.get(cell_type)
        return alpha, None if beta is None else binarize(beta - self.threshold)

    @property
    def weight_mask_variables(self) -> list:
        return list(self.weight_masks.values())

    @property
    def arch_mask_variables(self) -> list:
        return list(self.alpha_masks.values()) + list(self.beta_masks.values())

    def binary_masks(self) -> dict:
        """The binary masks as numpy booleans: {"alpha": {type: [E, K]}, "beta": ..., "weights":
        {kernel path: kernel-shaped}} (kernel paths as in the supernet)."""

        def binary(variable):
            return ops.convert_to_numpy(variable) >= self.threshold

        return {
            "alpha": {t: binary(v) for t, v in self.alpha_masks.items()},
            "beta": {t: binary(v) for t, v in self.beta_masks.items()},
            "weights": {path: binary(v) for path, v in self.weight_masks.items()},
        }

    # ------------------------------------------------------------- training

    @property
    def supernet(self) -> Supernet:
        return self.network

    def compile(self, weight_mask_optimizer, arch_mask_optimizer, jit_compile=False, **kwargs):
        """Takes one optimizer for the weight masks and one for the α/β masks."""
        super().compile(optimizer=weight_mask_optimizer, jit_compile=jit_compile, **kwargs)
        self.weight_mask_optimizer = weight_mask_optimizer
        self.arch_mask_optimizer = arch_mask_optimizer

    def build_masks(self):
        """Creates the optimizers' slots; call after `compile()`, before `fit()` or a restore."""
        self.weight_mask_optimizer.build(self.weight_mask_variables)
        self.arch_mask_optimizer.build(self.arch_mask_variables)
        self.built = True

    @property
    def optimizer_variables(self) -> list:
        return list(self.weight_mask_optimizer.variables) + list(self.arch_mask_optimizer.variables)

    @property
    def state_variables(self) -> list:
        """Every variable of the masking state, in a fixed order (what a checkpoint holds)."""
        return (
            list(self.supernet.variables)
            + self.weight_mask_variables
            + self.arch_mask_variables
            + self.optimizer_variables
            + list(self.metrics_variables)
        )

    def train_step(self, data):
        images, labels = data
        weight_masks, arch_masks = self.weight_mask_variables, self.arch_mask_variables
        with tf.GradientTape() as tape:
            logits = self.supernet(images, training=True)
            loss = cross_entropy(labels, logits)
        grads = tape.gradient(loss, weight_masks + arch_masks)
        # The optimizers sum what each replica passes: hand them 1/replicas of it.
        scale = replica_scale()
        grads = [
            ops.zeros_like(v) if g is None else g * scale
            for g, v in zip(grads, weight_masks + arch_masks, strict=True)
        ]
        self.weight_mask_optimizer.apply(grads[: len(weight_masks)], weight_masks)
        if arch_masks:
            self.arch_mask_optimizer.apply(grads[len(weight_masks) :], arch_masks)
        return self.update_metrics(loss, labels, logits)


def weight_mask_counts(binary_weight_masks: dict) -> tuple[int, int]:
    """(kept, total) entries of the weight masks."""
    kept = sum(int(np.count_nonzero(m)) for m in binary_weight_masks.values())
    total = sum(int(m.size) for m in binary_weight_masks.values())
    return kept, total
