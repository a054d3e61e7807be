"""A cell of the search space: Eq. 1 (`MixedOp`) and Eq. 2 (`Cell`) of the paper (§3.1).

    Eq. 1: edge_{j→i}(x) = Σ_k w_k · op_k(x),   w = the op weights of the edge;
    Eq. 2: node_i = Σ_{j<i} v_{ij} · edge_{j→i}(node_j),   v = the edge weights.

The op and edge weights come from outside: softmax(α) and softmax(β) in the
supernet (`hmnas_keras.space.supernet`), with masks during hierarchical
masking, and fixed values in a searched network. A cell built from a
`genotype` holds only the surviving edges and ops of a searched cell.
"""

import collections
import contextlib
import threading

import keras
import tensorflow as tf
from keras import ops

from hmnas_keras.space.maskable import (
    FLOAT32,
    MaskableBatchNormalization,
    MaskableKernel,
    graph_constant,
    graph_gradients,
)
from hmnas_keras.space.operations import (
    BuiltOnCall,
    FactorizedReduce,
    ReLUConvBN,
    build_op,
    deferred_moving_statistics,
    half_split,
    moving_averages,
    scaled_batch_norm_outputs,
)
from hmnas_keras.space.search_space import (
    OP_NAMES,
    cell_edges,
    edge_index,
    is_parameter_free,
)


