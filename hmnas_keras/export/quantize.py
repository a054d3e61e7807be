"""int8 models of the compact classifier, calibrated on training images.

- `export_onnx_int8`: `model.int8.onnx`, onnxruntime's static quantization of
  the float model.onnx: QDQ format, weights int8 per output channel,
  activations uint8 (onnxruntime's recommended U8S8 pairing on x86: its int8
  kernels take unsigned activations);
- `export_tflite_int8`: `model.int8.tflite`, TensorFlow's full-integer
  post-training quantization (every op int8, `TFLITE_BUILTINS_INT8`), float32
  input and output by default (quantized inside the model), or int8 input and
  output with `int8_io=True`; the metadata says which.

Both carry the float models' metadata plus a "quantization" entry saying how
they were made. Both calibrate the ranges of the activations on `calibration` — normalised
training images, never test images — fed in batches of `CALIBRATION_BATCH`.
"""

import os

import numpy as np

from hmnas_keras.export.compact import INPUT_NAME
from hmnas_keras.export.formats import (
    set_onnx_metadata,
    temporary_path,
    tflite_converter,
    write_tflite,
)

CALIBRATION_BATCH = 16


def _calibration_batches(calibration: np.ndarray):
    calibration = np.asarray(calibration, "float32")
    for start in range(0, len(calibration), CALIBRATION_BATCH):
        yield calibration[start : start + CALIBRATION_BATCH]


def export_onnx_int8(float_path: str, path: str, metadata: dict, calibration: np.ndarray) -> None:
    """`model.int8.onnx` from the float `model.onnx` at `float_path` (QDQ, per-channel)."""
    import onnx
    from onnxruntime import quantization

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(_calibration_batches(calibration))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared, tmp = temporary_path(path) + ".prepared.onnx", temporary_path(path)
    try:
        # Shape inference and graph clean-up (onnxruntime's recommended pre-processing);
        # the batch dimension is symbolic, which needs no sympy-based inference.
        quantization.quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        quantization.quantize_static(
            prepared,
            tmp,
            Reader(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )
        proto = onnx.load(tmp)
        quantization_note = {
            "kind": "int8, onnxruntime static quantization (QDQ)",
            "weights": "int8, per channel",
            "activations": "uint8",
            "calibration_images": int(len(calibration)),
        }
        set_onnx_metadata(proto, {**metadata, "quantization": quantization_note})
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (prepared, tmp):
            if os.path.exists(leftover):
                os.remove(leftover)


def export_tflite_int8(
    model, path: str, metadata: dict, calibration: np.ndarray, int8_io: bool = False
) -> None:
    """`model.int8.tflite`: full-integer quantization; float32 I/O unless `int8_io`."""
    import tensorflow as tf

    converter = tflite_converter(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: (
        [batch] for batch in _calibration_batches(calibration)
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    quantization_note = {
        "kind": "int8, TFLite full-integer post-training",
        "input_output": "int8" if int8_io else "float32",
        "calibration_images": int(len(calibration)),
    }
    write_tflite(converter.convert(), path, {**metadata, "quantization": quantization_note})
