"""Bilevel supernet training driven by Keras `fit()` (paper §3.2, Algorithm 1).

`BilevelSearch` wraps a `Supernet`. Each training element is a pair of batches
`((weight_images, weight_labels), (arch_images, arch_labels))`. An iteration
first (optionally) updates α, β on the architecture batch with the arch
optimizer, then updates the network weights on the weight batch.

Whether an iteration takes the architecture step is decided on the host by an
`ArchStepPolicy` (warm-up, then probability σ(t) drawn from a generator seeded
by (seed, iteration)), and the iteration runs one of two traced functions: one
with the architecture step, one without. An optimizer step inside `tf.cond`
fails under `MirroredStrategy`, and a zero gradient would still move Adam.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.supernet import Supernet
from hmnas_keras.trainer import cross_entropy

SCHEDULES = ("constant", "linear", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class ArchStepSchedule:
    """σ(t): the probability of an architecture step t iterations after warm-up.

    σ(0) = 1 and σ is non-increasing:
    - constant: 1 forever;
    - linear: from 1 down to `final_prob` over `decay_steps`, then flat;
    - cosine: half a cosine from 1 down to `final_prob` over `decay_steps`;
    - step: 1 for `decay_steps` iterations, then `final_prob`.
    """

    kind: str = "constant"
    final_prob: float = 0.0
    decay_steps: int = 1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"Received an unknown schedule, expected one of {', '.join(SCHEDULES)}. "
                f"Received: kind={self.kind!r}"
            )
        if not 0.0 <= self.final_prob <= 1.0:
            raise ValueError(
                "Received an invalid final_prob, expected a probability in [0, 1]. "
                f"Received: final_prob={self.final_prob}"
            )
        if self.decay_steps < 1:
            raise ValueError(
                "Received an invalid decay_steps, expected a positive integer. "
                f"Received: decay_steps={self.decay_steps}"
            )

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return 1.0
        progress = min(max(t, 0), self.decay_steps) / self.decay_steps
        if self.kind == "linear":
            return 1.0 - (1.0 - self.final_prob) * progress
        if self.kind == "cosine":
            return self.final_prob + (1.0 - self.final_prob) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        return 1.0 if t < self.decay_steps else self.final_prob


@dataclasses.dataclass(frozen=True)
class ArchStepPolicy:
    """Decides, for a global iteration, whether α and β are updated.

    Stateless: the decision for iteration i depends only on (seed, i), so a
    resumed run takes exactly the same decisions as an uninterrupted one.
    """

    warmup_steps: int = 0
    schedule: ArchStepSchedule = ArchStepSchedule()
    seed: int = 0

    def probability(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return 0.0
        return self.schedule(iteration - self.warmup_steps)

    def should_step(self, iteration: int) -> bool:
        probability = self.probability(iteration)
        if probability >= 1.0:
            return True
        if probability <= 0.0:
            return False
        return bool(np.random.default_rng([self.seed, iteration]).random() < probability)


def _global_gradients(grads):
    """Sums per-replica gradients, so that clipping sees the whole batch's gradient."""
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    return grads


def apply_weight_gradients(optimizer, grads, variables, weight_decay, grad_clip_norm):
    """One SGD-style update as in DARTS: global-norm clip, coupled L2 decay, apply.

    Under a distribution strategy the per-replica gradients are summed first,
    so that the clip sees the global gradient; the optimizer then sums what each
    replica passes, so each hands it 1/replicas of the total.
    """
    scale = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
    grads = [g * scale for g in _global_gradients(grads)]
    if grad_clip_norm > 0:
        grads, _ = tf.clip_by_global_norm(grads, grad_clip_norm)
    grads = [(g + weight_decay * v.value) * scale for g, v in zip(grads, variables, strict=True)]
    optimizer.apply(grads, variables)


