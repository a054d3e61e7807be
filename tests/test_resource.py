"""Resource targets and channel masks: the cost term, its gradient, and what the export keeps."""

import re
import types

import keras
import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from conftest import real_images
from keras import ops

from hmnas_keras.architecture.counting import flop_counts, parameter_counts
from hmnas_keras.config import MaskConfig, RunConfig
from hmnas_keras.export.compact import (
    CHANNEL_ALIGNMENT,
    compact_model,
    compact_parameter_counts,
    kernel_macs,
)
from hmnas_keras.export.formats import export_onnx
from hmnas_keras.pipeline.derive_phase import derive_architecture
from hmnas_keras.pipeline.workdir import Workdir
from hmnas_keras.space.search_space import SearchSpace
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.masking import MaskedSearch

OPS = ("sep_conv_3x3", "dil_conv_3x3", "max_pool_3x3", "skip_connect")
SPACE = SearchSpace(num_cells=3, channels=4, num_nodes=3, op_names=OPS)
DATA = types.SimpleNamespace(num_classes=3, image_shape=(8, 8, 3), class_names=["a", "b", "c"])


def _supernet(seed=0):
    """A built supernet with random non-zero weights and moved BN statistics."""
    keras.utils.set_random_seed(seed)
    supernet = Supernet(SPACE, 3, name="supernet")
    x = real_images(8)
    supernet(x, training=True)
    rng = np.random.default_rng(seed)
    for variable in supernet.variables:
        if "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype("float32"))
        elif "moving_mean" not in variable.path:
            values = rng.normal(0.0, 0.5, variable.shape)
            variable.assign(np.where(values == 0, 0.1, values).astype("float32"))
    return supernet, x


def _random_masks(masked, rng, keep_arch=0.8, keep_weights=0.7):
    """Random binary masks (values on both sides of τ); α, β denser than the weights."""
    for variables, keep in (
        (masked.arch_mask_variables, keep_arch),
        (masked.weight_mask_variables, keep_weights),
    ):
        for variable in variables:
            kept = rng.random(variable.shape) < keep
            variable.assign(np.where(kept, 1e-2, 1e-3).astype("float32"))


def _config(weight_mask):
    return RunConfig(search_space=SPACE, mask=MaskConfig(weight_mask=weight_mask))


# The element variant is large (~75 s alone): element counting is also checked in the default
# suite by the unused-cell test below and by the pipeline tests' architecture.json counts.
@pytest.mark.parametrize(
    "weight_mask", [pytest.param("element", marks=pytest.mark.large), "channel"]
)
def test_cost_term_equals_the_counted_cost_of_the_derived_network(weight_mask, tmp_path):
    supernet, _ = _supernet()
    masked = MaskedSearch(supernet, weight_mask=weight_mask)
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(4):
        _random_masks(masked, rng, keep_arch=0.6 + 0.1 * trial)
        counted = masked.counted_cost()
        binary = masked.binary_masks()
        masked.detach()
        workdir = Workdir(str(tmp_path / f"{weight_mask}-{trial}"))
        architecture, network = derive_architecture(
            _config(weight_mask), DATA, workdir, supernet, binary_masks=binary
        )
        masked.attach()
        assert architecture["cost"] == {k: round(v) for k, v in counted.items()}
        if network is None:  # a degenerate draw: nothing to build
            continue
        checked += 1
        assert parameter_counts(network.trainable_variables)["nonzero"] == counted["params"]
        assert flop_counts(network)["nonzero_macs"] == counted["flops"]
        if weight_mask == "channel":  # channels are dropped: dense is what survives
            assert parameter_counts(network.trainable_variables)["dense"] == counted["params"]
    assert checked >= 2
    dense = masked.cost.dense()
    assert dense["params"] == parameter_counts(supernet.weight_variables)["dense"]
    assert dense["flops"] == flop_counts(supernet)["macs"]


def test_unused_cells_are_not_built_and_not_counted(tmp_path):
    supernet, _ = _supernet(2)
    masked = MaskedSearch(supernet)
    for variable in masked.weight_mask_variables:
        variable.assign(np.full(variable.shape, 1e-2, "float32"))
    # The last cell (reduce) reads only its input 0 (cell 0's output): cell 1 is unused.
    for cell_type, beta in masked.beta_masks.items():
        values = np.full(beta.shape, 1e-2, "float32")
        if cell_type == "reduce":
            values[[1, 3, 6]] = 0.0  # every edge leaving input node 1
        beta.assign(values)
    binary = masked.binary_masks()
    counted = masked.counted_cost()
    masked.detach()
    architecture, network = derive_architecture(
        _config("element"), DATA, Workdir(str(tmp_path)), supernet, binary_masks=binary
    )
    assert [i["used"] for i in architecture["instances"]] == [True, False, True]
    assert network.cells[1] is None
    assert parameter_counts(network.trainable_variables)["nonzero"] == counted["params"]
    model = compact_model(network)
    assert kernel_macs(model) == flop_counts(network)
    x = real_images(4)
    np.testing.assert_allclose(
        ops.convert_to_numpy(model(x)), ops.convert_to_numpy(network(x)), atol=1e-5
    )


