"""The searched architecture as plain data: the `architecture.json` format (DESIGN.md §2).

An architecture is a JSON-ready dictionary, kept apart from the code that
builds networks from it (`hmnas_keras.architecture.searched_network`) and from
the rules that derive it (`hmnas_keras.architecture.derivation`). Format
"hmnas_keras/architecture", version 2:

    {"format": "hmnas_keras/architecture", "version": 2,
     "derivation": "masks" | "darts" | "random",
     "search_space": {"num_cells", "channels", "num_nodes", "op_names", "multi_level"},
     "num_classes": int, "image_shape": [h, w, c], "class_names": [...],
     "cells": {cell_type: {
         "edges": [{"source": int, "target": int, "weight": float,
                    "ops": [{"name": str, "weight": float}, ...]}, ...],
         "alive_nodes": [int, ...], "dead_nodes": [int, ...],
         "incoming_edges": {node: count}, "pruned_edges": [{"source", "target", "reason"}],
         "ops_kept": int, "ops_total": int}},
     "instances": [{"cell": i, "type": cell_type, "used": bool,
         "edges": [{"source", "target", "ops": [names]}], "alive_nodes": [...],
         "channels": [kept channel indices] or null,
         "middle": {"SOURCE_TARGET/OP": [kept middle channel indices]} or null}, ...],
     "stem_channels": [kept stem channel indices] or null,
     "weight_mask": "element" | "channel",
     "weight_masks": file name next to architecture.json (npz of 0/1 kernels) or null,
     "degenerate": null or a sentence saying why the network is unusable,
     ... plus "layers", "parameters", "flops", "counts" and (with masks) "cost"
     added when it is derived (`hmnas_keras.pipeline.derive_phase`)}

"cells" holds what each cell type keeps, with the op and edge weights;
"instances" what each cell of the network keeps. They differ when a cell is
unused (nothing downstream reads it: it is not built) or, with channel masks,
when a separable convolution kept no middle channel in that cell. "channels"
and "middle" (channel masks only) say which channels survive: every node of a
cell keeps the same channels, each separable convolution its middle ones.
Version 1 files (no "instances") still read: every cell keeps its type's edges.

Nodes 0 and 1 are the cell inputs; 2 .. num_nodes + 1 the intermediate nodes.
"""

import json

import numpy as np

from hmnas_keras.architecture.derivation import DERIVATIONS
from hmnas_keras.checkpoint import write_json
from hmnas_keras.space.search_space import SearchSpace, cell_edges

FORMAT = "hmnas_keras/architecture"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class ArchitectureError(ValueError):
    """An architecture file that cannot be read or used."""


def new_architecture(
    derivation: str,
    search_space,
    num_classes: int,
    image_shape,
    class_names,
    cells: dict,
    weight_masks_file: str | None = None,
    instances: list | None = None,
    stem_channels: list | None = None,
    weight_mask: str = "element",
) -> dict:
    """The architecture.json dictionary (without counts) for derived `cells`.

    `instances` default to every cell keeping its type's edges, all used.
    """
    if derivation not in DERIVATIONS:
        raise ValueError(
            f"Received an unknown derivation, expected one of {', '.join(DERIVATIONS)}. "
            f"Received: derivation={derivation!r}"
        )
    architecture = {
        "format": FORMAT,
        "version": VERSION,
        "derivation": derivation,
        "search_space": search_space.to_dict(),
        "num_classes": int(num_classes),
        "image_shape": [int(d) for d in image_shape],
        "class_names": list(class_names),
        "cells": cells,
        "instances": instances,
        "stem_channels": stem_channels,
        "weight_mask": weight_mask,
        "weight_masks": weight_masks_file,
    }
    if instances is None:
        architecture["instances"] = _type_instances(architecture)
    architecture["degenerate"] = degenerate_reason(architecture)
    return architecture


def _type_instances(architecture: dict) -> list:
    """Instances of an architecture without per-cell information: each cell as its type."""
    space = search_space_of(architecture)
    return [
        {
            "cell": index,
            "type": cell_type,
            "used": True,
            "edges": [
                {"source": e["source"], "target": e["target"], "ops": [o["name"] for o in e["ops"]]}
                for e in architecture["cells"][cell_type]["edges"]
            ],
            "alive_nodes": list(architecture["cells"][cell_type]["alive_nodes"]),
            "channels": None,
            "middle": None,
        }
        for index, cell_type in enumerate(space.cell_types)
    ]


def instances(architecture: dict) -> list:
    """The architecture's "instances" (built from its cell types for a version 1 file)."""
    return architecture.get("instances") or _type_instances(architecture)


def network_instances(architecture: dict) -> list:
    """Per cell, the arguments `hmnas_keras.space.network.CellNetwork` builds it from."""
    result = []
    for instance in instances(architecture):
        middle = None
        if instance.get("middle") is not None:
            middle = {}
            for key, kept in instance["middle"].items():
                edge, name = key.split("/")
                source, target = (int(n) for n in edge.split("_"))
                middle[source, target, name] = len(kept)
        result.append(
            {
                "genotype": tuple(
                    (e["source"], e["target"], tuple(e["ops"])) for e in instance["edges"]
                ),
                "used": instance["used"],
                "kept": instance.get("channels"),
                "middle": middle,
            }
        )
    return result


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
    if architecture.get("stem_channels") == []:
        return (
            "every channel of the stem was masked, so the network's output no longer depends "
            "on its input"
        )
    for instance in architecture.get("instances") or []:
        if instance["used"] and not instance["alive_nodes"]:
            return (
                f"every node of cell {instance['cell']} was pruned (no channel, or no edge with "
                "an op, survived), so the network's output no longer depends on its input"
            )
    for name in ("stem_conv/kernel", "classifier/kernel"):
        if weight_masks is not None and name in weight_masks and not weight_masks[name].any():
            return (
                f"every weight of {name} was masked, so the network's output no longer "
                "depends on its input"
            )
    return None


def search_space_of(architecture: dict) -> SearchSpace:
    return SearchSpace.from_dict(architecture["search_space"])


def genotypes(architecture: dict) -> dict:
    """Cell type -> genotype ((source, target, op names), ...) for `hmnas_keras.space.cell.Cell`."""
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
    index = {edge: i for i, edge in enumerate(cell_edges(num_nodes))}
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
        "edges_total": len(architecture["cells"]) * len(cell_edges(num_nodes)),
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
    if architecture.get("version") not in READABLE_VERSIONS:
        raise ArchitectureError(
            f"{path} has format version {architecture.get('version')}; this hmnas_keras reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}."
        )
    for key in ("search_space", "num_classes", "image_shape", "cells"):
        if key not in architecture:
            raise ArchitectureError(f"{path} lacks the required key {key!r}.")
    return architecture
