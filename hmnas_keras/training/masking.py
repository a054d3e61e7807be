"""Hierarchical masking (paper §3.3, Eq. 3–4, Algorithm 1; DESIGN.md §2).

`MaskedSearch` wraps a trained `Supernet` and gives every α, every β and
every convolution and dense kernel a real-valued mask M^r. The forward pass
uses the binary masks M = H(M^r − τ):

    op weight   = M_α ⊙ softmax(α*)
    edge weight = M_β ⊙ softmax(β*)
    kernel      = M_w ⊙ w*

and the backward pass is straight-through (BinaryConnect): the gradient w.r.t.
M is used as the gradient of M^r. Only the masks train (Adam, one optimizer for
the weight masks, one for the α/β masks); w*, α*, β* stay frozen. Batch
normalisation runs in training mode, so its moving statistics follow the
masked network (they are what the searched network is evaluated with).

Two kinds of weight mask (`weight_mask`):
- "element" (the paper's): one mask per kernel entry;
- "channel": one mask per channel, so that a 0 removes a whole channel and
  the export can drop it. The groups are the stem's output channels, each
  cell's node channels (shared by every node of the cell: the outputs of its
  preprocessing and of every op, and the channels every depthwise kernel
  reading a node works on) and each separable convolution's middle channels
  (`hmnas_keras.architecture.cost.channel_groups`). A channel mask multiplies
  the kernel columns that write the channel and the output of the BN that
  follows, so a masked channel is exactly zero in training and in inference.
  The classifier is not masked: its outputs are the classes; it loses the
  input rows whose channels died.

Beyond the paper, a resource target (`target="params"` or `"flops"`,
`target_count`) adds a Lagrangian term to the objective:

    loss = cross-entropy + λ · (cost / target − 1)

where `cost` is counted from the binary masks in the same forward pass
(`hmnas_keras.architecture.cost.MaskCost`, differentiable through the
straight-through estimator, so it acts on ops, edges, nodes and weights) and
λ follows dual ascent, λ ← λ + η · (cost / target − 1) after every step. λ
may go negative: the target is an equality (a user asking for half the
parameters wants that size, not less), and a run that pruned too much is
pushed back up.

Why a Lagrangian and not a hinge with a fixed λ: the λ a hinge needs depends
on how steep the cross-entropy is in the masks, which differs between
datasets, supernets and budgets, so a fixed λ either overshoots or stops
short; dual ascent raises λ until the constraint holds, with nothing to tune.
Three details make it settle inside a few hundred steps:
- the cost's gradient is rescaled to the largest norm the cross-entropy's
  gradient has had, so λ is dimensionless and λ = 1 weighs the two equally on
  any dataset, also once the cross-entropy's gradient vanishes (a network
  pruned to nothing);
- the target the controller follows falls linearly from the supernet's size
  to the user's over the first `ramp_steps` (half the run, in the mask
  phase), so masks leave in the order the cross-entropy allows instead of all
  at once;
- the step uses λ + clip(cost / target − 1, −1, 1) (a proportional term on
  top of the integral one), which damps the oscillation plain dual ascent
  has;
- with a target, the real-valued masks are clipped to [0, 2·initial value]
  (BinaryConnect's clip), so a mask stays within reach of τ and can follow λ
  back across the threshold instead of drifting far from it.
The cost still oscillates by a few per cent as masks near τ flip from step to
step; `calibrate` lands it on the target at the end of the run.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.architecture.cost import MaskCost, channel_groups, supernet_norms
from hmnas_keras.checkpoint import relative_path
from hmnas_keras.space.maskable import graph_constant
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.trainer import (
    NetworkTrainer,
    apply_unscaled,
    cross_entropy,
    replica_scale,
    scaled_loss,
    unscaled,
)

# λ's dual-ascent step per mask step, for a gap cost/target − 1 of 1.
DUAL_RATE = 0.05
# The proportional part of the multiplier: λ + PROPORTIONAL · (cost/target − 1).
PROPORTIONAL = 1.0


@tf.custom_gradient
def binarize(shifted):
    """Heaviside H(x) = 1 where x >= 0, else 0; the gradient passes straight through.

    Pass a tensor (such as `mask - tau`), not a Keras Variable: a variable
    captured by `tf.custom_gradient` demands a `variables` argument.
    """

    def grad(upstream):
        return upstream

    return tf.cast(shifted >= graph_constant(0.0, shifted.dtype), shifted.dtype), grad


def _variable_name(path: str) -> str:
    """A Keras variable name for the mask of the variable at `path` ('/' is not allowed)."""
    return "mask." + path.split("/", 1)[-1].replace("/", ".")


def _group_name(group: tuple) -> str:
    """A Keras variable name for a channel group: channel_mask.cell_2.3.sep_conv_3x3."""
    parts = [group[0]] if group[0] == "stem" else [f"{group[0]}_{group[1]}", *map(str, group[2:])]
    return "channel_mask." + ".".join(parts)


class MaskedSearch(NetworkTrainer):
    """Trains hierarchical masks on a frozen, built `Supernet` with Keras `fit()`.

    Args:
        supernet: the trained supernet (built). Its layers carry the masks
            (`hmnas_keras.space.maskable`) while this object exists;
            `detach()` removes them.
        threshold: τ of the binariser.
        initial_value: the value every real-valued mask starts at.
        weight_mask: "element" or "channel" (see the module doc).
        target: None, "params" or "flops": the resource the objective targets.
        target_count: the target, in parameters or multiply-accumulates per image.
        ramp_steps: over these first steps the controller's target falls linearly
            from the supernet's dense count to `target_count` (0: from the start).
        dual_rate: η of λ's dual ascent.
    """

    def __init__(
        self,
        supernet: Supernet,
        threshold: float = 5e-3,
        initial_value: float = 1e-2,
        weight_mask: str = "element",
        target: str | None = None,
        target_count: float | None = None,
        ramp_steps: int = 0,
        dual_rate: float = DUAL_RATE,
        proportional: float = PROPORTIONAL,
        **kwargs,
    ):
        if not supernet.built:
            raise ValueError("MaskedSearch needs a built supernet (call it on a batch first).")
        if weight_mask not in ("element", "channel"):
            raise ValueError(
                "Received an invalid weight_mask, expected 'element' or 'channel'. "
                f"Received: {weight_mask!r}"
            )
        if target is not None and not (target in ("params", "flops") and target_count):
            raise ValueError(
                "Received an invalid target, expected 'params' or 'flops' with a positive "
                f"target_count. Received: target={target!r}, target_count={target_count!r}"
            )
        super().__init__(supernet, **kwargs)
        self.threshold = threshold
        self.initial_value = initial_value
        self.weight_mask = weight_mask
        self.target = target
        self.target_count = target_count
        self.ramp_steps = ramp_steps
        self.dual_rate = dual_rate
        self.proportional = proportional
        self._create_masks()
        self.cost = MaskCost(supernet, weight_mask)
        self.multiplier = self.gradient_scale = None
        if target is not None:
            self.gradient_scale, self.multiplier = (
                self.add_weight(
                    shape=(),
                    initializer="zeros",
                    trainable=False,
                    aggregation="only_first_replica",
                    name=name,
                )
                for name in ("cost_gradient_scale", "cost_multiplier")
            )
        self.attach()

    def _create_masks(self) -> None:
        init = keras.initializers.Constant(self.initial_value)
        self.weight_masks, self.channel_masks = {}, {}
        if self.weight_mask == "element":
            for layer in self.kernel_layers:
                self.weight_masks[layer.kernel.path] = self.add_weight(
                    shape=tuple(layer.kernel.shape),
                    initializer=init,
                    name=_variable_name(layer.kernel.path),
                )
        else:
            for group, channels in channel_groups(self.supernet).items():
                self.channel_masks[_group_name(group)] = self.add_weight(
                    shape=(channels,), initializer=init, name=_group_name(group)
                )
        self.alpha_masks, self.beta_masks = {}, {}
        for cell_type, alpha in self.supernet.alphas.items():
            self.alpha_masks[cell_type] = self.add_weight(
                shape=tuple(alpha.shape), initializer=init, name=f"mask_alpha_{cell_type}"
            )
        for cell_type, beta in self.supernet.betas.items():
            self.beta_masks[cell_type] = self.add_weight(
                shape=tuple(beta.shape), initializer=init, name=f"mask_beta_{cell_type}"
            )

    # ---------------------------------------------------------------- masks

    @property
    def kernel_layers(self) -> list:
        """The supernet's layers with maskable kernels, by kernel path (not tracked here)."""
        return sorted(self.supernet.kernel_layers(), key=lambda layer: layer.kernel.path)

    def _binary(self, mask):
        """M = H(M^r − τ), straight-through."""
        return binarize(mask - graph_constant(self.threshold, mask.dtype))

    def channel_vector(self, group: tuple):
        """The binary mask of a channel group; ("cell", i, a, b) is a slice of ("cell", i)."""
        if group[0] == "cell" and len(group) == 4:
            return self.channel_vector(group[:2])[group[2] : group[3]]
        return self._binary(self.channel_masks[_group_name(group)])

    def attach(self):
        """Makes the supernet use the binary masks in its forward pass."""
        if self.weight_mask == "element":
            for layer in self.kernel_layers:
                mask = self.weight_masks[layer.kernel.path]
                layer.set_kernel_mask(lambda mask=mask: self._binary(mask))
        else:
            for kernel in self.cost.kernels:
                if kernel.kind == "depthwise":
                    shape, group = (1, 1, -1, 1), kernel.rows
                elif kernel.kind == "conv":
                    shape, group = (1, 1, 1, -1), kernel.cols
                else:
                    continue  # the classifier: its outputs are the classes
                kernel.layer.set_kernel_mask(
                    lambda group=group, shape=shape: ops.reshape(self.channel_vector(group), shape)
                )
            for norm, group in supernet_norms(self.supernet):
                norm.set_output_mask(lambda group=group: self.channel_vector(group))
        self.supernet.set_arch_masks(self._arch_masks)

    def detach(self):
        """Removes the masks: the supernet computes its unmasked function again."""
        for layer in self.kernel_layers:
            layer.set_kernel_mask(None)
        for norm, _ in supernet_norms(self.supernet):
            norm.set_output_mask(None)
        self.supernet.set_arch_masks(None)

    def _arch_masks(self, cell_type):
        alpha = self._binary(self.alpha_masks[cell_type])
        beta = self.beta_masks.get(cell_type)
        return alpha, None if beta is None else self._binary(beta)

    @property
    def weight_mask_variables(self) -> list:
        """The masks of the network weights: element masks, or channel masks."""
        return list(self.weight_masks.values()) + list(self.channel_masks.values())

    @property
    def arch_mask_variables(self) -> list:
        return list(self.alpha_masks.values()) + list(self.beta_masks.values())

    def _masks(self, binary) -> dict:
        """Every mask through `binary`, in the form `MaskCost` takes (relative kernel paths)."""
        masks = {
            "alpha": {t: binary(v) for t, v in self.alpha_masks.items()},
            "beta": {t: binary(v) for t, v in self.beta_masks.items()},
            "weights": {relative_path(p): binary(v) for p, v in self.weight_masks.items()},
        }
        if self.weight_mask == "channel":
            groups = channel_groups(self.supernet)
            masks["channels"] = {g: binary(self.channel_masks[_group_name(g)]) for g in groups}
        return masks

    def binary_masks(self) -> dict:
        """The binary masks as numpy booleans: {"alpha": {type: [E, K]}, "beta": ...,
        "weights": {kernel path: kernel-shaped} (supernet paths; element masks), and with
        channel masks "channels": {group: [channels]}}."""

        def binary(variable):
            return ops.convert_to_numpy(variable) >= self.threshold

        masks = self._masks(binary)
        masks["weights"] = {path: binary(v) for path, v in self.weight_masks.items()}
        return masks

    def counted_cost(self, shift: float = 0.0) -> dict:
        """{"params", "flops"} of the network the current binary masks derive (numbers).

        `shift` is subtracted from the weight (or channel) masks before they are
        binarised: what `calibrate` searches over.
        """
        weight_masks = set(map(id, self.weight_mask_variables))

        def binary(variable):
            value = ops.convert_to_numpy(variable)
            if id(variable) in weight_masks:
                value = value - shift
            return (value >= self.threshold).astype("float32")

        cost = self.cost(self._masks(binary))
        return {kind: float(ops.convert_to_numpy(value)) for kind, value in cost.items()}

    def calibrate(self, tolerance: float, iterations: int = 24) -> dict | None:
        """Lands the cost on the target at the end of a run (None without a target).

        The controller leaves the cost oscillating around the target by a few
        per cent, as masks near τ flip from step to step. If the cost is more
        than tolerance / 2 off, this finds by bisection the one shift of every
        weight (or channel) mask that brings it closest to the target (the cost
        falls monotonically as the shift grows: a mask only removes) and
        applies it, so only the masks nearest τ — the least decided ones —
        change sides. A shift that cannot bring the cost within `tolerance`
        (a target below what the α/β masks keep, say) is not applied.
        Returns {"shift", "ratio_before", "ratio_after", "applied"}.
        """
        if self.target is None:
            return None

        def ratio(shift):
            return self.counted_cost(shift)[self.target] / self.target_count

        before = ratio(0.0)
        result = {"shift": 0.0, "ratio_before": before, "ratio_after": before, "applied": False}
        if abs(before - 1.0) <= tolerance / 2:
            return result
        values = np.concatenate(
            [ops.convert_to_numpy(v).ravel() for v in self.weight_mask_variables]
        )
        # Every mask on at `low`, every mask off at `high`.
        low, high = float(values.min()) - self.threshold, float(values.max()) - self.threshold
        best = (abs(before - 1.0), 0.0, before)
        for _ in range(iterations):
            middle = 0.5 * (low + high)
            reached = ratio(middle)
            best = min(best, (abs(reached - 1.0), middle, reached))
            if reached > 1.0:
                low = middle
            else:
                high = middle
        _, shift, reached = best
        if abs(reached - 1.0) <= tolerance and shift != 0.0:
            for variable in self.weight_mask_variables:
                variable.assign(variable - shift)
            result.update(shift=shift, ratio_after=ratio(0.0), applied=True)
        return result

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
            + ([self.multiplier, self.gradient_scale] if self.multiplier is not None else [])
            + self.optimizer_variables
            + list(self.metrics_variables)
        )

    def cost_ratio(self):
        """cost / target of the current binary masks, with its straight-through gradient."""
        return self.cost(self._masks(self._binary))[self.target] / self.target_count

    def ramped_target(self):
        """The controller's target at this step: from the dense count down to the target.

        Asking for the whole reduction at once makes every mask cross τ in the
        same few steps (Adam moves each by about its learning rate, whatever its
        gradient) and the network collapse; a target that falls gradually, as
        in gradual magnitude pruning, lets the cross-entropy decide which go first.
        """
        if not self.ramp_steps:
            return self.target_count
        done = ops.cast(self.weight_mask_optimizer.iterations, "float32") / self.ramp_steps
        dense = float(self.cost.dense()[self.target])
        return dense + (self.target_count - dense) * ops.minimum(done, 1.0)

    def train_step(self, data):
        images, labels = data
        variables = self.weight_mask_variables + self.arch_mask_variables
        with tf.GradientTape(persistent=self.target is not None) as tape:
            logits = self.supernet(images, training=True)
            loss = cross_entropy(labels, logits)
            scaled = scaled_loss(loss, self.weight_mask_optimizer)
            if self.target is not None:
                ratio = self.cost_ratio()
        grads = _dense(tape.gradient(scaled, variables), variables)
        grads = unscaled(grads, self.weight_mask_optimizer)
        if self.target is not None:
            cost_grads = _dense(tape.gradient(ratio, variables), variables)
            # λ is dimensionless: the cost's gradient is rescaled to the largest norm
            # the cross-entropy's gradient has had, so that λ = 1 weighs them equally
            # on any dataset, and the cost term stays as strong where the cross-entropy's
            # gradient vanishes (a network pruned to nothing must be pushed back up).
            norm = tf.linalg.global_norm(grads)  # not finite: a step mixed precision skips
            norm = tf.where(tf.math.is_finite(norm), norm, tf.zeros_like(norm))
            scale = ops.maximum(self.gradient_scale, norm)
            self.gradient_scale.assign(scale)
            balance = scale / (tf.linalg.global_norm(cost_grads) + 1e-12)
            gap = ratio * self.target_count / self.ramped_target() - 1.0
            weight = self.multiplier + self.proportional * ops.clip(gap, -1.0, 1.0)
            grads = [g + weight * balance * c for g, c in zip(grads, cost_grads, strict=True)]
        self.apply_mask_gradients(grads)
        logs = self.update_metrics(loss, labels, logits)
        if self.target is not None:
            self.multiplier.assign(self.multiplier + self.dual_rate * gap)
            logs.update(cost_ratio=ratio, multiplier=self.multiplier.value)
        return logs

    def apply_mask_gradients(self, grads) -> None:
        """One step of both mask optimizers (`grads` in weight-mask, then α/β-mask order)."""
        # The optimizers sum what each replica passes: hand them 1/replicas of it.
        scale = replica_scale()
        weight_masks, arch_masks = self.weight_mask_variables, self.arch_mask_variables
        if scale != 1.0:  # not a product per mask for nothing
            grads = [g * scale for g in grads]
        apply_unscaled(self.weight_mask_optimizer, grads[: len(weight_masks)], weight_masks)
        if arch_masks:
            apply_unscaled(self.arch_mask_optimizer, grads[len(weight_masks) :], arch_masks)
        if self.target is not None:
            # BinaryConnect's clip: a real-valued mask stays within reach of τ, so that
            # the masks can follow λ both ways instead of drifting far from the threshold.
            for variable in weight_masks + arch_masks:
                variable.assign(ops.clip(variable, 0.0, 2.0 * self.initial_value))


def _dense(grads, variables) -> list:
    """Gradients with zeros for the variables that got none."""
    return [ops.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)]


def weight_mask_counts(binary_weight_masks: dict) -> tuple[int, int]:
    """(kept, total) entries of the weight masks."""
    kept = sum(int(np.count_nonzero(m)) for m in binary_weight_masks.values())
    total = sum(int(m.size) for m in binary_weight_masks.values())
    return kept, total
