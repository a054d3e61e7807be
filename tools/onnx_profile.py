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

import os
import sys

from absl import app, flags

from hmnas_keras.serving.timing import profile

flags.DEFINE_list("models", None, "ONNX files to profile.")
flags.DEFINE_integer("batch_size", 64, "Images per call.", lower_bound=1)
flags.DEFINE_integer("runs", 10, "Profiled calls per model.", lower_bound=1)
flags.DEFINE_integer("warmup", 3, "Untimed calls first.", lower_bound=0)
flags.DEFINE_integer("top", 12, "Op types shown per model.", lower_bound=1)
FLAGS = flags.FLAGS


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
