"""Deriving architectures, architecture.json, the searched network and fine-tuning."""

import json
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from hmnas_keras.architecture import architecture_json as arch_lib
from hmnas_keras.architecture.baselines import darts_masks, random_masks
from hmnas_keras.architecture.counting import flop_counts, parameter_counts
from hmnas_keras.architecture.derivation import derive_cell
from hmnas_keras.architecture.searched_network import (
    SearchedNetwork,
    inherit_weights,
    to_searched,
)
from hmnas_keras.checkpoint import relative_path
from hmnas_keras.pipeline.finetune_phase import pruned_weights_are_zero
from hmnas_keras.space.maskable import MaskableConv2D, MaskableDense, PointwiseConv
from hmnas_keras.space.search_space import SearchSpace, edge_index
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.finetune import FineTune
from hmnas_keras.training.masking import MaskedSearch

OPS = ("sep_conv_3x3", "max_pool_3x3", "skip_connect")
SPACE = SearchSpace(num_cells=3, channels=4, num_nodes=3, op_names=OPS)
EDGES = SPACE.edges  # (0,2) (1,2) (0,3) (1,3) (2,3) (0,4) (1,4) (2,4) (3,4)
SMALL = SearchSpace(num_cells=2, channels=4, num_nodes=2, op_names=OPS)  # faster to trace


def _hand_masks():
    """Node 2 dead (edge 0->2 masked, 1->2 without ops); 2->3 and 2->4 dangle."""
    alpha = np.ones((9, 3), dtype=bool)
    beta = np.ones(9, dtype=bool)
    beta[edge_index(0, 2)] = False
    alpha[edge_index(1, 2)] = False
    alpha[edge_index(0, 3)] = [True, False, True]
    alpha[edge_index(1, 3)] = [False, True, False]
    beta[edge_index(0, 4)] = beta[edge_index(1, 4)] = False
    alpha[edge_index(3, 4)] = [True, False, False]
    return alpha, beta


def test_derivation_on_hand_set_masks():
    alpha, beta = _hand_masks()
    op_weights = np.full((9, 3), 1 / 3)
    edge_weights = np.array([0.5, 0.5, 0.2, 0.3, 0.5, 0.1, 0.2, 0.3, 0.4])
    cell = derive_cell(OPS, 3, op_weights * alpha, edge_weights * beta, alpha, beta)
    assert [(e["source"], e["target"], [o["name"] for o in e["ops"]]) for e in cell["edges"]] == [
        (0, 3, ["sep_conv_3x3", "skip_connect"]),
        (1, 3, ["max_pool_3x3"]),
        (3, 4, ["sep_conv_3x3"]),
    ]
    assert cell["edges"][0]["weight"] == 0.2 and cell["edges"][0]["ops"][1]["weight"] == 0.333333
    assert cell["alive_nodes"] == [3, 4] and cell["dead_nodes"] == [2]
    assert cell["incoming_edges"] == {"2": 0, "3": 2, "4": 1}
    reasons = {(p["source"], p["target"]): p["reason"] for p in cell["pruned_edges"]}
    assert reasons == {
        (0, 2): "edge masked",
        (1, 2): "every op masked",
        (2, 3): "source node dead",
        (0, 4): "edge masked",
        (1, 4): "edge masked",
        (2, 4): "source node dead",
    }
    assert cell["ops_kept"] == 4 and cell["ops_total"] == 27


def test_architecture_json_round_trip_and_errors(tmp_path):
    alpha, beta = _hand_masks()
    cell = derive_cell(OPS, 3, np.full((9, 3), 0.3), np.full(9, 0.5), alpha, beta)
    architecture = arch_lib.new_architecture(
        "masks", SPACE, 10, (8, 8, 3), list("abcdefghij"), {"normal": cell, "reduce": cell}
    )
    assert architecture["degenerate"] is None
    path = str(tmp_path / "architecture.json")
    arch_lib.write_architecture(architecture, path)
    assert arch_lib.read_architecture(path) == json.loads(json.dumps(architecture))
    assert arch_lib.genotypes(architecture)["normal"] == (
        (0, 3, ("sep_conv_3x3", "skip_connect")),
        (1, 3, ("max_pool_3x3",)),
        (3, 4, ("sep_conv_3x3",)),
    )
    op_w, edge_w = arch_lib.weight_matrices(architecture)["reduce"]
    assert op_w.shape == (9, 3) and op_w[edge_index(0, 3)].tolist() == pytest.approx([0.3, 0, 0.3])
    assert edge_w[edge_index(0, 2)] == 0 and edge_w[edge_index(3, 4)] == 0.5
    assert arch_lib.summary_counts(architecture) == {
        "ops": 8, "ops_total": 54, "edges": 6, "edges_total": 18, "nodes": 4, "nodes_total": 6
    }  # fmt: skip

    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(arch_lib.ArchitectureError, match="not an hmnas_keras architecture"):
        arch_lib.read_architecture(str(tmp_path / "bad.json"))
    (tmp_path / "v9.json").write_text(json.dumps({**architecture, "version": 9}))
    with pytest.raises(arch_lib.ArchitectureError, match="version 9"):
        arch_lib.read_architecture(str(tmp_path / "v9.json"))
    with pytest.raises(arch_lib.ArchitectureError, match="No architecture file"):
        arch_lib.read_architecture(str(tmp_path / "missing.json"))


