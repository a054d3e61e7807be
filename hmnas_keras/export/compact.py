"""The compact model: what survived, as a plain Keras functional model (DESIGN.md §3).

`compact_model(network)` rebuilds a built `SearchedNetwork` with standard
Keras layers only — Conv2D, DepthwiseConv2D, BatchNormalization, ReLU,
pooling, Cropping2D/ZeroPadding2D, Rescaling, Add, Concatenate,
GlobalAveragePooling2D, Dense — and copies its weights:

- no mask layers, no α/β variables: the searched network's kernels already
  hold the masked weights (pruned entries are exact zeros and stay zeros);
- only the surviving edges and ops are built; dead nodes are not computed
  (the searched network's next preprocessing kernels and classifier already
  lost their input channels);
- the fixed weight of op k on edge j -> i, c = edge_weight · op_weight, is
  folded into the op's last BatchNormalization (γ' = c·γ, β' = c·β: exact,
  BN is affine in its input) or, for the identity, applied by a `Rescaling`
  layer;
- parameter-free work shared by the edges leaving one node (ReLU, pooling)
  is computed once.

In inference mode its output equals the searched network's up to float
rounding (the scale is applied inside BN instead of after it).

`compact_model(network, fuse=True)`, what the export writes, computes each
node as a few wide layers instead (`_fused_node`): the same function in about
2.6x fewer layers, with concatenations padded to CHANNEL_ALIGNMENT zero
channels; parameters and FLOPs are counted on the unfused form.
"""

import itertools

import keras
import numpy as np
from keras import ops

from hmnas_keras.architecture.counting import macs
from hmnas_keras.architecture.counting import parameter_counts as variable_counts
from hmnas_keras.space.operations import DilConv, FactorizedReduce, Identity, Pool, SepConv
from hmnas_keras.space.search_space import edge_index

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

# The fused form pads the channels of its concatenations to a multiple of this:
# onnxruntime's x86 NCHWc kernels take depthwise convolutions only over a
# multiple of 4 channels, and other convolutions with 16 or more inputs only
# then; anything else runs a generic kernel 2-5x slower (docs/BENCHMARKS.md).
CHANNEL_ALIGNMENT = 4


