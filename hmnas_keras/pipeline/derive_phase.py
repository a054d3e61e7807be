"""Deriving the searched network of a run and measuring it.

`derive_architecture` turns a supernet (and, for HM-NAS, its learned masks)
into `WORKDIR/architecture.json` with parameter and FLOP counts (the rule and
the derivations: `hmnas_keras.architecture.derivation`), and
`write_searched_summary` writes `WORKDIR/searched.json`: the searched
network's test accuracy with the weights it inherits, before fine-tuning
(paper Table 3, "searched network"). The mask phase derives at its end;
`prepare_architecture` derives for the baselines before fine-tuning.
"""

import os
import time

import numpy as np
from keras import ops

from hmnas_keras.architecture import architecture_json as arch_json
from hmnas_keras.architecture.cost import MaskCost, network_gates
from hmnas_keras.architecture.counting import flop_counts, layer_sparsity, parameter_counts
from hmnas_keras.architecture.derivation import cell_masks, derive_cell, derive_instances
from hmnas_keras.architecture.searched_network import (
    SearchedNetwork,
    inherit_weights,
    to_searched,
)
from hmnas_keras.checkpoint import (
    CheckpointError,
    assign_by_path,
    checkpoint_reading,
    relative_path,
    write_json,
)
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.pipeline.workdir import SEARCHED_MODEL, SUPERNET_MODEL, Workdir
from hmnas_keras.runtime import release_eager_kernels
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.trainer import NetworkTrainer


def build_supernet(config: RunConfig, data: SearchData, arrays: dict | None = None) -> Supernet:
    """A built supernet, with `arrays` ({relative path: array}) assigned if given."""
    supernet = Supernet(
        config.search_space, data.num_classes, recompute=config.recompute, name=SUPERNET_MODEL
    )
    supernet(ops.zeros((1, *data.image_shape)), training=False)
    release_eager_kernels()  # the eager build's: the phases run their steps traced
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
    """Test loss and accuracy of `network` in inference mode (Keras `evaluate()`)."""
    evaluator = NetworkTrainer(network, name="evaluate")
    evaluator.compile(jit_compile=False)
    result = evaluator.evaluate(dataset, verbose=0, return_dict=True)
    return {"test_loss": result["loss"], "test_accuracy": result["accuracy"]}


def derived_masks(config: RunConfig, supernet: Supernet, binary_masks: dict | None) -> dict:
    """The binary α and β masks of `config.derivation`: {"alpha": {type}, "beta": {type}}.

    "masks" takes them from `binary_masks` (hierarchical masking); the
    baselines derive them from the supernet's softmax(α), softmax(β).
    """
    space = config.search_space
    # Sample 0 draws the architecture that runs before --random_sample drew.
    sample = [config.random_sample] if config.random_sample else []
    rng = np.random.default_rng([config.seed, 11, *sample])
    masks = {"alpha": {}, "beta": {}}
    for cell_type in space.present_cell_types:
        op_weights = ops.convert_to_numpy(supernet.op_weights(cell_type))
        edge_weights = ops.convert_to_numpy(supernet.edge_weights(cell_type))
        learned = None
        if binary_masks is not None:
            learned = (binary_masks["alpha"][cell_type], binary_masks["beta"].get(cell_type))
        alpha_mask, beta_mask = cell_masks(
            config.derivation, space, op_weights, edge_weights, learned, rng
        )
        masks["alpha"][cell_type] = alpha_mask
        if beta_mask is not None:
            masks["beta"][cell_type] = beta_mask
    return masks


