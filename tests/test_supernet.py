import numpy as np
import pytest
from keras import ops

from hmnas_keras.space.cell import Cell, MixedOp
from hmnas_keras.space.operations import SepConv
from hmnas_keras.space.search_space import SearchSpace
from hmnas_keras.space.supernet import Supernet, segment_softmax

OPS = ("sep_conv_3x3", "max_pool_3x3", "skip_connect")


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_mixed_op_is_the_weighted_sum_of_its_ops():
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype("float32")
    mixed = MixedOp(4, 1, OPS)
    weights = np.array([0.2, 0.5, 0.3], "float32")
    output = np.asarray(mixed(x, weights, training=False))
    expected = sum(
        w * np.asarray(mixed.candidates[name](x, training=False)) for w, name in zip(weights, OPS)
    )
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-6)


def test_cell_follows_eq2_by_hand():
    rng = np.random.default_rng(1)
    s0 = rng.normal(size=(2, 6, 6, 5)).astype("float32")
    s1 = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    cell = Cell(4, num_nodes=2, reduction=False, reduction_prev=False, op_names=OPS)
    alpha = rng.normal(size=(5, 3)).astype("float32")
    beta = rng.normal(size=(5,)).astype("float32")
    op_w = np.stack([_softmax(a) for a in alpha])
    edge_w = np.concatenate([_softmax(beta[:2]), _softmax(beta[2:])])
    np.testing.assert_allclose(np.asarray(segment_softmax(beta, 2)), edge_w, rtol=1e-6)
    output = np.asarray(cell(s0, s1, op_w, edge_w, training=False))

    p0 = np.asarray(cell.preprocess_0(s0, training=False))
    p1 = np.asarray(cell.preprocess_1(s1, training=False))

    def edge(index, source, x):
        # Parameter-free ops (pooling, identity) are computed once per source node.
        own, shared = cell.edge_ops[index].candidates, cell.source_ops[source]
        assert set(own) | set(shared) == set(OPS) and not set(own) & set(shared)
        return sum(
            op_w[index, k] * np.asarray((own.get(name) or shared[name])(x, training=False))
            for k, name in enumerate(OPS)
        )

    node2 = edge_w[0] * edge(0, 0, p0) + edge_w[1] * edge(1, 1, p1)
    node3 = edge_w[2] * edge(2, 0, p0) + edge_w[3] * edge(3, 1, p1) + edge_w[4] * edge(4, 2, node2)
    np.testing.assert_allclose(output, np.concatenate([node2, node3], -1), rtol=1e-4, atol=1e-5)


def test_building_a_supernet_runs_each_cell_and_edge_once(monkeypatch):
    # Keras builds a layer without a build() by running call() symbolically first, and
    # every nested layer again inside that run; BuiltOnCall's build() leaves it to the call.
    calls = {"cell": 0, "edge": 0, "sep_conv": 0}
    for key, cls in (("cell", Cell), ("edge", MixedOp), ("sep_conv", SepConv)):
        original = cls.call

        def counted(self, *args, key=key, original=original, **kwargs):
            calls[key] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "call", counted)
    space = SearchSpace(
        num_cells=2, channels=4, num_nodes=2, op_names=("sep_conv_3x3", "skip_connect")
    )
    net = Supernet(space, 3)
    net(ops.zeros((1, 8, 8, 3)), training=False)
    assert calls == {"cell": 2, "edge": 10, "sep_conv": 10}
    assert all(layer.built for layer in net._flatten_layers())


def test_reduction_cell_halves_the_size():
    x = np.ones((1, 8, 8, 4), "float32")
    cell = Cell(6, num_nodes=2, reduction=True, reduction_prev=False, op_names=OPS)
    weights = np.full((5, 3), 1 / 3, "float32")
    assert tuple(cell(x, x, weights, np.ones(5, "float32")).shape) == (1, 4, 4, 12)


def test_single_level_mode_has_uniform_edge_weights_and_no_beta():
    space = SearchSpace(num_cells=3, channels=4, num_nodes=3, op_names=OPS, multi_level=False)
    net = Supernet(space, 3)
    net(np.zeros((1, 8, 8, 3), "float32"))
    assert net.betas == {}
    expected = [1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1 / 4, 1 / 4, 1 / 4, 1 / 4]
    for cell_type in ("normal", "reduce"):
        np.testing.assert_allclose(np.asarray(net.edge_weights(cell_type)), expected, rtol=1e-6)


