"""The fused export against the unfused one, in onnxruntime, for several workdirs.

    python tools/fusion_speed.py --workdirs=runs/hm-p50,runs/hm-ch-f30 --rounds=5

For each fine-tuned workdir: builds both forms of its compact model
(`compact_model(network)` and `compact_model(network, fuse=True)`), checks
each against the searched network on random inputs, writes both as ONNX to a
temporary folder and times all of them back to back with
`hmnas_keras.serving.timing.measure`, as tools/onnx_speed.py does (models take
turns within every round; medians). Prints layers, ONNX nodes, the parity error, batch-1 latency and
batch-64 throughput of each, and the fused/unfused ratios. Measure on an idle
machine.
"""

import os
import sys
import tempfile

import numpy as np
from absl import app, flags, logging

from hmnas_keras import quiet_logs  # noqa: F401  (first: before TensorFlow loads)

flags.DEFINE_list("workdirs", None, "Fine-tuned run directories.")
flags.DEFINE_integer("rounds", 5, "Rounds; each times every model once.", lower_bound=1)
flags.DEFINE_integer("latency_calls", 20, "Batch-1 calls per model and round.", lower_bound=1)
flags.DEFINE_integer("throughput_calls", 3, "Batch-64 calls per model and round.", lower_bound=1)
FLAGS = flags.FLAGS


def _write_both(workdir: str, folder: str) -> list[dict]:
    import onnx
    from keras import ops

    from hmnas_keras.export.compact import compact_model
    from hmnas_keras.export.formats import export_onnx
    from hmnas_keras.pipeline.export_phase import load_finetuned_network
    from hmnas_keras.pipeline.workdir import Workdir

    architecture, network = load_finetuned_network(Workdir(workdir))
    x = np.random.default_rng(0).normal(size=(16, *architecture["image_shape"]))
    x = x.astype("float32")
    expected = ops.convert_to_numpy(network(x, training=False))
    rows = []
    for fuse in (False, True):
        model = compact_model(network, fuse=fuse)
        error = float(np.abs(ops.convert_to_numpy(model(x)) - expected).max())
        form = "fused" if fuse else "unfused"
        path = os.path.join(folder, f"{os.path.basename(workdir.rstrip('/'))}.{form}.onnx")
        export_onnx(model, path, {"form": form})
        rows.append(
            {
                "workdir": workdir,
                "form": form,
                "path": path,
                "layers": len(model.layers),
                "nodes": len(onnx.load(path).graph.node),
                "error": error,
            }
        )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdirs:
        raise app.UsageError("--workdirs is required: fine-tuned run directories.")
    logging.set_verbosity(logging.WARNING)  # tf2onnx logs every conversion step at INFO
    from hmnas_keras.export.formats import ExportError
    from hmnas_keras.serving.timing import measure

    with tempfile.TemporaryDirectory() as folder:
        rows = []
        try:
            for workdir in FLAGS.workdirs:
                rows += _write_both(workdir, folder)
        except ExportError as error:
            print(f"Error: {error}", file=sys.stderr)
            return 1
        speeds = measure(
            [row["path"] for row in rows],
            FLAGS.rounds,
            FLAGS.latency_calls,
            FLAGS.throughput_calls,
        )
    print(
        f"{'workdir':<24} {'form':<8} {'layers':>6} {'nodes':>6} {'max err':>8} "
        f"{'b1 ms':>7} {'b64 img/s':>9} {'b1 x':>5} {'b64 x':>5}"
    )
    for index, (row, speed) in enumerate(zip(rows, speeds, strict=True)):
        latency = speed["latency_ms_batch_1"]
        throughput = speed["throughput_images_per_s_batch_64"]
        base = speeds[index - 1] if row["form"] == "fused" else speed
        print(
            f"{row['workdir']:<24} {row['form']:<8} {row['layers']:>6} {row['nodes']:>6} "
            f"{row['error']:>8.1e} {latency:>7.2f} {throughput:>9,.0f} "
            f"{base['latency_ms_batch_1'] / latency:>5.2f} "
            f"{throughput / base['throughput_images_per_s_batch_64']:>5.2f}"
        )
    return 0


if __name__ == "__main__":
    app.run(main)