class SharedCalls:
    """One traced function per kind of `MixedOp`, called by every edge of that kind.

    Traced one by one, a supernet's edges put the same computation into the graph
    once per edge (42 edges of 30–40 Keras layer calls each at 3 cells), and
    TensorFlow traces, differentiates, optimises and instantiates every copy: most
    of a step function's first call. Edges of one kind (same configuration, same
    input shape) compute the same function of their variables, masks and inputs,
    so the first edge of a kind is traced as that pure function (Keras'
    `stateless_call`, its masks replaced by arguments) and every edge of the kind
    calls it with its own values. TensorFlow inlines the calls before optimising
    the graph: not inlining them (`_noinline`) made the graph optimiser's work
    smaller but the step 27% slower (373 against 294 ms at C=8).

    With `recompute`, a training call keeps none of the edge's activations for the
    backward pass: its gradient is a second function of the kind, called with the
    edge's inputs, that computes the edge again and differentiates it. That
    function is not inlined (`_noinline`): TensorFlow instantiates it once per
    kind instead of once per edge, so the step's graph shrinks as well. Less
    memory, slower steps (docs/BENCHMARKS.md); the same numbers. Inside
    `architecture_gradients_only` it computes no gradients for the edges' weights.
    """

    def __init__(self, recompute: bool = False):
        self.recompute = recompute
        self._functions = {}

    def __call__(self, mixed_op, x, op_weights, shared_outputs, training):
        kernels, norms = _mask_hooks(mixed_op)
        kernel_masks = [None if k.kernel_mask is None else k.kernel_mask() for k in kernels]
        output_masks = [None if n._output_mask is None else n._output_mask() for n in norms]
        key = (
            *_edge_kind(mixed_op),
            tuple(v.trainable for v in mixed_op.weights),
            tuple(mask is None for mask in kernel_masks + output_masks),
            tuple(x.shape),
            bool(training),
        )
        if key not in self._functions:
            self._functions[key] = (mixed_op, self._trace(mixed_op, bool(training)))
        traced, function = self._functions[key]
        arguments = (
            # Tensors, not variables: a distributed variable passed in loses its gradient.
            [tf.convert_to_tensor(v) for v in mixed_op.trainable_variables],
            [tf.convert_to_tensor(v) for v in mixed_op.non_trainable_variables],
            kernel_masks,
            output_masks,
            x,
            op_weights,
            shared_outputs,
        )
        if training and self.recompute:
            outputs, statistics = self._recomputed(key, function, arguments)
        else:
            outputs, statistics = function(*arguments)
        if training and mixed_op.non_trainable_variables:
            variables = mixed_op.non_trainable_variables  # BN moving statistics: vectors
            values = tf.split(statistics, [v.shape[0] for v in variables])
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
        for layer, source in zip(kernels, _mask_hooks(traced)[0], strict=True):
            layer.output_positions = source.output_positions
        return outputs

    def _recomputed(self, key, function, arguments):
        """`function(*arguments)` with a gradient that computes it again (`recompute`)."""
        flat = tf.nest.flatten(arguments)  # the weights first, then the rest
        positions = [i for i, t in enumerate(flat) if t is not None]  # absent masks: None
        every_gradient = not getattr(_GRADIENTS, "architecture_only", False)
        wanted = [i for i in positions if every_gradient or i >= len(arguments[0])]

        def rebuild(tensors):
            values = list(flat)
            for i, t in zip(positions, tensors, strict=True):
                values[i] = t
            return tf.nest.pack_sequence_as(arguments, values)

        backward_key = ("backward", every_gradient, *key)
        if backward_key not in self._functions:

            def backward(tensors, output_gradient):
                outputs, _ = function(*rebuild(tensors))
                chosen = [tensors[positions.index(i)] for i in wanted]
                return tf.gradients(outputs, chosen, output_gradient)

            self._functions[backward_key] = tf.function(
                backward, autograph=False, experimental_attributes={"_noinline": True}
            )
        backward = self._functions[backward_key]

        @tf.custom_gradient
        def call(*tensors):
            def gradient(output_gradient, _):  # the statistics have none
                computed = iter(backward(list(tensors), output_gradient))
                return [next(computed) if i in wanted else None for i in positions]

            return function(*rebuild(tensors)), gradient

        return call(*[flat[i] for i in positions])

    @staticmethod
    def _trace(traced, training: bool):
        kernels, norms = _mask_hooks(traced)

        def pure(trainable, non_trainable, kernel_masks, output_masks, x, op_weights, shared):
            saved = [k._kernel_mask for k in kernels], [n._output_mask for n in norms]
            calls, traced.shared_calls = traced.shared_calls, None
            try:
                for layer, mask in zip(kernels, kernel_masks, strict=True):
                    layer._kernel_mask = None if mask is None else (lambda mask=mask: mask)
                for layer, mask in zip(norms, output_masks, strict=True):
                    layer._output_mask = None if mask is None else (lambda mask=mask: mask)
                with deferred_moving_statistics() as statistics:
                    outputs, _ = traced.stateless_call(
                        trainable, non_trainable, x, op_weights, shared, training=training
                    )
                if not training or not non_trainable:
                    return outputs, graph_constant([], "float32")
                # The updated moving statistics (vectors), as one vector: one output instead
                # of one per statistic (each output is an Identity, and a gradient input of
                # the backward function), updated all at once, and without a gradient:
                # otherwise the backward function would differentiate every moving-average
                # update (a third of an edge's gradient graph) for gradients always zero.
                updated = moving_averages(traced.non_trainable_variables, non_trainable, statistics)
                return outputs, tf.stop_gradient(updated)
            finally:
                traced.shared_calls = calls
                for layer, mask in zip(kernels, saved[0], strict=True):
                    layer._kernel_mask = mask
                for layer, mask in zip(norms, saved[1], strict=True):
                    layer._output_mask = mask

        return tf.function(pure, autograph=False)


_GRADIENTS = threading.local()  # per thread: a distribution strategy runs replicas in threads


@contextlib.contextmanager
def architecture_gradients_only():
    """While a step is traced inside it, recomputing edges (`SharedCalls` with `recompute`)
    compute no gradients for their weights: the first-order architecture step's, which
    wants α's and β's only (TensorFlow cannot prune what a function it does not inline
    computes)."""
    previous = getattr(_GRADIENTS, "architecture_only", False)
    _GRADIENTS.architecture_only = True
    try:
        yield
    finally:
        _GRADIENTS.architecture_only = previous


