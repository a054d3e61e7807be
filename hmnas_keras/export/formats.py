"""The compact model as files: `.keras`, SavedModel and ONNX (DESIGN.md §3).

- `export_keras`: `model.keras` (standard layers only; `keras.saving.load_model`);
- `export_saved_model`: a TensorFlow SavedModel whose `serve` signature (also
  `serving_default`, what TF Serving calls) maps `images` [batch, h, w, c]
  float32 to `logits` [batch, classes];
- `export_onnx`: the same function in ONNX (opset `ONNX_OPSET`), input
  `images` and output `logits` with a dynamic `batch` dimension; its metadata
  (`model_metadata`, JSON under `hmnas_keras.serving.metadata.METADATA_KEY`)
  holds the class names and the preprocessing, so a client can prepare
  images without this package.

Every file is written to a temporary name and renamed, so an interrupted
export leaves no half-written model (`remove_leftovers` clears what a killed
one left).
"""

import json
import os
import shutil
import warnings

import numpy as np

from hmnas_keras.export.compact import INPUT_NAME, OUTPUT_NAME
from hmnas_keras.serving.metadata import METADATA_FORMAT, METADATA_KEY, METADATA_VERSION

ONNX_OPSET = 17
TMP_MARKER = ".tmp-"


class ExportError(ValueError):
    """A model that cannot be exported, or an export that does not match its model."""


def model_metadata(architecture: dict, mean, std) -> dict:
    """What a client needs to use the model: classes, input and preprocessing."""
    height, width, channels = (int(v) for v in architecture["image_shape"])
    return {
        "format": METADATA_FORMAT,
        "version": METADATA_VERSION,
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
    return f"{path}{TMP_MARKER}{os.getpid()}"


def _replace_dir(tmp_path: str, path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp_path, path)


def export_keras(model, path: str) -> None:
    """`model.keras` (Keras' own format; `keras.saving.load_model`)."""
    tmp = _tmp(path) + ".keras"
    model.save(tmp)
    os.replace(tmp, path)


def serve_function(model):
    """The model as a tf.function `images` [batch, h, w, c] -> {"logits": ...} (inference mode)."""
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
    serve = serve_function(model)
    module = tf.Module()
    module.model_variables = model.variables
    module.serve = serve
    tf.saved_model.save(module, tmp, signatures={"serve": serve, "serving_default": serve})
    _replace_dir(tmp, path)


def _rename_output(proto, old: str, new: str) -> None:
    for node in proto.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
        node.input[:] = [new if name == old else name for name in node.input]
    for value in list(proto.graph.output) + list(proto.graph.value_info):
        if value.name == old:
            value.name = new


def export_onnx(model, path: str, metadata: dict, opset: int = ONNX_OPSET) -> None:
    """ONNX with input `images`, output `logits`, a dynamic `batch` dimension and metadata.

    Converted by `keras.Model.export(format="onnx")` (tf2onnx underneath), then
    annotated: the output renamed, the batch dimension named, the metadata added.
    """
    import onnx
    import tensorflow as tf

    raw = _tmp(path) + ".raw"
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, INPUT_NAME)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Keras' tf2onnx patch probes np.object
        model.export(
            raw, format="onnx", input_signature=signature, opset_version=opset, verbose=False
        )
    proto = onnx.load(raw)
    os.remove(raw)
    _rename_output(proto, proto.graph.output[0].name, OUTPUT_NAME)
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


def remove_leftovers(directory: str) -> None:
    """Removes the temporary files and folders an interrupted export left in `directory`."""
    for name in os.listdir(directory):
        if TMP_MARKER in name:
            leftover = os.path.join(directory, name)
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)


def file_size(path: str) -> int:
    """Bytes of a file, or of every file in a folder."""
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, names in os.walk(path)
            for name in names
        )
    return os.path.getsize(path)
