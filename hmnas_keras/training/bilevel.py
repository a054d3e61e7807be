"""Bilevel supernet training driven by Keras `fit()` (paper §3.2, Algorithm 1).

`BilevelSearch` wraps a `Supernet`. Each training element is a pair of batches
`((weight_images, weight_labels), (arch_images, arch_labels))`. An iteration
first (optionally) updates α, β on the architecture batch with the arch
optimizer, then updates the network weights on the weight batch.

Whether an iteration takes the architecture step is decided on the host by an
`ArchStepPolicy` (`hmnas_keras.training.arch_step`: warm-up, then probability
σ(t)). The architecture step and the weight step are two traced functions
of the iteration's batch: an iteration without the architecture step calls
only the second, so the weight step is traced once for both kinds. Never a
zero gradient instead of a skipped step: it would still move Adam.
"""

import keras
import tensorflow as tf
from keras import ops

from hmnas_keras.runtime import call_while_tracing, release_eager_kernels
from hmnas_keras.space.cell import architecture_gradients_only
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.arch_step import ArchStepPolicy
from hmnas_keras.training.trainer import (
    NetworkTrainer,
    apply_unscaled,
    cross_entropy,
    replica_scale,
    scaled_loss,
    unscaled,
)


def _check_arch_batch(batch) -> None:
    """Raises if an iteration that takes an architecture step got no architecture batch."""
    if batch[1][0].shape[0] == 0:  # eager: the batch's own size
        raise ValueError(
            "Received an empty architecture batch for an iteration that takes an "
            "architecture step: the dataset's `arch_steps` disagrees with the search's "
            "policy. Build the dataset with `arch_steps=search.policy` (or without "
            "arch_steps, for every step)."
        )