def derived_cells(config: RunConfig, supernet: Supernet, masks: dict) -> dict:
    """Per cell type, the architecture.json entry of the derived α and β `masks`.

    HM-NAS keeps M_α ⊙ softmax(α*) and M_β ⊙ softmax(β*) as the op and edge
    weights (§3.3); the DARTS heuristic and random cells are discrete DARTS
    cells: one op per edge with weight 1, two edges per node with weight 1.
    """
    space = config.search_space
    cells = {}
    for cell_type in space.present_cell_types:
        alpha_mask, beta_mask = masks["alpha"][cell_type], masks["beta"].get(cell_type)
        if config.derivation == "masks":
            op_weights = ops.convert_to_numpy(supernet.op_weights(cell_type))
            edge_weights = ops.convert_to_numpy(supernet.edge_weights(cell_type))
        else:
            op_weights = np.ones(alpha_mask.shape, "float32")
            edge_weights = np.ones(alpha_mask.shape[:1], "float32")
        beta_applied = np.ones_like(edge_weights) if beta_mask is None else beta_mask
        cells[cell_type] = derive_cell(
            space.op_names,
            space.num_nodes,
            op_weights * alpha_mask,
            edge_weights * beta_applied,
            alpha_mask,
            beta_mask,
        )
    return cells


def _float32(masks: dict) -> dict:
    """0/1 masks as float32 arrays (nested in dicts), as `MaskCost` counts them."""
    return {
        key: _float32(value) if isinstance(value, dict) else np.asarray(value, "float32")
        for key, value in masks.items()
    }


def _numbers(value):
    """Gates (tensors, nested in dicts and lists) as Python floats."""
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return float(ops.convert_to_numpy(value))


def _new_architecture(config, data, supernet, binary_masks, weight_masks) -> dict:
    """architecture.json (without counts) for the masks `config.derivation` gives."""
    masks = derived_masks(config, supernet, binary_masks)
    weight_mask = config.mask.weight_mask if config.derivation == "masks" else "element"
    channels = (binary_masks or {}).get("channels") if weight_mask == "channel" else None
    if channels is not None:
        masks["channels"] = channels
    if weight_masks is not None:
        masks["weights"] = weight_masks
    masks = _float32(masks)
    gates = _numbers(network_gates(config.search_space, masks, weight_mask))
    cells = derived_cells(config, supernet, masks)
    stem = None if channels is None else [int(i) for i in np.flatnonzero(channels["stem",])]
    architecture = arch_json.new_architecture(
        config.derivation,
        config.search_space,
        data.num_classes,
        data.image_shape,
        data.class_names,
        cells,
        weight_masks_file=Workdir.WEIGHT_MASKS if weight_masks is not None else None,
        instances=derive_instances(config.search_space, cells, gates, channels),
        stem_channels=stem,
        weight_mask=weight_mask,
    )
    cost = MaskCost(supernet, weight_mask)(masks)
    architecture["cost"] = {kind: int(round(float(value))) for kind, value in cost.items()}
    return architecture


def _searched_network(architecture, supernet, weight_masks, inherit: bool) -> SearchedNetwork:
    """The built searched network, with the supernet's (masked) weights if `inherit`."""
    network = SearchedNetwork(architecture, name=SEARCHED_MODEL).build_network()
    if inherit:
        arrays = {relative_path(v.path): ops.convert_to_numpy(v) for v in supernet.variables}
        inherit_weights(network, architecture, arrays)
        if weight_masks is not None:
            network.apply_weight_masks(to_searched(architecture, weight_masks))
    return network


