"""The supernet phase: bilevel training with checkpoints, logs and resume.

Artifacts under `WORKDIR/supernet/`:
- `checkpoint.npz`: the full training state (weights, α, β, BN statistics, both
  optimizers' state, metric accumulators, epoch and step), written atomically
  at every epoch end and every `checkpoint_every_steps` steps;
- `metrics.csv`: one row per epoch;
- `arch_history.jsonl`: softmax(α) and softmax(β) per cell type after each epoch;
- `tensorboard/`: the same metrics for TensorBoard;
- `summary.json`: written when the phase finishes.
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from hmnas_keras.bilevel import ArchStepPolicy, ArchStepSchedule, BilevelSearch
from hmnas_keras.checkpoint import read_state, restore_checkpoint, save_checkpoint
from hmnas_keras.config import RunConfig
from hmnas_keras.data import SearchData
from hmnas_keras.supernet import Supernet

PHASE_DIR = "supernet"
CHECKPOINT_FILE = "checkpoint.npz"
METRICS_FILE = "metrics.csv"
ARCH_HISTORY_FILE = "arch_history.jsonl"
SUMMARY_FILE = "summary.json"
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


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
    decay_epochs = train.arch_step_decay_epochs or max(train.epochs - train.warmup_epochs, 1)
    policy = ArchStepPolicy(
        warmup_steps=train.warmup_epochs * steps_per_epoch,
        schedule=ArchStepSchedule(
            train.arch_step_schedule, train.arch_step_final_prob, decay_epochs * steps_per_epoch
        ),
        seed=config.seed,
    )
    supernet = Supernet(config.search_space, data.num_classes, name="supernet")
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
        weight_optimizer=keras.optimizers.SGD(
            learning_rate, momentum=train.momentum, name="weight_optimizer"
        ),
        arch_optimizer=keras.optimizers.Adam(
            train.arch_learning_rate, beta_1=train.arch_beta_1, beta_2=0.999, name="arch_optimizer"
        ),
    )
    search.build_search(data.image_shape)
    return search


def state_variables(search: BilevelSearch) -> list:
    """Every variable of the training state, in a fixed order."""
    return (
        list(search.supernet.variables)
        + search.optimizer_variables
        + list(search.metrics_variables)
    )


def count_parameters(variables) -> int:
    return int(sum(np.prod(v.shape) for v in variables))


class _PhaseLogger(keras.callbacks.Callback):
    """Logs each epoch, checkpoints, stops on NaN; keeps files consistent on resume."""

    def __init__(
        self, phase_dir, search, data, train, start_epoch, start_step, elapsed, metric_values
    ):
        super().__init__()
        self.phase_dir = phase_dir
        self.search = search
        self.data = data
        self.train = train
        self.epoch = start_epoch
        self.step_in_epoch = start_step
        self.elapsed_before = elapsed
        self.started = time.monotonic()
        self.metric_values = metric_values
        self.diverged_at = None

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _checkpoint(self, epoch, step_in_epoch):
        save_checkpoint(
            os.path.join(self.phase_dir, CHECKPOINT_FILE),
            state_variables(self.search),
            {
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": epoch * self.data.steps_per_epoch + step_in_epoch,
                "elapsed_seconds": self.elapsed,
                "finished": epoch >= self.train.epochs,
            },
        )

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.metric_values is not None:
            # A resumed partial epoch continues the accumulators it had.
            for variable, value in zip(
                self.search.metrics_variables, self.metric_values, strict=True
            ):
                variable.assign(value)
            self.metric_values = None

    def on_train_batch_end(self, batch, logs=None):
        self.step_in_epoch += 1
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.diverged_at = (self.epoch, self.step_in_epoch)
            self.model.stop_training = True
            return
        every = self.train.checkpoint_every_steps
        global_step = self.epoch * self.data.steps_per_epoch + self.step_in_epoch
        if every and global_step % every == 0 and self.step_in_epoch < self.data.steps_per_epoch:
            self._checkpoint(self.epoch, self.step_in_epoch)

    def on_epoch_end(self, epoch, logs=None):
        # The loss is a running mean, so a NaN in any batch was caught at that batch.
        if self.diverged_at is not None:
            return
        logs = dict(logs or {})
        took_arch_steps = logs.get("arch_step_fraction", 0.0) > 0
        row = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
            "arch_loss": logs.get("arch_loss") if took_arch_steps else None,
            "arch_accuracy": logs.get("arch_accuracy") if took_arch_steps else None,
            "arch_step_fraction": logs.get("arch_step_fraction"),
            "test_loss": logs.get("val_loss"),
            "test_accuracy": logs.get("val_accuracy"),
            "learning_rate": float(self.search.weight_optimizer.learning_rate),
            "seconds": round(self.elapsed, 2),
        }
        _append_csv(os.path.join(self.phase_dir, METRICS_FILE), row)
        with open(os.path.join(self.phase_dir, ARCH_HISTORY_FILE), "a") as handle:
            record = {"epoch": epoch + 1, "weights": self.search.supernet.arch_weights_numpy()}
            handle.write(json.dumps(record) + "\n")
        self.step_in_epoch = 0
        self._checkpoint(epoch + 1, 0)


def _append_csv(path, row):
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _truncate_logs(phase_dir: str, completed_epochs: int) -> None:
    """Drops log rows of epochs after the checkpoint (written before a kill)."""
    csv_path = os.path.join(phase_dir, METRICS_FILE)
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= completed_epochs]
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    history_path = os.path.join(phase_dir, ARCH_HISTORY_FILE)
    if os.path.exists(history_path):
        with open(history_path) as handle:
            lines = [line for line in handle if json.loads(line)["epoch"] <= completed_epochs]
        with open(history_path, "w") as handle:
            handle.writelines(lines)


def checkpoint_path(workdir: str) -> str:
    return os.path.join(workdir, PHASE_DIR, CHECKPOINT_FILE)


def run_supernet_phase(
    config: RunConfig,
    data: SearchData,
    workdir: str,
    strategy: tf.distribute.Strategy | None = None,
    verbose: int | None = None,
) -> SupernetResult:
    """Trains the supernet, resuming from `WORKDIR/supernet/checkpoint.npz` if present."""
    strategy = strategy or tf.distribute.get_strategy()
    train = config.supernet
    phase_dir = os.path.join(workdir, PHASE_DIR)
    os.makedirs(phase_dir, exist_ok=True)
    if verbose is None:
        verbose = 1 if sys.stdout.isatty() else 2

    with strategy.scope():
        search = build_search(config, data)
    ckpt = checkpoint_path(workdir)
    state = {"epoch": 0, "step_in_epoch": 0, "elapsed_seconds": 0.0, "finished": False}
    metric_values = None
    if os.path.exists(ckpt):
        state = restore_checkpoint(ckpt, state_variables(search))
        search.reset_iteration()
        if state["step_in_epoch"]:
            metric_values = [keras.ops.convert_to_numpy(v) for v in search.metrics_variables]
        _truncate_logs(phase_dir, state["epoch"])
        if state["finished"]:
            print(f"The supernet phase already finished its {train.epochs} epochs.")
        else:
            print(
                f"Resuming the supernet phase at epoch {state['epoch'] + 1}, "
                f"step {state['step_in_epoch']} of {data.steps_per_epoch}."
            )

    logger = _PhaseLogger(
        phase_dir,
        search,
        data,
        train,
        state["epoch"],
        state["step_in_epoch"],
        state["elapsed_seconds"],
        metric_values,
    )
    callbacks = [
        logger,
        keras.callbacks.TensorBoard(os.path.join(phase_dir, "tensorboard"), write_graph=False),
    ]
    test_data = data.test_dataset()
    steps = data.steps_per_epoch
    epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
    fit_kwargs = dict(callbacks=callbacks, verbose=verbose)
    if train.test_every:
        fit_kwargs.update(validation_data=test_data, validation_freq=train.test_every)
    if epoch < train.epochs and step_in_epoch:
        search.fit(
            data.bilevel_dataset(epoch + 1, epoch * steps + step_in_epoch),
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps - step_in_epoch,
            **fit_kwargs,
        )
        epoch += 1
    if epoch < train.epochs and logger.diverged_at is None:
        search.fit(
            data.bilevel_dataset(train.epochs, epoch * steps),
            epochs=train.epochs,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            **fit_kwargs,
        )
    if logger.diverged_at is not None:
        last = read_state(ckpt) if os.path.exists(ckpt) else None
        kept = (
            f"The last good checkpoint (epoch {last['epoch']}, step {last['step_in_epoch']}) "
            f"is kept in {ckpt}"
            if last
            else "No checkpoint had been written yet"
        )
        raise TrainingDiverged(
            f"The supernet loss became NaN at epoch {logger.diverged_at[0] + 1}, step "
            f"{logger.diverged_at[1]}. {kept}. Lower --learning_rate (or --arch_learning_rate), "
            "then rerun with --resume."
        )

    test = search.evaluate(test_data, verbose=0, return_dict=True)
    summary = {
        "epochs": train.epochs,
        "steps": train.epochs * steps,
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "weight_parameters": count_parameters(search.supernet.weight_variables),
        "arch_parameters": count_parameters(search.supernet.arch_variables),
        "wall_seconds": round(read_state(ckpt)["elapsed_seconds"], 2),
        "arch_weights": search.supernet.arch_weights_numpy(),
    }
    with open(os.path.join(phase_dir, SUMMARY_FILE), "w") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")
    return SupernetResult(search, summary)
