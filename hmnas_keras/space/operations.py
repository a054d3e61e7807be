"""The candidate operations of the search space (DESIGN.md §2, paper §4.1).

Each operation is a Keras layer mapping a feature map to `channels` output
channels at stride 1 or 2. `OPS` maps an operation name to its builder; the
order of `OP_NAMES` (`hmnas_keras.space.search_space`) is the order of α's
columns. Every operation lists its maskable kernels in `kernel_layers()`.
"""

import contextlib
import math
import threading
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from hmnas_keras.space.maskable import (
    FLOAT32,
    MaskableBatchNormalization,
    MaskableDepthwiseConv2D,
    PointwiseConv,
    graph_constant,
    graph_gradients,
    has_even_size,
    subsample,
)
from hmnas_keras.space.search_space import OP_NAMES

# BatchNormalization inside the searched operations carries no affine
# parameters, as in DARTS' supernet: op and edge weights provide the scale.
BN_MOMENTUM = 0.9

_DEFERRED = threading.local()  # per thread: a distribution strategy runs replicas in threads


@contextlib.contextmanager
def deferred_moving_statistics():
    """Within it, a training-mode `FusedBatchNorm` leaves its moving statistics alone and
    records its batch statistics instead: yields {id(variable): (batch value, momentum)}.

    The caller then updates them all at once (`moving_averages`): an edge of the
    supernet has 12 moving statistics, and three ops each (two products and a sum)
    were a tenth of a supernet step's graph.
    """
    previous = getattr(_DEFERRED, "statistics", None)
    _DEFERRED.statistics = statistics = {}
    try:
        yield statistics
    finally:
        _DEFERRED.statistics = previous


def moving_averages(variables, values, statistics):
    """The moving statistics `variables`, whose current values are `values`, after the batch
    statistics recorded by `deferred_moving_statistics`, as one vector (the variables' in
    order): m·value + (1 − m)·batch, what `FusedBatchNorm` assigns, computed for all at once
    and so the same numbers; a variable without batch statistics keeps its value."""
    if not all(id(v) in statistics for v in variables):
        return tf.concat(
            [
                value
                if id(variable) not in statistics
                else moving_averages([variable], [value], statistics)
                for variable, value in zip(variables, values, strict=True)
            ],
            axis=0,
        )
    batch, momenta = zip(*(statistics[id(v)] for v in variables), strict=True)
    dtype = values[0].dtype
    if len(set(momenta)) == 1:
        momentum, rest = graph_constant(momenta[0], dtype), graph_constant(1.0 - momenta[0], dtype)
    else:
        sizes = [v.shape[0] for v in variables]
        momentum = graph_constant(np.repeat(momenta, sizes), dtype)
        rest = graph_constant(np.repeat([1.0 - m for m in momenta], sizes), dtype)
    return tf.concat(values, axis=0) * momentum + tf.concat(batch, axis=0) * rest


class FusedBatchNorm(MaskableBatchNormalization):
    """BatchNormalization whose training-mode pass uses TensorFlow's fused kernel.

    Keras 3 normalises with separate moment and arithmetic ops; on a CPU the
    supernet is bound by those memory passes, and the fused kernel (forward and
    gradient) makes a supernet step about twice as fast. Inference and the
    variables are those of `keras.layers.BatchNormalization`, and so is a
    frozen layer (`trainable=False` normalises with the moving statistics, also
    in training). The fused kernel gets ε as it is: TensorFlow 2.21's
    `tf.compat.v1.nn.fused_batch_norm` no longer raises it to 1.001e-5, and its
    CPU kernel normalises with the ε given, as Keras does.
    """

    def call(self, inputs, training=None, mask=None):
        fused = training and self.trainable and len(inputs.shape) == 4
        if not fused or self.axis not in (-1, 3):
            return super().call(inputs, training=training, mask=mask)
        channels, dtype = inputs.shape[-1], inputs.dtype
        scale = self.gamma if self.scale else graph_constant(np.ones(channels), dtype)
        offset = self.beta if self.center else graph_constant(np.zeros(channels), dtype)
        # What tf.compat.v1.nn.fused_batch_norm runs, with the graph's shared constants.
        outputs, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=inputs,
            scale=scale,
            offset=offset,
            mean=graph_constant([], dtype),
            variance=graph_constant([], dtype),
            epsilon=self.epsilon,
            is_training=True,
        )
        deferred = getattr(_DEFERRED, "statistics", None)
        if deferred is not None and not (self.scale or self.center or tf.executing_eagerly()):
            outputs = _gradient_to_inputs_only(outputs, inputs)  # a shared edge function's
        # The fused kernel returns the unbiased variance; Keras tracks the biased one.
        if None in inputs.shape[:-1]:
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), dtype)
            variance = variance * (count - 1.0) / count
        else:  # a static shape: a constant factor instead of shape arithmetic in the graph
            count = math.prod(inputs.shape[:-1])
            variance = variance * graph_constant((count - 1) / count, dtype)
        if deferred is not None:
            deferred[id(self.moving_mean)] = (mean, self.momentum)
            deferred[id(self.moving_variance)] = (variance, self.momentum)
            return self.mask_output(outputs)
        # Keras' update, with one constant per factor (not one per product).
        momentum = graph_constant(self.momentum, dtype)
        rest = graph_constant(1.0 - self.momentum, dtype)
        self.moving_mean.assign(self.moving_mean * momentum + mean * rest)
        self.moving_variance.assign(self.moving_variance * momentum + variance * rest)
        return self.mask_output(outputs)


