"""The search space as plain data (paper §3.1, §4.1; DESIGN.md §2): no TensorFlow, no Keras.

`SearchSpace` is the shape of the supernet; `OP_NAMES` the ordered candidate
operations (the order of α's columns). A cell is a DAG: nodes 0 and 1 are its
inputs, 2 .. num_nodes + 1 its intermediate nodes, and intermediate node i
takes an edge from every earlier node. This module is the one place that
enumerates those edges: `cell_edges` lists them in α/β row order (by target,
then source), `edge_index` gives the row of one edge and `incoming_edges` the
rows of each intermediate node's incoming edges.
"""

import dataclasses

OP_NAMES = (
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
)
CELL_TYPES = ("normal", "reduce")


def cell_edges(num_nodes: int) -> tuple[tuple[int, int], ...]:
    """(source, target) of every edge of a cell, in α/β row order."""
    return tuple((source, target) for target in range(2, num_nodes + 2) for source in range(target))


def edge_index(source: int, target: int) -> int:
    """Row of edge source -> target in `cell_edges` order."""
    return (target - 1) * target // 2 - 1 + source


def incoming_edges(num_nodes: int) -> tuple[tuple[int, slice], ...]:
    """(node, slice of the rows of its incoming edges) for each intermediate node, in order."""
    return tuple(
        (target, slice(edge_index(0, target), edge_index(0, target) + target))
        for target in range(2, num_nodes + 2)
    )


def is_parameter_free(op_name: str, stride: int) -> bool:
    """Pooling (with its affine-free BN) and the stride-1 identity have no weights."""
    return op_name in ("max_pool_3x3", "avg_pool_3x3") or (
        op_name == "skip_connect" and stride == 1
    )


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

    @classmethod
    def from_dict(cls, values: dict) -> "SearchSpace":
        """The search space of a config.json or architecture.json entry."""
        values = dict(values)
        values["op_names"] = tuple(values["op_names"])
        return cls(**values)

    def to_dict(self) -> dict:
        return {
            "num_cells": self.num_cells,
            "channels": self.channels,
            "num_nodes": self.num_nodes,
            "op_names": list(self.op_names),
            "multi_level": self.multi_level,
        }

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
    def cell_channels(self) -> tuple[int, ...]:
        """C of each cell: the initial channels, doubled at every reduction cell."""
        channels, result = self.channels, []
        for cell_type in self.cell_types:
            if cell_type == "reduce":
                channels *= 2
            result.append(channels)
        return tuple(result)

    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """(source, target) node pairs of a cell, in α/β row order (see `cell_edges`)."""
        return cell_edges(self.num_nodes)

    @property
    def num_edges(self) -> int:
        return len(self.edges)
