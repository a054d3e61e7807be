"""The export flags, shared by `python -m hmnas_keras.search` and `tools/export_model.py`.

    --export_formats=keras,saved_model,onnx,tflite,onnx_int8,tflite_int8

`define_flags` declares them once; `export_config` turns them into the run's
`ExportConfig`, and `override` applies only those given on a command line to a
saved one (what `tools/export_model.py` does with a workdir's config.json).
"""

import dataclasses

from absl import flags

from hmnas_keras.config import DEFAULT_EXPORT_FORMATS, EXPORT_FORMATS, ExportConfig

# Flag name -> ExportConfig field.
FLAG_FIELDS = {
    "export_formats": "formats",
    "calibration_images": "calibration_images",
    "accuracy_images": "accuracy_images",
    "quantization_tolerance": "quantization_tolerance",
    "tflite_int8_io": "tflite_int8_io",
    "fuse_nodes": "fuse_nodes",
}


def define_flags() -> None:
    defaults = ExportConfig()
    flags.DEFINE_list(
        "export_formats",
        list(DEFAULT_EXPORT_FORMATS),
        f"What the export writes, a comma list of: {', '.join(EXPORT_FORMATS)} "
        "(tflite and tflite_int8 need the tflite extra).",
    )
    flags.DEFINE_integer(
        "calibration_images",
        defaults.calibration_images,
        "Training images that calibrate the int8 models.",
    )
    flags.DEFINE_integer(
        "accuracy_images",
        defaults.accuracy_images,
        "Test images on which every exported model's top-1 accuracy is measured (at most).",
    )
    flags.DEFINE_float(
        "quantization_tolerance",
        defaults.quantization_tolerance,
        "Accuracy points an int8 model may lose against Keras before it is flagged.",
    )
    flags.DEFINE_bool(
        "tflite_int8_io",
        defaults.tflite_int8_io,
        "model.int8.tflite takes and returns int8 tensors (default: float32 in and out).",
    )
    flags.DEFINE_bool(
        "fuse_nodes",
        defaults.fuse_nodes,
        "The exported graph computes each node's ops as a few wide layers (the same function "
        "in several times fewer layers, about 2x faster in onnxruntime at batch 1); "
        "--nofuse_nodes keeps a few layers per op, named after it.",
    )


def export_config(values) -> ExportConfig:
    """The ExportConfig of the flags (absl FLAGS); raises ValueError on bad values."""
    return ExportConfig(**{field: values[name].value for name, field in FLAG_FIELDS.items()})


def override(config: ExportConfig, values) -> ExportConfig:
    """`config` with the export flags given on the command line applied."""
    given = {f: values[name].value for name, f in FLAG_FIELDS.items() if values[name].present}
    return dataclasses.replace(config, **given)