def _gradient_to_inputs_only(outputs, inputs):
    """`outputs` of a fused batch norm of `inputs` without scale and offset, whose graph
    gradient is the fused kernel's for `inputs` alone.

    Differentiating the fused batch norm itself, TensorFlow puts a zero tensor
    into the gradient graph for each of its five other outputs (batch
    statistics and reserve spaces) before its gradient ignores them: 30 graph
    nodes per supernet edge and pass. Here an IdentityN of (outputs, inputs)
    carries the gradient (the fused kernel's gradient op, as TensorFlow calls
    it), so the batch norm itself is never differentiated and one zero tensor
    is made (for the IdentityN's unused second output), which nothing reads.

    For graph gradients only: the batch norms of a shared edge function
    (`cell.SharedCalls`, where `deferred_moving_statistics` is on). A tape (the
    step's `GradientTape`, which differentiates the rest of the network) uses
    IdentityN's own gradient, the same values, but makes that zero tensor, of the
    activations' size, and adds it to the gradient: 36 such tensors in a C=8
    supernet's step, 25 MiB of constants once TensorFlow folds them, and 36
    additions of nothing per step.
    """
    with graph_gradients({"IdentityN": "HmnasFusedBatchNormInputs"}):
        return tf.raw_ops.IdentityN(input=[outputs, inputs])[0]


@tf.RegisterGradient("HmnasFusedBatchNormInputs")
def _fused_batch_norm_inputs_gradient(op, grad, _):
    norm = op.inputs[0].op  # FusedBatchNormV3, in training: what TensorFlow's gradient reads
    return None, _fused_batch_norm_backprop(norm, grad)[0]


def scaled_batch_norm_outputs(weight, outputs):
    """weight · `outputs` (a scalar times an op's output, a term of Eq. 1) with a graph
    gradient that does not read `outputs`, when they are a shared edge function's
    affine-free fused batch norm's (`_gradient_to_inputs_only`); None otherwise.

    The gradient of w · y for w is Σ dy·y: a product and a reduction over y per
    op, and y kept from the forward pass for it. But y is the batch norm x̂ of its
    input x, and the batch norm's gradient kernel, which reads x anyway, computes
    Σ dy·x̂ per channel as the gradient of a scale: for w it is the sum of those,
    and for x it is w times the kernel's gradient for dy (the kernel is linear in
    dy). The same values, rounded in another order; the C=8/3 supernet's weight
    step 5% faster. Peak memory did not move: only α's gradient reads y, and the
    architecture step's peak stays below the weight step's.
    """
    if tf.executing_eagerly():
        return None
    producer = outputs.op
    if producer.type != "IdentityN" or producer.outputs[0] is not outputs:
        return None
    try:
        overridden = producer.get_attr("_gradient_op_type")
    except ValueError:  # another IdentityN, with its own gradient
        return None
    if overridden != b"HmnasFusedBatchNormInputs":
        return None
    with graph_gradients({"IdentityN": "HmnasScaledBatchNorm"}):
        return tf.raw_ops.IdentityN(input=[weight * outputs, producer.inputs[1], weight])[0]


@tf.RegisterGradient("HmnasScaledBatchNorm")
def _scaled_batch_norm_gradient(op, grad, *_):
    product, _, weight = op.inputs
    norm = product.op.inputs[1].op.inputs[0].op  # w · IdentityN(FusedBatchNormV3(x), x)
    backprop = _fused_batch_norm_backprop(norm, grad)
    return None, weight * backprop[0], tf.reduce_sum(backprop[1])


def _fused_batch_norm_backprop(norm, grad):
    """The training-mode fused batch norm `norm`'s gradient kernel for `grad`: (for x,
    for the scale, for the offset, ...)."""
    return tf.raw_ops.FusedBatchNormGradV3(
        y_backprop=grad,
        x=norm.inputs[0],
        scale=norm.inputs[1],
        reserve_space_1=norm.outputs[3],
        reserve_space_2=norm.outputs[4],
        reserve_space_3=norm.outputs[5],
        epsilon=norm.get_attr("epsilon"),
        data_format=norm.get_attr("data_format"),
        is_training=norm.get_attr("is_training"),
    )


