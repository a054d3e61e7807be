import numpy as np
import pytest

from hmnas_keras.space.operations import FactorizedReduce, build_op
from hmnas_keras.space.search_space import OP_NAMES


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_op_output_shape(op_name, stride):
    images = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    output = build_op(op_name, 4, stride)(images, training=True)
    assert tuple(output.shape) == (2, 8 // stride, 8 // stride, 4)
    assert np.all(np.isfinite(np.asarray(output)))


def test_factorized_reduce_handles_odd_sizes_and_odd_channels():
    images = np.ones((1, 7, 7, 3), "float32")
    assert tuple(FactorizedReduce(5)(images).shape) == (1, 4, 4, 5)


def test_unknown_op_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="sep_conv_3x3.*Received: op_name='conv_7x7'"):
        build_op("conv_7x7", 4, 1)


def test_stride_two_dilated_conv_equals_the_dilated_conv_at_even_positions():
    import tensorflow as tf

    from hmnas_keras.space.operations import DilConv

    images = np.random.default_rng(1).normal(size=(2, 9, 9, 3)).astype("float32")
    strided = DilConv(3, 5, stride=2)
    strided(images)
    kernel = strided.depthwise.kernel
    full = tf.nn.depthwise_conv2d(
        tf.nn.relu(images), kernel, [1, 1, 1, 1], "SAME", dilations=[2, 2]
    )[:, ::2, ::2, :]
    expected = strided.bn(strided.pointwise(full), training=False)
    np.testing.assert_allclose(strided(images, training=False), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (2, 7, 7, 3), (1, 2, 2, 1)])
def test_subsample_is_the_strided_slice_forward_and_backward(shape, offset):
    import tensorflow as tf

    from hmnas_keras.space.maskable import subsample

    x = tf.constant(np.random.default_rng(5).normal(size=shape).astype("float32"))
    upstream = np.random.default_rng(6).normal(size=x[:, offset::2, offset::2].shape)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got, expected = subsample(x, offset), x[:, offset::2, offset::2, :]
        got_loss = tf.reduce_sum(got * upstream)
        expected_loss = tf.reduce_sum(expected * upstream)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(tape.gradient(got_loss, x), tape.gradient(expected_loss, x))
    assert np.count_nonzero(tape.gradient(got_loss, x)) == upstream.size


def test_pointwise_conv_refuses_a_stride_other_than_one_or_two():
    from hmnas_keras.space.maskable import PointwiseConv

    with pytest.raises(ValueError, match="expected 1 or 2. Received: 3"):
        PointwiseConv(4, strides=3)


# Reference implementations in numpy (NHWC, TensorFlow's "same" padding, inference-mode BN).


