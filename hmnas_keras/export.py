"""The export phase: the compact model as `.keras`, SavedModel and ONNX (DESIGN.md §3).

`export_workdir` (the pipeline's `run_export_phase`, and `tools/export_model.py`)
reads WORKDIR/architecture.json and the fine-tuned weights
(WORKDIR/finetune/checkpoint.npz), builds the compact model
(`hmnas_keras.compact`), checks that it equals the searched network, and
writes under WORKDIR/export/:

- `model.keras` — the Keras model (standard layers only; `keras.saving.load_model`);
- `saved_model/` — a TensorFlow SavedModel whose `serve` signature (also
  `serving_default`, what TF Serving calls) maps `images` [batch, h, w, c]
  float32 to `logits` [batch, classes];
- `model.onnx` — the same function in ONNX (opset `ONNX_OPSET`), input
  `images` and output `logits` with a dynamic `batch` dimension; its metadata
  (`hmnas_keras.metadata`, JSON) holds the class names and the preprocessing,
  so a client can prepare images without this package;
- `metadata.json` — that metadata as a file;
- `summary.json` — file sizes, parameters and FLOPs of the compact model,
  the parity errors of every export against Keras at two batch sizes (and of
  the compact model against the searched network), and onnxruntime latency at
  batch 1 and throughput at batch 64 against Keras. `report.json` shows it.

Every file is written to a temporary name and renamed, so an interrupted
export leaves no half-written model.
"""

import json
import os
import shutil
import statistics
import time
import warnings

import numpy as np

from hmnas_keras import architecture as arch_lib
from hmnas_keras.checkpoint import CheckpointError, read_arrays, write_json
from hmnas_keras.compact import INPUT_NAME, OUTPUT_NAME, compact_model, kernel_macs
from hmnas_keras.compact import parameter_counts as compact_parameter_counts
from hmnas_keras.serve import METADATA_FORMAT, METADATA_KEY

EXPORT_DIR = "export"
KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
SUMMARY_FILE = "summary.json"
FINETUNE_CHECKPOINT = os.path.join("finetune", "checkpoint.npz")
ONNX_OPSET = 17
# Latency and throughput are measured at these batch sizes; every export is checked at both.
LATENCY_BATCH_SIZE = 1
THROUGHPUT_BATCH_SIZE = 64
PARITY_BATCH_SIZES = (LATENCY_BATCH_SIZE, THROUGHPUT_BATCH_SIZE)


class ExportError(ValueError):
    """A workdir that cannot be exported, or an export that does not match its model."""


def load_finetuned_network(workdir: str):
    """(architecture, built SearchedNetwork with the fine-tuned weights) of a workdir."""
    from hmnas_keras.searched import SearchedNetwork, assign_by_path, relative_path

    path = os.path.join(workdir, arch_lib.ARCHITECTURE_FILE)
    if not os.path.exists(path):
        raise ExportError(
            f"{workdir} has no {arch_lib.ARCHITECTURE_FILE}: export needs a searched and "
            "fine-tuned run. Run the mask and finetune phases first."
        )
    architecture = arch_lib.read_architecture(path)
    if architecture.get("degenerate"):
        raise ExportError(f"Nothing to export: {architecture['degenerate']}.")
    checkpoint = os.path.join(workdir, FINETUNE_CHECKPOINT)
    try:
        arrays = read_arrays(checkpoint, prefix="searched/")
    except CheckpointError:
        raise ExportError(
            f"{workdir} has no fine-tuned weights ({checkpoint}). Run the finetune phase first "
            "(--phases=...,finetune,export)."
        ) from None
    arrays = {relative_path(p): a for p, a in arrays.items()}
    network = SearchedNetwork(architecture, name="searched").build_network()
    assign_by_path(
        network,
        arrays,
        lambda path: ExportError(
            f"{checkpoint} does not match {arch_lib.ARCHITECTURE_FILE} (variable {path}): "
            "was architecture.json replaced after fine-tuning?"
        ),
    )
    return architecture, network


