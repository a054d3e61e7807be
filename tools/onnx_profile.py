"""Where onnxruntime spends its time in exported models: per op type, from its profiler.

    python tools/onnx_profile.py \
        --models=runs/darts/export/model.onnx,runs/darts/export/model.int8.onnx
    python tools/onnx_profile.py --models=... --batch_size=1 --runs=50

For each model: onnxruntime's own profile (SessionOptions.enable_profiling)
of `--runs` calls at `--batch_size` on random inputs (after `--warmup` calls
left out), kernel times summed per op type of the optimised graph and divided
by the runs.
Convolutions are split into depthwise (group > 1) and the others, since the
two take different kernels. Measure on an idle machine. Needs onnxruntime,
onnx and numpy only.
"""

import collections
import json
import os
import sys
import tempfile

import numpy as np
from absl import app, flags

flags.DEFINE_list("models", None, "ONNX files to profile.")
flags.DEFINE_integer("batch_size", 64, "Images per call.", lower_bound=1)
flags.DEFINE_integer("runs", 10, "Profiled calls per model.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed calls first.", lower_bound=0)
flags.DEFINE_integer("top", 12, "Op types shown per model.", lower_bound=1)
FLAGS = flags.FLAGS


def _kinds(optimized_path: str) -> dict:
    """Node name -> op kind, with convolutions split into depthwise and the rest."""
    import onnx

    kinds = {}
    for node in onnx.load(optimized_path).graph.node:
        kind = node.op_type
        if "Conv" in kind:
            groups = [a.i for a in node.attribute if a.name == "group"]
            kind += " (depthwise)" if groups and groups[0] > 1 else ""
        kinds[node.name] = kind
    return kinds


def profile(path: str, batch_size: int, runs: int, warmup: int) -> dict:
    """{"total_ms", "ops": {kind: {"ms", "count"}}} per call, from onnxruntime's profiler."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        options.log_severity_level = 3  # the note that the optimised graph is machine-specific
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        kinds = _kinds(options.optimized_model_filepath)
        (model_input,) = session.get_inputs()
        shape = [batch_size, *[int(d) for d in model_input.shape[1:]]]
        batch = np.random.default_rng(0).normal(size=shape).astype("float32")
        for _ in range(warmup + runs):
            session.run(None, {model_input.name: batch})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    # Only the kernels of the timed calls: those after the end of the last warm-up call.
    calls = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = calls[warmup - 1] if warmup else 0
    totals, counts = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < start:
            continue
        kind = kinds.get(name[: -len("_kernel_time")], event["args"].get("op_name", "?"))
        totals[kind] += event["dur"]
        counts[kind] += 1
    ops = {
        kind: {"ms": round(totals[kind] / runs / 1e3, 3), "count": counts[kind] // runs}
        for kind, _ in totals.most_common()
    }
    return {"total_ms": round(sum(totals.values()) / runs / 1e3, 3), "ops": ops}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.models:
        raise app.UsageError("--models is required: one or more exported .onnx files.")
    missing = [path for path in FLAGS.models if not os.path.isfile(path)]
    if missing:
        print(f"Error: no such model: {', '.join(missing)}", file=sys.stderr)
        return 1
    for path in FLAGS.models:
        result = profile(path, FLAGS.batch_size, FLAGS.runs, FLAGS.warmup)
        print(f"{path}: {result['total_ms']:.2f} ms per call at batch {FLAGS.batch_size}")
        for kind, entry in list(result["ops"].items())[: FLAGS.top]:
            share = 100 * entry["ms"] / result["total_ms"]
            print(f"  {kind:32s} {entry['ms']:8.2f} ms {share:5.1f}%  {entry['count']:4d} nodes")
    return 0


if __name__ == "__main__":
    app.run(main)
