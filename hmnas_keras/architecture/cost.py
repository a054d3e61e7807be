"""The resource cost of the network a set of binary masks derives: parameters and FLOPs.

One function, `MaskCost.__call__`, counts what the derived network keeps,
from the binary masks of hierarchical masking, with the same rules as the
derivation (`hmnas_keras.architecture.derivation`) and the same conventions as
`hmnas_keras.architecture.counting`:

- an op counts iff its α mask is 1, its edge survives (β mask 1, an op left,
  source node alive) and its cell is used (the classifier, or a later cell
  that survives, reads its output);
- a cell's preprocessing counts iff an edge that survives reads that input;
- a kernel counts the entries the derived network keeps: with element masks
  the 1s of its weight mask, with channel masks (alive input channels) x
  (alive output channels) x (kernel height x width); input channels coming
  from a node that died (or, with channel masks, a channel that died) are
  not kept either;
- parameters add the stem BatchNormalization's γ and β (per alive stem
  channel) and the classifier's bias; FLOPs are multiply-accumulates per
  image: kept kernel entries x output positions.

The masks may be numpy arrays (counting a derived architecture) or tensors
that carry a straight-through gradient (the masking objective): "any of"
is written 1 − Π(1 − x), so every count is a polynomial in the masks and the
gradient reaches the α, β, weight and channel masks alike.
"""

import dataclasses

import numpy as np
from keras import ops

from hmnas_keras.checkpoint import relative_path
from hmnas_keras.space.operations import DilConv, FactorizedReduce, Pool, ReLUConvBN, SepConv
from hmnas_keras.space.search_space import cell_edges, incoming_edges

COST_KINDS = ("params", "flops")


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """One kernel of the supernet, for counting.

    `rows` and `cols` name the gates of its input and output channels (see
    `MaskCost._gate`); `gate` the scalar that says whether the kernel's op or
    preprocessing survives.
    """

    path: str
    kind: str  # "conv" (h, w, in, out), "depthwise" (h, w, channels, 1) or "dense" (in, out)
    spatial: int
    positions: int
    rows: tuple
    cols: tuple
    gate: tuple
    layer: object = dataclasses.field(default=None, compare=False, repr=False)


def _kernel(layer, kind, rows, cols, gate) -> KernelCost:
    shape = tuple(layer.kernel.shape)
    spatial = int(np.prod(shape[:2])) if kind != "dense" else 1
    if layer.output_positions is None:
        raise ValueError(f"{layer.name} was never called: call the supernet on a batch first.")
    return KernelCost(
        relative_path(layer.kernel.path),
        kind,
        spatial,
        layer.output_positions,
        rows,
        cols,
        gate,
        layer,
    )


def _op_kernels(op, index: int, edge: int, name: str, channels: int) -> list:
    gate = ("op", index, edge, name)
    cell, half = ("cell", index), channels // 2
    if isinstance(op, SepConv):
        middle = ("middle", index, edge, name)
        return [
            _kernel(op.depthwise_1, "depthwise", cell, cell, gate),
            _kernel(op.pointwise_1, "conv", cell, middle, gate),
            _kernel(op.depthwise_2, "depthwise", middle, middle, gate),
            _kernel(op.pointwise_2, "conv", middle, cell, gate),
        ]
    if isinstance(op, DilConv):
        return [
            _kernel(op.depthwise, "depthwise", cell, cell, gate),
            _kernel(op.pointwise, "conv", cell, cell, gate),
        ]
    if isinstance(op, FactorizedReduce):
        return [
            _kernel(op.conv_1, "conv", cell, ("cell", index, 0, half), gate),
            _kernel(op.conv_2, "conv", cell, ("cell", index, half, channels), gate),
        ]
    return []


def _preprocess_kernels(preprocess, index: int, which: int, source: int, channels: int) -> list:
    gate, rows = ("pre", index, which), ("out", source)
    if isinstance(preprocess, ReLUConvBN):
        return [_kernel(preprocess.conv, "conv", rows, ("cell", index), gate)]
    half = channels // 2
    return [
        _kernel(preprocess.conv_1, "conv", rows, ("cell", index, 0, half), gate),
        _kernel(preprocess.conv_2, "conv", rows, ("cell", index, half, channels), gate),
    ]


def supernet_kernels(supernet) -> list[KernelCost]:
    """Every kernel of a built, called supernet with its channel gates and op gate."""
    image_channels = int(supernet.stem_conv.kernel.shape[2])
    kernels = [
        _kernel(supernet.stem_conv, "conv", ("ones", image_channels), ("stem",), ("always",))
    ]
    for index, cell in enumerate(supernet.cells):
        preprocess = zip((cell.preprocess_0, cell.preprocess_1), (index - 2, index - 1))
        for which, (layer, source) in enumerate(preprocess):
            kernels += _preprocess_kernels(layer, index, which, source, cell.channels)
        for (source, target, _), mixed_op in zip(cell.genotype, cell.edge_ops, strict=True):
            edge = cell_edges(cell.num_nodes).index((source, target))
            for name, op in mixed_op.candidates.items():
                kernels += _op_kernels(op, index, edge, name, cell.channels)
    kernels.append(
        _kernel(
            supernet.classifier,
            "dense",
            ("out", len(supernet.cells) - 1),
            ("ones", supernet.num_classes),
            ("always",),
        )
    )
    return kernels