def model_metadata(architecture: dict, mean, std) -> dict:
    """What a client needs to use the model: classes, input and preprocessing."""
    height, width, channels = (int(v) for v in architecture["image_shape"])
    return {
        "format": METADATA_FORMAT,
        "version": 1,
        "class_names": list(architecture["class_names"]),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NHWC",
            "shape": [None, height, width, channels],
            "color": "RGB" if channels == 3 else "L",
        },
        "preprocessing": {
            "resize": [height, width],
            "resize_method": "bilinear, antialiased",
            "scale": 1.0 / 255.0,
            "mean": [float(v) for v in np.asarray(mean).reshape(-1)],
            "std": [float(v) for v in np.asarray(std).reshape(-1)],
            "formula": "(pixel * scale - mean) / std, per channel, pixels in 0..255",
        },
        "output": {"name": OUTPUT_NAME, "kind": "logits", "probabilities": "softmax(logits)"},
        "search": {
            "derivation": architecture["derivation"],
            "search_space": architecture["search_space"],
        },
    }


def _tmp(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def _replace_dir(tmp_path: str, path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp_path, path)


def export_keras(model, path: str) -> None:
    tmp = _tmp(path) + ".keras"
    model.save(tmp)
    os.replace(tmp, path)


def _serve_function(model):
    import tensorflow as tf

    @tf.function(
        input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, INPUT_NAME)]
    )
    def serve(images):
        return {OUTPUT_NAME: model(images, training=False)}

    return serve


def export_saved_model(model, path: str) -> None:
    """A SavedModel with the `serve` and `serving_default` signatures (images -> logits)."""
    import tensorflow as tf

    tmp = _tmp(path)
    serve = _serve_function(model)
    module = tf.Module()
    module.model_variables = model.variables
    module.serve = serve
    tf.saved_model.save(module, tmp, signatures={"serve": serve, "serving_default": serve})
    _replace_dir(tmp, path)


