"""The multi-level encoded supernet (paper §3.1, Eq. 1–2; DESIGN.md §2).

`Supernet` is a Keras model: a stem, `num_cells` cells and a classifier. Each
cell type (normal, reduce) has one α (edge x op logits) and, in multi-level
mode, one β (one logit per incoming edge of each intermediate node), shared by
every cell of that type. `Supernet.arch_variables` and
`Supernet.weight_variables` give the two groups by reference.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from hmnas_keras.operations import (
    OP_NAMES,
    FactorizedReduce,
    MaskableConv2D,
    MaskableDense,
    MaskableKernel,
    ReLUConvBN,
    build_op,
    is_parameter_free,
)

CELL_TYPES = ("normal", "reduce")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The shape of the supernet: plain data, kept apart from the model code."""

    num_cells: int = 3
    channels: int = 16
    num_nodes: int = 4
    op_names: tuple[str, ...] = OP_NAMES
    multi_level: bool = True

    def __post_init__(self):
        for field in ("num_cells", "channels", "num_nodes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Received an invalid value for {field}, expected a positive integer. "
                    f"Received: {field}={value!r}"
                )
        if not self.op_names:
            raise ValueError("Received an empty op_names, expected at least one operation.")
        unknown = [name for name in self.op_names if name not in OP_NAMES]
        if unknown or len(set(self.op_names)) != len(self.op_names):
            raise ValueError(
                f"Received invalid op_names, expected distinct names among {', '.join(OP_NAMES)}. "
                f"Received: op_names={list(self.op_names)}"
            )
        object.__setattr__(self, "op_names", tuple(self.op_names))

    @property
    def reduction_cells(self) -> tuple[int, ...]:
        """Indices of the reduction cells: L//3 and 2L//3."""
        return tuple(sorted({self.num_cells // 3, 2 * self.num_cells // 3}))

    @property
    def cell_types(self) -> tuple[str, ...]:
        """The type of each cell, in order."""
        return tuple(
            "reduce" if i in self.reduction_cells else "normal" for i in range(self.num_cells)
        )

    @property
    def present_cell_types(self) -> tuple[str, ...]:
        """Cell types that occur in the network (a 2-cell net has no normal cell)."""
        return tuple(t for t in CELL_TYPES if t in self.cell_types)

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """(source, target) node pairs; nodes 0, 1 are the inputs, 2.. the intermediates."""
        return tuple(
            (source, target) for target in range(2, self.num_nodes + 2) for source in range(target)
        )

    @property
    def num_edges(self) -> int:
        return len(self.edges)


def edge_index(source: int, target: int) -> int:
    """Position of edge source -> target in `SearchSpace.edges` order."""
    return (target - 1) * target // 2 - 1 + source


class MixedOp(keras.layers.Layer):
    """Eq. 1: Σ_k w_k · op_k(x) with externally supplied op weights w.

    `op_weights` has one entry per name in `op_names` (the search space's
    ops); only the operations in `active` (default: all) are built and
    computed, which is how a searched network keeps a subset. Operations in
    `shared_op_names` are parameter-free: their output depends only on x, so
    the cell computes them once per source node and passes them in
    `shared_outputs` instead of every edge recomputing them.
    """

    def __init__(
        self,
        channels: int,
        stride: int,
        op_names=OP_NAMES,
        shared_op_names=(),
        active=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.stride = stride
        self.op_names = tuple(op_names)
        self.shared_op_names = tuple(shared_op_names)
        self.active = tuple(self.op_names if active is None else active)
        self.candidates = {
            name: build_op(name, channels, stride)
            for name in self.active
            if name not in self.shared_op_names
        }

    def call(self, x, op_weights, shared_outputs=None, training=None):
        output = 0.0
        for name in self.active:
            if name in self.candidates:
                op_output = self.candidates[name](x, training=training)
            else:
                op_output = shared_outputs[name]
            output = output + op_weights[self.op_names.index(name)] * op_output
        return output

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            stride=self.stride,
            op_names=list(self.op_names),
            shared_op_names=list(self.shared_op_names),
            active=list(self.active),
        )
        return config


class Cell(keras.layers.Layer):
    """Eq. 2: node i = Σ_j edge_weight(i, j) · MixedOp_{j→i}(node j).

    Inputs are the outputs of the two previous cells; the output concatenates
    the intermediate nodes. Parameter-free operations (pooling with its
    affine-free BN, identity) give the same output on every edge leaving a
    node, so `source_ops` computes them once per node.

    `genotype` selects a searched cell: a tuple of (source, target, op names)
    for the edges that survive. Nodes without a surviving incoming edge are
    dead and left out of the output; input nodes no edge reads are not
    computed. None (the default) is the full supernet cell.
    """

    def __init__(
        self,
        channels: int,
        num_nodes: int,
        reduction: bool,
        reduction_prev: bool,
        op_names=OP_NAMES,
        genotype=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.channels = channels
        self.num_nodes = num_nodes
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.op_names = tuple(op_names)
        if genotype is None:
            genotype = tuple(
                (source, target, self.op_names)
                for target in range(2, num_nodes + 2)
                for source in range(target)
            )
        self.genotype = tuple(
            sorted(
                ((int(source), int(target), tuple(names)) for source, target, names in genotype),
                key=lambda edge: (edge[1], edge[0]),
            )
        )
        for source, target, names in self.genotype:
            if not (2 <= target < num_nodes + 2 and 0 <= source < target and names):
                raise ValueError(
                    f"Received an invalid genotype edge, expected 0 <= source < target <= "
                    f"{num_nodes + 1} with at least one op. Received: {(source, target, names)}"
                )
        self.alive_nodes = tuple(sorted({target for _, target, _ in self.genotype}))
        used_sources = {source for source, _, _ in self.genotype}
        if not self.alive_nodes:
            raise ValueError("Received a genotype without edges: the cell would have no output.")
        dangling = sorted(s for s in used_sources if s >= 2 and s not in self.alive_nodes)
        if dangling:
            raise ValueError(
                f"Received a genotype with edges leaving dead nodes {dangling}: a node an edge "
                "reads must have an incoming edge itself."
            )
        self.preprocess_0 = None
        if 0 in used_sources:
            if reduction_prev:
                self.preprocess_0 = FactorizedReduce(channels, name="preprocess_0")
            else:
                self.preprocess_0 = ReLUConvBN(channels, name="preprocess_0")
        self.preprocess_1 = ReLUConvBN(channels, name="preprocess_1") if 1 in used_sources else None
        self.source_ops = []
        for source in range(num_nodes + 1):
            stride = self._stride(source)
            needed = {name for s, _, names in self.genotype if s == source for name in names}
            self.source_ops.append(
                {
                    name: build_op(name, channels, stride, name=f"node_{source}_{name}")
                    for name in self.op_names
                    if name in needed and is_parameter_free(name, stride)
                }
            )
        self.edge_ops = [
            MixedOp(
                channels,
                self._stride(source),
                self.op_names,
                shared_op_names=tuple(self.source_ops[source]),
                active=names,
                name=f"edge_{source}_{target}",
            )
            for source, target, names in self.genotype
        ]

    def _stride(self, source: int) -> int:
        return 2 if self.reduction and source < 2 else 1

    def call(self, s0, s1, op_weights, edge_weights, training=None):
        """op_weights: [num_edges, num_ops]; edge_weights: [num_edges], in edge order."""
        nodes = {}
        if self.preprocess_0 is not None:
            nodes[0] = self.preprocess_0(s0, training=training)
        if self.preprocess_1 is not None:
            nodes[1] = self.preprocess_1(s1, training=training)
        shared = {}
        for (source, target, _), mixed_op in zip(self.genotype, self.edge_ops, strict=True):
            if source not in shared:
                shared[source] = {
                    name: op(nodes[source], training=training)
                    for name, op in self.source_ops[source].items()
                }
            index = edge_index(source, target)
            mixed = mixed_op(nodes[source], op_weights[index], shared[source], training=training)
            nodes[target] = nodes.get(target, 0.0) + edge_weights[index] * mixed
        return ops.concatenate([nodes[node] for node in self.alive_nodes], axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            num_nodes=self.num_nodes,
            reduction=self.reduction,
            reduction_prev=self.reduction_prev,
            op_names=list(self.op_names),
            genotype=[[s, t, list(n)] for s, t, n in self.genotype],
        )
        return config


def segment_softmax(logits, num_nodes: int):
    """Softmax of the β logits over the incoming edges of each intermediate node."""
    weights, start = [], 0
    for target in range(2, num_nodes + 2):
        weights.append(ops.softmax(logits[start : start + target]))
        start += target
    return ops.concatenate(weights, axis=0)


def uniform_edge_weights(num_nodes: int) -> np.ndarray:
    """Single-level encoding: every incoming edge of node i weighs 1 / (i's in-degree)."""
    return np.concatenate(
        [np.full(target, 1.0 / target, dtype="float32") for target in range(2, num_nodes + 2)]
    )


class CellNetwork(keras.Model):
    """Stem (Conv3x3-BN, 3C), `num_cells` cells, global pooling and a Dense classifier.

    The skeleton shared by the supernet and the searched networks: `genotypes`
    maps a cell type to the genotype of its cells (None: full supernet cells);
    `fixed_weights` maps a cell type to the constant op weights [num_edges,
    num_ops] and edge weights [num_edges] its cells use. `Supernet` computes
    them from α and β instead (it overrides `cell_weights()`).
    """

    def __init__(
        self,
        search_space: SearchSpace,
        num_classes: int,
        genotypes=None,
        fixed_weights=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "Received an invalid value for num_classes, expected an integer >= 2. "
                f"Received: num_classes={num_classes!r}"
            )
        self.search_space = search_space
        self.num_classes = num_classes
        space = search_space
        genotypes = genotypes or {}
        self.stem_conv = MaskableConv2D(
            3 * space.channels, 3, padding="same", use_bias=False, name="stem_conv"
        )
        self.stem_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="stem_bn")
        self.cells = []
        channels = space.channels
        reduction_prev = False
        for index, cell_type in enumerate(space.cell_types):
            reduction = cell_type == "reduce"
            if reduction:
                channels *= 2
            self.cells.append(
                Cell(
                    channels,
                    space.num_nodes,
                    reduction,
                    reduction_prev,
                    space.op_names,
                    genotype=genotypes.get(cell_type),
                    name=f"cell_{index}",
                )
            )
            reduction_prev = reduction
        self.global_pool = keras.layers.GlobalAveragePooling2D(name="global_pool")
        self.classifier = MaskableDense(num_classes, name="classifier")
        self._fixed_weights = fixed_weights or {}

    def cell_weights(self) -> dict:
        """Per present cell type, (op weights, edge weights) for its cells."""
        return {
            cell_type: (ops.convert_to_tensor(op_w), ops.convert_to_tensor(edge_w))
            for cell_type, (op_w, edge_w) in self._fixed_weights.items()
        }

    def call(self, images, training=None):
        weights = self.cell_weights()
        s0 = s1 = self.stem_bn(self.stem_conv(images), training=training)
        for cell, cell_type in zip(self.cells, self.search_space.cell_types, strict=True):
            op_weights, edge_weights = weights[cell_type]
            s0, s1 = s1, cell(s0, s1, op_weights, edge_weights, training=training)
        return self.classifier(self.global_pool(s1))

    def kernel_layers(self) -> list:
        """Every layer with a maskable kernel (convolutions and the classifier), in order."""
        return [layer for layer in self._flatten_layers() if isinstance(layer, MaskableKernel)]


class Supernet(CellNetwork):
    """The multi-level encoded supernet: full cells, α and β as trainable variables.

    `arch_transform`, when set, maps (cell_type, op_weights, edge_weights) to
    the weights the cells use; the masking phase sets it to apply M_α and M_β.
    """

    arch_transform = None

    def __init__(self, search_space: SearchSpace, num_classes: int, **kwargs):
        super().__init__(search_space, num_classes, **kwargs)
        space = search_space
        arch_init = keras.initializers.RandomNormal(stddev=1e-3)
        self.alphas, self.betas = {}, {}
        for cell_type in space.present_cell_types:
            self.alphas[cell_type] = self.add_weight(
                shape=(space.num_edges, len(space.op_names)),
                initializer=arch_init,
                name=f"alpha_{cell_type}",
            )
            if space.multi_level:
                self.betas[cell_type] = self.add_weight(
                    shape=(space.num_edges,), initializer=arch_init, name=f"beta_{cell_type}"
                )
        self._uniform_edge_weights = uniform_edge_weights(space.num_nodes)

    @property
    def arch_variables(self) -> list:
        """α then β of every present cell type: the architecture parameters."""
        return list(self.alphas.values()) + list(self.betas.values())

    @property
    def weight_variables(self) -> list:
        """Every trainable variable that is not an architecture parameter."""
        arch_ids = {id(v) for v in self.arch_variables}
        return [v for v in self.trainable_variables if id(v) not in arch_ids]

    def op_weights(self, cell_type: str):
        """softmax(α) over the ops of each edge: [num_edges, num_ops]."""
        return ops.softmax(self.alphas[cell_type], axis=-1)

    def edge_weights(self, cell_type: str):
        """softmax(β) over each node's incoming edges, or uniform in single-level mode."""
        if self.search_space.multi_level:
            return segment_softmax(self.betas[cell_type], self.search_space.num_nodes)
        return ops.convert_to_tensor(self._uniform_edge_weights)

    def cell_weights(self) -> dict:
        weights = {}
        for cell_type in self.search_space.present_cell_types:
            op_weights, edge_weights = self.op_weights(cell_type), self.edge_weights(cell_type)
            if self.arch_transform is not None:
                op_weights, edge_weights = self.arch_transform(cell_type, op_weights, edge_weights)
            weights[cell_type] = (op_weights, edge_weights)
        return weights

    def arch_weights_numpy(self) -> dict:
        """softmax(α) and softmax(β) per cell type as nested lists (for logs and JSON)."""
        return {
            cell_type: {
                "ops": np.asarray(self.op_weights(cell_type)).round(6).tolist(),
                "edges": np.asarray(self.edge_weights(cell_type)).round(6).tolist(),
            }
            for cell_type in self.search_space.present_cell_types
        }