# The element variant is large (suite time); the channel variant reaches the same α, β
# and weight-mask code.
@pytest.mark.parametrize(
    "weight_mask", [pytest.param("element", marks=pytest.mark.large), "channel"]
)
def test_the_cost_gradient_reaches_every_kind_of_mask(weight_mask):
    supernet, _ = _supernet(3)
    dense = parameter_counts(supernet.weight_variables)["dense"]
    masked = MaskedSearch(
        supernet, weight_mask=weight_mask, target="params", target_count=dense / 2
    )
    with tf.GradientTape() as tape:
        ratio = masked.cost_ratio()
    groups = {
        "alpha": list(masked.alpha_masks.values()),
        "beta": list(masked.beta_masks.values()),
        "weights": masked.weight_mask_variables,
    }
    grads = tape.gradient(ratio, [v for group in groups.values() for v in group])
    assert float(ratio) == pytest.approx(2.0, rel=1e-6)  # every mask is 1: the whole supernet
    start = 0
    for name, variables in groups.items():
        window = grads[start : start + len(variables)]
        moved = [g is not None and np.abs(g.numpy()).max() > 0 for g in window]
        start += len(variables)
        assert all(moved), name
    # Removing a convolution lowers the cost: its α mask has a positive gradient.
    alpha_grad = grads[0].numpy()
    assert (alpha_grad[:, :2] > 0).all()  # sep_conv_3x3, dil_conv_3x3


def test_a_target_run_ends_near_its_target():
    keras.utils.set_random_seed(0)
    space = SearchSpace(num_cells=2, channels=4, num_nodes=2, op_names=OPS)
    supernet = Supernet(space, 3, name="supernet")
    x = real_images(64)
    labels = np.arange(64) % 3
    supernet(x[:2], training=False)
    dense = parameter_counts(supernet.weight_variables)["dense"]
    masked = MaskedSearch(supernet, target="params", target_count=0.5 * dense, name="masked")
    masked.compile(keras.optimizers.Adam(2e-3), keras.optimizers.Adam(2e-4))
    masked.build_masks()
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(16).repeat()
    masked.fit(dataset, epochs=4, steps_per_epoch=40, verbose=0)
    reached = masked.counted_cost()["params"] / (0.5 * dense)
    assert abs(reached - 1.0) <= 0.05, reached


def test_channel_masked_export_is_smaller_and_matches(tmp_path):
    supernet, _ = _supernet(4)
    masked = MaskedSearch(supernet, weight_mask="channel")
    rng = np.random.default_rng(5)
    _random_masks(masked, rng, keep_arch=0.9, keep_weights=0.6)
    binary = masked.binary_masks()
    masked.detach()
    architecture, network = derive_architecture(
        _config("channel"), DATA, Workdir(str(tmp_path)), supernet, binary_masks=binary
    )
    assert architecture["weight_mask"] == "channel" and architecture["degenerate"] is None
    model = compact_model(network)
    supernet_dense = parameter_counts(supernet.weight_variables)["dense"]
    dense = compact_parameter_counts(model)["dense"]
    assert dense == architecture["cost"]["params"] < supernet_dense
    assert kernel_macs(model)["macs"] == architecture["cost"]["flops"]
    x = real_images(16)
    expected = ops.convert_to_numpy(network(x, training=False))
    np.testing.assert_allclose(ops.convert_to_numpy(model(x)), expected, atol=1e-5)
    assert np.ptp(expected, axis=0).min() > 1e-3
    # The fused form (what the export writes): the same function in fewer layers, with
    # the pruned widths padded to onnxruntime's channel alignment by zero channels.
    fused = compact_model(network, fuse=True)
    assert len(fused.layers) < len(model.layers)
    np.testing.assert_allclose(ops.convert_to_numpy(fused(x)), expected, atol=1e-5)
    assert [layer for layer in fused.layers if layer.name.startswith("zeros_")]
    for layer in fused.layers:
        if ".node_" in layer.name and isinstance(layer, keras.layers.DepthwiseConv2D):
            assert layer.input.shape[-1] % CHANNEL_ALIGNMENT == 0, layer.name
        if layer.name.endswith((".conv", ".pw_1")) and layer.input.shape[-1] >= 16:
            assert layer.input.shape[-1] % CHANNEL_ALIGNMENT == 0, layer.name
    path = str(tmp_path / "model.onnx")
    export_onnx(fused, path, {"format": "test"})
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x})
    np.testing.assert_allclose(logits, expected, atol=1e-5)