def test_arch_and_weight_variables_are_complete_and_disjoint():
    space = SearchSpace(num_cells=3, channels=4, num_nodes=2, op_names=OPS)
    net = Supernet(space, 3)
    logits = net(np.zeros((2, 8, 8, 3), "float32"))
    assert tuple(logits.shape) == (2, 3)
    arch = {id(v) for v in net.arch_variables}
    weights = {id(v) for v in net.weight_variables}
    assert len(arch) == 4 and arch.isdisjoint(weights)
    assert arch | weights == {id(v) for v in net.trainable_variables}
    assert net.arch_variables[0] is net.alphas["normal"]
    assert tuple(net.alphas["reduce"].shape) == (5, 3)
    assert tuple(net.betas["normal"].shape) == (5,)


def test_reduction_cells_sit_at_one_and_two_thirds():
    assert SearchSpace(num_cells=8).reduction_cells == (2, 5)
    assert SearchSpace(num_cells=3).cell_types == ("normal", "reduce", "reduce")
    assert SearchSpace(num_cells=2).present_cell_types == ("reduce",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channels": 0}, "channels, expected a positive integer"),
        ({"op_names": ("conv_9x9",)}, "expected distinct names"),
        ({"op_names": ()}, "empty op_names"),
    ],
)
def test_search_space_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_edge_weights_sum_to_one_per_node():
    space = SearchSpace(num_cells=1, channels=4, num_nodes=3, op_names=OPS)
    net = Supernet(space, 3)
    net(np.zeros((1, 8, 8, 3), "float32"))
    net.betas["reduce"].assign(np.arange(9, dtype="float32"))
    weights = np.asarray(net.edge_weights("reduce"))
    np.testing.assert_allclose(
        [weights[:2].sum(), weights[2:5].sum(), weights[5:].sum()], 1, rtol=1e-6
    )
    assert float(ops.sum(net.op_weights("reduce"))) == pytest.approx(9.0, rel=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_edges_of_one_kind_share_one_traced_function_and_compute_what_each_edge_would(
    recompute,
):
    """Traced, the supernet calls one function per kind of edge (`SharedCalls`); the loss,
    every gradient (weights, α, β, kernel and BatchNorm-output masks), every edge's
    BatchNorm statistics and the recorded output positions equal those of edge-by-edge
    calls: with the edges' activations kept for the backward pass, or recomputed there."""
    import keras
    from conftest import traced_loss_and_gradients

    from hmnas_keras.space.maskable import MaskableBatchNormalization

    rng = np.random.default_rng(3)
    space = SearchSpace(num_cells=2, channels=4, num_nodes=2, op_names=OPS)
    images = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    networks = []
    for shared in (True, False):
        network = Supernet(space, num_classes=3, recompute=recompute and shared)
        network(images[:1], training=False)
        if not shared:
            network.set_weights(networks[0][0].get_weights())
            for cell in network.cells:
                for mixed_op in cell.edge_ops:
                    mixed_op.shared_calls = None
        # Masks read `scale`, so that their gradients flow: half the entries of each kernel,
        # and the outputs of the BatchNormalizations inside the first edge of each cell.
        scale = keras.Variable(1.5, name="mask_scale")
        mask_rng = np.random.default_rng(4)
        for layer in network.kernel_layers():
            mask = (mask_rng.random(layer.kernel.shape) < 0.5).astype("float32")
            layer.set_kernel_mask(lambda mask=mask, scale=scale: scale * mask)
        for cell in network.cells:
            for norm in cell.edge_ops[0]._flatten_layers():
                if isinstance(norm, MaskableBatchNormalization):
                    mask = (mask_rng.random(norm.moving_mean.shape) < 0.5).astype("float32")
                    norm.set_output_mask(lambda mask=mask, scale=scale: scale * mask)
        networks.append((network, scale))

    (shared, shared_scale), (plain, plain_scale) = networks
    shared_loss, shared_grads = traced_loss_and_gradients(shared, images, labels, [shared_scale])
    plain_loss, plain_grads = traced_loss_and_gradients(plain, images, labels, [plain_scale])
    np.testing.assert_allclose(float(shared_loss), float(plain_loss), rtol=1e-6)
    names = [v.path for v in shared.trainable_variables] + ["mask_scale"]
    assert [n for n, g in zip(names, shared_grads) if g is None] == []
    assert len(shared_grads) == len(plain_grads) > 2 + 4 * 10
    for got, expected in zip(shared_grads, plain_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)
    for got, expected in zip(shared.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    moving = [np.asarray(v) for v in shared.non_trainable_variables if "moving_mean" in v.path]
    assert len({m.tobytes() for m in moving}) == len(moving)  # each edge its own statistics
    positions = [layer.output_positions for layer in shared.kernel_layers()]
    assert None not in positions
    assert positions == [layer.output_positions for layer in plain.kernel_layers()]
    calls = shared.cells[0].edge_ops[0].shared_calls
    # Per cell, its 4 stride-2 edges and its stride-1 edge; the first edge's masked
    # BatchNormalization outputs make it a kind of its own: 6 kinds traced for 10 edges.
    assert sum(len(cell.edge_ops) for cell in shared.cells) == 10
    forward = [key for key in calls._functions if key[0] != "backward"]
    assert sum(1 for key in forward if key[-1]) == 6  # key[-1]: training
    # Recomputing, a backward function per kind (all gradients); else TensorFlow's own.
    assert len(calls._functions) - len(forward) == (6 if recompute else 0)
    assert all(op.shared_calls is calls for cell in shared.cells for op in cell.edge_ops)


def test_a_shared_edge_function_differentiates_its_output_and_not_its_moving_statistics():
    """The updated BatchNorm statistics leave a shared edge function as one vector without
    a gradient (their update is not part of the loss), so the backward function holds none
    of their arithmetic; the op weights are unstacked, not sliced one by one; and the
    statistics the edge assigns are those of an edge-by-edge call."""
    import tensorflow as tf

    space = SearchSpace(num_cells=1, channels=4, num_nodes=2, op_names=OPS)
    network = Supernet(space, num_classes=3)
    images = np.random.default_rng(7).normal(size=(2, 8, 8, 3)).astype("float32")
    network(images[:1], training=False)
    mixed_op = network.cells[0].edge_ops[-1]  # node 2 -> node 3: stride 1
    shape = (2, 4, 4, mixed_op.channels)  # a reduction cell: 4x4, twice the channels
    x = tf.constant(np.random.default_rng(8).normal(size=shape).astype("float32"))
    op_weights = tf.constant([0.2, 0.3, 0.5])
    trainable = [tf.convert_to_tensor(v) for v in mixed_op.trainable_variables]
    non_trainable = [tf.convert_to_tensor(v) for v in mixed_op.non_trainable_variables]
    function = mixed_op.shared_calls._trace(mixed_op, training=True)
    shared = {"max_pool_3x3": x * 0.5, "skip_connect": x}
    arguments = (trainable, non_trainable, [None] * 4, [None] * 2, x, op_weights, shared)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, op_weights, *trainable, *non_trainable])
        output, statistics = function(*arguments)
        loss = tf.reduce_sum(output * output)
        statistics_sum = tf.reduce_sum(statistics)
    inputs = [x, op_weights, *trainable, *non_trainable]
    # A function's backward returns zeros, not None, for inputs it reads.
    assert all(g is None or not np.any(g) for g in tape.gradient(statistics_sum, inputs))
    assert all(g is not None for g in tape.gradient(loss, [x, op_weights, *trainable]))
    # The sep conv's two BNs: mean and variance each, in the variables' order.
    assert len(non_trainable) == 4 and statistics.shape == (4 * mixed_op.channels,)
    mixed_op.shared_calls, calls = None, mixed_op.shared_calls
    before = [v.numpy() for v in mixed_op.non_trainable_variables]
    mixed_op(x, op_weights, shared, training=True)  # eagerly, edge by edge
    expected = np.concatenate([v.numpy() for v in mixed_op.non_trainable_variables])
    np.testing.assert_allclose(statistics, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.concatenate(before), expected)
    mixed_op.shared_calls = calls
    kinds = [op.type for op in function.get_concrete_function(*arguments).graph.get_operations()]
    assert kinds.count("Unpack") == 1 and "StridedSlice" not in kinds
    # The moving averages of all four statistics: one product per factor and one sum.
    graph = function.get_concrete_function(*arguments).graph
    update = graph.structured_outputs[1].op
    while update.type in ("Identity", "StopGradient"):
        update = update.inputs[0].op
    assert update.type == "AddV2"
    assert [t.op.type for t in update.inputs] == ["Mul", "Mul"]
    assert [t.op.inputs[0].op.type for t in update.inputs] == ["ConcatV2", "ConcatV2"]