class BilevelSearch(NetworkTrainer):
    """Trains a `Supernet`'s weights and architecture parameters in a bilevel way.

    Args:
        supernet: the network to train.
        policy: when to take the architecture step (default: every iteration).
        second_order: use DARTS' unrolled architecture gradient.
        weight_decay: L2 decay added to the weight gradients (coupled, as in
            PyTorch's SGD).
        arch_weight_decay: L2 decay added to the α/β gradients.
        grad_clip_norm: global-norm clip of the weight gradients (0 disables).
        hvp_radius: the second-order finite-difference step is
            hvp_radius / ‖∇_{w'} L_val‖ (DARTS uses 0.01).

    Metrics: `loss` and `accuracy` of the weight steps, `arch_loss` and
    `arch_accuracy` of the architecture steps, and `arch_step_fraction`.
    """

    def __init__(
        self,
        supernet: Supernet,
        policy: ArchStepPolicy | None = None,
        second_order: bool = False,
        weight_decay: float = 3e-4,
        arch_weight_decay: float = 1e-3,
        grad_clip_norm: float = 5.0,
        hvp_radius: float = 0.01,
        **kwargs,
    ):
        super().__init__(
            supernet, weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, **kwargs
        )
        self.policy = policy or ArchStepPolicy()
        self.second_order = second_order
        self.arch_weight_decay = arch_weight_decay
        self.hvp_radius = hvp_radius
        self.arch_loss = keras.metrics.Mean(name="arch_loss")
        self.arch_accuracy = keras.metrics.SparseCategoricalAccuracy(name="arch_accuracy")
        self.arch_step_fraction = keras.metrics.Mean(name="arch_step_fraction")
        self._next_iteration = None
        self.traced_steps = ()  # the tf.functions of the iterations (after make_train_function)

    @property
    def supernet(self) -> Supernet:
        return self.network

    @property
    def metrics(self):
        return super().metrics + [self.arch_loss, self.arch_accuracy, self.arch_step_fraction]

    def compile(self, weight_optimizer, arch_optimizer, jit_compile=False, **kwargs):
        """Takes both optimizers; `weight_optimizer` becomes `self.optimizer`.

        XLA is off unless asked for: Keras' "auto" would turn it on with a GPU,
        and on a CPU it made the supernet step much slower.
        """
        super().compile(optimizer=weight_optimizer, jit_compile=jit_compile, **kwargs)
        self.weight_optimizer = weight_optimizer
        self.arch_optimizer = arch_optimizer

    def build_search(self, image_shape: tuple[int, int, int]):
        """Creates every variable: the supernet's and both optimizers' slots.

        Call after `compile()` and before `fit()` or restoring a checkpoint.
        """
        self.supernet(ops.zeros((1, *image_shape)), training=False)
        self.weight_optimizer.build(self.supernet.weight_variables)
        self.arch_optimizer.build(self.supernet.arch_variables)
        release_eager_kernels()  # the eager build's: the steps run traced
        self.built = True

    @property
    def optimizer_variables(self) -> list:
        return list(self.weight_optimizer.variables) + list(self.arch_optimizer.variables)

    @property
    def state_variables(self) -> list:
        """Every variable of the training state, in a fixed order (what a checkpoint holds)."""
        return (
            list(self.supernet.variables) + self.optimizer_variables + list(self.metrics_variables)
        )

    # ------------------------------------------------------------------ steps

    def _loss_on(self, images, labels, values=None):
        """Training-mode loss, optionally with `values` substituted for the trainable variables."""
        if values is None:
            logits = self.supernet(images, training=True)
        else:
            logits, _ = self.supernet.stateless_call(
                values,
                [v.value for v in self.supernet.non_trainable_variables],
                images,
                training=True,
            )
        return cross_entropy(labels, logits), logits

    def _substituted(self, weight_values, arch_values):
        """Trainable-variable values in `supernet.trainable_variables` order."""
        by_id = {}
        for variable, value in zip(self.supernet.weight_variables, weight_values, strict=True):
            by_id[id(variable)] = value
        for variable, value in zip(self.supernet.arch_variables, arch_values, strict=True):
            by_id[id(variable)] = value
        return [by_id[id(v)] for v in self.supernet.trainable_variables]

    def arch_gradients(self, weight_batch, arch_batch):
        """Gradient of the architecture loss w.r.t. α, β (first or second order).

        Returns (gradients, arch_loss, arch_logits). Second order follows DARTS:
        ∇_α L_val(w', α) − ξ ∇²_{α,w} L_train(w, α) ∇_{w'} L_val(w', α) with
        w' = w − ξ (∇_w L_train + λ w), the Hessian-vector product taken by central
        finite differences with ε = hvp_radius / ‖∇_{w'} L_val‖.
        """
        arch_images, arch_labels = arch_batch
        arch_vars = self.supernet.arch_variables
        if not self.second_order:
            with tf.GradientTape() as tape, architecture_gradients_only():
                loss, logits = self._loss_on(arch_images, arch_labels)
                scaled = scaled_loss(loss, self.arch_optimizer)
            grads = tape.gradient(scaled, arch_vars)
            return unscaled(grads, self.arch_optimizer), loss, logits

        weight_images, weight_labels = weight_batch
        weight_vars = self.supernet.weight_variables
        xi = ops.cast(self.weight_optimizer.learning_rate, "float32")
        arch_values = [v.value for v in arch_vars]
        with tf.GradientTape() as tape:
            train_loss, _ = self._loss_on(weight_images, weight_labels)
        weight_grads = tape.gradient(train_loss, weight_vars)
        unrolled = [
            v.value - xi * (g + self.weight_decay * v.value)
            for v, g in zip(weight_vars, weight_grads, strict=True)
        ]
        with tf.GradientTape() as tape:
            tape.watch(unrolled)
            tape.watch(arch_values)
            loss, logits = self._loss_on(
                arch_images, arch_labels, self._substituted(unrolled, arch_values)
            )
        grads = tape.gradient(loss, arch_values + unrolled)
        arch_grads, unrolled_grads = grads[: len(arch_values)], grads[len(arch_values) :]
        epsilon = self.hvp_radius / (tf.linalg.global_norm(unrolled_grads) + 1e-12)

        def train_arch_grads(sign):
            shifted = [
                v.value + sign * epsilon * g
                for v, g in zip(weight_vars, unrolled_grads, strict=True)
            ]
            with tf.GradientTape() as inner:
                inner.watch(arch_values)
                shifted_loss, _ = self._loss_on(
                    weight_images, weight_labels, self._substituted(shifted, arch_values)
                )
            return inner.gradient(shifted_loss, arch_values)

        plus, minus = train_arch_grads(1.0), train_arch_grads(-1.0)
        gradients = [
            g - xi * (p - m) / (2.0 * epsilon)
            for g, p, m in zip(arch_grads, plus, minus, strict=True)
        ]
        return gradients, loss, logits

    def _arch_step(self, weight_batch, arch_batch):
        grads, loss, logits = self.arch_gradients(weight_batch, arch_batch)
        arch_vars = self.supernet.arch_variables
        scale = replica_scale()
        grads = [
            (g + self.arch_weight_decay * v.value) * scale
            for g, v in zip(grads, arch_vars, strict=True)
        ]
        apply_unscaled(self.arch_optimizer, grads, arch_vars)
        self.arch_loss.update_state(loss)
        self.arch_accuracy.update_state(arch_batch[1], logits)

    def _arch_only(self, data):
        """The architecture step of an iteration (no logs: the weight step's report them)."""
        weight_batch, arch_batch = data
        self._arch_step(weight_batch, arch_batch)
        return {}

    def _weight_only(self, data, arch_step_fraction):
        """The weight step of an iteration on `data[0]`, the weight batch; `arch_step_fraction`:
        1 if it took an architecture step, else 0."""
        self.arch_step_fraction.update_state(arch_step_fraction)
        images, labels = data[0]
        return self.weight_step(
            images, labels, self.supernet.weight_variables, self.weight_optimizer
        )

    def _bilevel_step(self, data, take_arch_step: bool):
        """One iteration as one function of the batch (what `iteration_function` runs)."""
        if take_arch_step:
            self._arch_only(data)
        return self._weight_only(data, 1.0 if take_arch_step else 0.0)

    def fit(self, *args, shuffle=False, **kwargs):
        """Keras `fit()`; the data arrive already shuffled (by seed), so no shuffle here."""
        return super().fit(*args, shuffle=shuffle, **kwargs)

    def train_step(self, data):
        """One iteration with the architecture step (fit() dispatches via the policy)."""
        return self._bilevel_step(data, take_arch_step=True)

    def iteration_function(self):
        """`run(iterator, take_arch_step: bool) -> logs`: one iteration on the iterator's next
        batch, as two traced functions, the architecture step and then the weight step
        (which gets the weight batch alone: the data pipeline leaves the architecture
        batch empty where the policy takes no architecture step).

        Every iteration calls the same weight step, so it is traced once, and no
        `tf.cond` holds an optimizer step (that fails under MirroredStrategy). The
        first iteration with an architecture step runs its first call while the
        weight step is traced (`runtime.call_while_tracing`; not under a strategy).
        """
        arch = self.replica_function(self._arch_only, on_batch=True)
        weight = self.replica_function(self._weight_only, on_batch=True)
        self.traced_steps = (arch, weight)
        fractions = {take: tf.constant(float(take)) for take in (True, False)}  # not per step
        with self.distribute_strategy.scope():
            alone = not tf.distribute.has_strategy()

        def run(iterator, take_arch_step: bool):
            batch = next(iterator)
            weight_part = (batch[0],)  # an empty architecture batch would retrace the step
            if take_arch_step and alone:
                _check_arch_batch(batch)
                call_while_tracing(arch, (batch,), weight, (weight_part, fractions[True]))
            elif take_arch_step:
                arch(batch)
            return weight(weight_part, fractions[take_arch_step])

        return run

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if not (self.weight_optimizer.built and self.arch_optimizer.built):
            raise ValueError(
                "BilevelSearch.build_search(image_shape) must be called after compile() "
                "and before fit(), so that every variable exists before tracing."
            )
        run = self.iteration_function()

        def train_function(iterator):
            if self._next_iteration is None:
                self._next_iteration = int(ops.convert_to_numpy(self.weight_optimizer.iterations))
            iteration = self._next_iteration
            logs = run(iterator, self.policy.should_step(iteration))
            self._next_iteration = iteration + 1
            return logs

        self.train_function = train_function
        return train_function

    def reset_iteration(self):
        """Re-reads the iteration counter from the optimizer (after a restore)."""
        self._next_iteration = None
