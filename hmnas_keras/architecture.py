"""Deriving the searched architecture and its `architecture.json` (DESIGN.md §2).

Three derivations produce binary op masks M_α [num_edges, num_ops] and edge
masks M_β [num_edges] per cell type; one rule turns masks into a cell:

- an op survives iff its α mask is 1;
- an edge survives iff its β mask is 1, at least one of its ops survives and
  its source node survives (the input nodes 0, 1 always do) — an edge leaving a
  dead node would only carry zeros;
- a node survives iff at least one incoming edge survives; a dead node leaves
  the cell's output concatenation.

Nodes keep any number of edges and edges any number of ops (no top-2 rule).
The derivations:
- "masks": the binary masks learned by hierarchical masking (HM-NAS);
- "darts": DARTS' heuristic — per edge the strongest op, per node the two
  strongest incoming edges, strength softmax(α)·softmax(β) (softmax(α) alone in
  single-level mode);
- "random": a DARTS-shaped random cell from the same space — per node two
  distinct random incoming edges with one random op each, drawn by seed.

The surviving op and edge weights (M_α ⊙ softmax(α*), M_β ⊙ softmax(β*)) are
kept as fixed scales, taken from the trained supernet (for a random
architecture without one, from a fresh supernet: nearly uniform).

architecture.json, format "hmnas_keras/architecture" version 1:

    {"format": "hmnas_keras/architecture", "version": 1,
     "derivation": "masks" | "darts" | "random",
     "search_space": {"num_cells", "channels", "num_nodes", "op_names", "multi_level"},
     "num_classes": int, "image_shape": [h, w, c], "class_names": [...],
     "cells": {cell_type: {
         "edges": [{"source": int, "target": int, "weight": float,
                    "ops": [{"name": str, "weight": float}, ...]}, ...],
         "alive_nodes": [int, ...], "dead_nodes": [int, ...],
         "incoming_edges": {node: count}, "pruned_edges": [{"source", "target", "reason"}],
         "ops_kept": int, "ops_total": int}},
     "weight_masks": file name next to architecture.json (npz of 0/1 kernels) or null,
     "degenerate": null or a sentence saying why the network is unusable,
     ... plus "layers", "parameters" and "flops" added by `hmnas_keras.searched`}

Nodes 0 and 1 are the cell inputs; 2 .. num_nodes + 1 the intermediate nodes.
"""

import json

import numpy as np

from hmnas_keras.checkpoint import write_json

FORMAT = "hmnas_keras/architecture"
VERSION = 1
DERIVATIONS = ("masks", "darts", "random")
ARCHITECTURE_FILE = "architecture.json"


class ArchitectureError(ValueError):
    """An architecture file that cannot be read or used."""


def _edges(num_nodes: int) -> list[tuple[int, int]]:
    return [(source, target) for target in range(2, num_nodes + 2) for source in range(target)]


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
    for index, (source, target) in enumerate(_edges(num_nodes)):
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
    start = 0
    for target in range(2, num_nodes + 2):
        incoming = strength[start : start + target]
        # Stable: ties go to the earlier source.
        top = np.argsort(-incoming, kind="stable")[:2]
        beta_mask[start + top] = True
        start += target
    return alpha_mask, beta_mask


def random_masks(num_ops: int, num_nodes: int, rng: np.random.Generator):
    """A DARTS-shaped random cell: per node 2 distinct random inputs, one random op each."""
    num_edges = sum(range(2, num_nodes + 2))
    alpha_mask = np.zeros((num_edges, num_ops), dtype=bool)
    beta_mask = np.zeros(num_edges, dtype=bool)
    start = 0
    for target in range(2, num_nodes + 2):
        for source in rng.choice(target, size=2, replace=False):
            beta_mask[start + source] = True
            alpha_mask[start + source, rng.integers(num_ops)] = True
        start += target
    return alpha_mask, beta_mask


