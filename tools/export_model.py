"""Exports the compact model of an existing workdir (what `--phases=...,export` does).

    python tools/export_model.py --workdir=runs/quickstart
    python tools/export_model.py --workdir=runs/cifar10 --speed_repeats=100
    python tools/export_model.py --workdir=runs/cifar10 \
        --export_formats=keras,saved_model,onnx,tflite,onnx_int8,tflite_int8

Reads WORKDIR/architecture.json, the fine-tuned weights and WORKDIR/config.json
(its data gives the normalisation constants and the real test images of the
parity checks), rewrites WORKDIR/export/ (model.keras, saved_model/,
model.onnx, metadata.json, summary.json) and WORKDIR/report.json, and prints
the parity errors, accuracies, sizes and speed. Unlike the pipeline's export
phase, it always exports again. The export flags (--export_formats,
--calibration_images, --accuracy_images, --quantization_tolerance,
--tflite_int8_io) default to the run's own (its config.json); those given here
replace them.
"""

import os
import sys

from absl import app, flags, logging

from hmnas_keras import quiet_logs  # noqa: F401  (first: before TensorFlow loads)
from hmnas_keras.export import options as export_options

flags.DEFINE_string("workdir", None, "A run's directory, fine-tuned (required).")
flags.DEFINE_float(
    "tolerance", 1e-5, "Largest |compact - searched| logit difference accepted.", lower_bound=0.0
)
flags.DEFINE_integer(
    "speed_repeats", 30, "Timed calls for the batch-1 latency (batch 64: a fifth).", lower_bound=1
)
export_options.define_flags()
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required: the directory of a fine-tuned run.")
    logging.set_verbosity(logging.WARNING)  # tf2onnx logs every conversion step at INFO
    from hmnas_keras.architecture.architecture_json import ArchitectureError
    from hmnas_keras.checkpoint import CheckpointError
    from hmnas_keras.data import DataError, make_search_data
    from hmnas_keras.export.formats import ExportError
    from hmnas_keras.pipeline.export_phase import export_data, export_workdir, format_summary
    from hmnas_keras.pipeline.report import write_report
    from hmnas_keras.pipeline.workdir import Workdir

    try:
        workdir = Workdir(FLAGS.workdir)
        if not os.path.exists(workdir.config):
            raise ExportError(
                f"{FLAGS.workdir} holds no {Workdir.CONFIG}: is it a hmnas_keras run?"
            )
        config = workdir.read_config()
        workdir = Workdir.of_run(FLAGS.workdir, config)
        try:
            export = export_options.override(config.export, FLAGS)
        except ValueError as error:
            raise ExportError(str(error)) from None
        data = make_search_data(config.data, config.seed)
        summary = export_workdir(
            workdir,
            **export_data(data, export),
            tolerance=FLAGS.tolerance,
            speed_repeats=FLAGS.speed_repeats,
        )
        write_report(config, workdir)
    except (ExportError, ArchitectureError, CheckpointError, DataError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(f"Exported models in {workdir.export.directory}; report in {workdir.report}")
    return 0


if __name__ == "__main__":
    app.run(main)
