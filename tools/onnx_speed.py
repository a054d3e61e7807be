"""onnxruntime speed of several exported models, measured back to back in one process.

    python tools/onnx_speed.py --workdirs=runs/hm,runs/hm-channel,runs/darts
    python tools/onnx_speed.py --workdirs='runs/cifar-*' --rounds=7 --json=speed.json

For each workdir's `export/model.onnx`: the median batch-1 latency and the
median batch-64 throughput on random inputs, with onnxruntime's default CPU
settings. The models take turns within every round (each round times every
model once), so a machine that slows down part-way slows them all alike; the
table gives each model's ratio to the first one. Measure on an idle machine.
Needs onnxruntime and numpy only (no TensorFlow).
"""

import glob
import json
import os
import sys

from absl import app, flags

from hmnas_keras.serving.timing import measure

flags.DEFINE_list(
    "workdirs", None, "Exported run directories (globs allowed); the first is the reference."
)
flags.DEFINE_integer("rounds", 5, "Rounds; each times every model once.", lower_bound=1)
flags.DEFINE_integer("latency_calls", 20, "Batch-1 calls per model and round.", lower_bound=1)
flags.DEFINE_integer("throughput_calls", 3, "Batch-64 calls per model and round.", lower_bound=1)
flags.DEFINE_string("json", None, "Also write the figures as JSON to this file.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdirs:
        raise app.UsageError("--workdirs is required: exported run directories, comma separated.")
    paths = []
    for pattern in FLAGS.workdirs:
        for workdir in sorted(glob.glob(pattern)) or [pattern]:
            path = os.path.join(workdir, "export", "model.onnx")
            if not os.path.exists(path):
                print(
                    f"Error: {workdir} has no export/model.onnx (is it exported?)", file=sys.stderr
                )
                return 1
            if path not in paths:
                paths.append(path)
    rows = measure(paths, FLAGS.rounds, FLAGS.latency_calls, FLAGS.throughput_calls)
    reference = rows[0]
    print(f"{'model':<45} {'b1 ms':>8} {'x ref':>6} {'b64 img/s':>10} {'x ref':>6}")
    for row in rows:
        latency, throughput = row["latency_ms_batch_1"], row["throughput_images_per_s_batch_64"]
        print(
            f"{row['model']:<45} {latency:>8.3f} {latency / reference['latency_ms_batch_1']:>6.2f} "
            f"{throughput:>10,.1f} "
            f"{throughput / reference['throughput_images_per_s_batch_64']:>6.2f}"
        )
    if FLAGS.json:
        with open(FLAGS.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    app.run(main)
