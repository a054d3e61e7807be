"""The export phase: the fine-tuned network of a workdir as compact, checked models.

`export_workdir` (the pipeline's `run_export_phase`, and `tools/export_model.py`)
reads WORKDIR/architecture.json and the fine-tuned weights, builds the compact
model (`hmnas_keras.export.compact`) and writes the formats of
`--export_formats` (default `.keras`, SavedModel and ONNX; also float TFLite,
and int8 ONNX and TFLite calibrated on training images:
`hmnas_keras.export.formats`, `hmnas_keras.export.quantize`) with their
metadata. It checks every float file against Keras, measures the top-1 test
accuracy of Keras and of every file on the same test images (an int8 model
that loses more than `--quantization_tolerance` points is kept but flagged,
with a warning), times Keras and every runtime (`hmnas_keras.export.checks`),
and writes WORKDIR/export/summary.json: files and sizes, parameters and FLOPs
of the compact model, parity errors at two batch sizes (and of the compact
model against the searched network), accuracies, batch-1 latency and batch-64
throughput. `report.json` shows it. The summary is written last: its presence
says the phase is complete.
"""

import os
import time

import numpy as np

from hmnas_keras.architecture.architecture_json import read_architecture
from hmnas_keras.architecture.searched_network import SearchedNetwork
from hmnas_keras.checkpoint import CheckpointError, assign_by_path, write_json
from hmnas_keras.config import INT8_FORMATS, ExportConfig
from hmnas_keras.export.checks import (
    LATENCY_BATCH_SIZE,
    PARITY_BATCH_SIZES,
    RUNTIME_FORMATS,
    RUNTIMES,
    THROUGHPUT_BATCH_SIZE,
    accuracy,
    load_exported,
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
    export_tflite,
    file_size,
    model_metadata,
    remove_leftovers,
    temporary_path,
)
from hmnas_keras.export.quantize import export_onnx_int8, export_tflite_int8
from hmnas_keras.pipeline.workdir import SEARCHED_MODEL, Workdir, read_json

# Real test images of the parity checks (the accuracy uses --accuracy_images of them).
PARITY_IMAGES = 64


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


def check_export_settings(export: ExportConfig, training_images: int | None = None) -> None:
    """Refuses, before any work, formats the installed packages cannot produce, and a
    calibration count the training split cannot provide (ExportError, one line)."""
    if any(kind.startswith("tflite") for kind in export.formats):
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            raise ExportError(
                "--export_formats with tflite or tflite_int8 needs the LiteRT interpreter, "
                'which checks the models: pip install -e ".[cpu,tflite]" in a checkout (or '
                "pip install ai-edge-litert)."
            ) from None
    if "onnx_int8" in export.formats:
        try:
            import onnxruntime.quantization  # noqa: F401
        except ImportError as error:
            raise ExportError(
                f"--export_formats=onnx_int8 needs onnxruntime's quantization tools ({error.name} "
                'is missing): pip install -e ".[cpu]" in a checkout.'
            ) from None
    if export.quantized and training_images is not None:
        _check_calibration_count(export.calibration_images, training_images)


def _check_calibration_count(count: int, training_images: int) -> None:
    if count > training_images:
        raise ExportError(
            f"--calibration_images={count} is more than the training split holds "
            f"({training_images} images): lower it, or use more training data."
        )


