"""The mask hook: layers whose kernels can be masked in the forward pass.

This module is the one place that defines how a weight mask reaches a network
(DESIGN.md §2, "How masks apply": kernel = M_w ⊙ w). Every convolution and
dense kernel of the networks — stem, cell preprocessing, factorized reduce,
depthwise, pointwise, classifier; not BN, not biases — is a `MaskableKernel`
layer, and the layer owns its optional mask:

- `layer.set_kernel_mask(mask)`: `mask` is a callable taking no argument and
  returning a tensor that broadcasts against the kernel (0/1 entries). From
  then on the forward pass uses `kernel * mask()`, so gradients reach
  whatever variables `mask` reads; the kernel variable itself never changes.
- `layer.set_kernel_mask(None)` removes it: the layer computes its unmasked
  function again.

Who sets masks: the masking phase (`hmnas_keras.training.masking`: binarised
trainable masks, straight-through gradient) and fine-tuning
(`hmnas_keras.architecture.searched_network.SearchedNetwork.apply_weight_masks`:
constant 0/1 masks, so that pruned weights get zero gradients). The
architecture counterpart, masks on the op and edge weights, is
`Supernet.set_arch_masks` (`hmnas_keras.space.supernet`).

Each layer also records `output_positions`, the number of output positions
(height x width; 1 for the classifier) of its last call: every kernel entry is
used once per output position, which is how `hmnas_keras.architecture.counting`
counts multiply-accumulates.
"""

import contextlib
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

# The dtype policy of every layer but the convolutions and pools. Under mixed precision
# (`--mixed_precision`, Keras' mixed_float16 global policy) only those compute in float16:
# the cells, the op containers, BatchNormalization, the op and edge weights and masks that
# mix their outputs, and the classifier stay float32 (their variables are float32 anyway).
FLOAT32 = "float32"


def _check_mask(mask) -> None:
    if mask is not None and not callable(mask):
        raise TypeError(
            "Received an invalid mask, expected a callable returning a tensor (or None). "
            f"Received: {type(mask).__name__}"
        )


class MaskableKernel:
    """A layer whose kernel can be multiplied by a mask in the forward pass (see module doc)."""

    _kernel_mask = None
    output_positions = None

    def set_kernel_mask(self, mask: Callable | None) -> None:
        """Uses `kernel * mask()` from now on (None: the kernel as it is)."""
        _check_mask(mask)
        self._kernel_mask = mask

    @property
    def kernel_mask(self) -> Callable | None:
        return self._kernel_mask

    def masked_kernel(self):
        """The kernel the forward pass uses."""
        if self._kernel_mask is None:
            return self.kernel
        # Under mixed precision the kernel is read in float16; the mask stays float32.
        return self.kernel * ops.cast(self._kernel_mask(), self.compute_dtype)

    def _record_positions(self, outputs):
        self.output_positions = int(np.prod(outputs.shape[1:-1]))
        return outputs


class MaskableBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose output can be multiplied by a mask (see module doc).

    It computes in float32 whatever the global dtype policy: under mixed precision
    the convolutions compute in float16 and every BN brings their outputs back to
    float32, so that what the op and edge weights mix is float32.
    """

    _output_mask = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)
        super().__init__(*args, **kwargs)

    def set_output_mask(self, mask: Callable | None) -> None:
        """Uses `outputs * mask()` from now on (None: the outputs as they are)."""
        _check_mask(mask)
        self._output_mask = mask

    def mask_output(self, outputs):
        if self._output_mask is None:
            return outputs
        return outputs * self._output_mask()

    def call(self, inputs, training=None, mask=None):
        return self.mask_output(super().call(inputs, training=training, mask=mask))


class MaskableConv2D(MaskableKernel, keras.layers.Conv2D):
    """Conv2D (no bias) with a maskable kernel (the stem)."""

    def call(self, inputs):
        if self.use_bias:
            raise ValueError("MaskableConv2D supports use_bias=False only.")
        return self._record_positions(self.convolution_op(inputs, self.masked_kernel()))


class MaskableDepthwiseConv2D(MaskableKernel, keras.layers.DepthwiseConv2D):
    """DepthwiseConv2D (no bias) with a maskable kernel."""

    def call(self, inputs):
        if self.use_bias:
            raise ValueError("MaskableDepthwiseConv2D supports use_bias=False only.")
        kernel = self.masked_kernel()
        native = self.data_format == "channels_last"
        dilated = tuple(self.dilation_rate) != (1, 1)
        with static_shape_gradients():
            if native and not dilated:
                # The op itself: Keras (through tf.nn) adds a constant for the dilation rate.
                outputs = tf.raw_ops.DepthwiseConv2dNative(
                    input=inputs,
                    filter=kernel,
                    strides=[1, *self.strides, 1],
                    padding=self.padding.upper(),
                    data_format="NHWC",
                )
            elif native and None not in inputs.shape[1:3] and tuple(self.strides) == (1, 1):
                outputs = _dilated_depthwise(inputs, kernel, self.dilation_rate, self.padding)
            else:
                outputs = ops.depthwise_conv(
                    inputs,
                    kernel,
                    strides=self.strides,
                    padding=self.padding,
                    dilation_rate=self.dilation_rate,
                    data_format=self.data_format,
                )
        return self._record_positions(outputs)


def _dilated_depthwise(inputs, kernel, rate, padding: str):
    """A dilated depthwise convolution (stride 1, NHWC, known height and width) as
    `tf.nn.depthwise_conv2d` computes it — space-to-batch, the convolution, batch-to-space,
    with the same paddings and crops — its shapes as shared constants: tf.nn builds ten
    constants per call, most of them never read."""
    rate = np.asarray(rate)
    if padding.lower() == "same":  # tf.nn's base paddings: the dilated filter's extent
        extra = (np.asarray(kernel.shape[:2]) - 1) * rate
        start, end = extra // 2, extra - extra // 2
    else:
        start = end = np.zeros(2, dtype=int)
    full = np.asarray(inputs.shape[1:3]) + start + end
    end_extra = (rate - full % rate) % rate  # to a multiple of the rate
    block = graph_constant(rate, "int32")
    batched = tf.raw_ops.SpaceToBatchND(
        input=inputs,
        block_shape=block,
        paddings=graph_constant(np.stack([start, end + end_extra], axis=1), "int32"),
    )
    outputs = tf.raw_ops.DepthwiseConv2dNative(
        input=batched, filter=kernel, strides=[1, 1, 1, 1], padding="VALID", data_format="NHWC"
    )
    crops = np.stack([np.zeros(2, dtype=int), end_extra], axis=1)
    return tf.raw_ops.BatchToSpaceND(
        input=outputs, block_shape=block, crops=graph_constant(crops, "int32")
    )


class MaskableDense(MaskableKernel, keras.layers.Dense):
    """Dense with a maskable kernel (the classifier); the bias is not masked. It computes
    in float32 whatever the global dtype policy, so that the logits are float32."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)
        super().__init__(*args, **kwargs)

    def call(self, inputs):
        outputs = ops.matmul(inputs, self.masked_kernel())
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        return self._record_positions(outputs)


_GRAPH_CONSTANTS = weakref.WeakKeyDictionary()  # graph -> {(dtype, shape, bytes): weakref}


def graph_constant(value, dtype):
    """`tf.constant(value, dtype)`, made once per graph being traced.

    Each layer call otherwise puts its own copies of the same constants (BN's
    unit scale and zero offset, its momentum, a 1x1 convolution's reshape
    shapes) into the graph: thousands of nodes in a supernet step, each traced,
    instantiated and held in memory. The constant is made outside any control
    dependency, so that sharing it adds none. Eagerly: a new constant. The cache
    holds weak references to the constants (a tensor refers to its graph, so a
    strong one would keep every traced graph alive).
    """
    if tf.executing_eagerly():
        return tf.constant(value, dtype)
    array = np.asarray(value, dtype=tf.as_dtype(dtype).as_numpy_dtype)
    cache = _GRAPH_CONSTANTS.setdefault(tf.compat.v1.get_default_graph(), {})
    key = (array.dtype.str, array.shape, array.tobytes())
    constant = cache[key]() if key in cache else None
    if constant is None:
        with tf.control_dependencies(None):
            constant = tf.constant(array, dtype)
        cache[key] = weakref.ref(constant)
    return constant


# The gradients of the layers' reshapes, slices and depthwise convolutions, with the
# static shapes they need as the graph's shared constants (`graph_constant`).
_STATIC_SHAPE_GRADIENTS = {
    "Reshape": "HmnasStaticShapeReshape",
    "Slice": "HmnasStaticShapeSlice",
    "DepthwiseConv2dNative": "HmnasStaticShapeDepthwise",
}


def static_shape_gradients():
    """Within it, the reshapes, slices and depthwise convolutions a traced graph gets carry
    gradients that read static shapes from shared constants.

    TensorFlow's own put a constant per shape into the gradient graph (two per
    depthwise convolution and one per reshape), and a slice's gradient
    computes its padding with ten ops: about 40 graph nodes per supernet edge
    and pass. The ops and the values are TensorFlow's (a reshape, a pad, the
    depthwise backprops with the same attributes). It changes only graph
    gradients (a shared edge function's backward); eagerly, a no-op.
    """
    return graph_gradients(_STATIC_SHAPE_GRADIENTS)


def graph_gradients(gradients: dict):
    """A context in which the ops a traced graph gets of the types in `gradients` (op type →
    a name registered with `tf.RegisterGradient`) carry that gradient instead of their own.

    Only graph gradients see it (`tf.gradients`, the backward function of a
    `tf.function`); eager tapes use the ops' own. Eagerly, or with nothing to
    replace, a no-op (the global graph's override map is not touched).
    """
    if tf.executing_eagerly() or not gradients:
        return contextlib.nullcontext()
    return tf.compat.v1.get_default_graph().gradient_override_map(gradients)