def test_weighted_sum_differentiates_as_the_plain_sum_with_a_smaller_graph():
    """Eq. 1's sum in a training graph: the same values and, bit for bit, the same gradients
    as the plain sum, without a reshape or shape constants per weight (TensorFlow's graph
    gradients, as a shared edge function's backward function is built)."""
    import tensorflow as tf

    from hmnas_keras.space.cell import weighted_sum

    rng = np.random.default_rng(5)
    weights = tf.constant([0.2, -0.3, 0.5, 0.1, 0.7])
    tensors = [tf.constant(rng.normal(size=(2, 3, 3, 4)).astype("float32")) for _ in range(3)]
    positions = [0, 2, 3]  # positions 1 and 4: ops the edge does not compute

    def traced(for_training):
        @tf.function(autograph=False)
        def gradients(weights, tensors):
            output = weighted_sum(weights, tensors, positions, for_training=for_training)
            return [output, *tf.gradients(tf.reduce_sum(output * output), [weights, *tensors])]

        results = gradients(weights, tensors)
        graph = gradients.get_concrete_function(weights, tensors).graph
        return results, [op.type for op in graph.get_operations()]

    (output, *grads), kinds = traced(True)
    (plain_output, *plain_grads), plain_kinds = traced(False)
    np.testing.assert_array_equal(output, plain_output)
    np.testing.assert_allclose(
        output, sum(float(weights[p]) * t for p, t in zip(positions, tensors)), rtol=1e-6
    )
    for got, expected in zip(grads, plain_grads, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert np.asarray(grads[0])[[1, 4]].tolist() == [0.0, 0.0]
    # A reshape per product and one for 0 + w·y, each with its constants, are gone.
    assert plain_kinds.count("Reshape") - kinds.count("Reshape") == len(positions) + 1
    assert len(kinds) < len(plain_kinds) - 15


def test_weighted_batch_norm_outputs_differentiate_without_keeping_the_outputs(monkeypatch):
    """A term w · BN(x) of Eq. 1 in a shared edge function (an affine-free fused batch norm,
    moving statistics deferred) differentiates, for w and x, to the plain sum's gradients,
    from the batch norm's gradient kernel: its output is read by the forward product only,
    so the backward pass does not keep it."""
    import tensorflow as tf

    from hmnas_keras.space import cell, operations

    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(4, 3, 3, 5)).astype("float32") * 2 + 1)
    other = tf.constant(rng.normal(size=(4, 3, 3, 5)).astype("float32"))
    weights = tf.constant([0.3, -0.6])
    norm = operations.FusedBatchNorm(momentum=0.9, epsilon=1e-5, center=False, scale=False)
    norm.build(x.shape)

    def traced():
        @tf.function(autograph=False)
        def gradients(weights, x, other):
            with operations.deferred_moving_statistics():
                normalised = norm(x, training=True)
            output = cell.weighted_sum(weights, [normalised, other], [0, 1])
            loss = tf.reduce_sum(output * output * tf.range(1.0, 6.0))
            return [output, *tf.gradients(loss, [weights, x, other])], normalised

        (results, normalised) = gradients(weights, x, other)
        concrete = gradients.get_concrete_function(weights, x, other)
        normalised = concrete.graph.outputs[-1].op.inputs[0]  # the batch norm's output
        return results, [c.type for c in normalised.consumers()]

    (output, *grads), consumers = traced()
    monkeypatch.setattr(cell, "scaled_batch_norm_outputs", lambda weight, outputs: None)
    (plain_output, *plain_grads), plain_consumers = traced()
    np.testing.assert_array_equal(output, plain_output)
    for got, expected in zip(grads, plain_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-5)
    assert abs(float(grads[0][0])) > 1e-3  # a gradient for w that is not zero
    # The product, and its gradient for w (Σ dy·y), read it; the fused gradient does not.
    assert sorted(plain_consumers) == ["Identity", "Mul", "Mul"]
    assert sorted(consumers) == ["Identity", "Mul"]