def _same_padding(size, kernel, stride, dilation=1):
    extent = (kernel - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return out, total // 2, total - total // 2


def np_depthwise(x, kernel, stride=1, dilation=1):
    n, h, w, c = x.shape
    k = kernel.shape[0]
    out_h, top, bottom = _same_padding(h, k, stride, dilation)
    out_w, left, right = _same_padding(w, k, stride, dilation)
    padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    result = np.zeros((n, out_h, out_w, c))
    for a in range(k):
        for b in range(k):
            rows = padded[:, a * dilation :: stride][:, :out_h]
            window = rows[:, :, b * dilation :: stride][:, :, :out_w]
            result += window * kernel[a, b, :, 0]
    return result


def np_pointwise(x, kernel, stride=1):
    return x[:, ::stride, ::stride] @ kernel[0, 0]


def np_batch_norm(x, bn):
    mean, variance = (np.asarray(v) for v in (bn.moving_mean, bn.moving_variance))
    y = (x - mean) / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        y = y * np.asarray(bn.gamma)
    return y + np.asarray(bn.beta) if bn.center else y


def np_pool(x, kind, stride):
    """3x3 pooling, "same" padding; padded positions are excluded (from averages too)."""
    n, h, w, c = x.shape
    out_h, top, _ = _same_padding(h, 3, stride)
    out_w, left, _ = _same_padding(w, 3, stride)
    result = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * stride - top, j * stride - left
            window = x[:, max(r0, 0) : r0 + 3, max(c0, 0) : c0 + 3]
            result[:, i, j] = window.max((1, 2)) if kind == "max" else window.mean((1, 2))
    return result


def np_reference(op, x):
    relu = np.maximum(x, 0)
    kind = type(op).__name__
    if kind == "SepConv":
        y = np_depthwise(relu, np.asarray(op.depthwise_1.kernel), op.stride)
        y = np_batch_norm(np_pointwise(y, np.asarray(op.pointwise_1.kernel)), op.bn_1)
        y = np_depthwise(np.maximum(y, 0), np.asarray(op.depthwise_2.kernel))
        return np_batch_norm(np_pointwise(y, np.asarray(op.pointwise_2.kernel)), op.bn_2)
    if kind == "DilConv":
        # Stride 1: dilation 2. Stride 2: the dilated conv's even output positions.
        y = np_depthwise(relu, np.asarray(op.depthwise.kernel), 1, 2)[:, :: op.stride, :: op.stride]
        return np_batch_norm(np_pointwise(y, np.asarray(op.pointwise.kernel)), op.bn)
    if kind == "Pool":
        return np_batch_norm(np_pool(x, op.kind, op.stride), op.bn)
    if kind == "Identity":
        return x
    shifted = np.pad(relu[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0)))
    paths = [
        np_pointwise(relu, np.asarray(op.conv_1.kernel), 2),
        np_pointwise(shifted, np.asarray(op.conv_2.kernel), 2),
    ]
    return np_batch_norm(np.concatenate(paths, axis=-1), op.bn)


@pytest.mark.parametrize("size", [7, 8])  # odd: strided slices; even: reshapes and slices
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_op_values_match_a_numpy_reference(op_name, stride, size):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, size, size, 4)).astype("float32")
    op = build_op(op_name, 4, stride)
    op(x, training=False)
    for variable in op.variables:  # BN statistics away from the identity too
        if "moving_variance" in variable.path:
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype("float32"))
        else:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    got = np.asarray(op(x, training=False))
    expected = np_reference(op, x.astype("float64"))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if op_name == "avg_pool_3x3" and (stride == 1 or size % 2):
        # The corner averages its 4 real neighbours, not 9 (at stride 2 on an even size,
        # "same" padding adds nothing before the first row: no corner to check).
        corner = x[0, :2, :2].mean((0, 1))
        np.testing.assert_allclose(np.asarray(op.pool(x))[0, 0, 0], corner, rtol=1e-5)


def test_fused_batch_norm_matches_keras_batch_normalization():
    import keras

    from hmnas_keras.space.operations import FusedBatchNorm

    rng = np.random.default_rng(4)
    x = (rng.normal(size=(8, 5, 5, 3)) * 3 + 1).astype("float32")
    for affine in (False, True):
        options = dict(momentum=0.9, epsilon=1e-5, center=affine, scale=affine)
        fused, plain = FusedBatchNorm(**options), keras.layers.BatchNormalization(**options)
        fused.build(x.shape)
        plain.build(x.shape)
        for a, b in zip(fused.weights, plain.weights, strict=True):
            value = rng.uniform(0.5, 2.0, a.shape).astype("float32")
            a.assign(value)
            b.assign(value)
        # Training: batch statistics, and the same moving-statistics update (biased variance).
        np.testing.assert_allclose(fused(x, training=True), plain(x, training=True), atol=2e-5)
        for a, b in zip(fused.weights, plain.weights, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, err_msg=a.path)
        # Inference: the moving statistics.
        np.testing.assert_allclose(fused(x, training=False), plain(x, training=False), atol=1e-6)
        # A frozen layer normalises with the moving statistics, in training too.
        fused.trainable = plain.trainable = False
        frozen = plain(x, training=True)
        np.testing.assert_allclose(fused(x, training=True), frozen, atol=1e-6)
        np.testing.assert_allclose(frozen, plain(x, training=False), atol=1e-6)