# The element variant is large (suite time); calibration is the same bisection for both kinds.
@pytest.mark.parametrize(
    "weight_mask", [pytest.param("element", marks=pytest.mark.large), "channel"]
)
def test_calibration_lands_the_cost_on_the_target(weight_mask):
    supernet, _ = _supernet(6)
    dense = parameter_counts(supernet.weight_variables)["dense"]
    masked = MaskedSearch(
        supernet, weight_mask=weight_mask, target="params", target_count=0.6 * dense
    )
    rng = np.random.default_rng(7)
    for variable in masked.weight_mask_variables:
        variable.assign(rng.uniform(0.0, 0.02, variable.shape).astype("float32"))
    before = {v.path: ops.convert_to_numpy(v) >= masked.threshold for v in masked.variables}
    values = {v.path: ops.convert_to_numpy(v) for v in masked.weight_mask_variables}
    result = masked.calibrate(0.05)
    assert result["applied"] and abs(result["ratio_before"] - 1.0) > 0.025
    assert abs(result["ratio_after"] - 1.0) <= 0.05
    assert masked.counted_cost()["params"] / (0.6 * dense) == pytest.approx(result["ratio_after"])
    for variable in masked.arch_mask_variables:  # α and β masks are left alone
        assert (ops.convert_to_numpy(variable) >= masked.threshold).all()
    shift = result["shift"]
    for path, value in values.items():
        after = ops.convert_to_numpy(next(v for v in masked.variables if v.path == path))
        np.testing.assert_allclose(after, value - shift, atol=1e-7)
        # Only masks within the shift of τ changed sides.
        flipped = (after >= masked.threshold) != before[path]
        assert (np.abs(value[flipped] - masked.threshold) <= abs(shift) + 1e-7).all()
    # Already on target: nothing changes.
    again = masked.calibrate(0.05)
    assert not again["applied"] and again["ratio_before"] == pytest.approx(result["ratio_after"])


@pytest.mark.parametrize(
    "mask, run, message",
    [
        ({"target": "params", "target_ratio": 1.5}, {}, "expected a fraction in (0, 1]"),
        ({"target": "params", "target_ratio": 0.0}, {}, "expected a fraction in (0, 1]"),
        ({"target": "flops", "target_value": -1.0}, {}, "expected a positive number"),
        ({"target": "params"}, {}, "needs exactly one of --mask_target_ratio"),
        (
            {"target": "params", "target_ratio": 0.5, "target_value": 10.0},
            {},
            "needs exactly one of --mask_target_ratio",
        ),
        ({"target_ratio": 0.5}, {}, "needs --mask_target=params or flops"),
        ({"weight_mask": "filter"}, {}, "unknown --weight_mask"),
        (
            {"target": "params", "target_ratio": 0.5},
            {"derivation": "darts", "phases": ("finetune",)},
            "--derivation=darts does not learn masks",
        ),
        (
            {"target": "flops", "target_ratio": 0.5},
            {"derivation": "random", "phases": ("finetune",), "finetune_init": "scratch"},
            "--derivation=random does not learn masks",
        ),
    ],
)
def test_bad_targets_are_refused_by_the_config(mask, run, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(search_space=SPACE, mask=MaskConfig(**mask), **run)


def test_scaled_learning_rates_follow_the_budget():
    mask = MaskConfig()
    assert mask.lr_schedule == "scaled"
    assert mask.effective_learning_rates(312) == pytest.approx((1e-4 * 25, 1e-5 * 25))
    assert mask.effective_learning_rates(7800) == pytest.approx((1e-4, 1e-5))
    paper = MaskConfig(lr_schedule="paper")
    assert paper.effective_learning_rates(312) == (1e-4, 1e-5)


def test_an_unreachable_target_is_left_alone_and_reported():
    from hmnas_keras.config import MaskConfig as Mask
    from hmnas_keras.pipeline.mask_phase import target_summary

    supernet, _ = _supernet(8)
    # Below the stem's BN and the classifier's bias, which no weight mask removes.
    masked = MaskedSearch(supernet, target="params", target_count=5)
    values = {v.path: ops.convert_to_numpy(v) for v in masked.weight_mask_variables}
    result = masked.calibrate(0.05)
    assert not result["applied"] and result["shift"] == 0.0
    for variable in masked.weight_mask_variables:
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), values[variable.path])
    summary = target_summary(masked, Mask(target="params", target_value=5), result)
    assert summary["within_tolerance"] is False and summary["reached"] > 5
    assert summary["relative_error"] == pytest.approx(summary["reached"] / 5 - 1, rel=1e-5)


# Large (suite time): the ramp is also exercised by every target run in the default suite.
@pytest.mark.large
def test_the_controller_target_ramps_from_the_supernet_to_the_target():
    supernet, _ = _supernet(9)
    masked = MaskedSearch(supernet, target="flops", target_count=1000.0, ramp_steps=10)
    masked.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-4))
    masked.build_masks()
    dense = masked.cost.dense()["flops"]
    iterations = masked.weight_mask_optimizer.iterations
    for step, expected in ((0, dense), (5, (dense + 1000.0) / 2), (10, 1000.0), (40, 1000.0)):
        iterations.assign(step)
        assert float(masked.ramped_target()) == pytest.approx(expected, rel=1e-6)
