"""`report.json` and its text summary: the paper's Table 3 for one run.

Rows: the supernet, the searched network (after masking, with inherited
weights, before fine-tuning) and the fine-tuned network — test accuracy,
parameters (dense and non-zero), reduction against the supernet, FLOPs
(multiply-accumulates per image; the text shows the dense count, report.json
also the count over non-zero weights) and the wall time of the phase that made it.
After the export phase, an "export" section: the exported files and their
sizes, the compact model's parameters and FLOPs, the parity errors of every
export, and onnxruntime latency and throughput against Keras
(`hmnas_keras.export`); "pictures" lists the drawings of the cells.
"""

import json
import os

from hmnas_keras.architecture import ARCHITECTURE_FILE
from hmnas_keras.checkpoint import write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.derive import SEARCHED_FILE, supernet_checkpoint_path
from hmnas_keras.export import EXPORT_DIR
from hmnas_keras.export import SUMMARY_FILE as EXPORT_SUMMARY_FILE
from hmnas_keras.export import format_summary as format_export_summary
from hmnas_keras.pictures import PICTURES_DIR

REPORT_FILE = "report.json"
REPORT_TEXT_FILE = "report.txt"


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


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


def build_report(config: RunConfig, workdir: str) -> dict:
    """Collects the phases' summaries in WORKDIR into the report dictionary."""
    architecture = _read(os.path.join(workdir, ARCHITECTURE_FILE))
    supernet_dir = os.path.dirname(supernet_checkpoint_path(config, workdir))
    supernet = _read(os.path.join(supernet_dir, "summary.json"))
    mask = _read(os.path.join(workdir, "mask", "summary.json"))
    searched = _read(os.path.join(workdir, SEARCHED_FILE))
    finetune = _read(os.path.join(workdir, "finetune", "summary.json"))
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
        if supernet_dir != os.path.join(workdir, "supernet"):
            rows["supernet"]["from"] = supernet_dir
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
    report = {
        "workdir": os.path.abspath(workdir),
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
    export = _read(os.path.join(workdir, EXPORT_DIR, EXPORT_SUMMARY_FILE))
    if export:
        report["export"] = export
        report["total_wall_seconds"] = round(
            report["total_wall_seconds"] + export["export_seconds"], 2
        )
    pictures = os.path.join(workdir, PICTURES_DIR)
    if os.path.isdir(pictures):
        report["pictures"] = sorted(
            os.path.join(PICTURES_DIR, name) for name in os.listdir(pictures)
        )
    if architecture:
        report["cells"] = {
            cell_type: {
                "edges": len(cell["edges"]),
                "ops": cell["ops_kept"],
                "alive_nodes": cell["alive_nodes"],
                "dead_nodes": cell["dead_nodes"],
                "incoming_edges": cell["incoming_edges"],
            }
            for cell_type, cell in architecture["cells"].items()
        }
    return report


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
    if report.get("export"):
        lines.append(format_export_summary(report["export"]))
    if report.get("degenerate"):
        lines.append(f"Degenerate architecture: {report['degenerate']}.")
    lines.append(f"Total wall time of this run's phases: {report['total_wall_seconds']:.0f} s")
    return "\n".join(lines)


def write_report(config: RunConfig, workdir: str) -> tuple[dict, str]:
    report = build_report(config, workdir)
    text = format_report(report)
    write_json(os.path.join(workdir, REPORT_FILE), report)
    with open(os.path.join(workdir, REPORT_TEXT_FILE), "w") as handle:
        handle.write(text + "\n")
    return report, text
