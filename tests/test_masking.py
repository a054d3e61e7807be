"""Hierarchical masks: the binariser, what a mask removes, and the mask training step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from hmnas_keras.space.search_space import SearchSpace, edge_index
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.masking import MaskedSearch, binarize

SPACE = SearchSpace(
    num_cells=2, channels=4, num_nodes=2, op_names=("sep_conv_3x3", "max_pool_3x3", "skip_connect")
)


def _images(seed=0, batch=3):
    return np.random.default_rng(seed).normal(size=(batch, 8, 8, 3)).astype("float32")


def _supernet(seed=0):
    keras.utils.set_random_seed(seed)
    supernet = Supernet(SPACE, 3, name="supernet")
    supernet(_images(), training=False)
    rng = np.random.default_rng(seed)
    for variable in supernet.arch_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return supernet


def _set(variable, index, value):
    array = ops.convert_to_numpy(variable).copy()
    array[index] = value
    variable.assign(array)


def test_binarize_is_heaviside_forward_and_identity_backward():
    shifted = tf.constant([-2.0, -1e-7, 0.0, 1e-7, 3.0])
    upstream = tf.constant([0.5, -1.0, 2.0, 3.0, -4.0])
    with tf.GradientTape() as tape:
        tape.watch(shifted)
        output = binarize(shifted)
        loss = tf.reduce_sum(output * upstream)
    np.testing.assert_array_equal(output.numpy(), [0.0, 0.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(tape.gradient(loss, shifted).numpy(), upstream.numpy())


def test_all_masks_at_one_give_the_supernet_output():
    supernet = _supernet()
    x = _images(1)
    before = ops.convert_to_numpy(supernet(x, training=False))
    masked = MaskedSearch(supernet)  # masks start at 1e-2 >= τ = 5e-3: all ones
    after = ops.convert_to_numpy(supernet(x, training=False))
    np.testing.assert_array_equal(after, before)
    assert all(m.all() for group in masked.binary_masks().values() for m in group.values())


def _sep_conv_kernels(supernet, source, target):
    cell = supernet.cells[supernet.search_space.cell_types.index("normal")]
    mixed = cell.edge_ops[edge_index(source, target)]
    return [w for w in mixed.candidates["sep_conv_3x3"].weights if w.trainable]


def _output_moves_when_perturbed(supernet, variables, x):
    before = ops.convert_to_numpy(supernet(x, training=False))
    saved = [ops.convert_to_numpy(v) for v in variables]
    for v in variables:
        v.assign(ops.convert_to_numpy(v) + 1.0)
    after = ops.convert_to_numpy(supernet(x, training=False))
    for v, value in zip(variables, saved, strict=True):
        v.assign(value)
    return np.abs(after - before).max()


def test_masking_an_op_removes_exactly_its_contribution():
    space = SearchSpace(
        num_cells=3, channels=4, num_nodes=2, op_names=("sep_conv_3x3", "skip_connect")
    )
    keras.utils.set_random_seed(0)
    supernet = Supernet(space, 3, name="supernet")
    x = _images(2)
    supernet(x, training=False)
    masked = MaskedSearch(supernet)
    kernels = _sep_conv_kernels(supernet, 1, 3)
    assert _output_moves_when_perturbed(supernet, kernels, x) > 1e-4

    edge = edge_index(1, 3)
    _set(masked.alpha_masks["normal"], (edge, 0), 0.0)  # sep_conv_3x3 on edge 1 -> 3
    masked_output = ops.convert_to_numpy(supernet(x, training=False))
    assert _output_moves_when_perturbed(supernet, kernels, x) == 0.0
    # Same as the supernet with that op weight set to zero (no renormalisation).
    masked.detach()

    def zero_op(cell_type):
        op_mask = np.ones((space.num_edges, 2), "float32")
        if cell_type == "normal":
            op_mask[edge] = [0.0, 1.0]
        return op_mask, None

    supernet.set_arch_masks(zero_op)
    np.testing.assert_allclose(
        ops.convert_to_numpy(supernet(x, training=False)), masked_output, rtol=1e-6, atol=1e-7
    )


def test_masking_an_edge_removes_all_its_ops():
    x = _images(3)
    # A 3-cell net: cell 0 is a normal cell.
    space = SearchSpace(num_cells=3, channels=4, num_nodes=2, op_names=SPACE.op_names)
    keras.utils.set_random_seed(1)
    supernet = Supernet(space, 3, name="supernet")
    supernet(x, training=False)
    masked = MaskedSearch(supernet)
    edge = edge_index(0, 2)
    kernels = _sep_conv_kernels(supernet, 0, 2)
    before = ops.convert_to_numpy(supernet(x, training=False))
    _set(masked.beta_masks["normal"], edge, -1.0)
    after = ops.convert_to_numpy(supernet(x, training=False))
    assert np.abs(after - before).max() > 1e-5
    assert _output_moves_when_perturbed(supernet, kernels, x) == 0.0
    # Equivalently: all of the edge's op masks at zero.
    _set(masked.beta_masks["normal"], edge, 1e-2)
    _set(masked.alpha_masks["normal"], edge, 0.0)
    np.testing.assert_allclose(
        ops.convert_to_numpy(supernet(x, training=False)), after, rtol=1e-6, atol=1e-7
    )


def test_weight_mask_zeroes_exactly_the_masked_kernel_entries():
    supernet = _supernet()
    masked = MaskedSearch(supernet)
    layer = supernet.stem_conv
    mask = masked.weight_masks[layer.kernel.path]
    pattern = np.random.default_rng(0).random(mask.shape) < 0.5
    mask.assign(np.where(pattern, 0.0, 1e-2).astype("float32"))
    effective = ops.convert_to_numpy(layer.masked_kernel())
    kernel = ops.convert_to_numpy(layer.kernel)
    np.testing.assert_array_equal(effective, np.where(pattern, 0.0, kernel))


def test_mask_gradient_is_the_gradient_of_the_binary_mask():
    supernet = _supernet()
    masked = MaskedSearch(supernet)
    x, y = _images(4), np.array([0, 1, 2])
    layer = supernet.classifier
    mask = masked.weight_masks[layer.kernel.path]
    with tf.GradientTape() as tape:
        logits = supernet(x, training=True)
        loss = ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    grad_mask = tape.gradient(loss, mask)
    # dL/dM = dL/dW_eff * w*: with M = 1, W_eff = w*.
    with tf.GradientTape() as tape:
        kernel = tf.identity(layer.kernel.value)
        tape.watch(kernel)
        # The mask hook multiplies: kernel * (kernel_eff / kernel) substitutes kernel_eff.
        layer.set_kernel_mask(lambda: kernel / layer.kernel.value)
        logits = supernet(x, training=True)
        loss = ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
    grad_kernel = tape.gradient(loss, kernel)
    np.testing.assert_allclose(
        grad_mask.numpy(), (grad_kernel * layer.kernel.value).numpy(), rtol=1e-4, atol=1e-7
    )


def test_a_mask_step_changes_masks_only():
    supernet = _supernet()
    masked = MaskedSearch(supernet, name="masked_search")
    masked.compile(
        weight_mask_optimizer=keras.optimizers.Adam(1e-3),
        arch_mask_optimizer=keras.optimizers.Adam(1e-4),
    )
    masked.build_masks()
    trainable = [ops.convert_to_numpy(v) for v in supernet.trainable_variables]
    weight_masks = [ops.convert_to_numpy(v) for v in masked.weight_mask_variables]
    arch_masks = [ops.convert_to_numpy(v) for v in masked.arch_mask_variables]
    dataset = tf.data.Dataset.from_tensors((_images(5), np.array([0, 1, 2]))).repeat(2)
    masked.fit(dataset, epochs=1, verbose=0, shuffle=False)
    for before, v in zip(trainable, supernet.trainable_variables, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(v), before, err_msg=v.path)
    moved = [
        np.abs(ops.convert_to_numpy(v) - b).max()
        for v, b in zip(masked.weight_mask_variables, weight_masks, strict=True)
    ]
    assert min(moved) > 0  # every kernel's mask got a gradient
    # Adam's first steps move each entry by about the learning rate.
    assert max(moved) == pytest.approx(2e-3, rel=0.05)
    arch_moved = [
        np.abs(ops.convert_to_numpy(v) - b).max()
        for v, b in zip(masked.arch_mask_variables, arch_masks, strict=True)
    ]
    assert max(arch_moved) == pytest.approx(2e-4, rel=0.05)


def test_single_level_supernet_has_no_edge_masks_and_derives():
    from hmnas_keras.architecture.derivation import derive_cell

    space = SearchSpace(
        num_cells=2, channels=4, num_nodes=2, op_names=SPACE.op_names, multi_level=False
    )
    keras.utils.set_random_seed(0)
    supernet = Supernet(space, 3, name="supernet")
    supernet(_images(), training=False)
    masked = MaskedSearch(supernet)
    assert masked.beta_masks == {} and list(masked.alpha_masks) == ["reduce"]
    _set(masked.alpha_masks["reduce"], edge_index(0, 2), 0.0)
    binary = masked.binary_masks()
    op_weights = ops.convert_to_numpy(supernet.op_weights("reduce")) * binary["alpha"]["reduce"]
    edge_weights = ops.convert_to_numpy(supernet.edge_weights("reduce"))
    cell = derive_cell(space.op_names, 2, op_weights, edge_weights, binary["alpha"]["reduce"])
    assert [(e["source"], e["target"]) for e in cell["edges"]] == [(1, 2), (0, 3), (1, 3), (2, 3)]
    assert cell["edges"][0]["weight"] == 0.5  # uniform edge weights, 1 / in-degree


def test_alpha_and_beta_mask_gradients_pass_straight_through():
    """dL/dM^r of the α and β masks is dL/dM of their binary masks (STE), and not zero."""
    supernet = _supernet(5)
    masked = MaskedSearch(supernet)
    x, y = _images(6), np.array([0, 1, 2])

    def loss():
        logits = supernet(x, training=True)
        return ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))

    real = [masked.alpha_masks[t] for t in SPACE.present_cell_types]
    real += [masked.beta_masks[t] for t in SPACE.present_cell_types]
    with tf.GradientTape() as tape:
        value = loss()
    through_ste = tape.gradient(value, real)
    masked.detach()
    # The same forward pass with the binary masks (all ones) as plain watched tensors.
    ones = {
        t: (tf.ones(masked.alpha_masks[t].shape), tf.ones(masked.beta_masks[t].shape))
        for t in SPACE.present_cell_types
    }
    supernet.set_arch_masks(lambda cell_type: ones[cell_type])
    binary = [ones[t][0] for t in SPACE.present_cell_types]
    binary += [ones[t][1] for t in SPACE.present_cell_types]
    with tf.GradientTape() as tape:
        tape.watch(binary)
        value = loss()
    expected = tape.gradient(value, binary)
    for got, want in zip(through_ste, expected, strict=True):
        assert got is not None and np.abs(want.numpy()).max() > 1e-6
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-8)
