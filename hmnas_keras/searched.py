"""The searched network: only what survived, with fixed op and edge weights.

`SearchedNetwork` is built from an architecture.json: the same stem, cells and
classifier as the supernet (same layer names, so weights move by path), but
each cell holds only its surviving edges and ops, dead nodes leave the output
concatenation, and the op and edge weights are constants. With
`apply_weight_masks` its kernels are multiplied by constant 0/1 masks in the
forward pass, so pruned weights get zero gradients and, starting at zero, stay
exactly zero through fine-tuning.

`FineTune` trains it with Keras `fit()` (SGD, coupled weight decay, global-norm
clip, as the supernet's weights are trained).
"""

import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.architecture import ArchitectureError, genotypes, weight_matrices
from hmnas_keras.bilevel import apply_weight_gradients
from hmnas_keras.operations import count_macs
from hmnas_keras.supernet import CellNetwork, SearchSpace
from hmnas_keras.trainer import NetworkTrainer, cross_entropy


def search_space_of(architecture: dict) -> SearchSpace:
    space = dict(architecture["search_space"])
    space["op_names"] = tuple(space["op_names"])
    return SearchSpace(**space)


def relative_path(path: str) -> str:
    """A variable path without the model's name: 'supernet/cell_0/...' -> 'cell_0/...'."""
    return path.split("/", 1)[1]


class SearchedNetwork(CellNetwork):
    """The network an architecture.json describes (see `hmnas_keras.architecture`)."""

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
            layer.kernel_transform = lambda kernel, constant=constant: kernel * constant
            layer.kernel.assign(ops.convert_to_numpy(layer.kernel) * mask)


def input_channel_slices(architecture: dict) -> dict:
    """Variable-path prefix -> (axis, kept input channels) for kernels reading a cell output.

    A dead node leaves its cell's output, so the next cells' preprocessing
    kernels (and the classifier, after the last cell) lose the matching input
    channels: those channels were exactly zero, so nothing else changes.
    """
    space = search_space_of(architecture)
    kept, channels = [], space.channels
    for cell_type in space.cell_types:
        if cell_type == "reduce":
            channels *= 2
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


def assign_by_path(model, arrays: dict, mismatch) -> None:
    """Assigns every variable of the built `model` from `arrays` ({relative path: array}).

    `mismatch(path)` makes the exception raised, before anything is assigned,
    for the first variable that has no array or an array of another shape.
    """
    for variable in model.variables:
        path = relative_path(variable.path)
        if path not in arrays or arrays[path].shape != tuple(variable.shape):
            raise mismatch(path)
    for variable in model.variables:
        variable.assign(arrays[relative_path(variable.path)])


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


def parameter_counts(variables) -> dict:
    """Dense and non-zero entries of `variables` (the trainable weights of a network)."""
    values = [ops.convert_to_numpy(v) for v in variables]
    return {
        "dense": int(sum(v.size for v in values)),
        "nonzero": int(sum(np.count_nonzero(v) for v in values)),
    }


def flop_counts(network, image_shape) -> dict:
    """Multiply-accumulates per image of the convolutions and dense layers (dense and non-zero)."""
    macs, nonzero = count_macs(network, ops.zeros((1, *image_shape)))
    return {"macs": macs, "nonzero_macs": nonzero}


def layer_sparsity(network: SearchedNetwork) -> list:
    """Per kernel: relative path, shape, parameters, non-zero entries, sparsity."""
    rows = []
    for layer in sorted(network.kernel_layers(), key=lambda layer: layer.kernel.path):
        value = ops.convert_to_numpy(layer.kernel)
        nonzero = int(np.count_nonzero(value))
        rows.append(
            {
                "path": relative_path(layer.kernel.path),
                "shape": list(value.shape),
                "parameters": int(value.size),
                "nonzero": nonzero,
                "sparsity": round(1.0 - nonzero / value.size, 6),
            }
        )
    return rows


class FineTune(NetworkTrainer):
    """Trains a `SearchedNetwork`'s weights with `fit()` (α*, β*, masks stay fixed)."""

    def __init__(self, network, weight_decay=3e-4, grad_clip_norm=5.0, **kwargs):
        super().__init__(network, **kwargs)
        self.weight_decay = weight_decay
        self.grad_clip_norm = grad_clip_norm

    def compile(self, optimizer, jit_compile=False, **kwargs):
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def build_finetune(self):
        """Creates the optimizer's slots; call after `compile()`, before `fit()` or a restore."""
        self.optimizer.build(self.network.trainable_variables)
        self.built = True

    def train_step(self, data):
        images, labels = data
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)
            loss = cross_entropy(labels, logits)
        apply_weight_gradients(
            self.optimizer,
            tape.gradient(loss, variables),
            variables,
            self.weight_decay,
            self.grad_clip_norm,
        )
        return self.update_metrics(loss, labels, logits)
