"""Deriving a searched cell from binary masks: the rule, and the three derivations.

Each derivation produces binary op masks M_α [num_edges, num_ops] and edge
masks M_β [num_edges] per cell type; one rule (`derive_cell`) turns masks into
a cell:

- an op survives iff its α mask is 1;
- an edge survives iff its β mask is 1, at least one of its ops survives and
  its source node survives (the input nodes 0, 1 always do) — an edge leaving a
  dead node would only carry zeros;
- a node survives iff at least one incoming edge survives; a dead node leaves
  the cell's output concatenation.

Nodes keep any number of edges and edges any number of ops (no top-2 rule).
The derivations (`DERIVATIONS`):
- "masks": the binary masks learned by hierarchical masking (HM-NAS);
- "darts", "random": the baselines of `hmnas_keras.architecture.baselines`.

With "masks" the surviving op and edge weights (M_α ⊙ softmax(α*),
M_β ⊙ softmax(β*)) are kept as fixed scales, taken from the trained supernet;
"darts" and "random" give discrete DARTS cells, every kept op and edge with
weight 1 (DARTS keeps no softmax scales; paper §1, Table 5).
Plain numpy: no TensorFlow.
"""

import numpy as np

from hmnas_keras.architecture import baselines
from hmnas_keras.space.search_space import cell_edges, edge_index

DERIVATIONS = ("masks", "darts", "random")


def derive_cell(
    op_names, num_nodes, op_weights, edge_weights, alpha_mask, beta_mask=None, digits=6
) -> dict:
    """One cell type's entry of architecture.json from its weights and binary masks."""
    op_weights = np.asarray(op_weights, dtype="float64")
    edge_weights = np.asarray(edge_weights, dtype="float64")
    alpha_mask = np.asarray(alpha_mask, dtype=bool)
    beta_mask = (
        np.ones(len(edge_weights), dtype=bool)
        if beta_mask is None
        else np.asarray(beta_mask, dtype=bool)
    )
    alive = {0, 1}
    edges, pruned = [], []
    for index, (source, target) in enumerate(cell_edges(num_nodes)):
        if not beta_mask[index]:
            reason = "edge masked"
        elif not alpha_mask[index].any():
            reason = "every op masked"
        elif source not in alive:
            reason = "source node dead"
        else:
            kept = [
                {"name": name, "weight": round(float(op_weights[index, k]), digits)}
                for k, name in enumerate(op_names)
                if alpha_mask[index, k]
            ]
            edges.append(
                {
                    "source": source,
                    "target": target,
                    "weight": round(float(edge_weights[index]), digits),
                    "ops": kept,
                }
            )
            alive.add(target)
            continue
        pruned.append({"source": source, "target": target, "reason": reason})
    nodes = range(2, num_nodes + 2)
    return {
        "edges": edges,
        "alive_nodes": [n for n in nodes if n in alive],
        "dead_nodes": [n for n in nodes if n not in alive],
        "incoming_edges": {str(n): sum(e["target"] == n for e in edges) for n in nodes},
        "pruned_edges": pruned,
        "ops_kept": sum(len(e["ops"]) for e in edges),
        "ops_total": int(alpha_mask.size),
    }


def cell_masks(derivation, space, op_weights, edge_weights, learned=None, rng=None):
    """(M_α, M_β or None) of one cell type for `derivation`.

    `op_weights`, `edge_weights`: softmax(α*), softmax(β*) of the cell type;
    `learned`: (M_α, M_β) learned by hierarchical masking ("masks");
    `rng`: the generator of the random derivation.
    """
    if derivation == "masks":
        return learned
    if derivation == "darts":
        return baselines.darts_masks(op_weights, edge_weights, space.num_nodes, space.multi_level)
    if derivation == "random":
        return baselines.random_masks(len(space.op_names), space.num_nodes, rng)
    raise ValueError(
        f"Received an unknown derivation, expected one of {', '.join(DERIVATIONS)}. "
        f"Received: derivation={derivation!r}"
    )


def _kept(vector) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.asarray(vector) > 0.5)]


def derive_instances(space, cells: dict, gates: list, channel_masks: dict | None) -> list:
    """architecture.json's "instances": what survives in each cell of the network.

    `cells`: the cell types' entries (`derive_cell`); `gates`: per cell, the
    0/1 gates of `hmnas_keras.architecture.cost.network_gates` as numbers;
    `channel_masks`: the binary channel masks ({("stem",) | ("cell", i) |
    ("middle", i, edge, op): vector}) or None with element masks. With element
    masks every cell of a type keeps its type's edges; with channel masks a
    separable convolution whose middle channels all died is pruned in that
    cell (and with it, perhaps, its edge and nodes). A cell nothing downstream
    reads is not used.
    """
    instances = []
    for index, cell_type in enumerate(space.cell_types):
        gate = gates[index]
        edges = []
        for entry in cells[cell_type]["edges"]:
            edge = edge_index(entry["source"], entry["target"])
            names = [op["name"] for op in entry["ops"] if gate["op"][edge, op["name"]] > 0.5]
            if gate["edge"][edge] > 0.5:
                edges.append({"source": entry["source"], "target": entry["target"], "ops": names})
        instance = {
            "cell": index,
            "type": cell_type,
            "used": bool(gate["used"] > 0.5),
            "edges": edges,
            "alive_nodes": [n for n in range(2, space.num_nodes + 2) if gate["nodes"][n] > 0.5],
            "channels": None,
            "middle": None,
        }
        if channel_masks is not None:
            instance["channels"] = _kept(channel_masks["cell", index])
            instance["middle"] = {
                f"{e['source']}_{e['target']}/{name}": _kept(
                    channel_masks["middle", index, edge_index(e["source"], e["target"]), name]
                )
                for e in edges
                for name in e["ops"]
                if name.startswith("sep_conv")
            }
        instances.append(instance)
    return instances