class BilevelSearch(keras.Model):
    """Trains a `Supernet`'s weights and architecture parameters in a bilevel way.

    Args:
        supernet: the network to train.
        policy: when to take the architecture step.
        second_order: use DARTS' unrolled architecture gradient.
        weight_decay: L2 decay added to the weight gradients (coupled, as in
            PyTorch's SGD).
        arch_weight_decay: L2 decay added to the α/β gradients.
        grad_clip_norm: global-norm clip of the weight gradients (0 disables).
        hvp_radius: the second-order finite-difference step is
            hvp_radius / ‖∇_{w'} L_val‖ (DARTS uses 0.01).
    """

    def __init__(
        self,
        supernet: Supernet,
        policy: ArchStepPolicy = ArchStepPolicy(),
        second_order: bool = False,
        weight_decay: float = 3e-4,
        arch_weight_decay: float = 1e-3,
        grad_clip_norm: float = 5.0,
        hvp_radius: float = 0.01,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.supernet = supernet
        self.policy = policy
        self.second_order = second_order
        self.weight_decay = weight_decay
        self.arch_weight_decay = arch_weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.hvp_radius = hvp_radius
        self.weight_loss = keras.metrics.Mean(name="loss")
        self.weight_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self.arch_loss = keras.metrics.Mean(name="arch_loss")
        self.arch_accuracy = keras.metrics.SparseCategoricalAccuracy(name="arch_accuracy")
        self.arch_step_fraction = keras.metrics.Mean(name="arch_step_fraction")
        self._next_iteration = None

    def call(self, images, training=None):
        return self.supernet(images, training=training)

    @property
    def metrics(self):
        return [
            self.weight_loss,
            self.weight_accuracy,
            self.arch_loss,
            self.arch_accuracy,
            self.arch_step_fraction,
        ]

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
        self.built = True

    @property
    def optimizer_variables(self) -> list:
        return list(self.weight_optimizer.variables) + list(self.arch_optimizer.variables)

    # ------------------------------------------------------------------ steps

    def _replica_scale(self):
        return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync

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
            with tf.GradientTape() as tape:
                loss, logits = self._loss_on(arch_images, arch_labels)
            return tape.gradient(loss, arch_vars), loss, logits

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
        scale = self._replica_scale()
        grads = [
            (g + self.arch_weight_decay * v.value) * scale
            for g, v in zip(grads, arch_vars, strict=True)
        ]
        self.arch_optimizer.apply(grads, arch_vars)
        self.arch_loss.update_state(loss)
        self.arch_accuracy.update_state(arch_batch[1], logits)

    def _weight_step(self, weight_batch):
        images, labels = weight_batch
        weight_vars = self.supernet.weight_variables
        with tf.GradientTape() as tape:
            loss, logits = self._loss_on(images, labels)
        apply_weight_gradients(
            self.weight_optimizer,
            tape.gradient(loss, weight_vars),
            weight_vars,
            self.weight_decay,
            self.grad_clip_norm,
        )
        self.weight_loss.update_state(loss)
        self.weight_accuracy.update_state(labels, logits)

    def _bilevel_step(self, data, take_arch_step: bool):
        weight_batch, arch_batch = data
        if take_arch_step:
            self._arch_step(weight_batch, arch_batch)
        self._weight_step(weight_batch)
        self.arch_step_fraction.update_state(1.0 if take_arch_step else 0.0)
        return {m.name: m.result() for m in self.metrics}

    def fit(self, *args, shuffle=False, **kwargs):
        """Keras `fit()`; the data arrive already shuffled (by seed), so no shuffle here."""
        return super().fit(*args, shuffle=shuffle, **kwargs)

    def train_step(self, data):
        """One iteration with the architecture step (fit() dispatches via the policy)."""
        return self._bilevel_step(data, take_arch_step=True)

    def test_step(self, data):
        images, labels = data
        logits = self.supernet(images, training=False)
        self.weight_loss.update_state(cross_entropy(labels, logits))
        self.weight_accuracy.update_state(labels, logits)
        return {"loss": self.weight_loss.result(), "accuracy": self.weight_accuracy.result()}

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if not (self.weight_optimizer.built and self.arch_optimizer.built):
            raise ValueError(
                "BilevelSearch.build_search(image_shape) must be called after compile() "
                "and before fit(), so that every variable exists before tracing."
            )
        with_arch = self._make_function(lambda data: self._bilevel_step(data, True))
        weights_only = self._make_function(lambda data: self._bilevel_step(data, False))

        def train_function(iterator):
            if self._next_iteration is None:
                self._next_iteration = int(ops.convert_to_numpy(self.weight_optimizer.iterations))
            iteration = self._next_iteration
            step = with_arch if self.policy.should_step(iteration) else weights_only
            logs = step(iterator)
            self._next_iteration = iteration + 1
            return logs

        self.train_function = train_function
        return train_function

    def reset_iteration(self):
        """Re-reads the iteration counter from the optimizer (after a restore)."""
        self._next_iteration = None
