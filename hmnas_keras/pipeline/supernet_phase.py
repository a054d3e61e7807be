"""The supernet phase: bilevel training with checkpoints, logs and resume.

Artifacts under `WORKDIR/supernet/` (see `hmnas_keras.pipeline.phase` for the common ones):
- `checkpoint.npz`: weights, α, β, BN statistics, both optimizers' state,
  metric accumulators, epoch and step;
- `metrics.csv`: one row per epoch;
- `arch_history.jsonl`: softmax(α) and softmax(β) per cell type after each epoch;
- `tensorboard/`;
- `summary.json`: written when the phase finishes.
"""

import dataclasses
import functools

import keras
import tensorflow as tf

from hmnas_keras.architecture.counting import parameter_counts
from hmnas_keras.checkpoint import write_json
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.distributed import evaluation_data
from hmnas_keras.pipeline.phase import Phase, run_phase, test_columns
from hmnas_keras.pipeline.workdir import SUPERNET_MODEL, Workdir
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.arch_step import ArchStepPolicy, ArchStepSchedule
from hmnas_keras.training.bilevel import BilevelSearch
from hmnas_keras.training.trainer import mixed_precision_optimizer

CSV_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "arch_loss",
    "arch_accuracy",
    "arch_step_fraction",
    "test_loss",
    "test_accuracy",
    "learning_rate",
    "seconds",
)


@dataclasses.dataclass
class SupernetResult:
    """What the phase leaves behind, for the caller and the report."""

    search: BilevelSearch
    summary: dict


def build_search(config: RunConfig, data: SearchData) -> BilevelSearch:
    """The compiled, built BilevelSearch for `config` (call inside a strategy scope)."""
    train = config.supernet
    keras.utils.set_random_seed(config.seed)
    steps_per_epoch = data.steps_per_epoch
    decay_epochs = train.arch_step_decay_epochs or train.epochs
    policy = ArchStepPolicy(
        warmup_steps=train.warmup_epochs * steps_per_epoch,
        schedule=ArchStepSchedule(
            train.arch_step_schedule, train.arch_step_final_prob, decay_epochs * steps_per_epoch
        ),
        seed=config.seed,
    )
    supernet = Supernet(
        config.search_space, data.num_classes, recompute=config.recompute, name=SUPERNET_MODEL
    )
    search = BilevelSearch(
        supernet,
        policy,
        second_order=train.second_order,
        weight_decay=train.weight_decay,
        arch_weight_decay=train.arch_weight_decay,
        grad_clip_norm=train.grad_clip_norm,
        name="bilevel_search",
    )
    total_steps = train.epochs * steps_per_epoch
    learning_rate = keras.optimizers.schedules.CosineDecay(
        train.learning_rate, total_steps, alpha=train.learning_rate_min / train.learning_rate
    )
    search.compile(
        weight_optimizer=mixed_precision_optimizer(
            keras.optimizers.SGD(learning_rate, momentum=train.momentum, name="weight_optimizer"),
            config.mixed_precision,
        ),
        arch_optimizer=mixed_precision_optimizer(
            keras.optimizers.Adam(
                train.arch_learning_rate,
                beta_1=train.arch_beta_1,
                beta_2=0.999,
                name="arch_optimizer",
            ),
            config.mixed_precision,
        ),
        jit_compile=config.jit_compile,
    )
    search.build_search(data.image_shape)
    return search


def _row(search: BilevelSearch):
    def row(epoch, logs):
        took_arch_steps = logs.get("arch_step_fraction", 0.0) > 0
        return {
            **test_columns(logs),
            "arch_loss": logs.get("arch_loss") if took_arch_steps else None,
            "arch_accuracy": logs.get("arch_accuracy") if took_arch_steps else None,
            "arch_step_fraction": logs.get("arch_step_fraction"),
            "learning_rate": float(search.weight_optimizer.learning_rate),
        }

    return row


def run_supernet_phase(
    config: RunConfig,
    data: SearchData,
    workdir: Workdir,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int | None = None,
) -> SupernetResult:
    """Trains the supernet, resuming from `WORKDIR/supernet/checkpoint.npz` if present."""
    strategy = strategy or tf.distribute.get_strategy()
    train = config.supernet
    with strategy.scope():
        search = build_search(config, data)
    test_data = data.test_dataset()
    phase = Phase(
        name="supernet",
        files=workdir.supernet,
        model=search,
        state_variables=search.state_variables,
        epochs=train.epochs,
        steps_per_epoch=data.steps_per_epoch,
        # One replica: no architecture batch where σ draws no architecture step. Several
        # replicas split every batch, so they keep it (an empty one would trace a step
        # with an unknown batch size).
        dataset=functools.partial(
            data.bilevel_dataset,
            arch_steps=search.policy if strategy.num_replicas_in_sync == 1 else None,
        ),
        columns=CSV_COLUMNS,
        row=_row(search),
        jsonl_logs={
            workdir.arch_history: lambda epoch: {"weights": search.supernet.arch_weights_numpy()}
        },
        test_data=test_data,
        test_every=train.test_every,
        checkpoint_every_steps=train.checkpoint_every_steps,
        after_restore=search.reset_iteration,
        diverged_hint="Lower --learning_rate (or --arch_learning_rate)",
    )
    state = run_phase(phase, verbose)
    test = search.evaluate(**evaluation_data(strategy, test_data), verbose=0, return_dict=True)
    summary = {
        "epochs": train.epochs,
        "steps": train.epochs * data.steps_per_epoch,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "weight_parameters": parameter_counts(search.supernet.weight_variables)["dense"],
        "arch_parameters": parameter_counts(search.supernet.arch_variables)["dense"],
        "wall_seconds": round(state["elapsed_seconds"], 2),
        "arch_weights": search.supernet.arch_weights_numpy(),
    }
    write_json(workdir.supernet.summary, summary)
    return SupernetResult(search, summary)
