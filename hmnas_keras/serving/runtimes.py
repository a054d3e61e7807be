"""The runtimes that run an exported model: onnxruntime for `.onnx`, LiteRT for `.tflite`.

`open_model(path)` picks one by the file's extension and returns a callable
`model(inputs) -> logits` on float32 batches [N, H, W, C] (an int8-I/O
TFLite model is quantized and dequantized here, with the scales it carries),
with the model's hmnas_keras metadata as `model.metadata` (None when it has
none). `model.int8.onnx` is an ordinary ONNX model; `model.tflite` and
`model.int8.tflite` need the LiteRT interpreter (`pip install
"hmnas-keras[tflite]"`, the `ai-edge-litert` package). No TensorFlow.
"""

import json
import os
import threading

import numpy as np

from hmnas_keras.serving.metadata import METADATA_KEY

TFLITE_SIGNATURE = "serving_default"


class ServeError(ValueError):
    """A model, image or request that cannot be served; the message says what to fix.

    `status`: the HTTP status the server answers it with (400, or 413 for an image
    too large to decode).
    """

    status = 400


class ImageTooLarge(ServeError):
    """An image (or a request's images) with more pixels than the server decodes.

    `pixels`: what the image declares (None for a decompression bomb Pillow refused).
    """

    status = 413

    def __init__(self, message: str, pixels: int | None = None):
        super().__init__(message)
        self.pixels = pixels


def _threads(threads: int) -> int:
    return threads or os.cpu_count() or 1


class OnnxModel:
    """An ONNX model in onnxruntime (CPU)."""

    runtime = "onnxruntime"

    def __init__(self, path: str, threads: int = 0):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                path, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise ServeError(f"{path} is not a readable ONNX model: {error}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = None if raw is None else json.loads(raw)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: inputs})[0]


def read_tflite_metadata(content: bytes) -> dict | None:
    """The METADATA_KEY entry of a TFLite flatbuffer, or None."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_KEY.encode():
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return None


class LiteRtModel:
    """A TFLite model in the LiteRT interpreter, through its `serving_default` signature.

    The interpreter is not thread-safe: calls are serialised by a lock.
    """

    runtime = "litert"

    def __init__(self, path: str, threads: int = 0):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ServeError(
                f"{path} is a TFLite model, which needs the LiteRT interpreter: "
                'pip install -e ".[tflite]" in a checkout (or pip install ai-edge-litert).'
            ) from None
        try:
            with open(path, "rb") as handle:
                content = handle.read()
            self.metadata = read_tflite_metadata(content)
            self.interpreter = Interpreter(model_content=content, num_threads=_threads(threads))
            self.runner = self.interpreter.get_signature_runner(TFLITE_SIGNATURE)
        except Exception as error:  # the interpreter raises RuntimeError / ValueError
            raise ServeError(f"{path} is not a readable TFLite model: {error}") from None
        (self.input_name,) = self.runner.get_input_details()
        (self.output_name,) = self.runner.get_output_details()
        self.input_detail = self.runner.get_input_details()[self.input_name]
        self.output_detail = self.runner.get_output_details()[self.output_name]
        self.lock = threading.Lock()

    @staticmethod
    def _scale(detail) -> tuple[float, int]:
        scale, zero_point = detail["quantization"]
        return float(scale), int(zero_point)

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        dtype = self.input_detail["dtype"]
        if dtype != np.float32:
            scale, zero_point = self._scale(self.input_detail)
            info = np.iinfo(dtype)
            inputs = np.clip(np.round(inputs / scale) + zero_point, info.min, info.max)
        with self.lock:
            outputs = self.runner(**{self.input_name: inputs.astype(dtype)})[self.output_name]
        if self.output_detail["dtype"] != np.float32:
            scale, zero_point = self._scale(self.output_detail)
            outputs = (outputs.astype("float32") - zero_point) * scale
        return np.asarray(outputs, "float32")


def open_model(path: str, threads: int = 0):
    """An OnnxModel for `.onnx`, a LiteRtModel for `.tflite`."""
    if path.endswith(".tflite"):
        return LiteRtModel(path, threads)
    if path.endswith(".onnx"):
        return OnnxModel(path, threads)
    raise ServeError(
        f"{path}: expected an exported .onnx, .int8.onnx, .tflite or .int8.tflite model."
    )
