"""The compact model as files: `.keras`, SavedModel and ONNX (DESIGN.md §3).

- `export_keras`: `model.keras` (standard layers only; `keras.saving.load_model`);
- `export_saved_model`: a TensorFlow SavedModel whose `serve` signature (also
  `serving_default`, what TF Serving calls) maps `images` [batch, h, w, c]
  float32 to `logits` [batch, classes];
- `export_onnx`: the same function in ONNX (opset `ONNX_OPSET`), input
  `images` and output `logits` with a dynamic `batch` dimension; its metadata
  (`model_metadata`, JSON under `hmnas_keras.serving.metadata.METADATA_KEY`)
  holds the class names and the preprocessing, so a client can prepare
  images without this package;
- `export_tflite`: a LiteRT (TFLite) flatbuffer from TensorFlow's converter
  (`tf.lite.TFLiteConverter`, the maintained converter for TensorFlow models;
  LiteRT's `ai-edge-litert` package has the interpreter only), with one
  signature `serving_default`: `images` -> `logits`, and the same metadata
  JSON as a flatbuffer metadata entry named `METADATA_KEY`. The int8 models
  are in `hmnas_keras.export.quantize`.

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


def temporary_path(path: str) -> str:
    """Where `path` is written before it is renamed into place (`remove_leftovers` clears it)."""
    return f"{path}{TMP_MARKER}{os.getpid()}"


def _replace_dir(tmp_path: str, path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp_path, path)


def export_keras(model, path: str) -> None:
    """`model.keras` (Keras' own format; `keras.saving.load_model`)."""
    tmp = temporary_path(path) + ".keras"
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

    tmp = temporary_path(path)
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

    raw = temporary_path(path) + ".raw"
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
    set_onnx_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    tmp = temporary_path(path)
    onnx.save(proto, tmp)
    os.replace(tmp, path)


def set_onnx_metadata(proto, metadata: dict) -> None:
    """Puts `metadata` (JSON) into an ONNX ModelProto under METADATA_KEY, replacing any."""
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(metadata))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def frozen_function(model):
    """The model's serving function with its variables folded in as constants.

    What the TFLite converter takes: converting the variables as resources
    leaves READ_VARIABLE ops that the int8 calibrator cannot run. Returns a
    tf.function `images` -> {"logits": ...}.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    frozen = convert_variables_to_constants_v2(serve_function(model).get_concrete_function())

    @tf.function(
        input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, INPUT_NAME)],
        autograph=False,
    )
    def serve(images):
        return {OUTPUT_NAME: frozen(images)[0]}

    return serve


def tflite_converter(model):
    """A `tf.lite.TFLiteConverter` of the model's frozen serving function."""
    import tensorflow as tf

    function = frozen_function(model).get_concrete_function()
    return tf.lite.TFLiteConverter.from_concrete_functions([function], tf.Module())


def with_tflite_metadata(content: bytes, metadata: dict) -> bytes:
    """The flatbuffer `content` with `metadata` (JSON) added under METADATA_KEY."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata).encode("utf-8"))
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_KEY.encode()]
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_tflite(content: bytes, path: str, metadata: dict) -> None:
    """Writes a converted flatbuffer with its metadata, atomically."""
    tmp = temporary_path(path)
    with open(tmp, "wb") as handle:
        handle.write(with_tflite_metadata(content, metadata))
    os.replace(tmp, path)


def export_tflite(model, path: str, metadata: dict) -> None:
    """`model.tflite`: float32, signature `serving_default` (`images` -> `logits`)."""
    write_tflite(tflite_converter(model).convert(), path, metadata)


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