def test_a_cell_without_surviving_nodes_is_reported_not_built():
    alpha = np.zeros((9, 3), dtype=bool)
    cell = derive_cell(OPS, 3, np.zeros((9, 3)), np.zeros(9), alpha)
    ok = derive_cell(OPS, 3, np.ones((9, 3)), np.ones(9), ~alpha)
    architecture = arch_lib.new_architecture(
        "masks", SPACE, 10, (8, 8, 3), list("abcdefghij"), {"normal": ok, "reduce": cell}
    )
    assert "every node of the reduce cell was pruned" in architecture["degenerate"]
    with pytest.raises(arch_lib.ArchitectureError, match="cannot be built"):
        SearchedNetwork(architecture)
    masks = {"classifier/kernel": np.zeros((2, 2), dtype=bool)}
    architecture = arch_lib.new_architecture(
        "masks", SPACE, 10, (8, 8, 3), list("abcdefghij"), {"normal": ok, "reduce": ok}
    )
    assert architecture["degenerate"] is None
    assert "classifier/kernel was masked" in arch_lib.degenerate_reason(architecture, masks)


def test_darts_heuristic_picks_the_strongest_op_and_top_two_edges():
    op_weights = np.array(
        [
            [0.6, 0.3, 0.1],  # 0->2
            [0.2, 0.7, 0.1],  # 1->2
            [0.5, 0.4, 0.1],  # 0->3: strength 0.5 * 0.2 = 0.10
            [0.1, 0.1, 0.8],  # 1->3: strength 0.8 * 0.5 = 0.40
            [0.3, 0.3, 0.4],  # 2->3: strength 0.4 * 0.3 = 0.12
        ]
    )
    edge_weights = np.array([0.5, 0.5, 0.2, 0.5, 0.3])
    alpha, beta = darts_masks(op_weights, edge_weights, 2, multi_level=True)
    assert beta.tolist() == [True, True, False, True, True]
    assert alpha.argmax(axis=1).tolist() == [0, 1, 0, 2, 2] and alpha.sum() == 5
    # Single-level: β plays no part; strengths are 0.5, 0.8, 0.4 -> edges 0->3 and 1->3.
    _, beta = darts_masks(op_weights, edge_weights, 2, multi_level=False)
    assert beta.tolist() == [True, True, True, True, False]


def test_random_architecture_is_darts_shaped_and_seeded():
    first = random_masks(7, 4, np.random.default_rng([3, 11]))
    again = random_masks(7, 4, np.random.default_rng([3, 11]))
    other = random_masks(7, 4, np.random.default_rng([4, 11]))
    np.testing.assert_array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])
    alpha, beta = first
    start = 0
    for target in range(2, 6):
        assert beta[start : start + target].sum() == 2
        start += target
    assert (alpha.sum(axis=1) == beta).all()