def _op_norms(op, cell_group, middle_group) -> list:
    if isinstance(op, SepConv):
        return [(op.bn_1, middle_group), (op.bn_2, cell_group)]
    if isinstance(op, (DilConv, FactorizedReduce, Pool, ReLUConvBN)):
        return [(op.bn, cell_group)]
    return []


def supernet_norms(supernet) -> list:
    """(BatchNormalization layer, channel group) of every BN of a built supernet.

    The group names the channels the BN normalises, as `KernelCost.cols`
    does: ("stem",), ("cell", i) (a cell's node channels) or ("middle", i,
    edge, op) (a separable convolution's middle channels).
    """
    norms = [(supernet.stem_bn, ("stem",))]
    for index, cell in enumerate(supernet.cells):
        group = ("cell", index)
        for preprocess in (cell.preprocess_0, cell.preprocess_1):
            norms += _op_norms(preprocess, group, None)
        for source_ops in cell.source_ops:
            for op in source_ops.values():
                norms += _op_norms(op, group, None)
        for (source, target, _), mixed_op in zip(cell.genotype, cell.edge_ops, strict=True):
            edge = cell_edges(cell.num_nodes).index((source, target))
            for name, op in mixed_op.candidates.items():
                norms += _op_norms(op, group, ("middle", index, edge, name))
    return norms


def channel_groups(supernet) -> dict:
    """{group: channels} of every channel mask a supernet has with --weight_mask=channel."""
    space = supernet.search_space
    groups = {("stem",): 3 * space.channels}
    for index, cell in enumerate(supernet.cells):
        groups["cell", index] = cell.channels
        for (source, target, _), mixed_op in zip(cell.genotype, cell.edge_ops, strict=True):
            edge = cell_edges(cell.num_nodes).index((source, target))
            for name, op in mixed_op.candidates.items():
                if isinstance(op, SepConv):
                    groups["middle", index, edge, name] = cell.channels
    return groups


def _any(values):
    """1 if any entry is 1, for 0/1 entries: 1 − Π(1 − x) (differentiable)."""
    return 1.0 - ops.prod(1.0 - ops.convert_to_tensor(values, "float32"))


def _cell_gates(space, index: int, masks: dict, weight_mask: str, inputs: tuple) -> dict:
    """Op, edge, node and input-read gates of cell `index` (before the cell-use gate).

    `inputs`: whether the cell's two inputs (the outputs of cells index − 2 and
    index − 1, or the stem) carry anything; an edge from an input that does not
    is dead, like an edge from a dead node.
    """
    cell_type = space.cell_types[index]
    alpha = masks["alpha"][cell_type]
    beta = masks["beta"].get(cell_type)
    channels = masks.get("channels") if weight_mask == "channel" else None
    cell_alive = 1.0 if channels is None else _any(channels["cell", index])
    nodes = {0: inputs[0], 1: inputs[1]}
    op_alive, edge_alive = {}, {}
    for target, rows in incoming_edges(space.num_nodes):
        for edge in range(rows.start, rows.stop):
            for k, name in enumerate(space.op_names):
                alive = alpha[edge, k] * cell_alive
                if channels is not None and name.startswith("sep_conv"):
                    alive = alive * _any(channels["middle", index, edge, name])
                op_alive[edge, name] = alive
            edge_gate = 1.0 if beta is None else beta[edge]
            ops_left = _any([op_alive[edge, name] for name in space.op_names])
            edge_alive[edge] = edge_gate * ops_left * nodes[edge - rows.start]
        nodes[target] = _any([edge_alive[e] for e in range(rows.start, rows.stop)])
    edges = cell_edges(space.num_nodes)
    reads = {
        j: _any([edge_alive[e] for e, (source, _) in enumerate(edges) if source == j])
        for j in (0, 1)
    }
    return {"op": op_alive, "edge": edge_alive, "nodes": nodes, "reads": reads}


def network_gates(space, masks: dict, weight_mask: str = "element") -> list[dict]:
    """Per cell, what binary masks keep: op, edge, node and input-read gates, and `used`.

    A cell is alive iff one of its intermediate nodes is (with channel masks a
    cell whose channels all died is dead, and so is every edge reading it). A
    cell is used iff the classifier reads it (the last cell) or a used later
    cell reads it (cell i+1 through its input 1, cell i+2 through its input 0).
    Every gate is 0 or 1 (a tensor when the masks are tensors).
    """
    stem = 1.0
    if weight_mask == "channel":
        stem = _any(masks["channels"]["stem",])
    alive = {-2: stem, -1: stem}  # cell index -> does its output carry anything
    cells = []
    for index in range(space.num_cells):
        gates = _cell_gates(space, index, masks, weight_mask, (alive[index - 2], alive[index - 1]))
        alive[index] = _any([gates["nodes"][n] for n in range(2, space.num_nodes + 2)])
        cells.append(gates)
    last = len(cells) - 1
    cells[last]["used"] = 1.0
    for index in range(last - 1, -1, -1):
        readers = [cells[index + 1]["used"] * cells[index + 1]["reads"][1]]
        if index + 2 <= last:
            readers.append(cells[index + 2]["used"] * cells[index + 2]["reads"][0])
        cells[index]["used"] = _any(readers)
    return cells