def weighted_sum(weights, tensors, positions, for_training: bool = True):
    """Σ_k weights[positions[k]] · tensors[k] (Eq. 1); traced `for_training`, with a smaller
    gradient.

    TensorFlow differentiates each product of a scalar weight by a tensor as a
    broadcast (a product, a sum, then a reshape back to the scalar's shape, with
    three constants), and the sum's first term 0 + w·y likewise: about 35 graph
    nodes per edge and pass more than the values need. The products and sums
    here carry gradients (`maskable.graph_gradients`) that compute the same values
    with the same ops — Σ dy·y over every axis for w, w·dy for y, dy through a
    sum — without the reshapes and shape constants. The values are those of the
    plain sum, and so are eager gradients (the override is a graph's). Not for
    inference graphs (exported: their ops would name gradients of this module).
    """
    # One unstack instead of a strided slice per op: a slice and its gradient are
    # 2 graph nodes and 7 constants each, in every edge of every step.
    weights = tf.unstack(weights)
    shapes = {tuple(t.shape) for t in tensors}
    plain = not for_training or len(shapes) > 1 or None in shapes.pop()
    output = 0.0  # as the plain sum: 0 + -0 is +0, which max pooling tells from -0
    with graph_gradients({} if plain else _MIXING_GRADIENTS):
        for position, tensor in zip(positions, tensors, strict=True):
            weight = weights[position]
            product = None if plain else scaled_batch_norm_outputs(weight, tensor)
            output = output + (weight * tensor if product is None else product)
    return output


_MIXING_GRADIENTS = {"Mul": "HmnasMixingProduct", "AddV2": "HmnasMixingSum"}


@tf.RegisterGradient("HmnasMixingProduct")
def _mixing_product_gradient(op, grad):
    """w · y (w a scalar): TensorFlow's Mul gradient, without the reshape of w's."""
    weight, tensor = op.inputs
    axes = graph_constant(list(range(grad.shape.rank)), "int32")
    return tf.reduce_sum(grad * tensor, axes), weight * grad


@tf.RegisterGradient("HmnasMixingSum")
def _mixing_sum_gradient(op, grad):
    """a + b of one shape, or 0 + b: the gradient passes through (none for the constant)."""
    return [None if t.op.type == "Const" else grad for t in op.inputs]


def _edge_kind(mixed_op) -> tuple:
    """What edges that can share a traced function have in common (see `SharedCalls`)."""
    return (
        mixed_op.channels,
        mixed_op.stride,
        mixed_op.active,
        mixed_op.shared_op_names,
        tuple(tuple(v.shape) for v in mixed_op.weights),
    )


def share_edge_calls(network, repeated_only: bool = False, recompute: bool = False) -> None:
    """Makes the edges of every cell of `network` (a `CellNetwork`) share traced functions.

    For training: the supernet does it, and fine-tuning for its searched network, with
    `repeated_only` (the network built): an edge of a kind of its own gains nothing and
    costs a nested function (a DARTS-shaped searched cell traced in 2.1 s instead of
    0.8 s). A network that is exported should not share (its graph would hold nested
    function calls). `recompute`: the edges keep no activations (`SharedCalls`).
    """
    edges = [op for cell in network.cells if cell is not None for op in cell.edge_ops]
    if repeated_only:
        kinds = collections.Counter(_edge_kind(op) for op in edges)
        edges = [op for op in edges if kinds[_edge_kind(op)] > 1]
    shared_calls = SharedCalls(recompute)
    for mixed_op in edges:
        mixed_op.shared_calls = shared_calls


def _mask_hooks(layer) -> tuple[list, list]:
    """The maskable kernels and BatchNormalizations inside `layer`, in a fixed order."""
    inner = list(layer._flatten_layers(include_self=False, recursive=True))
    return (
        [sub for sub in inner if isinstance(sub, MaskableKernel)],
        [sub for sub in inner if isinstance(sub, MaskableBatchNormalization)],
    )