class BuiltOnCall:
    """A layer of sublayers that each build themselves, from their inputs, on the first call.

    A Keras layer without a `build()` of its own is built by running its `call()`
    symbolically before the real call, and within that run each sublayer without
    one is built the same way: a cell's ops were traced once per level of
    nesting, and building a 3-cell supernet took 8.7 s (against 0.4 s for an
    eager call of the built network).
    """

    def build(self, input_shape):
        del input_shape  # nothing of its own: the sublayers build on the first call


def _batch_norm(name: str, affine: bool = False) -> keras.layers.BatchNormalization:
    return FusedBatchNorm(
        momentum=BN_MOMENTUM, epsilon=1e-5, center=affine, scale=affine, name=name
    )


def _check_stride(stride: int) -> None:
    if stride not in (1, 2):
        raise ValueError(f"Received an invalid stride, expected 1 or 2. Received: stride={stride}")


class ReLUConvBN(BuiltOnCall, keras.layers.Layer):
    """ReLU, then a 1x1 convolution to `channels`, then BatchNormalization (cell preprocessing)."""

    def __init__(self, channels: int, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        self.channels = channels
        self.conv = PointwiseConv(channels, name="conv")
        self.bn = _batch_norm("bn")

    def call(self, x, training=None):
        return self.bn(self.conv(ops.relu(x)), training=training)

    def kernel_layers(self) -> list:
        return [self.conv]

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels)
        return config


class _ConvOp(BuiltOnCall, keras.layers.Layer):
    """An operation with `channels` outputs, a square `kernel_size` and a `stride`."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        _check_stride(stride)
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kernel_size=self.kernel_size, stride=self.stride)
        return config


class SepConv(_ConvOp):
    """A separable convolution applied twice (ReLU-DW-PW-BN, twice).

    `middle` is the width between the two (default `channels`); a searched
    network with channel masks keeps only the middle channels that survived.
    """

    def __init__(
        self, channels: int, kernel_size: int, stride: int = 1, middle: int | None = None, **kwargs
    ):
        super().__init__(channels, kernel_size, stride, **kwargs)
        self.middle = channels if middle is None else middle
        self.depthwise_1 = MaskableDepthwiseConv2D(
            kernel_size, strides=stride, padding="same", use_bias=False, name="depthwise_1"
        )
        self.pointwise_1 = PointwiseConv(self.middle, name="pointwise_1")
        self.bn_1 = _batch_norm("bn_1")
        self.depthwise_2 = MaskableDepthwiseConv2D(
            kernel_size, padding="same", use_bias=False, name="depthwise_2"
        )
        self.pointwise_2 = PointwiseConv(channels, name="pointwise_2")
        self.bn_2 = _batch_norm("bn_2")

    def call(self, x, training=None):
        x = self.bn_1(self.pointwise_1(self.depthwise_1(ops.relu(x))), training=training)
        return self.bn_2(self.pointwise_2(self.depthwise_2(ops.relu(x))), training=training)

    def kernel_layers(self) -> list:
        return [self.depthwise_1, self.pointwise_1, self.depthwise_2, self.pointwise_2]

    def get_config(self):
        config = super().get_config()
        config.update(middle=self.middle)
        return config


class DilConv(_ConvOp):
    """A dilated (rate 2) separable convolution: ReLU-DW-PW-BN.

    At stride 2 the outputs sit on even positions, where a rate-2 kernel only
    ever reads even input positions: the result equals an undilated kernel run
    at stride 1 over the input's even rows and columns. That is how it is
    computed (TensorFlow has no depthwise convolution with both stride 2 and
    dilation 2), and it is 4x cheaper than subsampling a full-size output.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, **kwargs):
        super().__init__(channels, kernel_size, stride, **kwargs)
        self.depthwise = MaskableDepthwiseConv2D(
            kernel_size,
            dilation_rate=2 if stride == 1 else 1,
            padding="same",
            use_bias=False,
            name="depthwise",
        )
        self.pointwise = PointwiseConv(channels, name="pointwise")
        self.bn = _batch_norm("bn")

    def call(self, x, training=None):
        x = ops.relu(x)
        if self.stride == 2:
            x = subsample(x)
        return self.bn(self.pointwise(self.depthwise(x)), training=training)

    def kernel_layers(self) -> list:
        return [self.depthwise, self.pointwise]


