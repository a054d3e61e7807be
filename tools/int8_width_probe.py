"""Float against int8 ONNX throughput as a run's architecture widens (random weights).

    python tools/int8_width_probe.py --workdir=runs/darts --channels=16,36,64

Rebuilds WORKDIR/architecture.json with C = each of --channels initial
channels (element-mask architectures only), random weights (speed does not
depend on them), exports it as model.onnx and model.int8.onnx (calibrated on
random normal inputs) into a temporary folder, and times both in onnxruntime
at batch 64, taking turns for --rounds rounds; prints the medians and the
int8 / float ratio. Measure on an idle machine.
"""

import os
import statistics
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "A run with an architecture.json (required).")
flags.DEFINE_list("channels", ["16", "36", "64"], "Initial channel counts to try.")
flags.DEFINE_integer("rounds", 5, "Rounds; each times both models.", lower_bound=1)
FLAGS = flags.FLAGS
BATCH = 64


def probe(architecture: dict, channels: int, folder: str) -> dict:
    import onnxruntime

    from hmnas_keras.architecture.searched_network import SearchedNetwork
    from hmnas_keras.export.compact import compact_model
    from hmnas_keras.export.formats import export_onnx, model_metadata
    from hmnas_keras.export.quantize import export_onnx_int8

    architecture = {**architecture, "search_space": {**architecture["search_space"]}}
    architecture["search_space"]["channels"] = channels
    network = SearchedNetwork(architecture, name="searched").build_network()
    model = compact_model(network)
    rng = np.random.default_rng(0)
    shape = tuple(architecture["image_shape"])
    paths = {kind: os.path.join(folder, f"{kind}_{channels}.onnx") for kind in ("float", "int8")}
    metadata = model_metadata(architecture, [0.5] * 3, [0.25] * 3)
    export_onnx(model, paths["float"], metadata)
    export_onnx_int8(paths["float"], paths["int8"], metadata, rng.normal(size=(128, *shape)))
    batch = rng.normal(size=(BATCH, *shape)).astype("float32")
    sessions = {
        kind: onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        for kind, path in paths.items()
    }
    times = {kind: [] for kind in sessions}
    for _ in range(FLAGS.rounds):
        for kind, session in sessions.items():
            session.run(None, {"images": batch})
            started = time.perf_counter()
            for _ in range(3):
                session.run(None, {"images": batch})
            times[kind].append((time.perf_counter() - started) / 3)
    speed = {kind: BATCH / statistics.median(values) for kind, values in times.items()}
    return {"parameters": model.count_params(), **speed}  # Keras' count, BN statistics included


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: a run with an architecture.json.")
    from hmnas_keras.architecture.architecture_json import read_architecture
    from hmnas_keras.pipeline.workdir import Workdir

    logging.set_verbosity(logging.WARNING)  # tf2onnx logs every conversion step at INFO
    path = Workdir(FLAGS.workdir).architecture
    if not os.path.exists(path):
        print(f"Error: {FLAGS.workdir} has no architecture.json.", file=sys.stderr)
        return 1
    architecture = read_architecture(path)
    if architecture.get("weight_mask") == "channel":
        message = "Error: a channel-mask architecture fixes its channels; use another run."
        print(message, file=sys.stderr)
        return 1
    print(f"{'C':>4} {'parameters':>11} {'float /s':>9} {'int8 /s':>9} {'int8/float':>10}")
    with tempfile.TemporaryDirectory() as folder:
        for channels in (int(c) for c in FLAGS.channels):
            row = probe(architecture, channels, folder)
            print(
                f"{channels:>4} {row['parameters']:>11,} {row['float']:>9,.0f} "
                f"{row['int8']:>9,.0f} {row['int8'] / row['float']:>10.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    app.run(main)