def export_onnx(model, path: str, metadata: dict, opset: int = ONNX_OPSET) -> None:
    """ONNX with input `images`, output `logits`, a dynamic `batch` dimension and metadata."""
    import onnx
    import tf2onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the patch probes np.object
        patch_tf2onnx()  # tf2onnx 1.17 with numpy 2, as keras.Model.export does.
    serve = _serve_function(model)
    proto, _ = tf2onnx.convert.from_function(
        serve, input_signature=serve.input_signature, opset=opset
    )
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.doc_string = (
        "hmnas_keras compact classifier: images (NHWC float32, normalised as the metadata says) "
        "-> logits."
    )
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(metadata)
    onnx.checker.check_model(proto)
    tmp = _tmp(path)
    onnx.save(proto, tmp)
    os.replace(tmp, path)


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    return os.path.getsize(path)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def _batches(images: np.ndarray, size: int) -> np.ndarray:
    """`size` images, repeating `images` if there are fewer."""
    reps = -(-size // len(images))
    return np.concatenate([images] * reps)[:size]


def parity_errors(network, model, export_dir: str, images: np.ndarray) -> dict:
    """Max |difference| of logits: compact vs searched network, and every export vs Keras.

    `images` are real, normalised inputs; each export is run at every batch
    size of `PARITY_BATCH_SIZES` (images repeated if there are fewer).
    """
    import keras
    import onnxruntime
    import tensorflow as tf

    rng = np.random.default_rng(0)
    random_images = rng.normal(size=(8, *images.shape[1:])).astype("float32")
    keras_fn = _serve_function(model)
    result = {
        "compact_vs_searched": {
            "real": _max_abs(model(images, training=False), network(images, training=False)),
            "random": _max_abs(
                model(random_images, training=False), network(random_images, training=False)
            ),
            "images": int(len(images)),
        }
    }
    reloaded = keras.saving.load_model(os.path.join(export_dir, KERAS_FILE))
    saved = tf.saved_model.load(os.path.join(export_dir, SAVED_MODEL_DIR)).signatures["serve"]
    session = onnxruntime.InferenceSession(
        os.path.join(export_dir, ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    for key in ("keras_file", "saved_model", "onnx"):
        result[key] = {}
    for batch_size in PARITY_BATCH_SIZES:
        batch = _batches(images, batch_size)
        expected = keras_fn(tf.constant(batch))[OUTPUT_NAME].numpy()
        got = {
            "keras_file": reloaded(batch, training=False),
            "saved_model": saved(images=tf.constant(batch))[OUTPUT_NAME].numpy(),
            "onnx": session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0],
        }
        for key, value in got.items():
            if np.shape(value) != expected.shape:
                raise ExportError(
                    f"The {key} export returned shape {np.shape(value)} at batch {batch_size}; "
                    f"Keras returns {expected.shape}."
                )
            result[key][f"batch_{batch_size}"] = _max_abs(value, expected)
    return result


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (tracing, allocation)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_speed(model, onnx_path: str, image_shape, repeats: int = 30) -> dict:
    """Median batch-1 latency (ms) and batch-64 throughput (images/s): onnxruntime vs Keras.

    Keras runs the model in a tf.function (graph mode), onnxruntime with its
    default CPU settings; both on the same random inputs, one after the other.
    """
    import onnxruntime
    import tensorflow as tf

    rng = np.random.default_rng(1)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    keras_fn = _serve_function(model)

    def seconds(batch_size: int, count: int) -> dict:
        batch = rng.normal(size=(batch_size, *image_shape)).astype("float32")
        tensor = tf.constant(batch)
        return {
            "keras": _median_seconds(lambda: keras_fn(tensor)[OUTPUT_NAME].numpy(), count),
            "onnxruntime": _median_seconds(
                lambda: session.run([OUTPUT_NAME], {INPUT_NAME: batch}), count
            ),
        }

    latency = seconds(LATENCY_BATCH_SIZE, repeats)
    throughput = seconds(THROUGHPUT_BATCH_SIZE, max(3, repeats // 5))
    result = {
        "repeats": repeats,
        f"latency_ms_batch_{LATENCY_BATCH_SIZE}": {
            k: round(v * 1e3, 3) for k, v in latency.items()
        },
        f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}": {
            k: round(THROUGHPUT_BATCH_SIZE / v, 1) for k, v in throughput.items()
        },
        "onnxruntime_speedup": {
            "latency": round(latency["keras"] / latency["onnxruntime"], 2),
            "throughput": round(throughput["keras"] / throughput["onnxruntime"], 2),
        },
    }
    return result


def export_workdir(
    workdir: str,
    mean,
    std,
    images: np.ndarray,
    tolerance: float = 1e-5,
    speed_repeats: int = 30,
    log=print,
) -> dict:
    """Builds, exports and checks the compact model of `workdir`; writes export/summary.json.

    `mean`, `std`: the normalisation of the run's data; `images`: real
    normalised test images for the parity checks. Raises ExportError when the
    compact model differs from the searched network by more than `tolerance`.
    """
    started = time.monotonic()
    architecture, network = load_finetuned_network(workdir)
    model = compact_model(network)
    export_dir = os.path.join(workdir, EXPORT_DIR)
    os.makedirs(export_dir, exist_ok=True)
    for name in os.listdir(export_dir):  # leftovers of an interrupted export
        if ".tmp-" in name:
            leftover = os.path.join(export_dir, name)
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)
    metadata = model_metadata(architecture, mean, std)
    paths = {
        "keras_file": os.path.join(export_dir, KERAS_FILE),
        "saved_model": os.path.join(export_dir, SAVED_MODEL_DIR),
        "onnx": os.path.join(export_dir, ONNX_FILE),
    }
    log(f"Export: compact model of {len(model.layers)} layers; writing {export_dir}/")
    export_keras(model, paths["keras_file"])
    export_saved_model(model, paths["saved_model"])
    export_onnx(model, paths["onnx"], metadata)
    write_json(os.path.join(export_dir, METADATA_FILE), metadata)
    parity = parity_errors(network, model, export_dir, np.asarray(images, "float32"))
    compaction_error = parity["compact_vs_searched"]["real"]
    if compaction_error > tolerance:
        raise ExportError(
            f"The compact model differs from the searched network by {compaction_error:.3g} "
            f"(tolerance {tolerance:g}) on real inputs. This is a bug: please report it with "
            f"{arch_lib.ARCHITECTURE_FILE}."
        )
    log("Export: measuring onnxruntime and Keras speed")
    speed = measure_speed(model, paths["onnx"], architecture["image_shape"], speed_repeats)
    summary = {
        "files": {key: os.path.relpath(path, workdir) for key, path in paths.items()},
        "bytes": {key: _size(path) for key, path in paths.items()},
        "onnx_opset": ONNX_OPSET,
        "parameters": compact_parameter_counts(model),
        "flops": kernel_macs(model),
        "searched_parameters": architecture.get("parameters", {}).get("searched"),
        "parity_max_abs_error": parity,
        "speed": speed,
        "export_seconds": round(time.monotonic() - started, 2),
    }
    write_json(os.path.join(export_dir, SUMMARY_FILE), summary)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the console and report.txt."""
    parity = summary["parity_max_abs_error"]
    worst = {key: max(parity[key].values()) for key in ("keras_file", "saved_model", "onnx")}
    speed = summary["speed"]
    latency = speed["latency_ms_batch_1"]
    throughput = speed[f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}"]
    parameters = summary["parameters"]
    return "\n".join(
        [
            f"Export: {parameters['dense']:,} parameters ({parameters['nonzero']:,} non-zero), "
            f"{summary['flops']['macs'] / 1e6:.2f} MFLOPs; model.keras "
            f"{summary['bytes']['keras_file'] / 1024:.0f} KiB, model.onnx "
            f"{summary['bytes']['onnx'] / 1024:.0f} KiB (opset {summary['onnx_opset']})",
            f"Parity (max |logit difference|): compact vs searched "
            f"{parity['compact_vs_searched']['real']:.2g}; vs Keras at batch "
            f"{'/'.join(str(b) for b in PARITY_BATCH_SIZES)}: .keras {worst['keras_file']:.2g}, "
            f"SavedModel {worst['saved_model']:.2g}, ONNX {worst['onnx']:.2g}",
            f"Speed: batch-1 latency onnxruntime {latency['onnxruntime']:.2f} ms, Keras "
            f"{latency['keras']:.2f} ms; batch-{THROUGHPUT_BATCH_SIZE} throughput onnxruntime "
            f"{throughput['onnxruntime']:,.0f}/s, Keras {throughput['keras']:,.0f}/s",
        ]
    )


def real_test_images(data, count: int = 64) -> np.ndarray:
    """Up to `count` normalised test images of a SearchData."""
    images = []
    for batch, _ in data.test_dataset():
        images.append(batch.numpy())
        if sum(len(b) for b in images) >= count:
            break
    return np.concatenate(images)[:count]


def run_export_phase(config, data, workdir: str, verbose: bool = True) -> dict:
    """The pipeline's export phase (skipped when WORKDIR/export/summary.json exists)."""
    path = os.path.join(workdir, EXPORT_DIR, SUMMARY_FILE)
    if os.path.exists(path):
        print(f"The export phase already finished ({path}); tools/export_model.py exports again.")
        with open(path) as handle:
            return json.load(handle)
    del config  # the export depends on the workdir's files only
    return export_workdir(
        workdir,
        data.mean,
        data.std,
        real_test_images(data),
        log=print if verbose else (lambda *_: None),
    )
