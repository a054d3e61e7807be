"""The hierarchical masking phase (paper §3.3, §4.2): masks train, the supernet is frozen.

Starts from the trained supernet (`WORKDIR/supernet/checkpoint.npz` or
`--supernet_checkpoint`) and trains the masks on the whole training split.
Artifacts under `WORKDIR/mask/` (see `hmnas_keras.pipeline.phase` for the common ones):
- `checkpoint.npz`: supernet variables (w*, α*, β*, BN statistics), masks,
  both optimizers' state, metric accumulators, epoch and step;
- `metrics.csv`: per epoch the masked network's loss and accuracy, and how many
  ops, edges, nodes and weights are still alive;
- `weight_masks.npz`: the final binary weight masks;
- `summary.json`.
At the end the architecture is derived from the binary masks
(`WORKDIR/architecture.json`) and the searched network is measured
(`WORKDIR/searched.json`).
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf

from hmnas_keras.architecture.architecture_json import summary_counts
from hmnas_keras.architecture.derivation import derive_cell
from hmnas_keras.checkpoint import read_state, write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.pipeline.derive_phase import (
    build_supernet,
    derive_architecture,
    write_searched_summary,
)
from hmnas_keras.pipeline.phase import Phase, run_phase, test_columns
from hmnas_keras.pipeline.workdir import Workdir, read_json
from hmnas_keras.training.masking import MaskedSearch, weight_mask_counts

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
    "weight_mask_learning_rate",
    "arch_mask_learning_rate",
    "seconds",
)


def _schedule(learning_rate: float, config, steps_per_epoch: int):
    boundary = config.decay_epochs * steps_per_epoch
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [boundary], [learning_rate, learning_rate * config.decay_factor]
    )


def build_masked_search(config: RunConfig, data: SearchData, supernet_arrays: dict):
    """The compiled, built MaskedSearch on the trained supernet (call inside a strategy scope)."""
    mask = config.mask
    keras.utils.set_random_seed(config.seed)
    supernet = build_supernet(config, data, supernet_arrays)
    masked = MaskedSearch(
        supernet, threshold=mask.threshold, initial_value=mask.initial_value, name="masked_search"
    )
    steps = data.train_steps_per_epoch
    masked.compile(
        weight_mask_optimizer=keras.optimizers.Adam(
            _schedule(mask.weight_learning_rate, mask, steps), name="weight_mask_optimizer"
        ),
        arch_mask_optimizer=keras.optimizers.Adam(
            _schedule(mask.arch_learning_rate, mask, steps), name="arch_mask_optimizer"
        ),
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
    return counts


def _row(config: RunConfig, masked: MaskedSearch):
    def row(epoch, logs):
        counts = alive_counts(config, masked.binary_masks())
        print(
            f"Masks after epoch {epoch + 1}: {counts['ops']}/{counts['ops_total']} ops, "
            f"{counts['edges']}/{counts['edges_total']} edges, "
            f"{counts['nodes']}/{counts['nodes_total']} nodes, "
            f"{counts['weights']:,}/{counts['weights_total']:,} weights alive",
            flush=True,
        )
        return {
            **test_columns(logs),
            "ops": counts["ops"],
            "edges": counts["edges"],
            "nodes": counts["nodes"],
            "weights": counts["weights"],
            "weights_total": counts["weights_total"],
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
    strategy = strategy or tf.distribute.get_strategy()
    mask = config.mask
    arrays = workdir.supernet_arrays("a trained supernet to mask")
    with strategy.scope():
        masked = build_masked_search(config, data, arrays)
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
        row=_row(config, masked),
        test_data=test_data,
        test_every=mask.test_every,
        checkpoint_every_steps=mask.checkpoint_every_steps,
        diverged_hint="Lower --mask_weight_learning_rate and --mask_arch_learning_rate",
    )
    state = run_phase(phase, verbose)
    test = masked.evaluate(test_data, verbose=0, return_dict=True)
    binary_masks = masked.binary_masks()
    summary = {
        "epochs": mask.epochs,
        "steps": mask.epochs * data.train_steps_per_epoch,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "alive": alive_counts(config, binary_masks),
        "wall_seconds": round(state["elapsed_seconds"], 2),
    }

    # Derive from the masked supernet: w* with the BN statistics of the masked network.
    started = time.monotonic()
    masked.detach()
    architecture, network = derive_architecture(
        config, data, workdir, masked.supernet, binary_masks=binary_masks
    )
    write_searched_summary(
        workdir, architecture, network, data, inherited=True, seconds=time.monotonic() - started
    )
    summary["architecture"] = architecture["counts"]
    # Written last: its presence says that the phase and the derivation are complete.
    write_json(workdir.mask.summary, summary)
    return summary
