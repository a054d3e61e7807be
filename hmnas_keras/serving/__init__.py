"""Serving an exported model with onnxruntime or LiteRT: no TensorFlow, no Keras.

This subpackage needs only `onnxruntime`, `numpy` and Pillow (plus Starlette
and uvicorn for the HTTP server, and `ai-edge-litert` for `.tflite` models),
and imports nothing from the training side
of hmnas_keras, so it runs on a machine without TensorFlow (`pip install
".[serve]"`, or those packages). A test imports it with TensorFlow and Keras
made unimportable.

- `classifier`: `Classifier` (an exported model ready to classify images), `ServeError`;
- `runtimes`: onnxruntime for `.onnx` / `.int8.onnx`, LiteRT for `.tflite` / `.int8.tflite`;
- `cli`: `python -m hmnas_keras.serve` (files, folders, or `--port` for HTTP);
- `http_server`: the Starlette application (`settings`: its limits and timeouts);
- `metadata`: where an exported model keeps its class names and preprocessing.
"""

from hmnas_keras.serving.classifier import Classifier, ServeError, find_images

__all__ = ["Classifier", "ServeError", "find_images"]
