"""`report.json` and its text summary: the paper's Table 3 for one run.

Rows: the supernet, the searched network (after masking, with inherited
weights, before fine-tuning) and the fine-tuned network — test accuracy,
parameters (dense and non-zero), reduction against the supernet, FLOPs
(multiply-accumulates per image; the text shows the dense count, report.json
also the count over non-zero weights) and the wall time of the phase that made it.
After the export phase, an "export" section: the exported files and their
sizes, the compact model's parameters and FLOPs, the parity errors of every
export, and onnxruntime latency and throughput against Keras
(`hmnas_keras.pipeline.export_phase`); "pictures" lists the drawings of the cells.
"""

import os

from hmnas_keras.checkpoint import write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.pipeline.export_phase import format_summary as format_export_summary
from hmnas_keras.pipeline.workdir import Workdir
from hmnas_keras.pipeline.workdir import read_json_if_exists as _read


def _row(test_accuracy, parameters, flops, wall_seconds, supernet_parameters) -> dict:
    reduction = None
    if parameters and supernet_parameters:
        reduction = round(100.0 * (1.0 - parameters["nonzero"] / supernet_parameters["dense"]), 2)
    return {
        "test_accuracy": test_accuracy,
        "parameters": parameters,
        "reduction_percent": reduction,
        "flops": flops,
        "wall_seconds": wall_seconds,
    }


def _rows(workdir: Workdir, architecture: dict | None) -> dict:
    """The Table-3 rows: supernet, searched network, fine-tuned network (those that exist)."""
    supernet = _read(workdir.trained_supernet_summary)
    mask = _read(workdir.mask.summary)
    searched = _read(workdir.searched_summary)
    finetune = _read(workdir.finetune.summary)
    parameters = (architecture or {}).get("parameters", {})
    flops = (architecture or {}).get("flops", {})
    supernet_parameters = parameters.get("supernet")
    rows = {}
    if supernet or supernet_parameters:
        rows["supernet"] = _row(
            (supernet or {}).get("test_accuracy"),
            supernet_parameters,
            flops.get("supernet"),
            (supernet or {}).get("wall_seconds"),
            supernet_parameters,
        )
        if workdir.uses_other_supernet:
            rows["supernet"]["from"] = os.path.dirname(workdir.trained_supernet)
    if searched:
        wall = mask["wall_seconds"] if mask and searched["derivation"] == "masks" else None
        rows["searched"] = _row(
            searched["test_accuracy"],
            searched["parameters"],
            searched["flops"],
            wall if wall is not None else searched["derive_seconds"],
            supernet_parameters,
        )
    if finetune:
        rows["finetuned"] = _row(
            finetune["test_accuracy"],
            finetune["parameters"],
            finetune["flops"],
            finetune["wall_seconds"],
            supernet_parameters,
        )
        rows["finetuned"]["epochs"] = finetune["epochs"]
    return rows


def _cells(architecture: dict) -> dict:
    return {
        cell_type: {
            "edges": len(cell["edges"]),
            "ops": cell["ops_kept"],
            "alive_nodes": cell["alive_nodes"],
            "dead_nodes": cell["dead_nodes"],
            "incoming_edges": cell["incoming_edges"],
        }
        for cell_type, cell in architecture["cells"].items()
    }


def build_report(config: RunConfig, workdir: Workdir) -> dict:
    """Collects the phases' summaries in WORKDIR into the report dictionary."""
    architecture = _read(workdir.architecture)
    rows = _rows(workdir, architecture)
    report = {
        "workdir": os.path.abspath(workdir.root),
        "dataset": config.data.dataset,
        "derivation": config.derivation,
        "finetune_init": config.finetune_init,
        "phases": list(config.phases),
        "rows": rows,
        "architecture": (architecture or {}).get("counts"),
        "degenerate": (architecture or {}).get("degenerate"),
        "total_wall_seconds": round(
            sum(r["wall_seconds"] or 0.0 for r in rows.values() if "from" not in r), 2
        ),
    }
    export = _read(workdir.export.summary)
    if export:
        report["export"] = export
        report["total_wall_seconds"] = round(
            report["total_wall_seconds"] + export["export_seconds"], 2
        )
    if os.path.isdir(workdir.pictures):
        report["pictures"] = sorted(
            workdir.relative(os.path.join(workdir.pictures, name))
            for name in os.listdir(workdir.pictures)
        )
    if architecture:
        report["cells"] = _cells(architecture)
    mask = _read(workdir.mask.summary)
    if mask:
        report["mask"] = {
            "weight_mask": mask.get("weight_mask", "element"),
            "learning_rates": mask.get("learning_rates"),
            "target": mask.get("target"),
        }
    return report