def test_graph_constant_is_made_once_per_graph_and_outside_control_dependencies():
    import tensorflow as tf

    from hmnas_keras.space.maskable import graph_constant

    np.testing.assert_array_equal(graph_constant([1, 2], "int32"), [1, 2])  # eagerly
    made = []

    @tf.function(autograph=False)
    def traced(x):
        with tf.control_dependencies([tf.identity(x)]):
            first = graph_constant(np.ones(3), x.dtype)
        made.extend(
            [first, graph_constant(np.ones(3), x.dtype), graph_constant([0.0] * 3, "float32")]
        )
        return x * first

    np.testing.assert_array_equal(traced(tf.fill([3], 2.0)), [2.0, 2.0, 2.0])
    first, again, zeros = made
    assert first is again and zeros is not first  # same value, dtype and shape: one node
    assert first.op.control_inputs == []
    traced.get_concrete_function(tf.TensorSpec([None]))  # another graph: its own constants
    assert made[3] is made[4] and made[3] is not first and made[3].graph is not first.graph


def test_graph_constant_does_not_keep_a_traced_graph_alive():
    import gc
    import weakref

    import tensorflow as tf

    from hmnas_keras.space.maskable import graph_constant

    graphs = []

    def body(x):
        graphs.append(weakref.ref(tf.compat.v1.get_default_graph()))
        return x + graph_constant(1.0, "float32")

    concrete = tf.function(body, autograph=False).get_concrete_function(tf.TensorSpec([2]))
    np.testing.assert_array_equal(concrete(tf.zeros([2])), [1.0, 1.0])
    del concrete
    gc.collect()
    assert graphs[0]() is None


def test_fused_batch_norm_trains_exactly_as_tensorflows_fused_batch_norm():
    import tensorflow as tf

    from hmnas_keras.space.operations import FusedBatchNorm

    # A variance near ε, so that ε shows in the outputs.
    x = (np.random.default_rng(9).normal(size=(4, 4, 4, 3)) * 3e-3 + 1).astype("float32")
    layer = FusedBatchNorm(momentum=0.9, epsilon=1e-5, center=False, scale=False)
    expected = tf.compat.v1.nn.fused_batch_norm(
        x, tf.ones([3]), tf.zeros([3]), epsilon=1e-5, is_training=True
    )[0]
    np.testing.assert_array_equal(layer(x, training=True), expected)
    traced = tf.function(lambda x: layer(x, training=True), autograph=False)
    np.testing.assert_array_equal(traced(x), expected)


