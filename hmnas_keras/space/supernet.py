"""The multi-level encoded supernet (paper §3.1, Eq. 1–2; DESIGN.md §2).

`Supernet` is a Keras model: a stem, `num_cells` cells and a classifier
(`hmnas_keras.space.network.CellNetwork`). Each cell type (normal, reduce) has
one α (edge x op logits) and, in multi-level mode, one β (one logit per
incoming edge of each intermediate node), shared by every cell of that type:
op weights softmax(α) over each edge's ops, edge weights softmax(β) over each
node's incoming edges. Single-level encoding (the DARTS baseline) fixes the
edge weights to 1 / in-degree. `Supernet.arch_variables` and
`Supernet.weight_variables` give the two groups by reference.
"""

from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from hmnas_keras.space.cell import share_edge_calls
from hmnas_keras.space.network import CellNetwork
from hmnas_keras.space.search_space import SearchSpace, incoming_edges


def segment_softmax(logits, num_nodes: int):
    """Softmax of the β logits over the incoming edges of each intermediate node."""
    return ops.concatenate(
        [ops.softmax(logits[rows]) for _, rows in incoming_edges(num_nodes)], axis=0
    )


def uniform_edge_weights(num_nodes: int) -> np.ndarray:
    """Single-level encoding: every incoming edge of node i weighs 1 / (i's in-degree)."""
    return np.concatenate(
        [np.full(target, 1.0 / target, dtype="float32") for target, _ in incoming_edges(num_nodes)]
    )


class Supernet(CellNetwork):
    """The multi-level encoded supernet: full cells, α and β as trainable variables.

    Its op and edge weights can be masked (the architecture half of the mask
    hook, `hmnas_keras.space.maskable` being the weight half): with
    `set_arch_masks(masks)`, `masks(cell_type)` returns (op mask [num_edges,
    num_ops], edge mask [num_edges] or None) and the cells use
    op mask ⊙ softmax(α) and edge mask ⊙ softmax(β) (DESIGN.md §2; no
    renormalisation, so a 0 removes what it masks). None removes the masks.
    `recompute`: its edges keep no activations for training's backward pass
    (`cell.SharedCalls`): less memory, slower steps.
    """

    _arch_masks = None

    def __init__(
        self, search_space: SearchSpace, num_classes: int, recompute: bool = False, **kwargs
    ):
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
        share_edge_calls(self, recompute=recompute)

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

    def set_arch_masks(self, masks: Callable | None) -> None:
        """Masks the op and edge weights from now on (see the class doc); None removes them."""
        if masks is not None and not callable(masks):
            raise TypeError(
                "Received invalid arch masks, expected a callable cell_type -> (op mask, edge "
                f"mask) (or None). Received: {type(masks).__name__}"
            )
        self._arch_masks = masks

    def cell_weights(self) -> dict:
        weights = {}
        for cell_type in self.search_space.present_cell_types:
            op_weights, edge_weights = self.op_weights(cell_type), self.edge_weights(cell_type)
            if self._arch_masks is not None:
                op_mask, edge_mask = self._arch_masks(cell_type)
                op_weights = op_weights * op_mask
                if edge_mask is not None:
                    edge_weights = edge_weights * edge_mask
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
