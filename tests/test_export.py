"""Compaction (the compact Keras model) and export to .keras, SavedModel and ONNX."""

import json
import os

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from conftest import EXPORT_CLASSES, real_images, searched_network
from keras import ops

from hmnas_keras.architecture.counting import flop_counts
from hmnas_keras.export.compact import compact_model, compact_parameter_counts, kernel_macs
from hmnas_keras.export.formats import ONNX_OPSET, ExportError
from hmnas_keras.pipeline.export_phase import format_summary, load_finetuned_network
from hmnas_keras.pipeline.workdir import Workdir
from hmnas_keras.serving.metadata import METADATA_KEY

STANDARD_MODULES = ("keras.src.layers.", "keras.src.models.")


def _logits(model, x):
    return ops.convert_to_numpy(model(x, training=False))


@pytest.fixture(scope="module")
def gray():
    """A searched network on 1-channel digits (real inputs) and its compact model."""
    architecture, network = searched_network(image_shape=(8, 8, 1), seed=3)
    return architecture, network, compact_model(network)


def test_compact_model_equals_the_searched_network_on_real_and_random_inputs(gray):
    architecture, network, model = gray
    real = real_images(64, channels=1)
    random = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    for x in (real, random):
        difference = np.abs(_logits(model, x) - _logits(network, x)).max()
        assert difference <= 1e-5, difference
    # The logits are not trivially equal (e.g. all zero): different images, different outputs.
    assert np.ptp(_logits(model, real), axis=0).min() > 1e-2


def test_compact_model_holds_only_standard_layers_and_surviving_ops(gray):
    architecture, network, model = gray
    for layer in model.layers:
        assert type(layer).__module__.startswith(STANDARD_MODULES), type(layer)
    names = [layer.name for layer in model.layers]
    variables = [v.path for v in model.variables]
    assert not [v for v in variables if "alpha" in v or "beta_" in v or "mask" in v]
    for index, cell_type in enumerate(network.search_space.cell_types):
        cell = architecture["cells"][cell_type]
        prefix = f"cell_{index}."
        kept = {(e["source"], e["target"]): {o["name"] for o in e["ops"]} for e in cell["edges"]}
        for pruned in cell["pruned_edges"]:
            edge = f"{prefix}edge_{pruned['source']}_{pruned['target']}."
            assert not [n for n in names if n.startswith(edge)], edge
        for (source, target), op_names in kept.items():
            edge = f"{prefix}edge_{source}_{target}."
            built = {n[len(edge) :].split(".")[0] for n in names if n.startswith(edge)}
            assert built == op_names
        # Node 2 is dead: nothing computes it or reads it.
        assert not [n for n in names if n.startswith(f"{prefix}node_2")]
        assert cell["dead_nodes"] == [2]
    # The pruned dil_conv on 0->3 of every cell is absent; the others are there.
    assert not [n for n in names if ".edge_0_3.dil_conv_3x3." in n]
    assert [n for n in names if ".edge_0_4.dil_conv_3x3." in n]


def test_compact_model_keeps_parameters_zeros_and_flops_of_the_searched_network(gray):
    architecture, network, model = gray
    counts = compact_parameter_counts(model)
    assert {k: counts[k] for k in ("dense", "nonzero")} == architecture["parameters"]["searched"]
    assert 0 < counts["nonzero"] < counts["dense"]  # the 30% zeroed weights stayed zeros
    assert counts["folded_scales"] > 0
    assert kernel_macs(model) == flop_counts(network)
    # Every folded scale is c = edge weight x op weight of a surviving op (all in (0, 1)).
    for layer in model.layers:
        if layer.name in model.folded_scales:
            gamma = ops.convert_to_numpy(layer.gamma)
            assert np.all((gamma > 0) & (gamma < 1)) and np.ptp(gamma) == 0


