"""The export phase: the fine-tuned network of a workdir as a compact, checked model.

`export_workdir` (the pipeline's `run_export_phase`, and `tools/export_model.py`)
reads WORKDIR/architecture.json and the fine-tuned weights, builds the compact
model (`hmnas_keras.export.compact`), writes it as `.keras`, SavedModel and
ONNX with its metadata (`hmnas_keras.export.formats`), checks every file
against Keras and times onnxruntime (`hmnas_keras.export.checks`), and writes
WORKDIR/export/summary.json: file sizes, parameters and FLOPs of the compact
model, the parity errors of every export at two batch sizes (and of the compact
model against the searched network), and onnxruntime latency at batch 1 and
throughput at batch 64 against Keras. `report.json` shows it. The summary is
written last: its presence says the phase is complete.
"""

import os
import time

import numpy as np

from hmnas_keras.architecture.architecture_json import read_architecture
from hmnas_keras.architecture.searched_network import SearchedNetwork
from hmnas_keras.checkpoint import CheckpointError, assign_by_path, write_json
from hmnas_keras.export.checks import (
    PARITY_BATCH_SIZES,
    THROUGHPUT_BATCH_SIZE,
    measure_speed,
    parity_errors,
)
from hmnas_keras.export.compact import compact_model, compact_parameter_counts, kernel_macs
from hmnas_keras.export.formats import (
    ONNX_OPSET,
    ExportError,
    export_keras,
    export_onnx,
    export_saved_model,
    file_size,
    model_metadata,
    remove_leftovers,
)
from hmnas_keras.pipeline.workdir import SEARCHED_MODEL, Workdir, read_json


def load_finetuned_network(workdir: Workdir):
    """(architecture, built SearchedNetwork with the fine-tuned weights) of a workdir."""
    if not os.path.exists(workdir.architecture):
        raise ExportError(
            f"{workdir.root} has no {Workdir.ARCHITECTURE}: export needs a searched and "
            "fine-tuned run. Run the mask and finetune phases first."
        )
    architecture = read_architecture(workdir.architecture)
    if architecture.get("degenerate"):
        raise ExportError(f"Nothing to export: {architecture['degenerate']}.")
    checkpoint = workdir.finetune.checkpoint
    try:
        arrays = workdir.finetuned_arrays()
    except CheckpointError:
        raise ExportError(
            f"{workdir.root} has no fine-tuned weights ({checkpoint}). Run the finetune phase "
            "first (--phases=...,finetune,export)."
        ) from None
    network = SearchedNetwork(architecture, name=SEARCHED_MODEL).build_network()
    assign_by_path(
        network,
        arrays,
        lambda path: ExportError(
            f"{checkpoint} does not match {Workdir.ARCHITECTURE} (variable {path}): "
            "was architecture.json replaced after fine-tuning?"
        ),
    )
    return architecture, network


def _write_models(model, files, metadata: dict, log) -> None:
    os.makedirs(files.directory, exist_ok=True)
    remove_leftovers(files.directory)
    log(f"Export: compact model of {len(model.layers)} layers; writing {files.directory}/")
    export_keras(model, files.keras_file)
    export_saved_model(model, files.saved_model)
    export_onnx(model, files.onnx, metadata)
    write_json(files.metadata, metadata)


def export_workdir(
    workdir: Workdir,
    mean,
    std,
    images: np.ndarray,
    tolerance: float = 1e-5,
    speed_repeats: int = 30,
    log=print,
) -> dict:
    """Builds, exports and checks the compact model of `workdir`; writes export/summary.json.

    `mean`, `std`: the normalisation of the run's data; `images`: real
    normalised test images for the parity checks. Raises ExportError when the
    compact model differs from the searched network by more than `tolerance`.
    """
    started = time.monotonic()
    architecture, network = load_finetuned_network(workdir)
    model = compact_model(network)
    files = workdir.export
    _write_models(model, files, model_metadata(architecture, mean, std), log)
    parity = parity_errors(network, model, files.models, np.asarray(images, "float32"))
    compaction_error = parity["compact_vs_searched"]["real"]
    if compaction_error > tolerance:
        raise ExportError(
            f"The compact model differs from the searched network by {compaction_error:.3g} "
            f"(tolerance {tolerance:g}) on real inputs. This is a bug: please report it with "
            f"{Workdir.ARCHITECTURE}."
        )
    log("Export: measuring onnxruntime and Keras speed")
    speed = measure_speed(model, files.onnx, architecture["image_shape"], speed_repeats)
    summary = {
        "files": {key: workdir.relative(path) for key, path in files.models.items()},
        "bytes": {key: file_size(path) for key, path in files.models.items()},
        "onnx_opset": ONNX_OPSET,
        "parameters": compact_parameter_counts(model),
        "flops": kernel_macs(model),
        "searched_parameters": architecture.get("parameters", {}).get("searched"),
        "parity_max_abs_error": parity,
        "speed": speed,
        "export_seconds": round(time.monotonic() - started, 2),
    }
    write_json(files.summary, summary)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the console and report.txt."""
    parity = summary["parity_max_abs_error"]
    worst = {key: max(parity[key].values()) for key in ("keras_file", "saved_model", "onnx")}
    speed = summary["speed"]
    latency = speed["latency_ms_batch_1"]
    throughput = speed[f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}"]
    parameters = summary["parameters"]
    return "\n".join(
        [
            f"Export: {parameters['dense']:,} parameters ({parameters['nonzero']:,} non-zero), "
            f"{summary['flops']['macs'] / 1e6:.2f} MFLOPs "
            f"({summary['flops']['nonzero_macs'] / 1e6:.2f} over non-zero weights); model.keras "
            f"{summary['bytes']['keras_file'] / 1024:.0f} KiB, model.onnx "
            f"{summary['bytes']['onnx'] / 1024:.0f} KiB (opset {summary['onnx_opset']})",
            f"Parity (max |logit difference|): compact vs searched "
            f"{parity['compact_vs_searched']['real']:.2g}; vs Keras at batch "
            f"{'/'.join(str(b) for b in PARITY_BATCH_SIZES)}: .keras {worst['keras_file']:.2g}, "
            f"SavedModel {worst['saved_model']:.2g}, ONNX {worst['onnx']:.2g}",
            f"Speed: batch-1 latency onnxruntime {latency['onnxruntime']:.2f} ms, Keras "
            f"{latency['keras']:.2f} ms; batch-{THROUGHPUT_BATCH_SIZE} throughput onnxruntime "
            f"{throughput['onnxruntime']:,.0f}/s, Keras {throughput['keras']:,.0f}/s",
        ]
    )


def real_test_images(data, count: int = 64) -> np.ndarray:
    """Up to `count` normalised test images of a SearchData."""
    images = []
    for batch, _ in data.test_dataset():
        images.append(batch.numpy())
        if sum(len(b) for b in images) >= count:
            break
    return np.concatenate(images)[:count]


def run_export_phase(data, workdir: Workdir, verbose: bool = True) -> dict:
    """The pipeline's export phase (skipped when WORKDIR/export/summary.json exists)."""
    path = workdir.export.summary
    if os.path.exists(path):
        print(f"The export phase already finished ({path}); tools/export_model.py exports again.")
        return read_json(path)
    return export_workdir(
        workdir,
        data.mean,
        data.std,
        real_test_images(data),
        log=print if verbose else (lambda *_: None),
    )
