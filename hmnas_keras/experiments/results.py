"""An experiment's results: results.json (one entry per run), results.md, results.png.

Every figure is read from the runs' own files (finetune/summary.json,
mask/summary.json, supernet/summary.json, searched.json), so the results can
be rebuilt from the workdirs at any time.
"""

import os

import numpy as np

from hmnas_keras.checkpoint import write_json
from hmnas_keras.experiments.plan import VARIANTS, ExperimentFiles, PlannedRun
from hmnas_keras.pipeline.workdir import Workdir, read_json_if_exists

RESULTS_FORMAT = "hmnas_keras/experiment_results"


def is_finished(run: PlannedRun) -> bool:
    """A run has finished when its report exists: `search` writes it after its last phase."""
    return os.path.exists(Workdir(run.workdir).report)


def _phase_seconds(workdir: str, phase: str) -> float | None:
    summary = read_json_if_exists(getattr(Workdir(workdir), phase).summary)
    return None if summary is None else summary.get("wall_seconds")


def run_entry(run: PlannedRun, plan: dict, status: str, error: str | None = None) -> dict:
    """results.json's entry of `run` (figures filled in once it has finished)."""
    entry = {
        "name": run.name,
        "variant": run.variant,
        "seed": run.seed,
        "sample": run.sample,
        "status": status,
        "workdir": run.workdir,
        "error": error,
        "test_accuracy": None,
        "searched_test_accuracy": None,
        "searched_parameters": None,
        "parameters": None,
        "parameters_dense": None,
        "mflops": None,
        "mflops_nonzero": None,
        "wall_seconds": {},
    }
    if status != "finished":
        return entry
    if run.variant is None:  # a supernet run
        summary = read_json_if_exists(Workdir(run.workdir).supernet.summary) or {}
        entry.update(
            test_accuracy=summary.get("test_accuracy"),
            parameters=summary.get("weight_parameters"),
            parameters_dense=summary.get("weight_parameters"),
            wall_seconds={"supernet": summary.get("wall_seconds")},
        )
        return entry
    finetune = read_json_if_exists(Workdir(run.workdir).finetune.summary) or {}
    searched = read_json_if_exists(Workdir(run.workdir).searched_summary) or {}
    flops = finetune.get("flops") or {}
    entry.update(
        test_accuracy=finetune.get("test_accuracy"),
        searched_test_accuracy=searched.get("test_accuracy"),
        searched_parameters=(searched.get("parameters") or {}).get("nonzero"),
        parameters=(finetune.get("parameters") or {}).get("nonzero"),
        parameters_dense=(finetune.get("parameters") or {}).get("dense"),
        mflops=None if "macs" not in flops else flops["macs"] / 1e6,
        mflops_nonzero=None if "nonzero_macs" not in flops else flops["nonzero_macs"] / 1e6,
    )
    # The phases this result took, its shared supernet's and (random_init) its masks' too.
    by_name = {r.name: r for r in plan}
    sources, names = [], list(run.needs)
    while names:
        source = by_name[names.pop(0)]
        sources.append(source)
        names += source.needs
    seconds = {}
    for phase in ("supernet", "mask", "finetune"):
        for where in [run, *sources]:
            value = _phase_seconds(where.workdir, phase)
            if value is not None:
                seconds[phase] = value
                break
    entry["wall_seconds"] = seconds
    return entry


def write_results(files: ExperimentFiles, record: dict, entries: list[dict]) -> None:
    """Writes EXP/results.json and EXP/results.md."""
    write_json(
        files.results,
        {
            "format": RESULTS_FORMAT,
            "version": 1,
            "plan": record,
            "runs": [e for e in entries if e["variant"] is not None],
            "supernets": [e for e in entries if e["variant"] is None],
        },
    )
    with open(files.markdown, "w") as handle:
        handle.write(results_markdown(record, entries))


def _mean_std(values, scale=1.0, digits=2) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{np.mean(values):,.{digits}f} ± {np.std(values, ddof=1):,.{digits}f}"


def _number(value, form: str, scale=1) -> str:
    return "–" if value is None else form.format(value * scale)


def _paper(spec) -> str:
    if spec.paper_error is None:
        return "–"
    error = f"{spec.paper_error:.2f}"
    if spec.paper_error_std is not None:
        error += f" ± {spec.paper_error_std:.2f}"
    return f"{error} % / {spec.paper_params_m} M"


