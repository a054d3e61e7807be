"""The searched network: only what survived, with fixed op and edge weights.

`SearchedNetwork` is built from an architecture.json: the same stem, cells and
classifier as the supernet (same layer names, so weights move by path), but
each cell holds only its surviving edges and ops, dead nodes leave the output
concatenation, and the op and edge weights are constants. With
`apply_weight_masks` its kernels are multiplied by constant 0/1 masks in the
forward pass, so pruned weights get zero gradients and, starting at zero, stay
exactly zero through fine-tuning (`hmnas_keras.training.finetune`).
"""

import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.architecture.architecture_json import (
    ArchitectureError,
    instances,
    network_instances,
    search_space_of,
    weight_matrices,
)
from hmnas_keras.checkpoint import assign_by_path, relative_path
from hmnas_keras.space.network import CellNetwork


class SearchedNetwork(CellNetwork):
    """The network an architecture.json describes (see `architecture_json`)."""

    def __init__(self, architecture: dict, **kwargs):
        if architecture.get("degenerate"):
            raise ArchitectureError(
                f"The architecture cannot be built: {architecture['degenerate']}."
            )
        stem = architecture.get("stem_channels")
        super().__init__(
            search_space_of(architecture),
            int(architecture["num_classes"]),
            fixed_weights=weight_matrices(architecture),
            instances=network_instances(architecture),
            stem_channels=None if stem is None else len(stem),
            **kwargs,
        )
        self.image_shape = tuple(architecture["image_shape"])

    def build_network(self):
        self(ops.zeros((1, *self.image_shape)), training=False)
        return self

    def apply_weight_masks(self, masks: dict):
        """Multiplies each kernel by its constant 0/1 mask ({relative path: array}) from now on.

        Also zeroes the pruned entries of the variables, so that the stored
        weights are the masked ones.
        """
        for layer in self.kernel_layers():
            mask = masks.get(relative_path(layer.kernel.path))
            if mask is None:
                continue
            mask = np.asarray(mask, dtype="float32")
            if mask.shape != tuple(layer.kernel.shape):
                raise ArchitectureError(
                    f"The weight mask of {layer.kernel.path} has shape {mask.shape}, the kernel "
                    f"{tuple(layer.kernel.shape)}."
                )
            constant = tf.constant(mask)
            layer.set_kernel_mask(lambda constant=constant: constant)
            layer.kernel.assign(ops.convert_to_numpy(layer.kernel) * mask)


def channel_selection(architecture: dict) -> dict:
    """Which channels of the supernet the searched network keeps, by tensor.

    {"stem": kept stem channels, "cells": per cell {"kept": its node channels,
    "out": its output channels (alive nodes x kept), "middle": {"S_T/OP": kept
    middle channels}, "half": C // 2}}. With element masks a cell keeps all its
    channels and loses only the blocks of its dead nodes in "out".
    """
    space = search_space_of(architecture)
    stem = architecture.get("stem_channels")
    cells = []
    for instance, channels in zip(instances(architecture), space.cell_channels, strict=True):
        kept = np.arange(channels) if instance.get("channels") is None else instance["channels"]
        kept = np.asarray(kept, dtype="int64")
        blocks = [(node - 2) * channels + kept for node in instance["alive_nodes"]]
        middle = instance.get("middle") or {}
        cells.append(
            {
                "kept": kept,
                "out": np.concatenate(blocks) if blocks else np.zeros(0, "int64"),
                "middle": {key: np.asarray(value, "int64") for key, value in middle.items()},
                "half": channels // 2,
            }
        )
    return {
        "stem": np.arange(3 * space.channels) if stem is None else np.asarray(stem, "int64"),
        "cells": cells,
    }


def _halves(cell: dict) -> tuple[np.ndarray, np.ndarray]:
    """The kept channels of a factorized reduce's two paths, each in its own numbering."""
    kept, half = cell["kept"], cell["half"]
    return kept[kept < half], kept[kept >= half] - half


def _op_axes(cell: dict, op: str, layer: str, middle_key: str) -> dict:
    """{axis: kept indices} of a variable inside an op of a cell (see `_variable_axes`)."""
    kept = cell["kept"]
    middle = cell["middle"].get(middle_key, kept)
    first, second = _halves(cell)
    table = {
        "depthwise_1": {2: kept},
        "pointwise_1": {2: kept, 3: middle},
        "bn_1": {0: middle},
        "depthwise_2": {2: middle},
        "pointwise_2": {2: middle, 3: kept},
        "bn_2": {0: kept},
        "depthwise": {2: kept},
        "pointwise": {2: kept, 3: kept},
        "conv_1": {2: kept, 3: first},
        "conv_2": {2: kept, 3: second},
        "bn": {0: kept},
    }
    return table[layer]


def _variable_axes(path: str, selection: dict) -> dict:
    """{axis: kept indices} of the supernet variable at `path` in the searched network."""
    parts = path.split("/")
    cells = selection["cells"]
    if parts[0] == "stem_conv":
        return {3: selection["stem"]}
    if parts[0] == "stem_bn":
        return {0: selection["stem"]}
    if parts[0] == "classifier":
        return {0: cells[-1]["out"]} if parts[-1] == "kernel" else {}
    index = int(parts[0].split("_")[1])
    cell = cells[index]
    if parts[1].startswith("preprocess_"):
        source = index - 2 + int(parts[1][-1])
        rows = selection["stem"] if source < 0 else cells[source]["out"]
        first, second = _halves(cell)
        columns = {"conv": cell["kept"], "conv_1": first, "conv_2": second}
        if parts[2] == "bn":
            return {0: cell["kept"]}
        return {2: rows, 3: columns[parts[2]]}
    if parts[1].startswith("node_"):  # a shared pooling op's BN
        return {0: cell["kept"]}
    middle_key = f"{parts[1][len('edge_') :]}/{parts[2]}"
    return _op_axes(cell, parts[2], parts[3], middle_key)


def to_searched(architecture: dict, arrays: dict) -> dict:
    """Supernet arrays ({relative path: array}) in the searched network's shapes.

    Dead nodes leave their cell's output, so the next cells' preprocessing
    kernels (and the classifier, after the last cell) lose those input
    channels; with channel masks every kernel and BN also loses the channels
    that died. Those channels were exactly zero, so nothing else changes.
    """
    selection = channel_selection(architecture)
    result = {}
    for path, array in arrays.items():
        if path.split("/")[0] in ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"):
            result[path] = array
            continue
        for axis, kept in _variable_axes(path, selection).items():
            if axis < array.ndim:
                array = np.take(array, kept, axis=axis)
        result[path] = array
    return result


def inherit_weights(network: SearchedNetwork, architecture: dict, supernet_arrays: dict):
    """Sets every variable of the built `network` from the supernet's ({relative path: array}).

    Raises ArchitectureError if a variable has no counterpart or a different shape.
    """
    arrays = to_searched(architecture, supernet_arrays)

    def mismatch(path):
        if path not in arrays:
            return ArchitectureError(
                f"The supernet has no variable {path}: was the architecture derived from a "
                "supernet with this search space?"
            )
        return ArchitectureError(
            f"Supernet variable {path} has shape {arrays[path].shape}, which the searched "
            "network's does not match."
        )

    assign_by_path(network, arrays, mismatch)
