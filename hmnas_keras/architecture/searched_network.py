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
    genotypes,
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
        super().__init__(
            search_space_of(architecture),
            int(architecture["num_classes"]),
            genotypes=genotypes(architecture),
            fixed_weights=weight_matrices(architecture),
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


def input_channel_slices(architecture: dict) -> dict:
    """Variable-path prefix -> (axis, kept input channels) for kernels reading a cell output.

    A dead node leaves its cell's output, so the next cells' preprocessing
    kernels (and the classifier, after the last cell) lose the matching input
    channels: those channels were exactly zero, so nothing else changes.
    """
    space = search_space_of(architecture)
    kept = []
    for cell_type, channels in zip(space.cell_types, space.cell_channels, strict=True):
        alive = architecture["cells"][cell_type]["alive_nodes"]
        kept.append(
            np.concatenate([np.arange((n - 2) * channels, (n - 1) * channels) for n in alive])
        )
    slices = {}
    for index in range(space.num_cells):
        for name, previous in (("preprocess_0", index - 2), ("preprocess_1", index - 1)):
            if previous >= 0:
                slices[f"cell_{index}/{name}/"] = (2, kept[previous])
    slices["classifier/kernel"] = (0, kept[-1])
    return slices


def to_searched(architecture: dict, arrays: dict) -> dict:
    """Supernet arrays ({relative path: array}) in the searched network's shapes."""
    slices = input_channel_slices(architecture)
    result = {}
    for path, array in arrays.items():
        for prefix, (axis, kept) in slices.items():
            if path.startswith(prefix) and path.endswith("kernel"):
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