def _shape_of(tensor):
    """`tensor`'s static shape as a shared constant, else its dynamic shape."""
    if tensor.shape.is_fully_defined():
        return graph_constant(tensor.shape.as_list(), "int32")
    return tf.shape(tensor)


@tf.RegisterGradient("HmnasStaticShapeReshape")
def _reshape_gradient(op, grad):
    return tf.reshape(tf.convert_to_tensor(grad), _shape_of(op.inputs[0])), None


@tf.RegisterGradient("HmnasStaticShapeSlice")
def _slice_gradient(op, grad):
    source, begin = op.inputs[0], tf.get_static_value(op.inputs[1])
    if not source.shape.is_fully_defined() or begin is None:
        return _dynamic_slice_gradient(op, grad)
    after = np.asarray(source.shape.as_list()) - np.asarray(op.outputs[0].shape.as_list()) - begin
    paddings = graph_constant(np.stack([begin, after], axis=1), op.inputs[1].dtype)
    return tf.pad(grad, paddings), None, None


def _dynamic_slice_gradient(op, grad):
    source, begin = op.inputs[0], op.inputs[1]
    size = tf.shape(op.outputs[0], out_type=begin.dtype)
    after = tf.shape(source, out_type=begin.dtype) - size - begin
    return tf.pad(grad, tf.stack([begin, after], axis=1)), None, None


@tf.RegisterGradient("HmnasStaticShapeDepthwise")
def _depthwise_gradient(op, grad):
    attributes = {
        name: op.get_attr(name)
        for name in ("dilations", "strides", "padding", "explicit_paddings", "data_format")
    }
    source, kernel = op.inputs
    return [
        tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
            input_sizes=_shape_of(source), filter=kernel, out_backprop=grad, **attributes
        ),
        tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
            input=source, filter_sizes=_shape_of(kernel), out_backprop=grad, **attributes
        ),
    ]


def has_even_size(x) -> bool:
    """Whether `x` (NHWC) has a known, even height and width."""
    return all(size is not None and size % 2 == 0 for size in x.shape[1:3])


def subsample(x, offset: int = 0):
    """x[:, offset::2, offset::2, :]: every second row and column, starting at `offset` (0 or 1).

    TensorFlow's strided slice, and its gradient, copy element by element; on an even
    height and width the same values are a reshape and a contiguous slice, whose gradient
    is a pad: forward and backward together 1.5–2x faster (0.27 against 0.45 ms on
    32x32x32x32). Odd or unknown sizes take the strided slice.
    """
    height, width, channels = x.shape[1:]
    if not has_even_size(x) or channels is None:
        return x[:, offset::2, offset::2, :]
    with static_shape_gradients():
        shape = graph_constant([-1, height // 2, 2, width // 2, 2 * channels], "int32")
        picked = tf.slice(
            tf.reshape(x, shape),
            graph_constant([0, 0, offset, 0, offset * channels], "int32"),
            graph_constant([-1, height // 2, 1, width // 2, channels], "int32"),
        )
        return tf.reshape(picked, graph_constant([-1, height // 2, width // 2, channels], "int32"))


class PointwiseConv(MaskableKernel, keras.layers.Conv2D):
    """A 1x1 convolution (no bias) computed as one matrix product.

    TensorFlow's CPU kernels for the gradients of 1x1 convolutions were the
    largest cost of a supernet step; a reshape and MatMul gives the same
    result with fast gradients. Stride 2 subsamples first, from position
    `offset` (0, or 1 for the shifted path of a factorized reduce). The kernel
    has Conv2D's shape (1, 1, in, out), so weights move freely between the two.
    """

    def __init__(self, filters: int, strides: int = 1, **kwargs):
        super().__init__(filters, 1, strides=strides, use_bias=False, **kwargs)
        if self.strides not in ((1, 1), (2, 2)):  # subsample() takes every second position
            raise ValueError(f"Received an invalid stride, expected 1 or 2. Received: {strides}")

    def call(self, inputs, offset=0):
        if self.strides[0] > 1:
            inputs = subsample(inputs, offset)
        kernel_shape = graph_constant([inputs.shape[-1], self.filters], "int32")
        masked_kernel = self.masked_kernel()
        with static_shape_gradients():
            kernel = tf.reshape(masked_kernel, kernel_shape)
            rows = tf.reshape(inputs, graph_constant([-1, inputs.shape[-1]], "int32"))
            outputs = tf.matmul(rows, kernel)
            if None in inputs.shape[1:]:
                shape = tf.concat([tf.shape(inputs)[:-1], [self.filters]], axis=0)
            else:  # a static shape: no shape arithmetic in the graph
                shape = graph_constant([-1, *inputs.shape[1:-1], self.filters], "int32")
            outputs = tf.reshape(outputs, shape)
        return self._record_positions(outputs)

    def get_config(self):
        config = super().get_config()
        for key in ("kernel_size", "use_bias", "padding"):
            config.pop(key, None)
        return config
