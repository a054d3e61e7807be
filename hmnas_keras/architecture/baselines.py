"""The paper's baselines (§4.4, Tables 5–6), built from the same code as HM-NAS.

- Single-level encoding: the supernet with β fixed to uniform edge weights
  (`SearchSpace(multi_level=False)`; `--nomulti_level`), then the DARTS heuristic.
- The DARTS heuristic (`darts_masks`, `--derivation=darts`): per edge the
  strongest op, per node the two strongest incoming edges; strength
  softmax(α)·softmax(β) (softmax(α) alone in single-level mode).
- A random architecture (`random_masks`, `--derivation=random`): a
  DARTS-shaped random cell from the same space, drawn by seed.
- Random initialisation (`--finetune_init=scratch`): a searched network
  trained from fresh weights instead of the supernet's, its weight masks
  kept (the same pruned network; `--noscratch_masks` trains it dense).

The DARTS and random cells are discrete: each kept op and edge has weight 1.

Each returns binary masks (M_α [num_edges, num_ops], M_β [num_edges]) that
`hmnas_keras.architecture.derivation.derive_cell` turns into a cell. Plain
numpy: no TensorFlow.
"""

import numpy as np

from hmnas_keras.space.search_space import cell_edges, incoming_edges


def darts_masks(op_weights, edge_weights, num_nodes: int, multi_level: bool):
    """DARTS' heuristic as masks: per edge the strongest op, per node the top-2 edges.

    Edge strength is max_k softmax(α)_k · softmax(β)_edge (multi-level) or
    max_k softmax(α)_k (single-level); the two incoming edges of a node come
    from distinct source nodes by construction.
    """
    op_weights = np.asarray(op_weights, dtype="float64")
    edge_weights = np.asarray(edge_weights, dtype="float64")
    alpha_mask = np.zeros(op_weights.shape, dtype=bool)
    alpha_mask[np.arange(len(op_weights)), op_weights.argmax(axis=1)] = True
    strength = op_weights.max(axis=1) * (edge_weights if multi_level else 1.0)
    beta_mask = np.zeros(len(edge_weights), dtype=bool)
    for _, rows in incoming_edges(num_nodes):
        # Stable: ties go to the earlier source.
        top = np.argsort(-strength[rows], kind="stable")[:2]
        beta_mask[rows.start + top] = True
    return alpha_mask, beta_mask


def random_masks(num_ops: int, num_nodes: int, rng: np.random.Generator):
    """A DARTS-shaped random cell: per node 2 distinct random inputs, one random op each."""
    num_edges = len(cell_edges(num_nodes))
    alpha_mask = np.zeros((num_edges, num_ops), dtype=bool)
    beta_mask = np.zeros(num_edges, dtype=bool)
    for target, rows in incoming_edges(num_nodes):
        for source in rng.choice(target, size=2, replace=False):
            beta_mask[rows.start + source] = True
            alpha_mask[rows.start + source, rng.integers(num_ops)] = True
    return alpha_mask, beta_mask
