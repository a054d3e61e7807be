"""The fine-tuning phase (paper §3.4): trains the searched network.

The network is built from `WORKDIR/architecture.json`. With
`--finetune_init=inherited` (HM-NAS) it starts from the masked supernet's
weights, pruned weights held at exactly zero by constant masks; with
`--finetune_init=scratch` from fresh initial weights with the same weight
masks (the paper's random-initialisation baseline; `--noscratch_masks`: dense).
α*, β* and the masks stay fixed; SGD with cosine decay and cutout
(`--cutout_size`).

Artifacts under `WORKDIR/finetune/`: `checkpoint.npz` (network weights, BN
statistics, optimizer state, metric accumulators, epoch, step), `metrics.csv`,
`tensorboard/`, `summary.json`.
"""

import keras
import numpy as np
import tensorflow as tf

from hmnas_keras.architecture.architecture_json import ArchitectureError, read_architecture
from hmnas_keras.architecture.counting import flop_counts, parameter_counts
from hmnas_keras.architecture.searched_network import (
    SearchedNetwork,
    inherit_weights,
    to_searched,
)
from hmnas_keras.checkpoint import relative_path, write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.distributed import evaluation_data
from hmnas_keras.pipeline.derive_phase import read_weight_masks
from hmnas_keras.pipeline.phase import Phase, run_phase, test_columns
from hmnas_keras.pipeline.workdir import SEARCHED_MODEL, Workdir
from hmnas_keras.space.cell import share_edge_calls
from hmnas_keras.training.finetune import FineTune
from hmnas_keras.training.trainer import mixed_precision_optimizer

CSV_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "seconds",
)


def inherited_arrays(workdir: Workdir, architecture: dict) -> dict:
    """The supernet weights the searched network starts from.

    After masking: the masked supernet (its BN statistics follow the masked
    network). Otherwise: the trained supernet.
    """
    if architecture["derivation"] == "masks":
        return workdir.masked_supernet_arrays()
    return workdir.supernet_arrays("the trained supernet's weights")


def _check_data(architecture: dict, data: SearchData) -> None:
    if tuple(architecture["image_shape"]) != data.image_shape:
        raise ArchitectureError(
            f"The architecture was searched on {architecture['image_shape']} images; this data "
            f"has {list(data.image_shape)}. Use the same --image_size."
        )
    if architecture["num_classes"] != data.num_classes:
        raise ArchitectureError(
            f"The architecture has {architecture['num_classes']} classes; this data has "
            f"{data.num_classes}."
        )


def build_finetune(config: RunConfig, data: SearchData, workdir: Workdir, architecture: dict):
    """The compiled, built FineTune with its starting weights (call inside a strategy scope)."""
    train = config.finetune
    _check_data(architecture, data)
    keras.utils.set_random_seed(config.seed)
    network = SearchedNetwork(architecture, name=SEARCHED_MODEL).build_network()
    if config.finetune_init == "inherited":
        inherit_weights(network, architecture, inherited_arrays(workdir, architecture))
    if _keeps_weight_masks(config):
        masks = read_weight_masks(workdir, architecture)
        if masks is not None:
            network.apply_weight_masks(to_searched(architecture, masks))
    share_edge_calls(network, repeated_only=True)  # the export builds its own network
    finetune = FineTune(
        network,
        weight_decay=train.weight_decay,
        grad_clip_norm=train.grad_clip_norm,
        name="finetune",
    )
    total_steps = train.epochs * data.train_steps_per_epoch
    learning_rate = keras.optimizers.schedules.CosineDecay(
        train.learning_rate, total_steps, alpha=train.learning_rate_min / train.learning_rate
    )
    finetune.compile(
        mixed_precision_optimizer(
            keras.optimizers.SGD(learning_rate, momentum=train.momentum, name="finetune_optimizer"),
            config.mixed_precision,
        ),
        jit_compile=config.jit_compile,
    )
    finetune.build_finetune()
    return finetune


def _keeps_weight_masks(config: RunConfig) -> bool:
    """Whether pruned weights stay zero: inherited weights, or scratch with --scratch_masks."""
    return config.finetune_init == "inherited" or config.scratch_masks


def _read_trainable_architecture(workdir: Workdir) -> dict:
    architecture = read_architecture(workdir.architecture)
    if architecture.get("degenerate"):
        raise ArchitectureError(
            f"Nothing to fine-tune: {architecture['degenerate']}. Mask less aggressively "
            "(lower --mask_weight_learning_rate/--mask_arch_learning_rate, fewer --mask_epochs) "
            "or use --derivation=darts."
        )
    return architecture


def _summary(config, data, workdir, architecture, finetune, test, state) -> dict:
    network = finetune.network
    train = config.finetune
    summary = {
        "epochs": train.epochs,
        "steps": train.epochs * data.train_steps_per_epoch,
        "init": config.finetune_init,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "parameters": parameter_counts(network.trainable_variables),
        "flops": flop_counts(network),
        "wall_seconds": round(state["elapsed_seconds"], 2),
    }
    masks = read_weight_masks(workdir, architecture)
    if masks is not None and _keeps_weight_masks(config):
        summary["pruned_weights_zero"] = pruned_weights_are_zero(
            network, to_searched(architecture, masks)
        )
    return summary


def run_finetune_phase(
    config: RunConfig,
    data: SearchData,
    workdir: Workdir,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int | None = None,
) -> dict:
    """Fine-tunes the searched network of WORKDIR/architecture.json (resuming if possible)."""
    strategy = strategy or tf.distribute.get_strategy()
    train = config.finetune
    architecture = _read_trainable_architecture(workdir)
    with strategy.scope():
        finetune = build_finetune(config, data, workdir, architecture)
    test_data = data.test_dataset()

    def row(epoch, logs):
        return {
            **test_columns(logs),
            "learning_rate": float(finetune.optimizer.learning_rate),
        }

    cutout = data.config.cutout_size > 0
    phase = Phase(
        name="finetune",
        files=workdir.finetune,
        model=finetune,
        state_variables=finetune.state_variables,
        epochs=train.epochs,
        steps_per_epoch=data.train_steps_per_epoch,
        dataset=lambda epochs, start: data.train_dataset(epochs, start, cutout=cutout),
        columns=CSV_COLUMNS,
        row=row,
        test_data=test_data,
        test_every=train.test_every,
        checkpoint_every_steps=train.checkpoint_every_steps,
        diverged_hint="Lower --finetune_learning_rate",
    )
    state = run_phase(phase, verbose)
    test = finetune.evaluate(**evaluation_data(strategy, test_data), verbose=0, return_dict=True)
    summary = _summary(config, data, workdir, architecture, finetune, test, state)
    write_json(workdir.finetune.summary, summary)
    return summary


def pruned_weights_are_zero(network: SearchedNetwork, masks: dict) -> bool:
    """True if every kernel entry its mask prunes is exactly zero ({relative path: mask})."""
    for layer in network.kernel_layers():
        mask = masks.get(relative_path(layer.kernel.path))
        if mask is not None and np.any(keras.ops.convert_to_numpy(layer.kernel)[~mask] != 0):
            return False
    return True
