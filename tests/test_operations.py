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