class _Builder:
    """Creates standard layers on KerasTensors and remembers the weights to copy into them."""

    def __init__(self):
        self.assignments = []  # (layer, [arrays]) set once the model is built
        self.folded = set()  # names of BatchNormalization layers that carry a folded scale
        self._relu = {}
        self._pooled = {}
        self._producers = {}  # id(tensor) -> name of the layer that made it (node tensors)
        self._zeros = {}

    def named(self, layer, x):
        """`layer(x)`, remembering that `layer` made the result (ReLU and pooling are named so)."""
        output = layer(x)
        self.register(output, layer.name)
        return output

    def register(self, output, name):
        """Names the tensor `output` after `name` (for the ReLU and pooling that read it)."""
        self._producers[id(output)] = name

    def relu(self, x):
        # One ReLU per tensor, named after the layer that made it: every op
        # reading the same node shares it.
        if id(x) not in self._relu:
            name = f"{self._producers[id(x)]}.relu"
            self._relu[id(x)] = (x, self.named(keras.layers.ReLU(name=name), x))
        return self._relu[id(x)][1]

    def pointwise(self, source, x, name):
        layer = keras.layers.Conv2D(
            source.filters, 1, strides=source.strides, use_bias=False, name=name
        )
        self.assignments.append((layer, [_numpy(source.kernel)]))
        return layer(x)

    def depthwise(self, source, x, name):
        return self.stacked_depthwise([source], x, name)

    def batch_norm(self, source, x, name, scale=None):
        """A copy of `source` (a BatchNormalization); `scale` multiplies its output exactly."""
        gamma = _numpy(source.gamma) if source.scale else None
        beta = _numpy(source.beta) if source.center else None
        if scale is not None:
            channels = source.moving_mean.shape[0]
            gamma = np.float32(scale) * (gamma if gamma is not None else np.ones(channels, "f"))
            beta = None if beta is None else np.float32(scale) * beta
            self.folded.add(name)
        layer = keras.layers.BatchNormalization(
            momentum=source.momentum,
            epsilon=source.epsilon,
            center=beta is not None,
            scale=gamma is not None,
            name=name,
        )
        weights = [w for w in (gamma, beta) if w is not None]
        weights += [_numpy(source.moving_mean), _numpy(source.moving_variance)]
        self.assignments.append((layer, [w.astype("float32") for w in weights]))
        return self.named(layer, x)

    def factorized_reduce(self, source, x, name, scale=None):
        x = self.relu(x)
        paths = []
        if source.conv_1 is not None:
            paths.append(self.pointwise(source.conv_1, x, f"{name}.conv_1"))
        if source.conv_2 is not None:
            shifted = keras.layers.Cropping2D(((1, 0), (1, 0)), name=f"{name}.crop")(x)
            shifted = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"{name}.pad")(shifted)
            paths.append(self.pointwise(source.conv_2, shifted, f"{name}.conv_2"))
        if len(paths) > 1:
            x = keras.layers.Concatenate(name=f"{name}.concat")(paths)
        else:
            x = paths[0]
        return self.batch_norm(source.bn, x, f"{name}.bn", scale)

    def relu_conv_bn(self, source, x, name):
        x = self.relu(x)
        return self.batch_norm(source.bn, self.pointwise(source.conv, x, f"{name}.conv"), name)

    def sep_conv(self, source, x, name, scale):
        x = self.relu(x)
        x = self.depthwise(source.depthwise_1, x, f"{name}.depthwise_1")
        x = self.pointwise(source.pointwise_1, x, f"{name}.pointwise_1")
        x = self.batch_norm(source.bn_1, x, f"{name}.bn_1")
        x = keras.layers.ReLU(name=f"{name}.relu_2")(x)
        x = self.depthwise(source.depthwise_2, x, f"{name}.depthwise_2")
        x = self.pointwise(source.pointwise_2, x, f"{name}.pointwise_2")
        return self.batch_norm(source.bn_2, x, f"{name}.bn_2", scale)

    def pooled(self, source, x):
        """`source`'s pooling of `x`, shared by the edges leaving one node."""
        key = (id(x), source.kind, source.stride)
        if key not in self._pooled:
            pool_class = {"max": keras.layers.MaxPooling2D, "avg": keras.layers.AveragePooling2D}
            pooled = pool_class[source.kind](
                3,
                strides=source.stride,
                padding="same",
                name=f"{self._producers[id(x)]}.{source.kind}_pool_s{source.stride}",
            )
            self._pooled[key] = (x, pooled(x))
        return self._pooled[key][1]

    def pool(self, source, x, name, scale):
        # Each edge has its own BN after the shared pooling.
        return self.batch_norm(source.bn, self.pooled(source, x), f"{name}.bn", scale)

    def concat(self, tensors, name):
        """`tensors` concatenated on channels, followed by zero channels up to a multiple of
        `CHANNEL_ALIGNMENT`; returns (tensor, number of zero channels added)."""
        channels = sum(t.shape[-1] for t in tensors)
        pad = -channels % CHANNEL_ALIGNMENT
        if pad:
            tensors = [*tensors, self.zeros(tensors[0], pad)]
        if len(tensors) == 1:
            return tensors[0], 0
        return keras.layers.Concatenate(name=name)(tensors), pad

    def zeros(self, like, channels):
        """A tensor of `channels` zeros at the batch and spatial shape of `like`, made once
        per shape (a 1x1 convolution with a zero kernel: standard layers only)."""
        key = (tuple(like.shape[1:3]), channels)
        if key not in self._zeros:
            height, width = key[0]
            layer = keras.layers.Conv2D(
                channels, 1, use_bias=False, name=f"zeros_{height}x{width}x{channels}"
            )
            self.assignments.append((layer, [np.zeros((1, 1, like.shape[-1], channels), "f")]))
            self._zeros[key] = (like, layer(like))
        return self._zeros[key][1]

    def stacked_depthwise(self, sources, x, name, pad=0):
        """One depthwise convolution over `x`, the concatenated inputs of the `sources`
        (depthwise layers of one kernel size, stride, dilation and padding) and `pad`
        zero channels."""
        first = sources[0]
        layer = keras.layers.DepthwiseConv2D(
            first.kernel_size,
            strides=first.strides,
            padding=first.padding,
            dilation_rate=first.dilation_rate,
            use_bias=False,
            name=name,
        )
        kernels = [_numpy(source.kernel) for source in sources]
        kernels.append(np.zeros((*kernels[0].shape[:2], pad, 1), "f"))
        self.assignments.append((layer, [np.concatenate(kernels, axis=2)]))
        return layer(x)

    def conv_with_bias(self, kernel, bias, x, name):
        """A 1x1 convolution with the given (inputs, outputs) matrix and bias."""
        layer = keras.layers.Conv2D(kernel.shape[1], 1, use_bias=True, name=name)
        self.assignments.append(
            (layer, [kernel[None, None].astype("float32"), bias.astype("float32")])
        )
        return layer(x)

    def op(self, source, x, name, scale):
        """Candidate operation `source` (a layer of the searched network) scaled by `scale`."""
        if isinstance(source, SepConv):
            return self.sep_conv(source, x, name, scale)
        if isinstance(source, DilConv):
            return self.dil_conv(source, x, name, scale)
        if isinstance(source, FactorizedReduce):
            return self.factorized_reduce(source, x, name, scale)
        if isinstance(source, Pool):
            return self.pool(source, x, name, scale)
        if isinstance(source, Identity):
            return self.named(keras.layers.Rescaling(scale, name=f"{name}.scale"), x)
        raise TypeError(f"No compact form for {name} ({type(source).__name__}).")

    def dil_conv(self, source, x, name, scale):
        x = self.relu(x)
        if source.stride == 2:
            # x[:, ::2, ::2]: DilConv computes its stride-2 form on the even positions.
            x = keras.layers.MaxPooling2D(1, strides=2, name=f"{name}.subsample")(x)
        x = self.depthwise(source.depthwise, x, f"{name}.depthwise")
        x = self.pointwise(source.pointwise, x, f"{name}.pointwise")
        return self.batch_norm(source.bn, x, f"{name}.bn", scale)


