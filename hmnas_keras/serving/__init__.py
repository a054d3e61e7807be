"""Serving an exported model with onnxruntime: no TensorFlow, no Keras.

This subpackage needs only `onnxruntime`, `numpy` and Pillow (plus Starlette
and uvicorn for the HTTP server), and imports nothing from the training side
of hmnas_keras, so it runs on a machine without TensorFlow (`pip install
".[serve]"`, or those packages). A test imports it with TensorFlow and Keras
made unimportable.

- `classifier`: `Classifier` (a model.onnx ready to classify images), `ServeError`;
- `cli`: `python -m hmnas_keras.serve` (files, folders, or `--port` for HTTP);
- `http_server`: the Starlette application;
- `metadata`: where a model.onnx keeps its class names and preprocessing.
"""

from hmnas_keras.serving.classifier import Classifier, ServeError, find_images

__all__ = ["Classifier", "ServeError", "find_images"]
