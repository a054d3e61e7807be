"""Checks of an export: parity against Keras, accuracy, and speed in each runtime.

`parity_errors` compares the compact model with the searched network it came
from, and every float export (`.keras` reloaded, SavedModel loaded, ONNX in
onnxruntime, TFLite in LiteRT) with Keras at batch 1 and batch 64 on real
images. `accuracy` gives the top-1 test accuracy of Keras and of every export
(int8 models included) on the same test images, and how often each agrees
with Keras. `measure_speed` times batch-1 latency and batch-64 throughput of
Keras and of every runtime format, one after the other on the same inputs.
"""

import statistics
import time

import numpy as np

from hmnas_keras.export.compact import OUTPUT_NAME
from hmnas_keras.export.formats import ExportError, serve_function

# Latency and throughput are measured at these batch sizes; every export is checked at both.
LATENCY_BATCH_SIZE = 1
THROUGHPUT_BATCH_SIZE = 64
PARITY_BATCH_SIZES = (LATENCY_BATCH_SIZE, THROUGHPUT_BATCH_SIZE)


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, "float64") - np.asarray(b, "float64"))))


def _batches(images: np.ndarray, size: int) -> np.ndarray:
    """`size` images, repeating `images` if there are fewer."""
    reps = -(-size // len(images))
    return np.concatenate([images] * reps)[:size]


# The runtime that runs each format; the last four are the serving side's, and timed.
RUNTIMES = {
    "keras": "keras",
    "saved_model": "tensorflow",
    "onnx": "onnxruntime",
    "onnx_int8": "onnxruntime",
    "tflite": "litert",
    "tflite_int8": "litert",
}
RUNTIME_FORMATS = ("onnx", "onnx_int8", "tflite", "tflite_int8")
FLOAT_FORMATS = ("keras", "saved_model", "onnx", "tflite")


def load_exported(kind: str, path: str):
    """An exported model as a function: normalised float32 batch -> logits (numpy)."""
    if kind in RUNTIME_FORMATS:
        from hmnas_keras.serving.runtimes import open_model

        return open_model(path)
    import tensorflow as tf

    if kind == "keras":
        import keras

        reloaded = keras.saving.load_model(path)
        return lambda batch: np.asarray(reloaded(batch, training=False))
    if kind == "saved_model":
        signature = tf.saved_model.load(path).signatures["serve"]
        return lambda batch: signature(images=tf.constant(batch))[OUTPUT_NAME].numpy()
    raise ValueError(f"Unknown export format {kind!r}")


def parity_errors(network, model, loaded: dict, images: np.ndarray) -> dict:
    """Max |difference| of logits: compact vs searched network, and every float export vs Keras.

    `loaded` maps each exported format to its function (`load_exported`);
    int8 models are not expected to match to the decimal, so they are left out
    (`accuracy` compares their predictions instead). `images` are real,
    normalised inputs; each export is run at every batch size of
    `PARITY_BATCH_SIZES` (images repeated if there are fewer).
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    random_images = rng.normal(size=(8, *images.shape[1:])).astype("float32")
    keras_fn = serve_function(model)
    result = {
        "compact_vs_searched": {
            "real": _max_abs(model(images, training=False), network(images, training=False)),
            "random": _max_abs(
                model(random_images, training=False), network(random_images, training=False)
            ),
            "images": int(len(images)),
        }
    }
    floats = {kind: fn for kind, fn in loaded.items() if kind in FLOAT_FORMATS}
    for kind in floats:
        result[kind] = {}
    for batch_size in PARITY_BATCH_SIZES:
        batch = _batches(images, batch_size)
        expected = keras_fn(tf.constant(batch))[OUTPUT_NAME].numpy()
        for kind, fn in floats.items():
            value = fn(batch)
            if np.shape(value) != expected.shape:
                raise ExportError(
                    f"The {kind} export returned shape {np.shape(value)} at batch {batch_size}; "
                    f"Keras returns {expected.shape}."
                )
            result[kind][f"batch_{batch_size}"] = _max_abs(value, expected)
    return result


def accuracy(model, loaded: dict, images: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 test accuracy of Keras and of every exported model, on the same images.

    Returns {"images", "keras": accuracy, "models": {format: {"test_accuracy",
    "agreement_with_keras" (fraction of images with the same top-1)}}}.
    """
    import tensorflow as tf

    keras_fn = serve_function(model)
    labels = np.asarray(labels).reshape(-1)
    size = THROUGHPUT_BATCH_SIZE
    batches = [images[i : i + size] for i in range(0, len(images), size)]
    expected = np.concatenate(
        [np.argmax(keras_fn(tf.constant(b))[OUTPUT_NAME].numpy(), axis=1) for b in batches]
    )
    result = {
        "images": int(len(images)),
        "keras": float(np.mean(expected == labels)),
        "models": {},
    }
    for kind, fn in loaded.items():
        predicted = np.concatenate([np.argmax(fn(b), axis=1) for b in batches])
        result["models"][kind] = {
            "test_accuracy": float(np.mean(predicted == labels)),
            "agreement_with_keras": float(np.mean(predicted == expected)),
        }
    return result


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (tracing, allocation)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_speed(model, loaded: dict, image_shape, repeats: int = 30) -> dict:
    """Median batch-1 latency (ms) and batch-64 throughput (images/s) of Keras and each runtime.

    `loaded` maps the runtime formats (onnx, onnx_int8, tflite, tflite_int8)
    to their functions (`load_exported`); Keras runs the model in a
    tf.function (graph mode), onnxruntime with its default CPU settings, LiteRT
    with one thread per core. All on the same random inputs, one after the
    other; keys are "keras" and the formats.
    """
    import tensorflow as tf

    rng = np.random.default_rng(1)
    keras_fn = serve_function(model)
    runtimes = {kind: fn for kind, fn in loaded.items() if kind in RUNTIME_FORMATS}

    def seconds(batch_size: int, count: int) -> dict:
        batch = rng.normal(size=(batch_size, *image_shape)).astype("float32")
        tensor = tf.constant(batch)
        result = {"keras": _median_seconds(lambda: keras_fn(tensor)[OUTPUT_NAME].numpy(), count)}
        for kind, fn in runtimes.items():
            result[kind] = _median_seconds(lambda fn=fn: fn(batch), count)
        return result

    latency = seconds(LATENCY_BATCH_SIZE, repeats)
    throughput = seconds(THROUGHPUT_BATCH_SIZE, max(3, repeats // 5))
    return {
        "repeats": repeats,
        f"latency_ms_batch_{LATENCY_BATCH_SIZE}": {
            k: round(v * 1e3, 3) for k, v in latency.items()
        },
        f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}": {
            k: round(THROUGHPUT_BATCH_SIZE / v, 1) for k, v in throughput.items()
        },
        "speedup_over_keras": {
            kind: {
                "latency": round(latency["keras"] / latency[kind], 2),
                "throughput": round(throughput["keras"] / throughput[kind], 2),
            }
            for kind in runtimes
        },
    }