class MixedOp(BuiltOnCall, keras.layers.Layer):
    """Eq. 1: Σ_k w_k · op_k(x) with externally supplied op weights w.

    `op_weights` has one entry per name in `op_names` (the search space's
    ops); only the operations in `active` (default: all) are built and
    computed, which is how a searched network keeps a subset. Operations in
    `shared_op_names` are parameter-free: their output depends only on x, so
    the cell computes them once per source node and passes them in
    `shared_outputs` instead of every edge recomputing them. `options` gives
    per op name the options of `build_op` (pruned channels).
    """

    def __init__(
        self,
        channels: int,
        stride: int,
        op_names=OP_NAMES,
        shared_op_names=(),
        active=None,
        options=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        self.channels = channels
        self.stride = stride
        self.op_names = tuple(op_names)
        self.shared_op_names = tuple(shared_op_names)
        self.active = tuple(self.op_names if active is None else active)
        options = options or {}
        self.candidates = {
            name: build_op(name, channels, stride, **options.get(name, {}))
            for name in self.active
            if name not in self.shared_op_names
        }

    shared_calls = None  # a `SharedCalls` (set by the supernet): trace each kind of edge once

    def call(self, x, op_weights, shared_outputs=None, training=None):
        if self.shared_calls is not None and not tf.executing_eagerly() and self._sublayers_built():
            return self.shared_calls(self, x, op_weights, shared_outputs or {}, training)
        return self.mixed(x, op_weights, shared_outputs, training)

    def mixed(self, x, op_weights, shared_outputs=None, training=None):
        op_outputs = [
            self.candidates[name](x, training=training)
            if name in self.candidates
            else shared_outputs[name]
            for name in self.active
        ]
        positions = [self.op_names.index(name) for name in self.active]
        return weighted_sum(op_weights, op_outputs, positions, for_training=bool(training))

    def _sublayers_built(self) -> bool:
        return all(layer.built for layer in self._flatten_layers(include_self=False))

    def kernel_layers(self) -> list:
        return [layer for op in self.candidates.values() for layer in op.kernel_layers()]

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            stride=self.stride,
            op_names=list(self.op_names),
            shared_op_names=list(self.shared_op_names),
            active=list(self.active),
        )
        return config


def full_genotype(num_nodes: int, op_names) -> tuple:
    """The supernet cell as a genotype: every edge with every op."""
    return tuple((source, target, tuple(op_names)) for source, target in cell_edges(num_nodes))


def check_genotype(genotype, num_nodes: int) -> tuple:
    """The genotype's edges as ((source, target, op names), ...) sorted by target, then source.

    Raises ValueError for an edge outside the cell, an edge without ops, a
    cell without edges, or an edge leaving a node that has no incoming edge.
    """
    edges = tuple(
        sorted(
            ((int(source), int(target), tuple(names)) for source, target, names in genotype),
            key=lambda edge: (edge[1], edge[0]),
        )
    )
    for source, target, names in edges:
        if not (2 <= target < num_nodes + 2 and 0 <= source < target and names):
            raise ValueError(
                f"Received an invalid genotype edge, expected 0 <= source < target <= "
                f"{num_nodes + 1} with at least one op. Received: {(source, target, names)}"
            )
    if not edges:
        raise ValueError("Received a genotype without edges: the cell would have no output.")
    alive = {target for _, target, _ in edges}
    dangling = sorted({s for s, _, _ in edges if s >= 2 and s not in alive})
    if dangling:
        raise ValueError(
            f"Received a genotype with edges leaving dead nodes {dangling}: a node an edge "
            "reads must have an incoming edge itself."
        )
    return edges


