"""Pictures of what a search found (paper Fig. 4–6), drawn from a workdir's files.

`draw_workdir(workdir)` writes under WORKDIR/pictures/:

- `cell_<type>.png`, `.svg` and `.dot` (Graphviz source) — each cell type as a
  graph: inputs c_{k-2}, c_{k-1}, the intermediate nodes (dead ones grey) and
  the output; every surviving edge labelled with its weight and its ops (with
  their weights), drawn thicker the heavier it is;
- `incoming_edges.png` — the number of surviving incoming edges per node;
- `ops_per_edge.png` — the histogram of surviving edges by number of ops;
- `edge_weights.png` — softmax(β) of every edge over the supernet epochs,
  from `supernet/arch_history.jsonl` (when the run has one).

Pictures number the intermediate nodes from 0, as the paper's figures do:
picture node i is node i + 2 of architecture.json (whose 0 and 1 are the
inputs, drawn as c_{k-2} and c_{k-1}).

Only matplotlib is needed (no Graphviz binary); the `.dot` files render with
`dot -Tpng` for those who prefer Graphviz' layout.
"""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from hmnas_keras.architecture.architecture_json import read_architecture  # noqa: E402
from hmnas_keras.pipeline.workdir import Workdir  # noqa: E402
from hmnas_keras.space.search_space import cell_edges  # noqa: E402

SHORT_NAMES = {
    "sep_conv_3x3": "sep3",
    "sep_conv_5x5": "sep5",
    "dil_conv_3x3": "dil3",
    "dil_conv_5x5": "dil5",
    "max_pool_3x3": "max",
    "avg_pool_3x3": "avg",
    "skip_connect": "skip",
}


def _node_label(node: int) -> str:
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(node, str(node - 2))


def _short(op_name: str) -> str:
    return SHORT_NAMES.get(op_name, op_name)


def _edge_label(edge: dict) -> str:
    ops = ", ".join(f"{_short(op['name'])} {op['weight']:.2f}" for op in edge["ops"])
    return f"β {edge['weight']:.2f}: {ops}"


