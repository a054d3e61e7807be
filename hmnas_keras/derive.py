"""Deriving the searched network of a run and measuring it.

`derive_architecture` turns a supernet (and, for HM-NAS, its learned masks)
into `WORKDIR/architecture.json` with parameter and FLOP counts, and
`WORKDIR/searched.json`: the searched network's test accuracy with the weights
it inherits, before fine-tuning (paper Table 3, "searched network").
"""

import os
import time

import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras import architecture as arch_lib
from hmnas_keras.checkpoint import CheckpointError, read_arrays, write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.searched import (
    SearchedNetwork,
    assign_by_path,
    flop_counts,
    inherit_weights,
    layer_sparsity,
    parameter_counts,
    relative_path,
    to_searched,
)
from hmnas_keras.supernet import Supernet

WEIGHT_MASKS_FILE = os.path.join("mask", "weight_masks.npz")
SEARCHED_FILE = "searched.json"


def supernet_checkpoint_path(config: RunConfig, workdir: str) -> str:
    """The trained supernet a run derives from: its own, or --supernet_checkpoint."""
    if config.supernet_checkpoint:
        return config.supernet_checkpoint
    return os.path.join(workdir, "supernet", "checkpoint.npz")


def load_supernet_arrays(path: str, what: str = "a trained supernet") -> dict:
    """{relative path: array} of the supernet variables stored in a phase checkpoint."""
    try:
        arrays = read_arrays(path, prefix="supernet/")
    except CheckpointError:
        raise CheckpointError(
            f"This step needs {what}, and there is no checkpoint at {path}. Run the supernet "
            "phase first (--phases=supernet,...), or point --supernet_checkpoint at another "
            "run's supernet/checkpoint.npz."
        ) from None
    return {relative_path(p): a for p, a in arrays.items()}


def build_supernet(config: RunConfig, data: SearchData, arrays: dict | None = None) -> Supernet:
    """A built supernet, with `arrays` ({relative path: array}) assigned if given."""
    supernet = Supernet(config.search_space, data.num_classes, name="supernet")
    supernet(ops.zeros((1, *data.image_shape)), training=False)
    if arrays is not None:
        assign_by_path(
            supernet,
            arrays,
            lambda path: CheckpointError(
                f"The supernet checkpoint does not match this search space (variable {path}). "
                "Was it written with different --num_cells/--channels/--num_nodes/--ops?"
            ),
        )
    return supernet


def evaluate_network(network, dataset) -> dict:
    """Test loss and accuracy of `network` in inference mode."""

    @tf.function
    def logits_of(images):
        return network(images, training=False)

    total_loss, correct, count = 0.0, 0, 0
    for images, labels in dataset:
        logits = logits_of(images).numpy()
        labels = labels.numpy()
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss += float(-log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
        count += len(labels)
    return {"test_loss": total_loss / count, "test_accuracy": correct / count}


def derive_architecture(
    config: RunConfig,
    data: SearchData,
    workdir: str,
    supernet: Supernet,
    binary_masks: dict | None = None,
    inherit: bool = True,
) -> tuple[dict, SearchedNetwork | None]:
    """Derives, counts and writes WORKDIR/architecture.json; returns it and the built network.

    `supernet` is the built supernet the architecture comes from (trained, or
    fresh for a random architecture trained from scratch), without mask hooks;
    `binary_masks` the masks of `MaskedSearch.binary_masks()` for the "masks"
    derivation. With `inherit`, the network carries the supernet's (masked)
    weights; otherwise it keeps fresh initial weights and no weight masks.
    """
    space = config.search_space
    rng = np.random.default_rng([config.seed, 11])
    weight_masks = None
    cells = {}
    for cell_type in space.present_cell_types:
        op_weights = ops.convert_to_numpy(supernet.op_weights(cell_type))
        edge_weights = ops.convert_to_numpy(supernet.edge_weights(cell_type))
        if config.derivation == "masks":
            alpha_mask = binary_masks["alpha"][cell_type]
            beta_mask = binary_masks["beta"].get(cell_type)
        elif config.derivation == "darts":
            alpha_mask, beta_mask = arch_lib.darts_masks(
                op_weights, edge_weights, space.num_nodes, space.multi_level
            )
        else:
            alpha_mask, beta_mask = arch_lib.random_masks(len(space.op_names), space.num_nodes, rng)
        beta_applied = np.ones_like(edge_weights) if beta_mask is None else beta_mask
        cells[cell_type] = arch_lib.derive_cell(
            space.op_names,
            space.num_nodes,
            op_weights * alpha_mask,
            edge_weights * beta_applied,
            alpha_mask,
            beta_mask,
        )
    if binary_masks is not None:
        weight_masks = {relative_path(p): m for p, m in binary_masks["weights"].items()}
    architecture = arch_lib.new_architecture(
        config.derivation,
        space,
        data.num_classes,
        data.image_shape,
        data.class_names,
        cells,
        weight_masks_file=WEIGHT_MASKS_FILE if weight_masks is not None else None,
    )
    architecture["degenerate"] = arch_lib.degenerate_reason(architecture, weight_masks)
    architecture["parameters"] = {"supernet": parameter_counts(supernet.weight_variables)}
    architecture["flops"] = {"supernet": flop_counts(supernet, data.image_shape)}
    architecture["counts"] = arch_lib.summary_counts(architecture)
    network = None
    if architecture["degenerate"] is None:
        network = SearchedNetwork(architecture, name="searched").build_network()
        if inherit:
            arrays = {relative_path(v.path): ops.convert_to_numpy(v) for v in supernet.variables}
            inherit_weights(network, architecture, arrays)
        if inherit and weight_masks is not None:
            network.apply_weight_masks(to_searched(architecture, weight_masks))
        architecture["parameters"]["searched"] = parameter_counts(network.trainable_variables)
        architecture["flops"]["searched"] = flop_counts(network, data.image_shape)
        architecture["layers"] = layer_sparsity(network)
    if weight_masks is not None:
        path = os.path.join(workdir, WEIGHT_MASKS_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez_compressed(path, **{p: m.astype("uint8") for p, m in weight_masks.items()})
    arch_lib.write_architecture(architecture, os.path.join(workdir, arch_lib.ARCHITECTURE_FILE))
    return architecture, network


def read_weight_masks(workdir: str, architecture: dict) -> dict | None:
    """The weight masks an architecture refers to, in supernet shapes, or None."""
    if not architecture.get("weight_masks"):
        return None
    path = os.path.join(workdir, architecture["weight_masks"])
    if not os.path.exists(path):
        raise arch_lib.ArchitectureError(
            f"architecture.json refers to weight masks in {path}, which does not exist."
        )
    with np.load(path) as archive:
        return {name: archive[name].astype(bool) for name in archive.files}


def write_searched_summary(
    workdir: str, architecture: dict, network, data: SearchData, inherited: bool, seconds: float
) -> dict:
    """Measures the searched network before fine-tuning and writes WORKDIR/searched.json."""
    summary = {
        "derivation": architecture["derivation"],
        "degenerate": architecture["degenerate"],
        "counts": architecture["counts"],
        "parameters": architecture["parameters"].get("searched"),
        "flops": architecture["flops"].get("searched"),
        "test_accuracy": None,
        "test_loss": None,
        "derive_seconds": round(seconds, 2),
    }
    started = time.monotonic()
    if network is not None and inherited:
        summary.update(evaluate_network(network, data.test_dataset()))
        summary["evaluate_seconds"] = round(time.monotonic() - started, 2)
    write_json(os.path.join(workdir, SEARCHED_FILE), summary)
    return summary