def _format_mask(mask: dict) -> list[str]:
    """The mask phase's line: the kind of weight mask, learning rates, target and cost reached."""
    rates = mask.get("learning_rates")
    line = f"Masks: {mask['weight_mask']} weight masks"
    if rates:
        line += (
            f"; learning rates {rates['weight_masks']:.3g} (weights) / {rates['arch_masks']:.3g}"
            f" (α, β), {rates['schedule']} (x{rates['factor']:g} for {rates['steps']} steps)"
        )
    target = mask.get("target")
    if target:
        unit, scale = ("MFLOPs", 1e6) if target["kind"] == "flops" else ("parameters", 1.0)
        line += (
            f"; target {target['count'] / scale:,.6g} {unit} "
            f"({target['count'] / target['supernet']:.1%} of the supernet), reached "
            f"{target['reached'] / scale:,.6g} ({target['relative_error']:+.1%})"
        )
    return [line]


def _fmt(value, pattern, missing="-"):
    return missing if value is None else pattern.format(value)


def format_report(report: dict) -> str:
    """The text summary: one line per Table-3 row, then what the cells kept."""
    names = {"supernet": "supernet", "searched": "searched network", "finetuned": "fine-tuned"}
    lines = [
        f"HM-NAS report ({report['dataset']}; derivation {report['derivation']}, "
        f"fine-tuning from {report['finetune_init']} weights)",
        f"{'':18} {'test acc':>9} {'params':>11} {'non-zero':>11} {'reduction':>9} "
        f"{'MFLOPs':>9} {'wall':>9}",
    ]
    for key, row in report["rows"].items():
        parameters = row["parameters"] or {}
        flops = row["flops"] or {}
        lines.append(
            f"{names[key]:18} {_fmt(row['test_accuracy'], '{:.2%}'):>9} "
            f"{_fmt(parameters.get('dense'), '{:,}'):>11} "
            f"{_fmt(parameters.get('nonzero'), '{:,}'):>11} "
            f"{_fmt(row['reduction_percent'], '{:.1f}%'):>9} "
            f"{_fmt(flops.get('macs') and flops['macs'] / 1e6, '{:.2f}'):>9} "
            f"{_fmt(row['wall_seconds'], '{:.0f} s'):>9}"
            + (f"  (from {row['from']})" if "from" in row else "")
        )
    for cell_type, cell in (report.get("cells") or {}).items():
        lines.append(
            f"{cell_type} cell: {cell['edges']} edges, {cell['ops']} ops, nodes alive "
            f"{cell['alive_nodes']}"
            + (f", dead {cell['dead_nodes']}" if cell["dead_nodes"] else "")
        )
    if report.get("mask"):
        lines += _format_mask(report["mask"])
    if report.get("export"):
        lines.append(format_export_summary(report["export"]))
    if report.get("degenerate"):
        lines.append(f"Degenerate architecture: {report['degenerate']}.")
    lines.append(f"Total wall time of this run's phases: {report['total_wall_seconds']:.0f} s")
    return "\n".join(lines)


def write_report(config: RunConfig, workdir: Workdir) -> tuple[dict, str]:
    """Writes WORKDIR/report.json and report.txt; returns the report and its text."""
    report = build_report(config, workdir)
    text = format_report(report)
    write_json(workdir.report, report)
    with open(workdir.report_text, "w") as handle:
        handle.write(text + "\n")
    return report, text