def test_darts_and_random_cells_have_unit_weights_and_hmnas_cells_keep_softmax():
    from hmnas_keras.config import RunConfig
    from hmnas_keras.pipeline.derive_phase import derived_cells, derived_masks

    rng = np.random.default_rng(0)
    softmax = {
        cell_type: (rng.dirichlet(np.ones(3), size=5), rng.uniform(0.2, 0.6, size=5))
        for cell_type in SMALL.present_cell_types
    }
    supernet = types.SimpleNamespace(
        op_weights=lambda cell_type: softmax[cell_type][0],
        edge_weights=lambda cell_type: softmax[cell_type][1],
    )
    weights = {}
    for derivation, sample in (("darts", 0), ("random", 0), ("random", 1), ("masks", 0)):
        config = RunConfig(
            search_space=SMALL, derivation=derivation, phases=("finetune",), random_sample=sample
        )
        learned = {"alpha": {t: np.ones((5, 3), bool) for t in softmax}, "beta": {}}
        masks = derived_masks(config, supernet, learned if derivation == "masks" else None)
        cells = derived_cells(config, supernet, masks)
        weights[derivation, sample] = [
            (edge["weight"], op["weight"])
            for cell in cells.values()
            for edge in cell["edges"]
            for op in edge["ops"]
        ]
        if derivation == "random":
            weights[derivation, sample, "masks"] = [m.tolist() for m in masks["alpha"].values()]
    # Two nodes of two edges, one op each, per cell type; every weight 1.
    assert len(weights["darts", 0]) == 4 * len(SMALL.present_cell_types)
    assert set(weights["darts", 0]) == {(1.0, 1.0)}
    assert set(weights["random", 0]) == {(1.0, 1.0)}
    # Sample 0 is the architecture drawn before --random_sample; sample 1 another one.
    assert weights["random", 0, "masks"] != weights["random", 1, "masks"]
    assert all(0 < op < 1 and 0 < edge < 1 for edge, op in weights["masks", 0])


def _masked_supernet(seed=0, prune=0.3, space=SPACE):
    keras.utils.set_random_seed(seed)
    supernet = Supernet(space, 3, name="supernet")
    x = np.random.default_rng(seed).normal(size=(4, 8, 8, 3)).astype("float32")
    supernet(x, training=True)  # moving statistics move away from their initial values
    rng = np.random.default_rng(seed)
    for variable in supernet.arch_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    masked = MaskedSearch(supernet)
    for mask in masked.weight_masks.values():
        mask.assign(np.where(rng.random(mask.shape) < prune, 0.0, 1e-2).astype("float32"))
    return supernet, masked, x


def _searched_from(supernet, masked, alpha, beta):
    space = supernet.search_space
    binary = masked.binary_masks()
    cells = {}
    for cell_type in space.present_cell_types:
        masked.alpha_masks[cell_type].assign(np.where(alpha, 1e-2, 0.0).astype("float32"))
        masked.beta_masks[cell_type].assign(np.where(beta, 1e-2, 0.0).astype("float32"))
        op_w = ops.convert_to_numpy(supernet.op_weights(cell_type)) * alpha
        edge_w = ops.convert_to_numpy(supernet.edge_weights(cell_type)) * beta
        cells[cell_type] = derive_cell(OPS, space.num_nodes, op_w, edge_w, alpha, beta, digits=12)
    architecture = arch_lib.new_architecture("masks", space, 3, (8, 8, 3), list("abc"), cells)
    network = SearchedNetwork(architecture, name="searched").build_network()
    inherit_weights(
        network,
        architecture,
        {relative_path(v.path): ops.convert_to_numpy(v) for v in supernet.variables},
    )
    masks = {relative_path(p): m for p, m in binary["weights"].items()}
    network.apply_weight_masks(to_searched(architecture, masks))
    return architecture, network, to_searched(architecture, masks)


