"""Checks of an export: parity of every file against Keras, and onnxruntime speed.

`parity_errors` compares the compact model with the searched network it came
from, and every exported file (`.keras` reloaded, SavedModel loaded, ONNX in
onnxruntime) with Keras at batch 1 and batch 64 on real images.
`measure_speed` times batch-1 latency and batch-64 throughput in onnxruntime
and in Keras, one after the other on the same inputs.
"""

import statistics
import time

import numpy as np

from hmnas_keras.export.compact import INPUT_NAME, OUTPUT_NAME
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


def parity_errors(network, model, paths: dict, images: np.ndarray) -> dict:
    """Max |difference| of logits: compact vs searched network, and every export vs Keras.

    `paths` has the files written ("keras_file", "saved_model", "onnx");
    `images` are real, normalised inputs; each export is run at every batch
    size of `PARITY_BATCH_SIZES` (images repeated if there are fewer).
    """
    import keras
    import onnxruntime
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
    reloaded = keras.saving.load_model(paths["keras_file"])
    saved = tf.saved_model.load(paths["saved_model"]).signatures["serve"]
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
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
    keras_fn = serve_function(model)

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