def cell_dot(cell_type: str, cell: dict, num_nodes: int) -> str:
    """The cell as Graphviz DOT source."""
    alive = set(cell["alive_nodes"])
    lines = [
        f'digraph "{cell_type}_cell" {{',
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    for node in range(num_nodes + 2):
        if node < 2:
            style = 'fillcolor="#c6dbef"'
        elif node in alive:
            style = 'fillcolor="#fdd0a2"'
        else:
            style = 'fillcolor="#f0f0f0", fontcolor="#969696", style="rounded,filled,dashed"'
        lines.append(f'  n{node} [label="{_node_label(node)}", {style}];')
    lines.append('  out [label="c_{k}", fillcolor="#c7e9c0"];')
    for edge in cell["edges"]:
        width = 1.0 + 4.0 * edge["weight"]
        lines.append(
            f'  n{edge["source"]} -> n{edge["target"]} [label="{_edge_label(edge)}", '
            f"penwidth={width:.2f}];"
        )
    for node in sorted(alive):
        lines.append(f'  n{node} -> out [style=dashed, color="#969696"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _positions(num_nodes: int) -> dict:
    positions = {0: (0.0, 1.5), 1: (0.0, -1.5)}
    for node in range(2, num_nodes + 2):
        positions[node] = (2.0 * (node - 1), 0.9 if node % 2 else -0.9)
    positions["out"] = (2.0 * (num_nodes + 1), 0.0)
    return positions


def _edge_name(index: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[index % 26] * (1 + index // 26)


def _label_point(start, end, rad: float, source: int, target: int) -> tuple[float, float]:
    """A point on matplotlib's arc3 curve between `start` and `end`, where the edge's label goes.

    arc3 is a quadratic Bézier (equal aspect, so data and display directions
    agree); labels of later sources sit further along, so they spread out.
    """
    control = (
        (start[0] + end[0]) / 2 + rad * (end[1] - start[1]),
        (start[1] + end[1]) / 2 - rad * (end[0] - start[0]),
    )
    t = 0.3 + 0.4 * source / max(1, target - 1)
    return tuple(
        (1 - t) ** 2 * start[i] + 2 * t * (1 - t) * control[i] + t**2 * end[i] for i in (0, 1)
    )


def _draw_edges(axes, cell: dict, positions: dict) -> list[str]:
    """Draws each surviving edge with its letter and weight; returns the op table's rows."""
    rows = []
    for index, edge in enumerate(cell["edges"]):
        start, end = positions[edge["source"]], positions[edge["target"]]
        rad = 0.25 * (1 if index % 2 else -1) if edge["target"] - edge["source"] > 1 else 0.1
        axes.add_patch(
            FancyArrowPatch(
                start,
                end,
                connectionstyle=f"arc3,rad={rad}",
                arrowstyle="-|>",
                mutation_scale=14,
                linewidth=0.8 + 4.0 * edge["weight"],
                color="#3182bd",
                shrinkA=18,
                shrinkB=18,
                alpha=0.8,
            )
        )
        middle_x, middle_y = _label_point(start, end, rad, edge["source"], edge["target"])
        name = _edge_name(index)
        axes.text(
            middle_x,
            middle_y,
            f"{name} {edge['weight']:.2f}",
            fontsize=8,
            ha="center",
            va="center",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "linewidth": 0.3},
        )
        ops = " ".join(f"{_short(op['name'])} {op['weight']:.2f}" for op in edge["ops"])
        route = f"{_node_label(edge['source'])}→{_node_label(edge['target'])}"
        rows.append(f"{name}  {route:<11} β {edge['weight']:.3f}\n   {ops}")
    return rows


def _draw_nodes(axes, alive: set, positions: dict) -> None:
    """The nodes (dead ones grey) and the dashed arrows of the alive nodes into the output."""
    for node in sorted(alive):
        axes.annotate(
            "",
            xy=positions["out"],
            xytext=positions[node],
            arrowprops={
                "arrowstyle": "-|>",
                "linestyle": "dashed",
                "color": "#969696",
                "shrinkA": 18,
                "shrinkB": 18,
            },
        )
    for node, (x, y) in positions.items():
        if node == "out":
            color, label, text_color = "#c7e9c0", "c_{k}", "black"
        elif node < 2:
            color, label, text_color = "#c6dbef", _node_label(node), "black"
        elif node in alive:
            color, label, text_color = "#fdd0a2", _node_label(node), "black"
        else:
            color, label, text_color = "#f0f0f0", f"{_node_label(node)} (dead)", "#969696"
        axes.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=11,
            color=text_color,
            bbox={"boxstyle": "round,pad=0.5", "facecolor": color, "edgecolor": "#636363"},
        )


def draw_cell(cell_type: str, cell: dict, num_nodes: int, path_stem: str) -> list[str]:
    """Draws one cell type to PATH_STEM.png, .svg and .dot; returns the paths written.

    Each edge carries a letter and its weight; the table on the right lists
    the ops of every lettered edge with their weights.
    """
    positions = _positions(num_nodes)
    figure, (axes, table) = plt.subplots(
        1,
        2,
        figsize=(3.0 * (num_nodes + 2) + 4.5, 6.0),
        gridspec_kw={"width_ratios": [2.0 * (num_nodes + 2), 4.5]},
    )
    rows = _draw_edges(axes, cell, positions)
    _draw_nodes(axes, set(cell["alive_nodes"]), positions)
    axes.set_xlim(-0.8, 2.0 * (num_nodes + 1) + 0.8)
    axes.set_ylim(-2.6, 2.6)
    axes.set_aspect("equal")
    axes.axis("off")
    kept = f"{len(cell['edges'])} edges, {cell['ops_kept']}/{cell['ops_total']} ops"
    axes.set_title(f"{cell_type} cell: {kept} (edge: letter, weight; line width ~ weight)")
    table.axis("off")
    table.text(
        0.0,
        1.0,
        "\n".join(rows) if rows else "no surviving edge",
        family="monospace",
        fontsize=7.5,
        va="top",
        ha="left",
        transform=table.transAxes,
    )
    table.set_title("ops of each edge (op weight)", fontsize=9)
    written = []
    for extension in ("png", "svg"):
        path = f"{path_stem}.{extension}"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        written.append(path)
    plt.close(figure)
    with open(f"{path_stem}.dot", "w") as handle:
        handle.write(cell_dot(cell_type, cell, num_nodes))
    written.append(f"{path_stem}.dot")
    return written


def _grouped_bars(groups: dict, tick_labels: list, title: str, xlabel, ylabel, path, width_in):
    """One bar per (group, tick), groups side by side; saves the figure to `path`."""
    figure, axes = plt.subplots(figsize=(width_in, 3.5))
    width = 0.8 / len(groups)
    for offset, (label, counts) in enumerate(groups.items()):
        axes.bar([k + offset * width for k in range(len(counts))], counts, width=width, label=label)
    axes.set_xticks([k + width * (len(groups) - 1) / 2 for k in range(len(tick_labels))])
    axes.set_xticklabels(tick_labels)
    if xlabel:
        axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend()
    axes.set_title(title)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def draw_incoming_edges(architecture: dict, path: str) -> str:
    """Bar chart: surviving incoming edges per intermediate node, per cell type (paper Fig. 5)."""
    cells = architecture["cells"]
    num_nodes = architecture["search_space"]["num_nodes"]
    groups = {
        f"{cell_type} cell": [
            int(cell["incoming_edges"].get(str(n), 0)) for n in range(2, num_nodes + 2)
        ]
        for cell_type, cell in cells.items()
    }
    ticks = [f"node {n}" for n in range(num_nodes)]
    width_in = 1.2 * num_nodes * len(cells) + 2
    return _grouped_bars(
        groups, ticks, "Incoming edges per node", None, "surviving incoming edges", path, width_in
    )


def draw_ops_per_edge(architecture: dict, path: str) -> str:
    """Histogram: surviving edges by their number of surviving ops, per cell type (paper Fig. 6)."""
    num_ops = len(architecture["search_space"]["op_names"])
    groups = {}
    for cell_type, cell in architecture["cells"].items():
        counts = [0] * num_ops
        for edge in cell["edges"]:
            counts[len(edge["ops"]) - 1] += 1
        groups[f"{cell_type} cell"] = counts
    ticks = [str(k + 1) for k in range(num_ops)]
    return _grouped_bars(
        groups, ticks, "Edges by number of ops", "ops on the edge", "edges", path, 6
    )


def read_arch_history(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def draw_edge_weights(history: list[dict], num_nodes: int, path: str) -> str:
    """softmax(β) of every edge after each supernet epoch, one panel per cell type (Fig. 4)."""
    cell_types = list(history[0]["weights"])
    edges = cell_edges(num_nodes)
    figure, panels = plt.subplots(
        1, len(cell_types), figsize=(6 * len(cell_types), 4), squeeze=False
    )
    epochs = [row["epoch"] for row in history]
    colors = plt.get_cmap("tab20")
    for axes, cell_type in zip(panels[0], cell_types, strict=True):
        for index, (source, target) in enumerate(edges):
            values = [row["weights"][cell_type]["edges"][index] for row in history]
            axes.plot(
                epochs,
                values,
                marker="o",
                markersize=3,
                color=colors(index % 20),
                label=f"{_node_label(source)}→{_node_label(target)}",
            )
        axes.set_xlabel("supernet epoch")
        axes.set_ylabel("edge weight softmax(β)")
        axes.set_title(f"{cell_type} cell")
        axes.legend(fontsize=7, ncol=2)
    figure.suptitle("Edge weights during the supernet search")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def draw_workdir(workdir: Workdir) -> list[str]:
    """Draws every picture WORKDIR's files allow; returns the paths written."""
    architecture = read_architecture(workdir.architecture)
    directory = workdir.pictures
    os.makedirs(directory, exist_ok=True)
    num_nodes = architecture["search_space"]["num_nodes"]
    written = []
    for cell_type, cell in architecture["cells"].items():
        written += draw_cell(
            cell_type, cell, num_nodes, os.path.join(directory, f"cell_{cell_type}")
        )
    written.append(draw_incoming_edges(architecture, os.path.join(directory, "incoming_edges.png")))
    written.append(draw_ops_per_edge(architecture, os.path.join(directory, "ops_per_edge.png")))
    if os.path.exists(workdir.arch_history):
        history = read_arch_history(workdir.arch_history)
        if history:
            written.append(
                draw_edge_weights(history, num_nodes, os.path.join(directory, "edge_weights.png"))
            )
    return written