def test_deferred_moving_statistics_update_exactly_as_each_layer_would():
    """Within `deferred_moving_statistics`, training-mode FusedBatchNorms leave their moving
    statistics alone; `moving_averages` then gives, as one vector, bit for bit what each
    layer would have assigned: momenta that differ, and a frozen layer keeps its values."""
    import tensorflow as tf

    from hmnas_keras.space.operations import (
        FusedBatchNorm,
        deferred_moving_statistics,
        moving_averages,
    )

    rng = np.random.default_rng(11)
    x = (rng.normal(size=(4, 5, 5, 3)) * 2 + 1).astype("float32")

    def layers():
        made = [FusedBatchNorm(momentum=m, epsilon=1e-5) for m in (0.9, 0.9, 0.99, 0.9)]
        for layer in made:
            layer.build(x.shape)
            for variable in layer.non_trainable_variables:
                variable.assign(np.random.default_rng(12).uniform(0.5, 2, 3).astype("float32"))
        made[-1].trainable = False  # frozen: the moving statistics, no update
        return made

    def outputs(made):
        return [layer(x * (i + 1), training=True) for i, layer in enumerate(made)]

    immediate, deferred = layers(), layers()
    expected_outputs = outputs(immediate)
    expected = np.concatenate(
        [v.numpy() for layer in immediate for v in layer.non_trainable_variables]
    )

    @tf.function(autograph=False)
    def update():
        variables = [v for layer in deferred for v in layer.non_trainable_variables]
        values = [tf.convert_to_tensor(v) for v in variables]
        with deferred_moving_statistics() as statistics:
            got = outputs(deferred)
        assert len(statistics) == 6  # mean and variance of the three layers that train
        return got, moving_averages(variables, values, statistics)

    before = [v.numpy() for layer in deferred for v in layer.non_trainable_variables]
    got_outputs, vector = update()
    after = [v.numpy() for layer in deferred for v in layer.non_trainable_variables]
    np.testing.assert_array_equal(np.concatenate(after), np.concatenate(before))  # not assigned
    np.testing.assert_array_equal(vector, expected)
    assert not np.array_equal(expected[:3], before[0])
    np.testing.assert_array_equal(expected[-6:], np.concatenate(before[-2:]))  # frozen
    for got, want in zip(got_outputs, expected_outputs, strict=True):
        np.testing.assert_array_equal(got, want)
    # Outside the context, a layer updates its own statistics again.
    layer = deferred[0]
    layer(x, training=True)
    assert not np.array_equal(layer.moving_mean.numpy(), after[0])


def _graph_gradients(function, *inputs, unknown_batch=False):
    """(value, gradients of Σ value², op types of the traced graph) by TensorFlow's graph
    gradients (tf.gradients: how a shared edge function's backward is built), traced with
    the first input's batch size unknown if `unknown_batch`."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def traced(*inputs):
        value = function(*inputs)
        return [value, *tf.gradients(tf.reduce_sum(value * value), list(inputs))]

    specs = [tf.TensorSpec(t.shape, t.dtype) for t in inputs]
    if unknown_batch:
        specs[0] = tf.TensorSpec([None, *inputs[0].shape[1:]], inputs[0].dtype)
    concrete = traced.get_concrete_function(*specs)
    value, *gradients = concrete(*inputs)
    return value, gradients, [op.type for op in concrete.graph.get_operations()]


@pytest.mark.parametrize("unknown_batch", [False, True])
@pytest.mark.parametrize("layer_kind", ["pointwise_stride_2", "depthwise", "dilated"])
def test_static_shape_gradients_are_tensorflows_with_fewer_nodes(
    layer_kind, unknown_batch, monkeypatch
):
    """The layers' reshapes, slices and depthwise convolutions differentiate in a traced graph
    to TensorFlow's own gradients bit for bit, with their shapes as shared constants (with
    an unknown batch size, shapes computed in the graph); the dilated depthwise convolution
    is tf.nn's, bit for bit, forward and backward."""
    import tensorflow as tf

    from hmnas_keras.space import maskable

    rng = np.random.default_rng(13)
    x = tf.constant(rng.normal(size=(2, 8, 8, 4)).astype("float32"))
    if layer_kind == "pointwise_stride_2":
        layer = maskable.PointwiseConv(6, strides=2)
    else:
        rate = 2 if layer_kind == "dilated" else 1
        layer = maskable.MaskableDepthwiseConv2D(
            3, padding="same", dilation_rate=rate, use_bias=False
        )
    layer.build(x.shape)
    kernel = tf.constant(rng.normal(size=layer.kernel.shape).astype("float32"))
    layer.kernel.assign(kernel)

    def call(x, kernel):
        layer._kernel_mask = lambda: kernel / layer.kernel  # the kernel as an input
        return layer(x) + layer(-x)  # two calls: shapes a graph's calls share

    value, gradients, kinds = _graph_gradients(call, x, kernel, unknown_batch=unknown_batch)
    monkeypatch.setattr(maskable, "_STATIC_SHAPE_GRADIENTS", {})
    if layer_kind == "dilated":  # tf.nn's own dilated convolution
        monkeypatch.setattr(maskable, "_dilated_depthwise", None)

        def call(x, kernel):  # noqa: F811
            kernel = kernel * (layer.kernel / layer.kernel)
            return sum(
                tf.nn.depthwise_conv2d(inputs, kernel, [1, 1, 1, 1], "SAME", dilations=[2, 2])
                for inputs in (x, -x)
            )

    expected, expected_gradients, plain_kinds = _graph_gradients(
        call, x, kernel, unknown_batch=unknown_batch
    )
    np.testing.assert_array_equal(value, expected)
    for got, want in zip(gradients, expected_gradients, strict=True):
        np.testing.assert_array_equal(got, want)
    if not unknown_batch:
        assert kinds.count("Const") < plain_kinds.count("Const")
    layer._kernel_mask = None