def test_searched_network_equals_the_masked_supernet_with_a_dead_node():
    supernet, masked, x = _masked_supernet()
    alpha, beta = _hand_masks()
    architecture, network, _ = _searched_from(supernet, masked, alpha, beta)
    # The dead node 2 left the output: next cells read 2 of 3 node outputs.
    assert network.cells[1].preprocess_1.conv.kernel.shape == (1, 1, 8, 8)
    assert network.classifier.kernel.shape == (32, 3)  # 2 of 3 nodes of 16 channels
    assert "edge_1_2" not in [op.name for op in network.cells[0].edge_ops]
    # Training mode (batch statistics): exactly the masked supernet's function.
    np.testing.assert_allclose(
        ops.convert_to_numpy(network(x, training=True)),
        ops.convert_to_numpy(supernet(x, training=True)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert parameter_counts(network.trainable_variables)["dense"] < sum(
        int(np.prod(v.shape)) for v in supernet.weight_variables
    )


def test_searched_network_with_several_ops_per_edge_equals_it_in_inference():
    supernet, masked, x = _masked_supernet(seed=1, space=SMALL)
    alpha = np.ones((5, 3), dtype=bool)
    alpha[edge_index(2, 3), 1] = False
    beta = np.ones(5, dtype=bool)
    beta[edge_index(0, 3)] = False
    _, network, _ = _searched_from(supernet, masked, alpha, beta)
    np.testing.assert_allclose(
        ops.convert_to_numpy(network(x, training=False)),
        ops.convert_to_numpy(supernet(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


# Large (suite time): the pipeline test checks the same on its fine-tuned run
# (finetune/summary.json's pruned_weights_zero).
@pytest.mark.large
def test_pruned_weights_stay_exactly_zero_through_fine_tuning():
    supernet, masked, x = _masked_supernet(seed=2, prune=0.5, space=SMALL)
    alpha, beta = np.ones((5, 3), dtype=bool), np.ones(5, dtype=bool)
    _, network, masks = _searched_from(supernet, masked, alpha, beta)
    assert pruned_weights_are_zero(network, masks)
    before = {v.path: ops.convert_to_numpy(v) for v in network.trainable_variables}
    finetune = FineTune(network, weight_decay=1e-2, grad_clip_norm=5.0)
    finetune.compile(keras.optimizers.SGD(0.1, momentum=0.9))
    finetune.build_finetune()
    labels = np.array([0, 1, 2, 0])
    dataset = tf.data.Dataset.from_tensors((x, labels)).repeat(3)
    finetune.fit(dataset, epochs=1, verbose=0, shuffle=False)
    assert pruned_weights_are_zero(network, masks)
    for layer in network.kernel_layers():
        kernel = ops.convert_to_numpy(layer.kernel)
        mask = masks[relative_path(layer.kernel.path)]
        assert np.all(kernel[~mask] == 0.0), layer.kernel.path
        assert np.any(kernel[mask] != before[layer.kernel.path][mask]), layer.kernel.path


def test_mac_counts_of_each_kernel_layer():
    inputs = keras.Input((8, 8, 3))
    conv = MaskableConv2D(4, 3, padding="same", use_bias=False)
    pointwise = PointwiseConv(6, strides=2)
    dense = MaskableDense(5)
    features = keras.layers.GlobalAveragePooling2D()(pointwise(conv(inputs)))
    model = keras.Model(inputs, dense(features))
    model(np.zeros((1, 8, 8, 3), "float32"))
    network = types.SimpleNamespace(name="tiny", kernel_layers=lambda: [conv, pointwise, dense])
    counts = flop_counts(network)
    macs = counts["macs"]
    assert macs == 8 * 8 * (3 * 3 * 3 * 4) + 4 * 4 * (4 * 6) + 6 * 5
    assert counts["nonzero_macs"] == macs
    kernel = ops.convert_to_numpy(conv.kernel).copy()
    kernel[..., :2] = 0.0
    conv.kernel.assign(kernel)
    assert flop_counts(network)["nonzero_macs"] == macs - 8 * 8 * (3 * 3 * 3 * 2)


def test_a_searched_network_shares_the_edges_of_repeated_kinds_with_the_same_results():
    """Fine-tuning's `share_edge_calls(network, repeated_only=True)`: edges whose kind
    repeats call one traced function (with constant weight masks), the others stay
    plain; loss, gradients and BatchNorm statistics equal those of the unshared network."""
    from conftest import real_images, searched_network, traced_loss_and_gradients

    from hmnas_keras.checkpoint import relative_path
    from hmnas_keras.space.cell import _edge_kind, share_edge_calls

    _, shared = searched_network()
    _, plain = searched_network()
    for network in (shared, plain):
        network.apply_weight_masks(
            {
                relative_path(layer.kernel.path): (np.asarray(layer.kernel) != 0).astype("float32")
                for layer in network.kernel_layers()
            }
        )
    share_edge_calls(shared, repeated_only=True)
    edges = [op for cell in shared.cells if cell is not None for op in cell.edge_ops]
    kinds = [_edge_kind(op) for op in edges]
    repeated = [kinds.count(kind) > 1 for kind in kinds]
    assert [op.shared_calls is not None for op in edges] == repeated
    assert any(repeated) and not all(repeated)
    images = real_images(4)
    labels = np.array([0, 1, 2, 1])

    shared_loss, shared_grads = traced_loss_and_gradients(shared, images, labels)
    plain_loss, plain_grads = traced_loss_and_gradients(plain, images, labels)
    np.testing.assert_allclose(float(shared_loss), float(plain_loss), rtol=1e-6)
    for got, expected in zip(shared_grads, plain_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-6)
    for got, expected in zip(shared.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