def _write_models(
    model, files, export: ExportConfig, metadata, calibration, log, tflite_model=None
) -> dict:
    """Writes the chosen formats; returns {format: path}.

    `tflite_model` (default `model`) is what the TFLite files hold: the unfused
    form, since TensorFlow's int8 quantizer leaves some of the fused form's
    depthwise convolutions in float.
    """
    tflite_model = tflite_model or model
    os.makedirs(files.directory, exist_ok=True)
    remove_leftovers(files.directory)
    paths = {kind: files.models[kind] for kind in export.formats}
    form = "fused compact model" if export.fuse_nodes else "compact model"
    log(f"Export: {form} of {len(model.layers)} layers; writing {files.directory}/")
    if "keras" in paths:
        export_keras(model, paths["keras"])
    if "saved_model" in paths:
        export_saved_model(model, paths["saved_model"])
    float_onnx = paths.get("onnx") or temporary_path(files.onnx)
    if "onnx" in paths or "onnx_int8" in paths:
        export_onnx(model, float_onnx, metadata)
    if "tflite" in paths:
        export_tflite(tflite_model, paths["tflite"], metadata)
    if "onnx_int8" in paths:
        log(f"Export: int8 ONNX, calibrated on {len(calibration)} training images")
        export_onnx_int8(float_onnx, paths["onnx_int8"], metadata, calibration)
        if "onnx" not in paths:
            os.remove(float_onnx)
    if "tflite_int8" in paths:
        log(f"Export: int8 TFLite, calibrated on {len(calibration)} training images")
        export_tflite_int8(
            tflite_model, paths["tflite_int8"], metadata, calibration, export.tflite_int8_io
        )
    write_json(files.metadata, metadata)
    return paths


def flag_quantized(result: dict, export: ExportConfig, paths: dict, log) -> list[str]:
    """Marks the int8 models that lose more than the tolerance; warns by name."""
    flagged = []
    for kind, entry in result["models"].items():
        entry["drop_points"] = round(100.0 * (result["keras"] - entry["test_accuracy"]), 2)
        entry["flagged"] = kind in INT8_FORMATS and entry["drop_points"] > (
            export.quantization_tolerance
        )
        if entry["flagged"]:
            flagged.append(kind)
            log(
                f"Warning: {os.path.basename(paths[kind])} loses {entry['drop_points']:.2f} "
                f"points of test accuracy against Keras ({100 * entry['test_accuracy']:.2f}% "
                f"against {100 * result['keras']:.2f}% on {result['images']} images; "
                f"--quantization_tolerance={export.quantization_tolerance:g}). The file is kept; "
                "use it only if that loss is acceptable."
            )
    return flagged


def export_workdir(
    workdir: Workdir,
    mean,
    std,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
    export: ExportConfig | None = None,
    tolerance: float = 1e-5,
    speed_repeats: int = 30,
    log=print,
) -> dict:
    """Builds, exports and checks the compact model of `workdir`; writes export/summary.json.

    `mean`, `std`: the normalisation of the run's data; `images`: real
    normalised test images, the first `PARITY_IMAGES` for the parity checks
    and, with their `labels`, the first `export.accuracy_images` for the test
    accuracy of every model; `calibration`: normalised training images
    for the int8 models (needed when `export` asks for one). Raises ExportError
    when the compact model differs from the searched network by more than
    `tolerance`.
    """
    started = time.monotonic()
    export = export or ExportConfig()
    check_export_settings(export)
    if export.quantized and calibration is None:
        raise ExportError("The int8 formats need calibration images (training images).")
    architecture, network = load_finetuned_network(workdir)
    # The files hold the fused form; parameters and FLOPs are counted on the
    # unfused one, whose kernels are the searched network's without structural zeros.
    counted = compact_model(network)
    model = compact_model(network, fuse=True) if export.fuse_nodes else counted
    files = workdir.export
    metadata = model_metadata(architecture, mean, std)
    images = np.asarray(images, "float32")
    paths = _write_models(model, files, export, metadata, calibration, log, counted)
    loaded = {kind: load_exported(kind, path) for kind, path in paths.items()}
    parity = parity_errors(network, model, loaded, images[:PARITY_IMAGES])
    compaction_error = parity["compact_vs_searched"]["real"]
    if compaction_error > tolerance:
        raise ExportError(
            f"The compact model differs from the searched network by {compaction_error:.3g} "
            f"(tolerance {tolerance:g}) on real inputs. This is a bug: please report it with "
            f"{Workdir.ARCHITECTURE}."
        )
    summary = {
        "formats": list(export.formats),
        "files": {kind: workdir.relative(path) for kind, path in paths.items()},
        "bytes": {kind: file_size(path) for kind, path in paths.items()},
        "onnx_opset": ONNX_OPSET,
        "parameters": compact_parameter_counts(counted),
        "flops": kernel_macs(counted),
        "graph": {
            "fused": export.fuse_nodes,
            "layers": len(model.layers),
            "unfused_layers": len(counted.layers),
            "stored_weights": int(sum(np.prod(v.shape) for v in model.weights)),
        },
        "searched_parameters": architecture.get("parameters", {}).get("searched"),
        "parity_max_abs_error": parity,
    }
    if labels is not None:
        count = min(export.accuracy_images, len(images))
        log(f"Export: test accuracy of every model on {count} test images")
        summary["accuracy"] = accuracy(model, loaded, images[:count], labels[:count])
        summary["accuracy"]["flagged"] = flag_quantized(summary["accuracy"], export, paths, log)
    if export.quantized:
        summary["quantization"] = {
            "calibration_images": int(len(calibration)),
            "tolerance_points": export.quantization_tolerance,
            "tflite_int8_io": "int8" if export.tflite_int8_io else "float32",
        }
    log("Export: measuring the speed of Keras and of each runtime")
    summary["speed"] = measure_speed(model, loaded, architecture["image_shape"], speed_repeats)
    summary["export_seconds"] = round(time.monotonic() - started, 2)
    write_json(files.summary, summary)
    return summary