class MaskCost:
    """Counts parameters and FLOPs of the network that binary masks derive (see module doc).

    Args:
        supernet: the built, called supernet the masks belong to.
        weight_mask: "element" or "channel".
    """

    def __init__(self, supernet, weight_mask: str = "element"):
        space = supernet.search_space
        self.space = space
        self.weight_mask = weight_mask
        self.cell_types = space.cell_types
        self.cell_channels = space.cell_channels
        self.num_nodes = space.num_nodes
        self.op_names = space.op_names
        self.stem_channels = 3 * space.channels
        self.num_classes = supernet.num_classes
        self.kernels = supernet_kernels(supernet)

    def gates(self, masks: dict) -> list[dict]:
        return network_gates(self.space, masks, self.weight_mask)

    # ------------------------------------------------------------- counting

    def _channels(self, masks: dict, key: tuple, cells: list):
        """The 0/1 gate vector a kernel's rows or columns use."""
        kind = key[0]
        if kind == "ones":
            return ops.ones((key[1],))
        if kind == "stem":
            if self.weight_mask == "channel":
                return masks["channels"]["stem",]
            return ops.ones((self.stem_channels,))
        if kind == "out":
            if key[1] < 0:
                return self._channels(masks, ("stem",), cells)
            index = key[1]
            block = self._channels(masks, ("cell", index), cells)
            nodes = cells[index]["nodes"]
            return ops.concatenate([nodes[n] * block for n in range(2, self.num_nodes + 2)], axis=0)
        if kind == "cell":
            channels = self.cell_channels[key[1]]
            if self.weight_mask == "channel":
                vector = masks["channels"]["cell", key[1]]
            else:
                vector = ops.ones((channels,))
            return vector if len(key) == 2 else vector[key[2] : key[3]]
        if self.weight_mask == "channel":  # "middle"
            return masks["channels"][key]
        return ops.ones((self.cell_channels[key[1]],))

    def _gate(self, key: tuple, cells: list):
        if key[0] == "always":
            return 1.0
        cell = cells[key[1]]
        if key[0] == "pre":
            return cell["reads"][key[2]] * cell["used"]
        _, _, edge, name = key
        return cell["op"][edge, name] * cell["edge"][edge] * cell["used"]

    def _kept(self, kernel: KernelCost, masks: dict, cells: list):
        rows = self._channels(masks, kernel.rows, cells)
        cols = self._channels(masks, kernel.cols, cells)
        element = None
        if self.weight_mask == "element":
            element = masks.get("weights", {}).get(kernel.path)
        if kernel.kind == "depthwise":
            per_channel = kernel.spatial if element is None else ops.sum(element, axis=(0, 1, 3))
            return ops.sum(per_channel * rows)
        if element is None:
            return kernel.spatial * ops.sum(rows) * ops.sum(cols)
        if kernel.kind == "conv":
            element = ops.sum(element, axis=(0, 1))
        return ops.sum(element * rows[:, None] * cols[None, :])

    def __call__(self, masks: dict) -> dict:
        """{"params", "flops"} of the derived network (tensors; see the module doc).

        `masks`: {"alpha": {type: [E, K]}, "beta": {type: [E]}, and "weights":
        {kernel path: kernel-shaped} (element masks) or "channels": {group: [n]}
        (channel masks: ("stem",), ("cell", i), ("middle", i, edge, op))}, all 0/1.
        """
        cells = self.gates(masks)
        params = ops.sum(self._channels(masks, ("stem",), cells)) * 2.0 + self.num_classes
        flops = 0.0
        for kernel in self.kernels:
            kept = self._gate(kernel.gate, cells) * self._kept(kernel, masks, cells)
            params = params + kept
            flops = flops + kept * kernel.positions
        return {"params": params, "flops": flops}

    def dense(self) -> dict:
        """{"params", "flops"} of the whole supernet (every mask 1): what ratios refer to."""
        params = 2 * self.stem_channels + self.num_classes
        flops = 0
        for kernel in self.kernels:
            entries = kernel.spatial * _size(kernel, self)
            params += entries
            flops += entries * kernel.positions
        return {"params": int(params), "flops": int(flops)}


def _size(kernel: KernelCost, cost: MaskCost) -> int:
    """Input x output channels of a kernel (its channel count, for a depthwise kernel)."""

    def length(key):
        kind = key[0]
        if kind == "ones":
            return key[1]
        if kind == "stem" or (kind == "out" and key[1] < 0):
            return cost.stem_channels
        if kind == "out":
            return cost.num_nodes * cost.cell_channels[key[1]]
        if kind == "cell" and len(key) == 4:
            return key[3] - key[2]
        return cost.cell_channels[key[1]]

    if kernel.kind == "depthwise":
        return length(kernel.rows)
    return length(kernel.rows) * length(kernel.cols)
