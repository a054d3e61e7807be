import numpy as np
import pytest
from keras import ops

from hmnas_keras.space.cell import Cell, MixedOp
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
