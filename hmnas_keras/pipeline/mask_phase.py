"""The hierarchical masking phase (paper §3.3, §4.2): masks train, the supernet is frozen.

Starts from the trained supernet (`WORKDIR/supernet/checkpoint.npz` or
`--supernet_checkpoint`) and trains the masks on the whole training split.
Artifacts under `WORKDIR/mask/` (see `hmnas_keras.pipeline.phase` for the common ones):
- `checkpoint.npz`: supernet variables (w*, α*, β*, BN statistics), masks,
  both optimizers' state, metric accumulators, epoch and step;
- `metrics.csv`: per epoch the masked network's loss and accuracy, how many
  ops, edges, nodes and weights (or channels) are still alive, the parameters
  and FLOPs of the network the masks derive, and with a resource target the
  target, cost / target and λ;
- `weight_masks.npz`: the final binary weight masks (element masks);
- `summary.json`: test accuracy, what is alive, the effective mask learning
  rates and, with a target, the cost reached.
At the end the architecture is derived from the binary masks
(`WORKDIR/architecture.json`) and the searched network is measured
(`WORKDIR/searched.json`).
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from hmnas_keras.architecture.architecture_json import summary_counts
from hmnas_keras.architecture.cost import MaskCost
from hmnas_keras.architecture.derivation import derive_cell
from hmnas_keras.checkpoint import checkpoint_reading, read_state, write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.distributed import evaluation_data
from hmnas_keras.pipeline.derive_phase import (
    build_supernet,
    derive_architecture,
    write_searched_summary,
)
from hmnas_keras.pipeline.phase import Phase, run_phase, test_columns
from hmnas_keras.pipeline.workdir import Workdir, read_json
from hmnas_keras.training.masking import MaskedSearch, weight_mask_counts
from hmnas_keras.training.trainer import mixed_precision_optimizer

CSV_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "ops",
    "edges",
    "nodes",
    "weights",
    "weights_total",
    "channels",
    "channels_total",
    "params",
    "flops",
    "target",
    "cost_ratio",
    "multiplier",
    "weight_mask_learning_rate",
    "arch_mask_learning_rate",
    "seconds",
)
# A run ends on its target if the cost it reached is within this fraction of it.
TARGET_TOLERANCE = 0.05
# The controller's target reaches the user's after this fraction of the mask steps.
RAMP_FRACTION = 0.5


class MaskTargetError(ValueError):
    """A resource target or mask kind that this supernet or checkpoint cannot take."""


def resolve_target(mask, cost: MaskCost) -> float | None:
    """The target in parameters or MACs per image (None without a target).

    Raises MaskTargetError if it exceeds the supernet's dense count.
    """
    if mask.target == "none":
        return None
    dense = cost.dense()[mask.target]
    if mask.target_ratio is not None:
        count = mask.target_ratio * dense
    else:
        count = mask.target_value * (1e6 if mask.target == "flops" else 1.0)
    if count > dense:
        unit = "MFLOPs" if mask.target == "flops" else "parameters"
        scale = 1e6 if mask.target == "flops" else 1.0
        raise MaskTargetError(
            f"--mask_target_value={mask.target_value:g} {unit} is larger than the supernet "
            f"({dense / scale:,.6g} {unit}): there is nothing to prune toward it. Give a smaller "
            "value, or --mask_target_ratio in (0, 1]."
        )
    return count


def checkpoint_mask_kind(path: str) -> str | None:
    """ "element" or "channel" if the checkpoint at `path` holds masks, else None."""
    with checkpoint_reading(path), np.load(path) as archive:
        paths = json.loads(str(archive["__paths__"]))
    if any("/channel_mask." in p for p in paths):
        return "channel"
    if any("/mask." in p for p in paths):
        return "element"
    return None


def _check_mask_kind(workdir: Workdir, config: RunConfig) -> None:
    """Refuses a mask checkpoint (resumed, or given as the supernet) of the other kind."""
    wanted = config.mask.weight_mask
    for path in (workdir.mask.checkpoint, workdir.trained_supernet):
        if not os.path.exists(path):
            continue
        kind = checkpoint_mask_kind(path)  # CheckpointError, with what to do, if damaged
        if kind is not None and kind != wanted:
            raise MaskTargetError(
                f"--weight_mask={wanted} on a mask checkpoint trained with {kind} masks "
                f"({path}). Masks of one kind cannot continue as the other: use "
                f"--weight_mask={kind}, or start the mask phase from the trained supernet "
                "(supernet/checkpoint.npz) in a new workdir."
            )


def check_mask_settings(config: RunConfig, data: SearchData, workdir: Workdir) -> None:
    """Refuses, before any training, a target or mask kind the mask phase could not take.

    The target is resolved on an untrained supernet of the run's shape (its
    dense counts do not depend on the weights), so a target larger than the
    supernet is refused before the supernet phase spends its epochs.
    """
    _check_mask_kind(workdir, config)
    if config.mask.initial_value < config.mask.threshold:
        print(
            f"Warning: --mask_initial_value={config.mask.initial_value:g} is below "
            f"--mask_threshold={config.mask.threshold:g}: every mask starts pruned (the "
            "network starts empty). Raise it above the threshold unless that is intended.",
            flush=True,
        )
    if config.mask.target != "none":
        resolve_target(config.mask, MaskCost(build_supernet(config, data), config.mask.weight_mask))


def _schedule(learning_rate: float, config, steps_per_epoch: int):
    boundary = config.decay_epochs * steps_per_epoch
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [boundary], [learning_rate, learning_rate * config.decay_factor]
    )


def learning_rates(config: RunConfig, data: SearchData) -> dict:
    """The mask learning rates this run uses (see `MaskConfig.lr_schedule`)."""
    mask = config.mask
    steps = mask.epochs * data.train_steps_per_epoch
    weight, arch = mask.effective_learning_rates(steps)
    return {
        "schedule": mask.lr_schedule,
        "steps": steps,
        "factor": round(weight / mask.weight_learning_rate, 6),
        "weight_masks": weight,
        "arch_masks": arch,
    }


def build_masked_search(config: RunConfig, data: SearchData, supernet_arrays: dict):
    """The compiled, built MaskedSearch on the trained supernet (call inside a strategy scope)."""
    mask = config.mask
    keras.utils.set_random_seed(config.seed)
    supernet = build_supernet(config, data, supernet_arrays)
    target_count = resolve_target(mask, MaskCost(supernet, mask.weight_mask))
    masked = MaskedSearch(
        supernet,
        threshold=mask.threshold,
        initial_value=mask.initial_value,
        weight_mask=mask.weight_mask,
        target=None if target_count is None else mask.target,
        target_count=target_count,
        ramp_steps=int(RAMP_FRACTION * mask.epochs * data.train_steps_per_epoch),
        name="masked_search",
    )
    rates = learning_rates(config, data)
    steps = data.train_steps_per_epoch
    masked.compile(
        weight_mask_optimizer=mixed_precision_optimizer(
            keras.optimizers.Adam(
                _schedule(rates["weight_masks"], mask, steps), name="weight_mask_optimizer"
            ),
            config.mixed_precision,
        ),
        arch_mask_optimizer=mixed_precision_optimizer(
            keras.optimizers.Adam(
                _schedule(rates["arch_masks"], mask, steps), name="arch_mask_optimizer"
            ),
            config.mixed_precision,
        ),
        jit_compile=config.jit_compile,
    )
    masked.build_masks()
    return masked


def alive_counts(config: RunConfig, binary_masks: dict) -> dict:
    """How many ops, edges, nodes and weights the binary masks keep."""
    space = config.search_space
    cells = {}
    for cell_type, alpha_mask in binary_masks["alpha"].items():
        num_edges = len(alpha_mask)
        cells[cell_type] = derive_cell(
            space.op_names,
            space.num_nodes,
            np.zeros(alpha_mask.shape),
            np.zeros(num_edges),
            alpha_mask,
            binary_masks["beta"].get(cell_type),
        )
    counts = summary_counts({"search_space": {"num_nodes": space.num_nodes}, "cells": cells})
    kept, total = weight_mask_counts(binary_masks["weights"])
    counts.update(weights=kept, weights_total=total)
    if "channels" in binary_masks:
        kept, total = weight_mask_counts(binary_masks["channels"])
        counts.update(channels=kept, channels_total=total)
    return counts


def alive_line(counts: dict) -> str:
    weights = (
        f"{counts['channels']:,}/{counts['channels_total']:,} channels"
        if "channels" in counts
        else f"{counts['weights']:,}/{counts['weights_total']:,} weights"
    )
    return (
        f"{counts['ops']}/{counts['ops_total']} ops, {counts['edges']}/{counts['edges_total']} "
        f"edges, {counts['nodes']}/{counts['nodes_total']} nodes, {weights}"
    )


def _write_scalars(writer, epoch: int, values: dict) -> None:
    with writer.as_default():
        for name, value in values.items():
            tf.summary.scalar(name, value, step=epoch + 1)
    writer.flush()


def _row(config: RunConfig, masked: MaskedSearch, files):
    # The cost, target and λ of each epoch, beside Keras' own train/ and validation/ logs.
    writer = tf.summary.create_file_writer(files.tensorboard_run("cost"))

    def row(epoch, logs):
        counts = alive_counts(config, masked.binary_masks())
        cost = masked.counted_cost()
        line = f"Masks after epoch {epoch + 1}: {alive_line(counts)} alive"
        line += f"; {cost['params']:,.0f} parameters, {cost['flops'] / 1e6:.2f} MFLOPs"
        target = {}
        if masked.target is not None:
            ratio = cost[masked.target] / masked.target_count
            target = {
                "target": masked.target_count,
                "cost_ratio": round(ratio, 6),
                "multiplier": float(keras.ops.convert_to_numpy(masked.multiplier)),
            }
            line += f" ({ratio:.3f} of the {masked.target} target, λ {target['multiplier']:.4g})"
        print(line, flush=True)
        scalars = {"params": cost["params"], "mflops": cost["flops"] / 1e6}
        if target:
            scalars.update(target=target["target"], cost_ratio=target["cost_ratio"])
            scalars["lambda"] = target["multiplier"]
        _write_scalars(writer, epoch, scalars)
        return {
            **test_columns(logs),
            **{k: counts.get(k) for k in CSV_COLUMNS if k in counts},
            "params": cost["params"],
            "flops": cost["flops"],
            **target,
            "weight_mask_learning_rate": float(masked.weight_mask_optimizer.learning_rate),
            "arch_mask_learning_rate": float(masked.arch_mask_optimizer.learning_rate),
        }

    return row


def _finished_summary(workdir: Workdir, config: RunConfig) -> dict | None:
    """The summary of a mask phase that already finished and derived, or None."""
    done = (workdir.mask.checkpoint, workdir.mask.summary, workdir.architecture)
    if all(os.path.exists(p) for p in done) and read_state(workdir.mask.checkpoint)["finished"]:
        print(f"The mask phase already finished its {config.mask.epochs} epochs and was derived.")
        return read_json(workdir.mask.summary)
    return None


def target_summary(masked: MaskedSearch, mask, calibration: dict | None) -> dict | None:
    """What the run aimed at and what it reached (None without a target)."""
    if masked.target is None:
        return None
    reached = masked.counted_cost()[masked.target]
    dense = masked.cost.dense()[masked.target]
    error = reached / masked.target_count - 1.0
    return {
        "kind": masked.target,
        "ratio": mask.target_ratio,
        "value": mask.target_value,
        "count": masked.target_count,
        "supernet": dense,
        "reached": reached,
        "reached_ratio": round(reached / dense, 6),
        "relative_error": round(error, 6),
        "within_tolerance": abs(error) <= TARGET_TOLERANCE,
        "tolerance": TARGET_TOLERANCE,
        "multiplier": float(keras.ops.convert_to_numpy(masked.multiplier)),
        "calibration": calibration,
    }


def _report_target(target: dict) -> None:
    if target is None:
        return
    unit, scale = ("MFLOPs", 1e6) if target["kind"] == "flops" else ("parameters", 1.0)
    line = (
        f"Target: {target['count'] / scale:,.6g} {unit}; reached {target['reached'] / scale:,.6g}"
        f" ({target['reached_ratio']:.1%} of the supernet, {target['relative_error']:+.1%} off)."
    )
    if not target["within_tolerance"]:
        line += (
            f" That is more than {target['tolerance']:.0%} from the target: the masks could not "
            "reach it in this budget (what cannot be pruned: the stem, the classifier, one op "
            "per node), or need more mask epochs."
        )
    print(line, flush=True)


def _derive(config, data, workdir, masked) -> dict:
    """Derives from the masked supernet: w* with the BN statistics of the masked network."""
    started = time.monotonic()
    binary_masks = masked.binary_masks()
    masked.detach()
    architecture, network = derive_architecture(
        config, data, workdir, masked.supernet, binary_masks=binary_masks
    )
    write_searched_summary(
        workdir, architecture, network, data, inherited=True, seconds=time.monotonic() - started
    )
    return architecture


def run_mask_phase(
    config: RunConfig,
    data: SearchData,
    workdir: Workdir,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int | None = None,
) -> dict:
    """Trains the masks (resuming if a checkpoint exists), derives and measures the network."""
    finished = _finished_summary(workdir, config)
    if finished is not None:
        return finished
    _check_mask_kind(workdir, config)
    strategy = strategy or tf.distribute.get_strategy()
    mask = config.mask
    arrays = workdir.supernet_arrays("a trained supernet to mask")
    with strategy.scope():
        masked = build_masked_search(config, data, arrays)
    rates = learning_rates(config, data)
    print(
        f"Mask learning rates ({rates['schedule']}, {rates['steps']} steps): weight masks "
        f"{rates['weight_masks']:.3g}, α/β masks {rates['arch_masks']:.3g}"
    )
    test_data = data.test_dataset()
    phase = Phase(
        name="mask",
        files=workdir.mask,
        model=masked,
        state_variables=masked.state_variables,
        epochs=mask.epochs,
        steps_per_epoch=data.train_steps_per_epoch,
        dataset=data.train_dataset,
        columns=CSV_COLUMNS,
        row=_row(config, masked, workdir.mask),
        test_data=test_data,
        test_every=mask.test_every,
        checkpoint_every_steps=mask.checkpoint_every_steps,
        diverged_hint="Lower --mask_weight_learning_rate and --mask_arch_learning_rate",
    )
    state = run_phase(phase, verbose)
    calibration = masked.calibrate(TARGET_TOLERANCE)
    if calibration and calibration["applied"]:
        print(
            f"Target calibration: cost {calibration['ratio_before']:.3f} of the target after "
            f"training; shifting the weight masks by {calibration['shift']:.3g} gives "
            f"{calibration['ratio_after']:.3f}."
        )
    test = masked.evaluate(**evaluation_data(strategy, test_data), verbose=0, return_dict=True)
    summary = {
        "epochs": mask.epochs,
        "steps": rates["steps"],
        "weight_mask": mask.weight_mask,
        "learning_rates": rates,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "alive": alive_counts(config, masked.binary_masks()),
        "target": target_summary(masked, mask, calibration),
        "wall_seconds": round(state["elapsed_seconds"], 2),
    }
    _report_target(summary["target"])
    summary["architecture"] = _derive(config, data, workdir, masked)["counts"]
    # Written last: its presence says that the phase and the derivation are complete.
    write_json(workdir.mask.summary, summary)
    return summary