def test_recomputed_edges_keep_no_activations_and_the_architecture_step_skips_weights():
    """With `recompute`, the step's graph calls each edge's function for its outputs only
    (TensorFlow's forward function, which also returns what the backward pass reads, is
    never made) and differentiates it with one function per kind, not inlined; the same
    loss and gradients bit for bit. Inside `architecture_gradients_only` that function
    computes gradients for the edge's inputs and op weights only, and α's and β's
    gradients do not change."""
    import tensorflow as tf
    from keras import losses

    from hmnas_keras.space.cell import architecture_gradients_only

    rng = np.random.default_rng(8)
    space = SearchSpace(num_cells=2, channels=4, num_nodes=2, op_names=OPS)
    images = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])

    def step(network, variables, architecture_only=False):
        @tf.function(autograph=False)
        def traced():
            with tf.GradientTape() as tape:
                if architecture_only:
                    with architecture_gradients_only():
                        logits = network(images, training=True)
                else:
                    logits = network(images, training=True)
                loss = ops.mean(
                    losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
                )
            return loss, tape.gradient(loss, variables)

        results = traced()
        graph = traced.get_concrete_function().graph.as_graph_def()
        # The step's own calls of the edges' functions, and the functions defined.
        calls = [n.attr["f"].func.name for n in graph.node if n.op.endswith("PartitionedCall")]
        return results, (calls, graph.library)

    kept = Supernet(space, num_classes=3)
    kept(images[:1], training=False)
    recomputed = Supernet(space, num_classes=3, recompute=True)
    recomputed(images[:1], training=False)
    recomputed.set_weights(kept.get_weights())
    (loss, grads), kept_library = step(kept, kept.trainable_variables)
    (recomputed_loss, recomputed_grads), library = step(recomputed, recomputed.trainable_variables)
    assert float(recomputed_loss) == float(loss)
    for got, expected in zip(recomputed_grads, grads, strict=True):
        np.testing.assert_array_equal(got, expected)

    def kinds(calls):  # the function names without their numbers
        return {name.rstrip("0123456789_").removesuffix("_pure") for name in calls}

    # Kept: TensorFlow's forward functions (which return the activations) and their
    # backward functions; recomputed: the edge's plain function and the recomputing one.
    assert kinds(kept_library[0]) == {"__forward", "__inference___backward"}
    assert kinds(library[0]) == {"__inference", "__inference_backward"}, library[0]
    not_inlined = [f for f in library[1].function if "_noinline" in f.attr]
    assert len(not_inlined) == 4  # a backward function per kind of edge

    # The architecture step: α's and β's gradients only, none computed for the weights.
    arch = recomputed.arch_variables
    (_, arch_grads), arch_library = step(recomputed, arch, architecture_only=True)
    where = {id(v): i for i, v in enumerate(recomputed.trainable_variables)}
    for got, expected in zip(arch_grads, [grads[where[id(v)]] for v in arch], strict=True):
        np.testing.assert_array_equal(got, expected)

    def backward_outputs(library):
        return sorted(
            len(f.signature.output_arg) for f in library[1].function if "_noinline" in f.attr
        )

    every, weightless = backward_outputs(library), backward_outputs(arch_library)
    assert len(weightless) == len(every) == 4
    assert all(a < b for a, b in zip(weightless, every, strict=True))


def test_weighted_sum_leaves_other_identities_to_their_own_gradient():
    """A term whose tensor is another IdentityN's output (no overridden gradient) is the
    plain product, with TensorFlow's gradients."""
    import tensorflow as tf

    from hmnas_keras.space import cell

    x = tf.constant(np.arange(24, dtype="float32").reshape(2, 2, 2, 3) / 10)
    weights = tf.constant([0.5, 2.0])

    @tf.function(autograph=False)
    def traced(weights, x):
        a, b = tf.identity_n([x, x * 2.0])
        output = cell.weighted_sum(weights, [a, b], [0, 1])
        return [output, *tf.gradients(tf.reduce_sum(output * output), [weights, x])]

    output, weight_grad, x_grad = traced(weights, x)
    np.testing.assert_allclose(output, 0.5 * x + 4.0 * x, rtol=1e-6)
    np.testing.assert_allclose(x_grad, 2 * 4.5 * 4.5 * x, rtol=1e-5)
    np.testing.assert_allclose(
        weight_grad,
        [np.sum(2 * 4.5 * x * x), np.sum(2 * 4.5 * x * 2 * x)],
        rtol=1e-5,
    )