def _speed_line(summary: dict) -> str:
    speed = summary["speed"]
    latency = speed[f"latency_ms_batch_{LATENCY_BATCH_SIZE}"]
    throughput = speed[f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}"]
    # Runs exported before the other runtimes existed called the float ONNX "onnxruntime".
    kind = "onnx" if "onnx" in latency else "onnxruntime" if "onnxruntime" in latency else None
    if kind is None:
        return (
            f"Speed: batch-1 latency Keras {latency['keras']:.2f} ms; batch-"
            f"{THROUGHPUT_BATCH_SIZE} throughput Keras {throughput['keras']:,.0f}/s"
        )
    return (
        f"Speed: batch-1 latency onnxruntime {latency[kind]:.2f} ms, Keras "
        f"{latency['keras']:.2f} ms; batch-{THROUGHPUT_BATCH_SIZE} throughput onnxruntime "
        f"{throughput[kind]:,.0f}/s, Keras {throughput['keras']:,.0f}/s"
    )


# The columns of the per-model table: heading and alignment.
TABLE_COLUMNS = (
    ("model", "<20"),
    ("runtime", "<12"),
    ("size", ">9"),
    ("test acc", ">9"),
    ("agrees", ">7"),
    ("batch-1 ms", ">10"),
    ("batch-64/s", ">10"),
)


def _table_row(cells) -> str:
    return " ".join(
        f"{cell:{align}}" for cell, (_, align) in zip(cells, TABLE_COLUMNS, strict=True)
    )


def models_table(summary: dict) -> list[str]:
    """One line per exported model: file, runtime, size, accuracy, batch-1 / batch-64 speed."""
    accuracy = summary.get("accuracy") or {}
    speed = summary["speed"]
    latency = speed[f"latency_ms_batch_{LATENCY_BATCH_SIZE}"]
    throughput = speed[f"throughput_images_per_s_batch_{THROUGHPUT_BATCH_SIZE}"]
    keras_acc = f"{100 * accuracy['keras']:.2f}%" if accuracy else "-"
    lines = [
        _table_row(heading for heading, _ in TABLE_COLUMNS),
        _table_row(
            ["Keras (in memory)", "keras", "", keras_acc, "", f"{latency['keras']:.2f}"]
            + [f"{throughput['keras']:,.0f}"]
        ),
    ]
    for kind, path in summary["files"].items():
        entry = accuracy.get("models", {}).get(kind)
        timed = kind in RUNTIME_FORMATS
        cells = [
            os.path.basename(path),
            RUNTIMES[kind],
            f"{summary['bytes'][kind] / 1024:,.0f} KiB",
            f"{100 * entry['test_accuracy']:.2f}%" if entry else "-",
            f"{100 * entry['agreement_with_keras']:.1f}%" if entry else "-",
            f"{latency[kind]:.2f}" if timed else "-",
            f"{throughput[kind]:,.0f}" if timed else "-",
        ]
        flagged = entry and entry.get("flagged")
        note = f"  <- {entry['drop_points']:.2f} points below Keras (flagged)" if flagged else ""
        lines.append(_table_row(cells) + note)
    if accuracy:
        lines.append(
            f"(test accuracy and agreement with Keras' top-1 on {accuracy['images']} test images)"
        )
    return lines


