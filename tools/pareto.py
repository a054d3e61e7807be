"""Accuracy against cost: one point per exported run (fine-tuned test accuracy vs its export).

    python tools/pareto.py --workdirs=runs/hm,runs/hm-half,runs/darts --out=pareto.png
    python tools/pareto.py --workdirs='runs/cifar-*' --out=runs/pareto.png

Reads each workdir's report.json (fine-tuned test accuracy), export/summary.json
(the exported model's dense MFLOPs, parameters and onnxruntime batch-1
latency) and config.json (derivation, weight mask, target), and draws two
panels: accuracy against MFLOPs and accuracy against latency, each point
labelled with its derivation and target. Prints the same figures as a table
(and `--json` writes them). A workdir without a fine-tuned, exported model is
reported and skipped. Needs matplotlib only; no TensorFlow.
"""

import glob
import json
import os
import sys

from absl import app, flags

flags.DEFINE_list("workdirs", None, "Run directories (globs allowed), fine-tuned and exported.")
flags.DEFINE_string("out", "pareto.png", "The picture to write (.png or .svg).")
flags.DEFINE_string("json", None, "Also write the points as JSON to this file.")
FLAGS = flags.FLAGS


def _read(path: str):
    with open(path) as handle:
        return json.load(handle)


def label(config: dict) -> str:
    """'masks, channel, flops 0.3' / 'darts' / 'masks' — what a point is."""
    parts = [config["derivation"]]
    mask = config.get("mask", {})
    if config["derivation"] == "masks":
        if mask.get("weight_mask", "element") != "element":
            parts.append(mask["weight_mask"])
        if mask.get("target", "none") != "none":
            amount = mask.get("target_ratio") or mask.get("target_value")
            parts.append(f"{mask['target']} {amount:g}")
    if config.get("finetune_init") == "scratch":
        parts.append("scratch")
    return ", ".join(parts)


def read_point(workdir: str) -> dict:
    """The figures of one exported run; raises ValueError naming what is missing."""
    needed = {
        "config": os.path.join(workdir, "config.json"),
        "report": os.path.join(workdir, "report.json"),
        "export": os.path.join(workdir, "export", "summary.json"),
    }
    missing = [name for name, path in needed.items() if not os.path.exists(path)]
    if missing:
        raise ValueError(f"{workdir}: no {', '.join(missing)} (is it fine-tuned and exported?)")
    config, report, export = (_read(needed[k]) for k in ("config", "report", "export"))
    finetuned = report["rows"].get("finetuned") or {}
    if finetuned.get("test_accuracy") is None:
        raise ValueError(f"{workdir}: its report has no fine-tuned test accuracy.")
    speed = export["speed"]
    # The float ONNX model's figures ("onnxruntime" in runs exported before TFLite existed).
    kind = "onnx" if "onnx" in speed["latency_ms_batch_1"] else "onnxruntime"
    if kind not in speed["latency_ms_batch_1"]:
        raise ValueError(f"{workdir}: its export has no ONNX model (see --export_formats).")
    return {
        "workdir": workdir,
        "label": label(config),
        "test_accuracy": finetuned["test_accuracy"],
        "mflops": export["flops"]["macs"] / 1e6,
        "parameters": export["parameters"]["dense"],
        "latency_ms": speed["latency_ms_batch_1"][kind],
        "throughput": speed["throughput_images_per_s_batch_64"][kind],
    }


def draw(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(12, 5))
    axes = (("mflops", "exported model, MFLOPs per image"), ("latency_ms", "onnxruntime, ms"))
    for panel, (key, xlabel) in zip(panels, axes, strict=True):
        for point in points:
            panel.scatter(point[key], 100 * point["test_accuracy"], s=40)
            panel.annotate(
                point["label"],
                (point[key], 100 * point["test_accuracy"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        panel.set_xlabel(xlabel if key == "mflops" else f"batch-1 latency, {xlabel}")
        panel.set_ylabel("fine-tuned test accuracy, %")
        panel.grid(alpha=0.3)
    panels[0].set_title("Accuracy against FLOPs")
    panels[1].set_title("Accuracy against latency")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdirs:
        raise app.UsageError("--workdirs is required: exported run directories, comma separated.")
    workdirs = []
    for pattern in FLAGS.workdirs:
        matches = sorted(glob.glob(pattern)) or [pattern]
        workdirs += [m for m in matches if m not in workdirs]
    points, skipped = [], []
    for workdir in workdirs:
        try:
            points.append(read_point(workdir))
        except ValueError as error:
            skipped.append(str(error))
    for message in skipped:
        print(f"Skipped: {message}", file=sys.stderr)
    if not points:
        print("Error: no workdir had a fine-tuned, exported model to plot.", file=sys.stderr)
        return 1
    print(f"{'run':<40} {'label':<28} {'test acc':>8} {'params':>9} {'MFLOPs':>8} {'ms':>7}")
    for point in sorted(points, key=lambda p: p["mflops"]):
        print(
            f"{point['workdir']:<40} {point['label']:<28} {point['test_accuracy']:>8.2%} "
            f"{point['parameters']:>9,} {point['mflops']:>8.2f} {point['latency_ms']:>7.2f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    draw(points, FLAGS.out)
    if FLAGS.json:
        with open(FLAGS.json, "w") as handle:
            json.dump(points, handle, indent=2)
    print(f"Wrote {FLAGS.out}")
    return 0


if __name__ == "__main__":
    app.run(main)
