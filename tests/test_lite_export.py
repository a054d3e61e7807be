"""TFLite and int8 exports: parity, accuracy next to Keras, metadata, serving without TensorFlow.

One tiny run (the shared searched network of conftest, 8x8 inputs, 3 classes)
is exported once with float TFLite and both int8 models; the tests read its
files back with the serving runtimes (onnxruntime, LiteRT) and check them
against the Keras model.
"""

import json

import numpy as np
import pytest
from conftest import EXPORT_CLASSES, export_tiny_run, real_images
from PIL import Image
from test_serve import http_server, request, run_cli

from hmnas_keras.config import ExportConfig
from hmnas_keras.export.formats import ExportError
from hmnas_keras.serving import Classifier, ServeError
from hmnas_keras.serving.runtimes import read_tflite_metadata

FORMATS = ("onnx", "tflite", "onnx_int8", "tflite_int8")
MEAN, STD = [0.3] * 3, [0.35] * 3


def digit_labels(count):
    from hmnas_keras.data import load_digits_arrays

    return load_digits_arrays().train_labels[:count] % len(EXPORT_CLASSES)


@pytest.fixture(scope="module")
def lite_workdir(tmp_path_factory):
    """A workdir exported as ONNX, TFLite and both int8 models, with accuracy on 96 images."""
    images = real_images(96)
    logs = []
    workdir, _, network, summary = export_tiny_run(
        tmp_path_factory.mktemp("lite") / "run",
        images,
        labels=digit_labels(96),
        # Calibration on other images than the ones the accuracy is measured on.
        calibration=real_images(160)[96:],
        export=ExportConfig(formats=FORMATS, accuracy_images=96, calibration_images=64),
        log=logs.append,
    )
    return workdir, network, summary, images, logs


def test_tflite_float_model_matches_keras(lite_workdir):
    workdir, network, summary, images, _ = lite_workdir
    assert summary["formats"] == list(FORMATS)
    assert set(summary["parity_max_abs_error"]) == {"compact_vs_searched", "onnx", "tflite"}
    assert max(summary["parity_max_abs_error"]["tflite"].values()) <= 1e-5
    # Read back by the serving side (LiteRT), at a batch size the export did not use.
    classifier = Classifier(workdir.export.tflite)
    np.testing.assert_allclose(
        classifier.logits(images[:5]), network(images[:5], training=False).numpy(), atol=1e-5
    )
    assert classifier.model.runtime == "litert"
    assert classifier.model.input_name == "images" and classifier.model.output_name == "logits"
    with open(workdir.export.metadata) as handle:
        assert classifier.metadata == json.load(handle)


def test_int8_models_agree_with_keras_and_report_accuracy(lite_workdir):
    workdir, network, summary, images, _ = lite_workdir
    labels = digit_labels(96)
    keras_top1 = network(images, training=False).numpy().argmax(axis=1)
    result = summary["accuracy"]
    assert result["images"] == 96
    assert result["keras"] == pytest.approx(np.mean(keras_top1 == labels))
    for kind, path in (
        ("onnx_int8", workdir.export.onnx_int8),
        ("tflite_int8", workdir.export.tflite_int8),
    ):
        top1 = Classifier(path).logits(images).argmax(axis=1)
        entry = result["models"][kind]
        assert entry["test_accuracy"] == pytest.approx(np.mean(top1 == labels))
        assert entry["agreement_with_keras"] == pytest.approx(np.mean(top1 == keras_top1))
        assert entry["agreement_with_keras"] >= 0.75, (kind, entry)
        assert entry["drop_points"] == pytest.approx(
            100 * (result["keras"] - entry["test_accuracy"]), abs=0.01
        )
    for kind in ("onnx", "tflite"):
        assert result["models"][kind]["agreement_with_keras"] == 1.0
    # Full-integer: every convolution of the int8 TFLite model computes in int8.
    interpreter = Classifier(workdir.export.tflite_int8).model.interpreter
    convolutions = [op for op in interpreter._get_ops_details() if "CONV" in op["op_name"]]
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    assert convolutions
    assert all(details[op["inputs"][1]]["dtype"] == np.int8 for op in convolutions)
    for kind in FORMATS:
        assert summary["speed"]["latency_ms_batch_1"][kind] > 0
        assert summary["speed"]["throughput_images_per_s_batch_64"][kind] > 0
    assert summary["quantization"]["calibration_images"] == 64