def results_markdown(record: dict, entries: list[dict]) -> str:
    """results.md: per variant, mean ± std over its finished runs, beside the paper's row."""
    runs = [e for e in entries if e["variant"] is not None]
    lines = [
        "# Experiment results",
        "",
        f"Variants {', '.join(record['variants'])}; seeds {', '.join(map(str, record['seeds']))}"
        + (
            f"; {record['random_archs']} random architectures per seed"
            if record["random_archs"]
            else ""
        )
        + ".",
        "",
        "Flags given to every run: "
        + (" ".join(f"`{flag}`" for flag in record["search_flags"].values()) or "(none)"),
        "",
        "Mean ± standard deviation over the finished runs of each variant. Parameters are "
        "those of the fine-tuned network (non-zero: what its weight masks keep); MFLOPs are "
        "its multiply-accumulates per image. Wall seconds per phase include the shared "
        "supernet a run started from (and, for random_init, the HM-NAS run's masking). "
        "The paper's column is its CIFAR-10 test error and parameters at the full budget "
        "(Tables 5, 6): compare orderings, not values.",
        "",
        "| variant | runs | test accuracy % | test error % | non-zero params | dense params "
        "| MFLOPs | supernet s | mask s | finetune s | paper: error / params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant in record["variants"]:
        mine = [e for e in runs if e["variant"] == variant]
        done = [e for e in mine if e["status"] == "finished"]
        accuracy = [e["test_accuracy"] for e in done]
        cells = [
            variant,
            f"{len(done)}/{len(mine)}",
            _mean_std(accuracy, 100),
            _mean_std([None if a is None else 1 - a for a in accuracy], 100),
            _mean_std([e["parameters"] for e in done], digits=0),
            _mean_std([e["parameters_dense"] for e in done], digits=0),
            _mean_std([e["mflops"] for e in done]),
            *(
                _mean_std([e["wall_seconds"].get(phase) for e in done], digits=0)
                for phase in ("supernet", "mask", "finetune")
            ),
            _paper(VARIANTS[variant]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _stages_table(entries)
    lines += [
        "",
        "## Runs",
        "",
        "| run | status | test accuracy % | searched (before fine-tuning) % | non-zero params "
        "| dense params | MFLOPs | error |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        cells = [
            e["name"],
            e["status"],
            _number(e["test_accuracy"], "{:.2f}", 100),
            _number(e["searched_test_accuracy"], "{:.2f}", 100),
            _number(e["parameters"], "{:,}"),
            _number(e["parameters_dense"], "{:,}"),
            _number(e["mflops"], "{:.2f}"),
            (e["error"] or "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The paper's Table 3 (CIFAR-10): test error % and parameters (M) of HM-NAS by stage.
PAPER_STAGES = {"supernet": (4.2, 3.0), "searched": (5.14, 1.8), "finetuned": (2.41, 1.8)}


def _stages_table(entries: list[dict]) -> list[str]:
    """HM-NAS by stage (the paper's Table 3): supernet, searched network, after fine-tuning."""
    hmnas = [e for e in entries if e["variant"] == "hmnas" and e["status"] == "finished"]
    if not hmnas:
        return []
    names = {e["name"] for e in entries}
    supernets = [
        e
        for e in entries
        if e["name"] in {f"seed{h['seed']}/supernet_multi_level" for h in hmnas} & names
    ]
    stages = {
        "supernet": ([e["test_accuracy"] for e in supernets], [e["parameters"] for e in supernets]),
        "searched": (
            [e["searched_test_accuracy"] for e in hmnas],
            [e["searched_parameters"] for e in hmnas],
        ),
        "finetuned": ([e["test_accuracy"] for e in hmnas], [e["parameters"] for e in hmnas]),
    }
    labels = {
        "supernet": "supernet",
        "searched": "searched network (inherited weights)",
        "finetuned": "searched network + fine-tuning",
    }
    lines = [
        "",
        "## HM-NAS by stage (the paper's Table 3)",
        "",
        "| stage | test accuracy % | test error % | parameters (supernet: all; others: non-zero) "
        "| paper: error / params |",
        "|---|---:|---:|---:|---|",
    ]
    for stage, (accuracy, parameters) in stages.items():
        error, params = PAPER_STAGES[stage]
        lines.append(
            f"| {labels[stage]} | {_mean_std(accuracy, 100)} "
            f"| {_mean_std([None if a is None else 1 - a for a in accuracy], 100)} "
            f"| {_mean_std(parameters, digits=0)} | {error:.2f} % / {params} M |"
        )
    return lines


def draw_results(path: str, entries: list[dict]) -> bool:
    """results.png: test accuracy against non-zero parameters, one marker per finished run."""
    done = [
        e
        for e in entries
        if e["variant"] is not None and e["status"] == "finished" and e["test_accuracy"] is not None
    ]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "os^vDP*X"
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, variant in enumerate(dict.fromkeys(e["variant"] for e in done)):
        mine = [e for e in done if e["variant"] == variant]
        axes.scatter(
            [e["parameters"] for e in mine],
            [100 * e["test_accuracy"] for e in mine],
            marker=markers[index % len(markers)],
            s=48,
            label=f"{variant} ({len(mine)})",
            alpha=0.85,
        )
    axes.set_xlabel("non-zero parameters of the fine-tuned network")
    axes.set_ylabel("test accuracy (%)")
    parameters = [e["parameters"] for e in done if e["parameters"]]
    if parameters and max(parameters) / max(min(parameters), 1) > 10:
        axes.set_xscale("log")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title("Ablation: one marker per run")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