class Cell(BuiltOnCall, keras.layers.Layer):
    """Eq. 2: node i = Σ_j edge_weight(i, j) · MixedOp_{j→i}(node j).

    Inputs are the outputs of the two previous cells; the output concatenates
    the intermediate nodes. Parameter-free operations (pooling with its
    affine-free BN, identity) give the same output on every edge leaving a
    node, so `source_ops` computes them once per node.

    `genotype` selects a searched cell: a tuple of (source, target, op names)
    for the edges that survive. Nodes without a surviving incoming edge are
    dead and left out of the output; input nodes no edge reads are not
    computed. None (the default) is the full supernet cell.

    With channel masks a searched cell keeps only some channels: `kept`, the
    indices (of `channels`) that every node of the cell keeps, and `middle`,
    {(source, target, op name): count} of the middle channels each separable
    convolution keeps. The cell then computes `width` = len(kept) channels.
    """

    def __init__(
        self,
        channels: int,
        num_nodes: int,
        reduction: bool,
        reduction_prev: bool,
        op_names=OP_NAMES,
        genotype=None,
        kept=None,
        middle=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", FLOAT32)  # see maskable.FLOAT32
        super().__init__(**kwargs)
        self.channels = channels
        self.num_nodes = num_nodes
        self.reduction = reduction
        self.reduction_prev = reduction_prev
        self.op_names = tuple(op_names)
        self.kept = None if kept is None else tuple(int(c) for c in kept)
        self.middle = dict(middle or {})
        self.width = channels if kept is None else len(self.kept)
        if genotype is None:
            genotype = full_genotype(num_nodes, self.op_names)
        self.genotype = check_genotype(genotype, num_nodes)
        self.alive_nodes = tuple(sorted({target for _, target, _ in self.genotype}))
        used_sources = {source for source, _, _ in self.genotype}
        self.preprocess_0 = self.preprocess_1 = None
        if 0 in used_sources:
            if reduction_prev:
                self.preprocess_0 = FactorizedReduce(
                    self.width, split=half_split(channels, self.kept), name="preprocess_0"
                )
            else:
                self.preprocess_0 = ReLUConvBN(self.width, name="preprocess_0")
        if 1 in used_sources:
            self.preprocess_1 = ReLUConvBN(self.width, name="preprocess_1")
        self.source_ops = [self._shared_ops(source) for source in range(num_nodes + 1)]
        self.edge_ops = [
            MixedOp(
                self.width,
                self._stride(source),
                self.op_names,
                shared_op_names=tuple(self.source_ops[source]),
                active=names,
                options=self._op_options(source, target, names),
                name=f"edge_{source}_{target}",
            )
            for source, target, names in self.genotype
        ]

    def _stride(self, source: int) -> int:
        return 2 if self.reduction and source < 2 else 1

    def _op_options(self, source: int, target: int, names) -> dict:
        """The pruned channels of the ops of one edge, as `build_op` options."""
        options = {}
        for name in names:
            if (source, target, name) in self.middle:
                options[name] = {"middle": self.middle[source, target, name]}
            elif name == "skip_connect" and self.kept is not None and self._stride(source) == 2:
                options[name] = {"split": half_split(self.channels, self.kept)}
        return options

    def _shared_ops(self, source: int) -> dict:
        """The parameter-free ops that edges leaving `source` use, computed once per node."""
        stride = self._stride(source)
        needed = {name for s, _, names in self.genotype if s == source for name in names}
        return {
            name: build_op(name, self.width, stride, name=f"node_{source}_{name}")
            for name in self.op_names
            if name in needed and is_parameter_free(name, stride)
        }

    def call(self, s0, s1, op_weights, edge_weights, training=None):
        """op_weights: [num_edges, num_ops]; edge_weights: [num_edges], in edge order."""
        nodes = {}
        if self.preprocess_0 is not None:
            nodes[0] = self.preprocess_0(s0, training=training)
        if self.preprocess_1 is not None:
            nodes[1] = self.preprocess_1(s1, training=training)
        shared = {}
        op_weights, edge_weights = tf.unstack(op_weights), tf.unstack(edge_weights)
        for (source, target, _), mixed_op in zip(self.genotype, self.edge_ops, strict=True):
            if source not in shared:
                shared[source] = {
                    name: op(nodes[source], training=training)
                    for name, op in self.source_ops[source].items()
                }
            index = edge_index(source, target)
            mixed = mixed_op(nodes[source], op_weights[index], shared[source], training=training)
            nodes[target] = nodes.get(target, 0.0) + edge_weights[index] * mixed
        return ops.concatenate([nodes[node] for node in self.alive_nodes], axis=-1)

    def kernel_layers(self) -> list:
        """The maskable kernels of this cell: preprocessing, then every edge's ops."""
        layers = []
        for preprocess in (self.preprocess_0, self.preprocess_1):
            if preprocess is not None:
                layers += preprocess.kernel_layers()
        for mixed_op in self.edge_ops:
            layers += mixed_op.kernel_layers()
        return layers

    def get_config(self):
        config = super().get_config()
        config.update(
            channels=self.channels,
            num_nodes=self.num_nodes,
            reduction=self.reduction,
            reduction_prev=self.reduction_prev,
            op_names=list(self.op_names),
            genotype=[[s, t, list(n)] for s, t, n in self.genotype],
            kept=None if self.kept is None else list(self.kept),
            middle=[[s, t, n, m] for (s, t, n), m in self.middle.items()],
        )
        return config