def derive_architecture(
    config: RunConfig,
    data: SearchData,
    workdir: Workdir,
    supernet: Supernet,
    binary_masks: dict | None = None,
    inherit: bool = True,
) -> tuple[dict, SearchedNetwork | None]:
    """Derives, counts and writes WORKDIR/architecture.json; returns it and the built network.

    `supernet` is the built supernet the architecture comes from (trained, or
    fresh for a random architecture trained from scratch), without masks;
    `binary_masks` the masks of `MaskedSearch.binary_masks()` for the "masks"
    derivation. With `inherit`, the network carries the supernet's (masked)
    weights; otherwise it keeps fresh initial weights and no weight masks.
    """
    weight_masks = None
    if binary_masks is not None and binary_masks.get("weights"):
        weight_masks = {relative_path(p): m for p, m in binary_masks["weights"].items()}
    architecture = _new_architecture(config, data, supernet, binary_masks, weight_masks)
    architecture["degenerate"] = arch_json.degenerate_reason(architecture, weight_masks)
    architecture["parameters"] = {"supernet": parameter_counts(supernet.weight_variables)}
    architecture["flops"] = {"supernet": flop_counts(supernet)}
    architecture["counts"] = arch_json.summary_counts(architecture)
    network = None
    if architecture["degenerate"] is None:
        network = _searched_network(architecture, supernet, weight_masks, inherit)
        architecture["parameters"]["searched"] = parameter_counts(network.trainable_variables)
        architecture["flops"]["searched"] = flop_counts(network)
        architecture["layers"] = layer_sparsity(network)
    if weight_masks is not None:
        _write_weight_masks(workdir, weight_masks)
    arch_json.write_architecture(architecture, workdir.architecture)
    return architecture, network


def _write_weight_masks(workdir: Workdir, weight_masks: dict) -> None:
    os.makedirs(os.path.dirname(workdir.weight_masks), exist_ok=True)
    np.savez_compressed(
        workdir.weight_masks, **{p: m.astype("uint8") for p, m in weight_masks.items()}
    )


def read_weight_masks(workdir: Workdir, architecture: dict) -> dict | None:
    """The weight masks an architecture refers to, in supernet shapes, or None."""
    if not architecture.get("weight_masks"):
        return None
    path = os.path.join(workdir.root, architecture["weight_masks"])
    if not os.path.exists(path):
        raise arch_json.ArchitectureError(
            f"architecture.json refers to weight masks in {path}, which does not exist."
        )
    with checkpoint_reading(path), np.load(path) as archive:
        return {name: archive[name].astype(bool) for name in archive.files}


def write_searched_summary(
    workdir: Workdir, architecture: dict, network, data: SearchData, inherited: bool, seconds: float
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
    write_json(workdir.searched_summary, summary)
    return summary


def _copy_architecture(config: RunConfig, workdir: Workdir) -> None:
    """Copies --architecture (and, with --scratch_masks, its weight masks) into the workdir."""
    architecture = arch_json.read_architecture(config.architecture)
    if architecture.get("weight_masks") and config.scratch_masks:
        source = Workdir(os.path.dirname(os.path.abspath(config.architecture)))
        _write_weight_masks(workdir, read_weight_masks(source, architecture))
        architecture["weight_masks"] = Workdir.WEIGHT_MASKS
    else:
        architecture["weight_masks"] = None  # every weight of the kept ops trains
    arch_json.write_architecture(architecture, workdir.architecture)


def prepare_architecture(config: RunConfig, data: SearchData, workdir: Workdir) -> None:
    """Makes sure WORKDIR/architecture.json exists before fine-tuning (deriving it if needed)."""
    if os.path.exists(workdir.architecture):
        return
    if config.architecture:
        _copy_architecture(config, workdir)
        return
    if config.derivation == "masks":
        raise arch_json.ArchitectureError(
            f"{workdir.root} has no architecture.json to fine-tune: --derivation=masks derives "
            "it in the mask phase. Add mask to --phases (after supernet), or use "
            "--derivation=darts/random."
        )
    started = time.monotonic()
    inherited = config.finetune_init == "inherited"
    needs_supernet = config.derivation == "darts" or inherited
    arrays = workdir.supernet_arrays() if needs_supernet else None
    supernet = build_supernet(config, data, arrays)
    architecture, network = derive_architecture(config, data, workdir, supernet, inherit=inherited)
    write_searched_summary(
        workdir, architecture, network, data, inherited, time.monotonic() - started
    )
    counts = architecture["counts"]
    print(
        f"Derived a {config.derivation} architecture: {counts['ops']} ops, {counts['edges']} "
        f"edges, {counts['nodes']} nodes. Written to {workdir.architecture}"
    )