def test_fused_batch_norm_graph_gradient_skips_the_zeros_of_its_unused_outputs(monkeypatch):
    """In a shared edge function (where moving statistics are deferred), differentiated by
    graph gradients."""
    import tensorflow as tf

    from hmnas_keras.space import operations

    x = tf.constant(np.random.default_rng(14).normal(size=(4, 5, 5, 3)).astype("float32"))
    layer = operations.FusedBatchNorm(momentum=0.9, epsilon=1e-5, center=False, scale=False)
    layer.build(x.shape)

    def normalised(x):
        with operations.deferred_moving_statistics():
            return layer(x, training=True)

    value, (gradient,), kinds = _graph_gradients(normalised, x)
    monkeypatch.setattr(operations, "_gradient_to_inputs_only", lambda outputs, inputs: outputs)
    expected, (expected_gradient,), plain_kinds = _graph_gradients(normalised, x)
    np.testing.assert_array_equal(value, expected)
    np.testing.assert_array_equal(gradient, expected_gradient)
    assert kinds.count("FusedBatchNormGradV3") == plain_kinds.count("FusedBatchNormGradV3") == 1
    # Five zero tensors (batch statistics, reserve spaces) against one (the IdentityN's).
    assert (plain_kinds.count("ZerosLike"), kinds.count("ZerosLike")) == (5, 1)


def test_fused_batch_norm_under_a_tape_makes_no_zeros_of_the_activations_size():
    """Outside a shared edge function the step's GradientTape differentiates the batch norm:
    TensorFlow's own gradient, with zeros only for its vector outputs (the IdentityN's
    gradient there would add a zero tensor of the activations' size)."""
    import tensorflow as tf

    from hmnas_keras.space import operations

    x = tf.constant(np.random.default_rng(15).normal(size=(4, 5, 5, 3)).astype("float32"))
    layer = operations.FusedBatchNorm(momentum=0.9, epsilon=1e-5, center=False, scale=False)
    layer.build(x.shape)

    @tf.function(autograph=False)
    def traced(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = layer(x, training=True)
            loss = tf.reduce_sum(value * value)
        return value, tape.gradient(loss, x)

    value, gradient = traced(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        expected = tf.compat.v1.nn.fused_batch_norm(
            x, tf.ones([3]), tf.zeros([3]), epsilon=1e-5, is_training=True
        )[0]
        expected_loss = tf.reduce_sum(expected * expected)
    np.testing.assert_array_equal(value, expected)
    np.testing.assert_array_equal(gradient, tape.gradient(expected_loss, x))
    graph = traced.get_concrete_function(x).graph
    zeros = [
        op.outputs[0].shape
        for op in graph.get_operations()
        if op.type in ("Fill", "ZerosLike", "Zeros")
    ]
    assert "IdentityN" not in [op.type for op in graph.get_operations()]
    assert all(shape.rank != 4 for shape in zeros), zeros