def test_int8_models_carry_metadata_and_quantization(lite_workdir):
    workdir, *_ = lite_workdir
    with open(workdir.export.tflite_int8, "rb") as handle:
        metadata = read_tflite_metadata(handle.read())
    assert metadata["class_names"] == EXPORT_CLASSES
    assert metadata["quantization"]["input_output"] == "float32"
    assert metadata["quantization"]["calibration_images"] == 64
    onnx_metadata = Classifier(workdir.export.onnx_int8).metadata
    assert onnx_metadata["quantization"]["weights"] == "int8, per channel"
    assert onnx_metadata["preprocessing"]["mean"] == pytest.approx(MEAN)
    import onnx

    ops = {node.op_type for node in onnx.load(workdir.export.onnx_int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_int8_io_tflite_is_quantized_and_dequantized_by_the_runtime(lite_workdir, tmp_path):
    from hmnas_keras.architecture.architecture_json import read_architecture
    from hmnas_keras.export.compact import compact_model
    from hmnas_keras.export.formats import model_metadata
    from hmnas_keras.export.quantize import export_tflite_int8

    workdir, network, summary, images, _ = lite_workdir
    path = str(tmp_path / "model.int8.tflite")
    architecture = read_architecture(workdir.architecture)
    metadata = model_metadata(architecture, MEAN, STD)
    export_tflite_int8(compact_model(network), path, metadata, images[:32], int8_io=True)
    classifier = Classifier(path)
    assert classifier.model.input_detail["dtype"] == np.int8
    assert classifier.metadata["quantization"]["input_output"] == "int8"
    keras_top1 = network(images, training=False).numpy().argmax(axis=1)
    assert np.mean(classifier.logits(images).argmax(axis=1) == keras_top1) >= 0.75


def test_quantization_loss_beyond_the_tolerance_is_flagged_with_a_warning():
    from hmnas_keras.pipeline.export_phase import flag_quantized, format_summary

    result = {
        "images": 200,
        "keras": 0.90,
        "models": {
            "onnx": {"test_accuracy": 0.90, "agreement_with_keras": 1.0},
            "onnx_int8": {"test_accuracy": 0.895, "agreement_with_keras": 0.98},
            "tflite_int8": {"test_accuracy": 0.85, "agreement_with_keras": 0.9},
        },
    }
    logs = []
    paths = {"onnx_int8": "x/model.int8.onnx", "tflite_int8": "x/model.int8.tflite"}
    flagged = flag_quantized(result, ExportConfig(quantization_tolerance=2.0), paths, logs.append)
    assert flagged == ["tflite_int8"]
    assert result["models"]["tflite_int8"]["drop_points"] == pytest.approx(5.0)
    assert result["models"]["onnx_int8"]["flagged"] is False
    (warning,) = logs
    assert warning.startswith("Warning: model.int8.tflite loses 5.00 points")
    summary = {
        "files": {"onnx": "export/model.onnx", "tflite_int8": "export/model.int8.tflite"},
        "bytes": {"onnx": 2048, "tflite_int8": 1024},
        "parameters": {"dense": 10, "nonzero": 8},
        "flops": {"macs": 1e6, "nonzero_macs": 9e5},
        "onnx_opset": 17,
        "parity_max_abs_error": {"compact_vs_searched": {"real": 1e-7}, "onnx": {"batch_1": 0}},
        "accuracy": result,
        "speed": {
            "latency_ms_batch_1": {"keras": 3.0, "onnx": 1.0, "tflite_int8": 0.5},
            "throughput_images_per_s_batch_64": {"keras": 10, "onnx": 30, "tflite_int8": 60},
        },
    }
    text = format_summary(summary)
    (line,) = [row for row in text.splitlines() if row.startswith("model.int8.tflite")]
    assert "85.00%" in line and "5.00 points below Keras (flagged)" in line


def test_bad_export_settings_give_one_line_errors(monkeypatch):
    import sys

    from hmnas_keras.pipeline.export_phase import check_export_settings

    with pytest.raises(ValueError, match="--calibration_images, expected a positive"):
        ExportConfig(formats=("onnx_int8",), calibration_images=0)
    with pytest.raises(ValueError, match="--export_formats.*Received: onnx,tf"):
        ExportConfig(formats=("onnx", "tf"))
    with pytest.raises(
        ExportError, match=r"--calibration_images=500 is more than .*\(300 images\)"
    ):
        check_export_settings(ExportConfig(formats=("onnx_int8",), calibration_images=500), 300)
    check_export_settings(ExportConfig(calibration_images=500), 300)  # no int8: not needed
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ExportError, match=r'needs the LiteRT interpreter.*"\.\[cpu,tflite\]"'):
        check_export_settings(ExportConfig(formats=("tflite",)))


def test_serving_a_tflite_without_the_litert_package_names_the_extra(lite_workdir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(ServeError, match=r'needs the LiteRT interpreter.*"\.\[tflite\]"'):
        Classifier(lite_workdir[0].export.tflite)


def test_cli_and_http_serve_tflite_and_int8_onnx_without_tensorflow(lite_workdir, tmp_path):
    workdir, network, *_ = lite_workdir
    from hmnas_keras.data import load_digits_arrays

    pixels = np.repeat(load_digits_arrays().test_images[:4], 3, axis=-1)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(tmp_path / f"digit_{i}.png"))
        Image.fromarray(image).save(paths[-1])
    x = (pixels.astype("float32") / 255.0 - 0.3) / 0.35
    expected = network(x, training=False).numpy().argmax(axis=1)

    for model in (workdir.export.tflite, workdir.export.onnx_int8, workdir.export.tflite_int8):
        result = run_cli(f"--model={model}", "--images", *paths, "--format=jsonl", "--top_k=1")
        assert result.returncode == 0, result.stderr
        top1 = [json.loads(line)["predictions"][0]["index"] for line in result.stdout.splitlines()]
        agreement = np.mean(np.array(top1) == expected)
        assert agreement == 1.0 if model == workdir.export.tflite else agreement >= 0.75

    for model in (workdir.export.tflite, workdir.export.onnx_int8):
        status, result = predict_over_http(model, pixels)
        assert status == 200, result
        top1 = np.array([p[0]["index"] for p in result["predictions"]])
        agreement = np.mean(top1 == expected)
        assert agreement == 1.0 if model == workdir.export.tflite else agreement >= 0.75


def predict_over_http(model, pixels):
    """Serves `model` over loopback HTTP (TensorFlow blocked) and POSTs JSON pixels to it."""
    with http_server(model) as url:
        payload = json.dumps({"pixels": pixels.tolist()}).encode()
        return request(f"{url}/predict?top_k=1", payload, "application/json")


def test_onnx_profile_splits_time_by_op_kind(lite_workdir):
    from hmnas_keras.serving.timing import profile  # what tools/onnx_profile.py prints

    workdir = lite_workdir[0]
    float_profile = profile(workdir.export.onnx, batch_size=4, runs=3, warmup=1)
    int8_profile = profile(workdir.export.onnx_int8, batch_size=4, runs=3, warmup=1)
    for result in (float_profile, int8_profile):
        assert result["total_ms"] > 0
        assert sum(e["ms"] for e in result["ops"].values()) == pytest.approx(
            result["total_ms"], rel=0.01, abs=0.01
        )
    # The float graph has depthwise and other convolutions; the int8 graph runs them as
    # quantized kernels.
    assert {"Conv (depthwise)"} <= set(float_profile["ops"])
    assert any(kind.startswith("QLinearConv") for kind in int8_profile["ops"]), int8_profile