class Pool(BuiltOnCall, keras.layers.Layer):
    """3x3 max or average pooling (padding excluded from averages), then BN."""

    def __init__(self, channels: int, kind: str, stride: int = 1, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        _check_stride(stride)
        if kind not in ("max", "avg"):
            raise ValueError(
                f"Received an invalid pool kind, expected 'max' or 'avg'. Received: kind={kind!r}"
            )
        self.channels = channels
        self.kind = kind
        self.stride = stride
        pool_class = keras.layers.MaxPooling2D if kind == "max" else keras.layers.AveragePooling2D
        self.pool = pool_class(3, strides=stride, padding="same", name="pool")
        self.bn = _batch_norm("bn")

    def call(self, x, training=None):
        return self.bn(self.pool(x), training=training)

    def kernel_layers(self) -> list:
        return []

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, kind=self.kind, stride=self.stride)
        return config


def half_split(channels: int, kept=None) -> tuple[int, int]:
    """Outputs of a factorized reduce's two paths: the first C//2 channels, then the rest.

    `kept`: the surviving channel indices (of `channels`) when channels were pruned.
    """
    if kept is None:
        return channels // 2, channels - channels // 2
    first = sum(1 for c in kept if c < channels // 2)
    return first, len(kept) - first


class FactorizedReduce(BuiltOnCall, keras.layers.Layer):
    """Halves the spatial size: ReLU, two offset 1x1 stride-2 convolutions, concat, BN.

    `split` gives the outputs of the two paths (default: half each); a path
    left with no output channel (after channel pruning) is not built.
    """

    def __init__(self, channels: int, split: tuple[int, int] | None = None, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        self.channels = channels
        self.split = tuple(split or half_split(channels))
        first, second = self.split
        self.conv_1 = PointwiseConv(first, strides=2, name="conv_1") if first else None
        self.conv_2 = PointwiseConv(second, strides=2, name="conv_2") if second else None
        self.bn = _batch_norm("bn")

    def call(self, x, training=None):
        x = ops.relu(x)
        paths = []
        if self.conv_1 is not None:
            paths.append(self.conv_1(x))
        if self.conv_2 is not None:
            # The second path sees the input shifted by one pixel; padding the end
            # keeps both paths at ceil(size / 2) for odd and even sizes alike. On
            # even sizes that is the odd rows and columns, taken directly.
            if has_even_size(x):
                paths.append(self.conv_2(x, offset=1))
            else:
                shifted = ops.pad(x[:, 1:, 1:, :], [[0, 0], [0, 1], [0, 1], [0, 0]])
                paths.append(self.conv_2(shifted))
        x = ops.concatenate(paths, axis=-1) if len(paths) > 1 else paths[0]
        return self.bn(x, training=training)

    def kernel_layers(self) -> list:
        return [conv for conv in (self.conv_1, self.conv_2) if conv is not None]

    def get_config(self):
        config = super().get_config()
        config.update(channels=self.channels, split=list(self.split))
        return config


class Identity(keras.layers.Layer):
    """The stride-1 skip connection."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)

    def call(self, x, training=None):
        return x

    def kernel_layers(self) -> list:
        return []


def _skip_connect(channels: int, stride: int, name: str, split=None) -> keras.layers.Layer:
    if stride == 1:
        return Identity(name=name)
    return FactorizedReduce(channels, split=split, name=name)


# name -> builder(channels, stride, name, **options); options of a searched network's
# pruned channels: `middle` (separable convolutions), `split` (the stride-2 skip).
OPS: dict[str, Callable[..., keras.layers.Layer]] = {
    "sep_conv_3x3": lambda c, s, name, middle=None: SepConv(c, 3, s, middle=middle, name=name),
    "sep_conv_5x5": lambda c, s, name, middle=None: SepConv(c, 5, s, middle=middle, name=name),
    "dil_conv_3x3": lambda c, s, name: DilConv(c, 3, s, name=name),
    "dil_conv_5x5": lambda c, s, name: DilConv(c, 5, s, name=name),
    "max_pool_3x3": lambda c, s, name: Pool(c, "max", s, name=name),
    "avg_pool_3x3": lambda c, s, name: Pool(c, "avg", s, name=name),
    "skip_connect": _skip_connect,
}


def build_op(
    op_name: str, channels: int, stride: int, name: str | None = None, **options
) -> keras.layers.Layer:
    """Builds the candidate operation `op_name` with `channels` outputs at `stride`.

    `options`: `middle=` for a separable convolution, `split=` for the stride-2
    skip (see `SepConv`, `FactorizedReduce`).
    """
    if op_name not in OPS:
        raise ValueError(
            f"Received an unknown operation, expected one of {', '.join(OP_NAMES)}. "
            f"Received: op_name={op_name!r}"
        )
    _check_stride(stride)
    return OPS[op_name](channels, stride, name or op_name, **options)
