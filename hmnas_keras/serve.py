"""Classify images with an exported model: `python -m hmnas_keras.serve` (no TensorFlow).

    python -m hmnas_keras.serve --model=runs/quickstart/export/model.onnx --images PATH...
    python -m hmnas_keras.serve --model=runs/quickstart/export/model.onnx --port=8000

The command is `hmnas_keras.serving.cli`; `from hmnas_keras.serve import
Classifier` keeps working as a short name for `hmnas_keras.serving.Classifier`.
"""

import sys

from hmnas_keras.serving import Classifier, ServeError, find_images
from hmnas_keras.serving.cli import main

__all__ = ["Classifier", "ServeError", "find_images", "main"]

if __name__ == "__main__":
    sys.exit(main())
