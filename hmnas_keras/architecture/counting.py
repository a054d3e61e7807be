"""Counting a network's size: parameters, multiply-accumulates, per-layer sparsity.

One convention everywhere (architecture.json, searched.json, the fine-tuning
summary, the export): FLOPs are multiply-accumulates (MACs) per image of the
convolutions and the dense layer, as DARTS and the paper count them. Every
kernel entry is used once per output position, so a kernel contributes
(output positions) x (entries), or x (non-zero entries) for the count over
non-zero weights. Parameters are the entries of the trainable variables
(dense, and non-zero).
"""

import numpy as np
from keras import ops

from hmnas_keras.checkpoint import relative_path


def parameter_counts(variables) -> dict:
    """Dense and non-zero entries of `variables` (the trainable weights of a network)."""
    values = [ops.convert_to_numpy(v) for v in variables]
    return {
        "dense": int(sum(v.size for v in values)),
        "nonzero": int(sum(np.count_nonzero(v) for v in values)),
    }


def macs(kernels) -> dict:
    """MACs per image of (kernel array, output positions) pairs, dense and over non-zero entries."""
    dense = nonzero = 0
    for kernel, positions in kernels:
        kernel = np.asarray(kernel)
        dense += positions * kernel.size
        nonzero += positions * int(np.count_nonzero(kernel))
    return {"macs": int(dense), "nonzero_macs": int(nonzero)}


def flop_counts(network) -> dict:
    """MACs per image of a built network's maskable kernels (as its forward pass uses them)."""
    layers = network.kernel_layers()
    missing = [layer.name for layer in layers if layer.output_positions is None]
    if missing:
        raise ValueError(
            f"Cannot count the FLOPs of {network.name}: layers {missing[:3]} were never called. "
            "Call the network on a batch first."
        )
    return macs(
        (ops.convert_to_numpy(layer.masked_kernel()), layer.output_positions) for layer in layers
    )


def layer_sparsity(network) -> list:
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