def test_fused_compact_model_is_the_same_function_in_fewer_layers(gray):
    architecture, network, model = gray
    fused = compact_model(network, fuse=True)
    for layer in fused.layers:
        assert type(layer).__module__.startswith(STANDARD_MODULES), type(layer)
    # Every node of every cell is one 1x1 convolution over its ops' concatenated parts.
    names = [layer.name for layer in fused.layers]
    for index in range(len(network.search_space.cell_types)):
        for node in (3, 4):
            assert f"cell_{index}.node_{node}.conv" in names
    assert len(fused.layers) < 0.75 * len(model.layers)
    real = real_images(64, channels=1)
    random = np.random.default_rng(1).normal(size=(8, 8, 8, 1)).astype("float32")
    for x in (real, random):
        difference = np.abs(_logits(fused, x) - _logits(network, x)).max()
        assert difference <= 1e-5, difference

    # The depthwise kernels are copied, not folded: the same non-zero entries (the
    # pruned weights still zeros), only regrouped.
    def depthwise_nonzero(m):
        layers = [layer for layer in m.layers if isinstance(layer, keras.layers.DepthwiseConv2D)]
        return sum(int(np.count_nonzero(ops.convert_to_numpy(layer.kernel))) for layer in layers)

    assert depthwise_nonzero(fused) == depthwise_nonzero(model) > 0


def test_exported_files_match_keras_at_two_batch_sizes(exported_workdir):
    workdir, architecture, network, summary = exported_workdir
    export_dir = os.path.join(workdir, "export")
    parity = summary["parity_max_abs_error"]
    assert parity["compact_vs_searched"]["real"] <= 1e-5
    assert parity["compact_vs_searched"]["random"] <= 1e-5
    assert summary["formats"] == ["keras", "saved_model", "onnx"]
    assert set(summary["files"]) == {"keras", "saved_model", "onnx"}
    for key in ("keras", "saved_model", "onnx"):
        assert set(parity[key]) == {"batch_1", "batch_64"}
        assert max(parity[key].values()) <= 1e-5, (key, parity[key])
    for key, size in summary["bytes"].items():
        assert size > 1000, key
    assert summary["parameters"]["dense"] == architecture["parameters"]["searched"]["dense"]
    assert summary["flops"] == architecture["flops"]["searched"]
    graph = summary["graph"]
    assert graph["fused"] and 0 < graph["layers"] < graph["unfused_layers"]
    assert "Graph: fused" in format_summary(summary)
    speed = summary["speed"]
    for runtime in ("keras", "onnx"):
        assert speed["latency_ms_batch_1"][runtime] > 0
        assert speed["throughput_images_per_s_batch_64"][runtime] > 0
    assert "Parity" in format_summary(summary)
    with open(os.path.join(export_dir, "summary.json")) as handle:
        assert json.load(handle) == summary

    # .keras round trip: the same function, by standard Keras loading.
    x = real_images(5)
    reloaded = keras.saving.load_model(os.path.join(export_dir, "model.keras"))
    expected = _logits(network, x)
    np.testing.assert_allclose(_logits(reloaded, x), expected, atol=1e-5)

    # SavedModel: the `serve` signature TF Serving calls, and serving_default.
    saved = tf.saved_model.load(os.path.join(export_dir, "saved_model"))
    assert {"serve", "serving_default"} <= set(saved.signatures)
    signature = saved.signatures["serving_default"]
    assert list(signature.structured_input_signature[1]) == ["images"]
    out = signature(images=tf.constant(x))["logits"].numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_onnx_file_has_named_dynamic_io_opset_and_metadata(exported_workdir):
    workdir, architecture, network, _ = exported_workdir
    path = os.path.join(workdir, "export", "model.onnx")
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [ONNX_OPSET]
    (model_input,) = proto.graph.input
    (model_output,) = proto.graph.output
    assert model_input.name == "images" and model_output.name == "logits"
    dims = model_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [8, 8, 3]
    metadata = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    assert metadata["class_names"] == EXPORT_CLASSES
    assert metadata["preprocessing"]["mean"] == [0.3] * 3
    assert metadata["preprocessing"]["std"] == [0.35] * 3
    assert metadata["input"]["shape"] == [None, 8, 8, 3]
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = real_images(batch)
        (logits,) = session.run(None, {"images": x})
        np.testing.assert_allclose(logits, _logits(network, x), atol=1e-5)
    with open(os.path.join(workdir, "export", "metadata.json")) as handle:
        assert json.load(handle) == metadata


def test_export_refuses_a_workdir_without_fine_tuned_weights(tmp_path, exported_workdir):
    workdir = exported_workdir[0]
    with pytest.raises(ExportError, match="no architecture.json"):
        load_finetuned_network(Workdir(str(tmp_path)))
    os.makedirs(tmp_path / "run")
    with open(os.path.join(workdir, "architecture.json")) as source:
        (tmp_path / "run" / "architecture.json").write_text(source.read())
    with pytest.raises(ExportError, match="Run the finetune phase first"):
        load_finetuned_network(Workdir(str(tmp_path / "run")))
