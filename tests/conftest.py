import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", help="Also run tests marked large.")


def pytest_configure(config):
    """The tests trace with the entry points' default: Grappler off on a machine without a GPU."""
    from hmnas_keras.runtime import set_graph_optimization

    set_graph_optimization("auto")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large test: pass --run-large to run it")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


# The tiny digits run of the command-line tests (each adds its ops, epochs and phases).
TINY_DIGITS = [
    "--dataset=digits",
    "--noaugment",
    "--num_cells=2",
    "--channels=4",
    "--num_nodes=2",
    "--batch_size=16",
    "--train_subset=200",
    "--test_subset=50",
    "--threads=2",
]


# A tiny searched, "fine-tuned" run, exported once per session: the export and
# serving tests share it. Its cells cover every op kind (separable and dilated
# convolutions, both pools, identity and factorized-reduce skips, each at
# stride 1 and 2), a dead node and edges with several ops.
EXPORT_OPS = ("sep_conv_3x3", "dil_conv_3x3", "max_pool_3x3", "avg_pool_3x3", "skip_connect")
EXPORT_CLASSES = ["cat", "dog", "ship"]


def export_masks():
    """Masks of a 3-node cell: node 2 dead (its only edge masked), multi-op edges, one pruned op."""
    from hmnas_keras.space.search_space import edge_index

    alpha = np.ones((9, len(EXPORT_OPS)), dtype=bool)
    beta = np.ones(9, dtype=bool)
    beta[edge_index(0, 2)] = beta[edge_index(1, 2)] = False  # node 2 dead
    alpha[edge_index(0, 3), 1] = False  # dil_conv pruned on 0->3
    beta[edge_index(1, 4)] = False
    return alpha, beta


def searched_network(image_shape=(8, 8, 3), seed=0, class_names=EXPORT_CLASSES):
    """(architecture, SearchedNetwork) with random weights: kernels 30% zeros, BN statistics set."""
    import keras

    from hmnas_keras.architecture import architecture_json as arch_json
    from hmnas_keras.architecture.counting import flop_counts, parameter_counts
    from hmnas_keras.architecture.derivation import derive_cell
    from hmnas_keras.architecture.searched_network import SearchedNetwork
    from hmnas_keras.space.search_space import SearchSpace

    space = SearchSpace(num_cells=3, channels=4, num_nodes=3, op_names=EXPORT_OPS)
    rng = np.random.default_rng(seed)
    alpha, beta = export_masks()
    cells = {}
    for cell_type in space.present_cell_types:
        op_weights = rng.dirichlet(np.ones(len(EXPORT_OPS)), size=9)
        edge_weights = rng.uniform(0.1, 0.9, size=9)
        cells[cell_type] = derive_cell(
            EXPORT_OPS, 3, op_weights * alpha, edge_weights * beta, alpha, beta
        )
    architecture = arch_json.new_architecture(
        "masks", space, len(class_names), image_shape, class_names, cells
    )
    architecture["degenerate"] = None
    keras.utils.set_random_seed(seed)
    network = SearchedNetwork(architecture, name="searched").build_network()
    for variable in network.variables:
        shape = tuple(variable.shape)
        if "moving_variance" in variable.path:
            value = rng.uniform(0.5, 2.0, shape)
        elif "moving_mean" in variable.path:
            value = rng.normal(0.0, 0.3, shape)
        else:
            value = rng.normal(0.0, 0.5, shape) * (rng.random(shape) >= 0.3)
        variable.assign(value.astype("float32"))
    architecture["parameters"] = {"searched": parameter_counts(network.trainable_variables)}
    architecture["flops"] = {"searched": flop_counts(network)}
    return architecture, network


def traced_loss_and_gradients(network, images, labels, extra_variables=()):
    """(training-mode loss, gradients of network.trainable_variables + extra_variables), traced."""
    import keras
    import tensorflow as tf
    from keras import ops

    @tf.function(autograph=False)
    def traced():
        with tf.GradientTape() as tape:
            logits = network(images, training=True)
            loss = ops.mean(
                keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
            )
        return loss, tape.gradient(loss, network.trainable_variables + list(extra_variables))

    return traced()


def real_images(count=16, channels=3):
    """Normalised 8x8 digits from scikit-learn (real images), repeated to `channels`."""
    from hmnas_keras.data import load_digits_arrays

    pixels = load_digits_arrays().train_images[:count].astype("float32") / 255.0
    pixels = np.repeat(pixels, channels, axis=-1) if channels > 1 else pixels
    return ((pixels - 0.3) / 0.35).astype("float32")


def export_tiny_run(root, images, **export_args):
    """(Workdir, architecture, network, summary): `searched_network()` saved as a fine-tuned
    run in `root` and exported by the export phase (normalisation 0.3 / 0.35)."""
    from hmnas_keras.architecture import architecture_json as arch_json
    from hmnas_keras.checkpoint import save_checkpoint
    from hmnas_keras.pipeline.export_phase import export_workdir
    from hmnas_keras.pipeline.workdir import Workdir

    workdir = Workdir(str(root))
    architecture, network = searched_network()
    os.makedirs(workdir.finetune.directory)
    arch_json.write_architecture(architecture, workdir.architecture)
    save_checkpoint(workdir.finetune.checkpoint, network.variables, {"finished": True})
    export_args = {"speed_repeats": 3, "log": lambda *_: None, **export_args}
    summary = export_workdir(workdir, [0.3] * 3, [0.35] * 3, images, **export_args)
    return workdir, architecture, network, summary


@pytest.fixture(scope="session")
def exported_workdir(tmp_path_factory):
    """A workdir with architecture.json, finetune/checkpoint.npz and a finished export."""
    workdir, architecture, network, summary = export_tiny_run(
        tmp_path_factory.mktemp("exported") / "run", real_images()
    )
    return workdir.root, architecture, network, summary