def _numpy(variable) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(variable))


def _bn_affine(bn, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with scale · bn(x) = a · x + b, per channel, for `bn` in inference (float64)."""
    mean = _numpy(bn.moving_mean).astype("float64")
    variance = _numpy(bn.moving_variance).astype("float64")
    gamma = _numpy(bn.gamma).astype("float64") if bn.scale else 1.0
    beta = _numpy(bn.beta).astype("float64") if bn.center else 0.0
    a = gamma / np.sqrt(variance + bn.epsilon)
    return scale * a, scale * (beta - a * mean)


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    rows, columns = sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)
    result = np.zeros((rows, columns))
    r = c = 0
    for block in blocks:
        result[r : r + block.shape[0], c : c + block.shape[1]] = block
        r, c = r + block.shape[0], c + block.shape[1]
    return result


def _group_key(layer, x) -> tuple:
    """Ops whose depthwise convolutions can run as one: same kind, kernel, stride, input size."""
    if isinstance(layer, SepConv):
        return ("sep", layer.kernel_size, layer.stride, tuple(x.shape[1:3]))
    return ("dil", layer.kernel_size, layer.stride, tuple(x.shape[1:3]))


def _fused_node(builder: _Builder, terms: list, name: str):
    """One node as a few wide layers instead of a few thin layers per op (the fused form).

    `terms`: the node's surviving ops [(layer, input, name, scale)]. The
    separable and dilated convolutions of one kernel size and stride run as one
    depthwise convolution over their concatenated inputs (a separable one's
    middle 1x1 convolutions as one block-diagonal convolution, its BN folded
    in); the last 1x1 convolution of every op, its BN and the op's scale, the
    pooled inputs with their BN, and the identities, are one 1x1 convolution
    over the concatenation of all of them, since a sum of linear maps of parts
    is one linear map of the whole. Factorized reduces are added as they are.
    Exact: the same function, computed in fewer, wider layers.
    """
    groups, inputs, rows, biases, separate = {}, [], [], [], []
    for layer, x, term_name, scale in terms:
        if isinstance(layer, SepConv | DilConv):
            x = builder.relu(x)
            groups.setdefault(_group_key(layer, x), []).append((layer, x, scale))
        elif isinstance(layer, Pool):
            a, b = _bn_affine(layer.bn, scale)
            inputs.append(builder.pooled(layer, x))
            rows.append(np.diag(a))
            biases.append(b)
        elif isinstance(layer, Identity):
            inputs.append(x)
            rows.append(scale * np.eye(x.shape[-1]))
        else:
            separate.append(builder.op(layer, x, term_name, scale))
    for (kind, size, detail, _), members in groups.items():
        group = f"{name}.{kind}_conv_{size}x{size}_s{detail}"
        ops_ = [m for m, _, _ in members]
        x, pad = builder.concat([x for _, x, _ in members], f"{group}.concat")
        if kind == "sep":
            x = builder.stacked_depthwise([m.depthwise_1 for m in ops_], x, f"{group}.dw_1", pad)
            blocks, middle_biases = [np.zeros((pad, 0))], []
            for member in ops_:
                a, b = _bn_affine(member.bn_1)
                blocks.insert(-1, _numpy(member.pointwise_1.kernel)[0, 0] * a)
                middle_biases.append(b)
            pad = -sum(block.shape[1] for block in blocks) % CHANNEL_ALIGNMENT
            blocks[-1] = np.zeros((blocks[-1].shape[0], pad))
            middle_biases.append(np.zeros(pad))
            x = builder.conv_with_bias(
                _block_diagonal(blocks), np.concatenate(middle_biases), x, f"{group}.pw_1"
            )
            x = keras.layers.ReLU(name=f"{group}.relu_2")(x)
            x = builder.stacked_depthwise([m.depthwise_2 for m in ops_], x, f"{group}.dw_2", pad)
            last = [(m.pointwise_2, m.bn_2, scale) for m, _, scale in members]
        else:
            if detail == 2:  # x[:, ::2, ::2] of all members at once (see DilConv)
                x = keras.layers.MaxPooling2D(1, strides=2, name=f"{group}.subsample")(x)
            x = builder.stacked_depthwise([m.depthwise for m in ops_], x, f"{group}.dw", pad)
            last = [(m.pointwise, m.bn, scale) for m, _, scale in members]
        inputs.append(x)
        for pointwise, bn, scale in last:
            a, b = _bn_affine(bn, scale)
            rows.append(_numpy(pointwise.kernel)[0, 0] * a)
            biases.append(b)
        rows.append(np.zeros((pad, rows[-1].shape[1])))
    if inputs:
        x, pad = builder.concat(inputs, f"{name}.concat")
        kernel = np.concatenate([*rows, np.zeros((pad, rows[0].shape[1]))])
        bias = np.sum(biases, axis=0) if biases else np.zeros(kernel.shape[1])
        separate.insert(0, builder.conv_with_bias(kernel, bias, x, f"{name}.conv"))
    output = separate[0] if len(separate) == 1 else keras.layers.Add(name=name)(separate)
    builder.register(output, name)
    return output


def _cell(builder: _Builder, cell, s0, s1, op_weights, edge_weights, prefix: str, fuse: bool):
    nodes = {}
    if cell.preprocess_0 is not None:
        if isinstance(cell.preprocess_0, FactorizedReduce):
            nodes[0] = builder.factorized_reduce(cell.preprocess_0, s0, f"{prefix}.preprocess_0")
        else:
            nodes[0] = builder.relu_conv_bn(cell.preprocess_0, s0, f"{prefix}.preprocess_0")
    if cell.preprocess_1 is not None:
        nodes[1] = builder.relu_conv_bn(cell.preprocess_1, s1, f"{prefix}.preprocess_1")
    # Edges come sorted by target: a node is complete before an edge reads it.
    edges = zip(cell.genotype, cell.edge_ops, strict=True)
    for target, incoming in itertools.groupby(edges, key=lambda edge: edge[0][1]):
        terms = []
        for (source, _, names), mixed_op in incoming:
            index = edge_index(source, target)
            for op_name in names:
                op_weight = op_weights[index, cell.op_names.index(op_name)]
                scale = float(edge_weights[index]) * float(op_weight)
                layer = mixed_op.candidates.get(op_name) or cell.source_ops[source][op_name]
                name = f"{prefix}.edge_{source}_{target}.{op_name}"
                terms.append((layer, nodes[source], name, scale))
        if fuse:
            nodes[target] = _fused_node(builder, terms, f"{prefix}.node_{target}")
            continue
        terms = [builder.op(*term) for term in terms]
        if len(terms) > 1:
            terms = [builder.named(keras.layers.Add(name=f"{prefix}.node_{target}"), terms)]
        nodes[target] = terms[0]
    outputs = [nodes[node] for node in cell.alive_nodes]
    if len(outputs) == 1:
        return outputs[0]
    return builder.named(keras.layers.Concatenate(name=f"{prefix}.concat"), outputs)


def compact_model(network, name: str = "compact", fuse: bool = False) -> keras.Model:
    """The plain Keras functional model equal to the built `network` (a SearchedNetwork).

    Returns a model with one input named "images" (normalised NHWC float32
    images) and one output, the logits, from the layer named "logits". Layers
    carrying a folded op/edge scale are listed in `model.folded_scales`.

    `fuse=False`: a few layers per surviving op, named after it (the form that
    is counted and inspected). `fuse=True`: each node's ops run as a few wide
    layers (`_fused_node`): the same function in far fewer layers, which is
    what runtimes are fast at on thin networks. Its 1x1 kernels hold some
    structural zeros (block-diagonal and diagonal parts), so count parameters
    and FLOPs on the unfused form.
    """
    builder = _Builder()
    images = keras.Input(tuple(network.image_shape), name=INPUT_NAME)
    stem = keras.layers.Conv2D(
        network.stem_conv.filters, 3, padding="same", use_bias=False, name="stem_conv"
    )
    builder.assignments.append((stem, [_numpy(network.stem_conv.kernel)]))
    s0 = s1 = builder.batch_norm(network.stem_bn, stem(images), "stem_bn")
    weights = {
        cell_type: (_numpy(op_weights), _numpy(edge_weights))
        for cell_type, (op_weights, edge_weights) in network.cell_weights().items()
    }
    for index, (cell, cell_type) in enumerate(
        zip(network.cells, network.search_space.cell_types, strict=True)
    ):
        if cell is None:  # unused: nothing downstream reads it
            s0, s1 = s1, None
            continue
        op_weights, edge_weights = weights[cell_type]
        s0, s1 = s1, _cell(builder, cell, s0, s1, op_weights, edge_weights, f"cell_{index}", fuse)
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(s1)
    classifier = keras.layers.Dense(network.num_classes, name=OUTPUT_NAME)
    outputs = classifier(x)
    builder.assignments.append(
        (classifier, [_numpy(network.classifier.kernel), _numpy(network.classifier.bias)])
    )
    model = keras.Model(images, outputs, name=name)
    for layer, arrays in builder.assignments:
        layer.set_weights(arrays)
    model.folded_scales = tuple(sorted(builder.folded))
    return model


def kernel_macs(model: keras.Model) -> dict:
    """Multiply-accumulates per image of the compact model's convolutions and dense layer.

    The convention of `hmnas_keras.architecture.counting`: output positions x
    kernel entries (dense), output positions x non-zero kernel entries.
    """
    kernel_types = keras.layers.Conv2D | keras.layers.DepthwiseConv2D | keras.layers.Dense
    return macs(
        (_numpy(layer.kernel), int(np.prod(layer.output.shape[1:-1])))
        for layer in model.layers
        if isinstance(layer, kernel_types)
    )


def compact_parameter_counts(model: keras.Model) -> dict:
    """Learned parameters of the compact model: kernels, biases and the stem BN's γ, β.

    BN moving statistics are not parameters, and neither are the γ that only
    carry a folded op/edge scale (counted apart as `folded_scales`), so the
    figures compare with the searched network's.
    """
    folded = set(getattr(model, "folded_scales", ()))
    learned, scales = [], 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name in folded:
            scales += sum(int(np.prod(v.shape)) for v in layer.trainable_weights)
        else:
            learned += layer.trainable_weights
    return {**variable_counts(learned), "folded_scales": scales}