def new_architecture(
    derivation: str,
    search_space,
    num_classes: int,
    image_shape,
    class_names,
    cells: dict,
    weight_masks_file: str | None = None,
) -> dict:
    """The architecture.json dictionary (without counts) for derived `cells`."""
    if derivation not in DERIVATIONS:
        raise ValueError(
            f"Received an unknown derivation, expected one of {', '.join(DERIVATIONS)}. "
            f"Received: derivation={derivation!r}"
        )
    architecture = {
        "format": FORMAT,
        "version": VERSION,
        "derivation": derivation,
        "search_space": {
            "num_cells": search_space.num_cells,
            "channels": search_space.channels,
            "num_nodes": search_space.num_nodes,
            "op_names": list(search_space.op_names),
            "multi_level": search_space.multi_level,
        },
        "num_classes": int(num_classes),
        "image_shape": [int(d) for d in image_shape],
        "class_names": list(class_names),
        "cells": cells,
        "weight_masks": weight_masks_file,
    }
    architecture["degenerate"] = degenerate_reason(architecture)
    return architecture


def degenerate_reason(architecture: dict, weight_masks: dict | None = None) -> str | None:
    """Why the derived network cannot be used, or None.

    A cell type without a surviving node makes every cell of that type output
    zeros; a stem or classifier kernel masked entirely does the same to the
    whole network. Either way the output no longer depends on the input.
    """
    for cell_type, cell in architecture["cells"].items():
        if not cell["alive_nodes"]:
            return (
                f"every node of the {cell_type} cell was pruned (no edge kept an op), so the "
                "network's output no longer depends on its input"
            )
    for name in ("stem_conv/kernel", "classifier/kernel"):
        if weight_masks is not None and name in weight_masks and not weight_masks[name].any():
            return (
                f"every weight of {name} was masked, so the network's output no longer "
                "depends on its input"
            )
    return None


def genotypes(architecture: dict) -> dict:
    """Cell type -> genotype ((source, target, op names), ...) for `hmnas_keras.supernet.Cell`."""
    return {
        cell_type: tuple(
            (e["source"], e["target"], tuple(op["name"] for op in e["ops"])) for e in cell["edges"]
        )
        for cell_type, cell in architecture["cells"].items()
    }


def weight_matrices(architecture: dict) -> dict:
    """Cell type -> (op weights [num_edges, num_ops], edge weights [num_edges]), zeros if pruned."""
    space = architecture["search_space"]
    op_names = space["op_names"]
    num_nodes = space["num_nodes"]
    index = {edge: i for i, edge in enumerate(_edges(num_nodes))}
    matrices = {}
    for cell_type, cell in architecture["cells"].items():
        op_weights = np.zeros((len(index), len(op_names)), dtype="float32")
        edge_weights = np.zeros(len(index), dtype="float32")
        for edge in cell["edges"]:
            i = index[(edge["source"], edge["target"])]
            edge_weights[i] = edge["weight"]
            for op in edge["ops"]:
                op_weights[i, op_names.index(op["name"])] = op["weight"]
        matrices[cell_type] = (op_weights, edge_weights)
    return matrices


def summary_counts(architecture: dict) -> dict:
    """Ops, edges and nodes kept, summed over cell types, with their totals."""
    space = architecture["search_space"]
    num_nodes = space["num_nodes"]
    cells = architecture["cells"].values()
    return {
        "ops": sum(c["ops_kept"] for c in cells),
        "ops_total": sum(c["ops_total"] for c in cells),
        "edges": sum(len(c["edges"]) for c in cells),
        "edges_total": len(architecture["cells"]) * len(_edges(num_nodes)),
        "nodes": sum(len(c["alive_nodes"]) for c in cells),
        "nodes_total": len(architecture["cells"]) * num_nodes,
    }


def write_architecture(architecture: dict, path: str) -> None:
    write_json(path, architecture)


def read_architecture(path: str) -> dict:
    """Reads and checks an architecture.json; raises ArchitectureError with the reason."""
    try:
        with open(path) as handle:
            architecture = json.load(handle)
    except FileNotFoundError:
        raise ArchitectureError(f"No architecture file at {path}.") from None
    except json.JSONDecodeError as error:
        raise ArchitectureError(f"{path} is not valid JSON: {error}.") from None
    if not isinstance(architecture, dict) or architecture.get("format") != FORMAT:
        raise ArchitectureError(
            f'{path} is not an hmnas_keras architecture file (expected "format": "{FORMAT}").'
        )
    if architecture.get("version") != VERSION:
        raise ArchitectureError(
            f"{path} has format version {architecture.get('version')}; this hmnas_keras reads "
            f"version {VERSION}."
        )
    for key in ("search_space", "num_classes", "image_shape", "cells"):
        if key not in architecture:
            raise ArchitectureError(f"{path} lacks the required key {key!r}.")
    return architecture