def _graph_line(summary: dict) -> list[str]:
    graph = summary.get("graph")  # absent in runs exported before the fused form
    if not graph or not graph["fused"]:
        return []
    return [
        f"Graph: fused, {graph['layers']:,} layers ({graph['unfused_layers']:,} unfused); "
        f"{graph['stored_weights']:,} stored weights and statistics, zeros of the "
        "block-diagonal and diagonal 1x1 kernels included"
    ]


def format_summary(summary: dict) -> str:
    """A few lines for the console and report.txt."""
    parity = summary["parity_max_abs_error"]
    floats = [k for k in parity if k != "compact_vs_searched"]
    parameters = summary["parameters"]
    files = ", ".join(
        f"{os.path.basename(path)} {summary['bytes'][kind] / 1024:.0f} KiB"
        for kind, path in summary["files"].items()
    )
    lines = [
        f"Export: {parameters['dense']:,} parameters ({parameters['nonzero']:,} non-zero), "
        f"{summary['flops']['macs'] / 1e6:.2f} MFLOPs "
        f"({summary['flops']['nonzero_macs'] / 1e6:.2f} over non-zero weights); {files} "
        f"(ONNX opset {summary['onnx_opset']})",
        *_graph_line(summary),
        f"Parity (max |logit difference|): compact vs searched "
        f"{parity['compact_vs_searched']['real']:.2g}; vs Keras at batch "
        f"{'/'.join(str(b) for b in PARITY_BATCH_SIZES)}: "
        + ", ".join(f"{kind} {max(parity[kind].values()):.2g}" for kind in floats),
        _speed_line(summary),
    ]
    if "accuracy" in summary:
        lines += models_table(summary)
    return "\n".join(lines)


def sample_test_examples(data, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` test images of a SearchData (normalised) and their labels.

    Drawn at random (fixed seed) when the split holds more: the split is in
    class order, so its first images would be a few classes only.
    """
    chosen = np.arange(len(data.test_images))
    if count < len(chosen):
        chosen = np.sort(np.random.default_rng([0, 13]).permutation(len(chosen))[:count])
    images = (data.test_images[chosen].astype("float32") / 255.0 - data.mean) / data.std
    return images.astype("float32"), np.asarray(data.test_labels)[chosen]


def calibration_images(data, count: int) -> np.ndarray:
    """`count` training images (weight and architecture parts), drawn by the run's seed,
    normalised as the model expects. Never test images."""
    pixels = np.concatenate([data.weight_images, data.arch_images])
    _check_calibration_count(count, len(pixels))
    chosen = np.sort(np.random.default_rng([data.seed, 11]).permutation(len(pixels))[:count])
    return ((pixels[chosen].astype("float32") / 255.0 - data.mean) / data.std).astype("float32")


def export_data(data, export: ExportConfig) -> dict:
    """The keyword arguments of `export_workdir` that come from the run's data."""
    images, labels = sample_test_examples(data, max(export.accuracy_images, PARITY_IMAGES))
    quantized = export.quantized
    return {
        "mean": data.mean,
        "std": data.std,
        "images": images,
        "labels": labels,
        "calibration": calibration_images(data, export.calibration_images) if quantized else None,
        "export": export,
    }


def run_export_phase(config, data, workdir: Workdir, verbose: bool = True) -> dict:
    """The pipeline's export phase (skipped when WORKDIR/export/summary.json exists)."""
    path = workdir.export.summary
    if os.path.exists(path):
        print(f"The export phase already finished ({path}); tools/export_model.py exports again.")
        return read_json(path)
    return export_workdir(
        workdir, **export_data(data, config.export), log=print if verbose else (lambda *_: None)
    )
