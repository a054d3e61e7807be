"""Running one training phase with Keras `fit()`: logs, checkpoints, resume.

Every phase (supernet, mask, finetune) trains a Keras model epoch by epoch and
leaves the same kind of artifacts in its directory:
- `checkpoint.npz`: the full training state (the `state_variables`: model
  variables, optimizer slots, metric accumulators) plus epoch, step and elapsed
  time, written atomically at every epoch end and every `checkpoint_every_steps`;
- `metrics.csv`: one row per epoch;
- any per-epoch JSON-lines logs the phase adds (`jsonl_logs`);
- `tensorboard/`.
(`hmnas_keras.pipeline.workdir.PhaseFiles` names them.)

A killed phase resumes from its checkpoint at the exact step: the data
pipelines are pure functions of (seed, step), partial-epoch metric accumulators
are restored, and log rows written after the checkpoint are dropped.
"""

import csv
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable

import keras
import tensorflow as tf

from hmnas_keras.checkpoint import (
    NonFiniteState,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from hmnas_keras.distributed import distribute_batches, evaluation_data, is_chief
from hmnas_keras.pipeline.workdir import PhaseFiles


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class Phase:
    """What `run_phase` needs to train, log and checkpoint one phase.

    Attributes:
        name: the phase name, used in messages.
        files: where its artifacts go.
        model: a compiled, built Keras model whose `fit()` trains the phase.
        state_variables: every variable of the training state, in a fixed order.
        epochs, steps_per_epoch: the length of the phase.
        dataset: (end_epoch, start_step) -> the training batches for global
            steps [start_step, end_epoch · steps_per_epoch).
        columns: the CSV columns; the first must be "epoch".
        row: (epoch, fit logs) -> the CSV row of a finished epoch.
        jsonl_logs: path -> (epoch) -> a JSON record appended after each epoch.
        test_data: evaluated every `test_every` epochs (0: never during fit).
        checkpoint_every_steps: extra checkpoints inside epochs (0: none).
        after_restore: called after a checkpoint was restored.
        diverged_hint: what to tell a user whose loss became NaN.
    """

    name: str
    files: PhaseFiles
    model: keras.Model
    state_variables: list
    epochs: int
    steps_per_epoch: int
    dataset: Callable[[int, int], tf.data.Dataset]
    columns: tuple[str, ...]
    row: Callable[[int, dict], dict]
    jsonl_logs: dict = dataclasses.field(default_factory=dict)
    test_data: tf.data.Dataset | None = None
    test_every: int = 1
    checkpoint_every_steps: int = 0
    after_restore: Callable[[], None] | None = None
    diverged_hint: str = "Lower the learning rate"

    @property
    def checkpoint_path(self) -> str:
        return self.files.checkpoint


class _PhaseLogger(keras.callbacks.Callback):
    """Logs each epoch, checkpoints, stops on NaN; keeps files consistent on resume."""

    def __init__(self, phase: Phase, start_epoch, start_step, elapsed, metric_values):
        super().__init__()
        self.phase = phase
        self.epoch = start_epoch
        self.step_in_epoch = start_step
        self.elapsed_before = elapsed
        self.started = time.monotonic()
        self.metric_values = metric_values
        self.diverged_at = None

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def checkpoint(self, epoch, step_in_epoch):
        phase = self.phase
        state = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": epoch * phase.steps_per_epoch + step_in_epoch,
            "elapsed_seconds": self.elapsed,
            "finished": epoch >= phase.epochs,
        }
        try:
            save_checkpoint(phase.checkpoint_path, phase.state_variables, state, True)
        except NonFiniteState:
            # The last step's loss was finite, but its update was not: stop here and
            # keep the checkpoint before it.
            at_end = (epoch - 1, phase.steps_per_epoch)
            self.diverged_at = (epoch, step_in_epoch) if step_in_epoch else at_end
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if self.metric_values is not None:
            # A resumed partial epoch continues the accumulators it had.
            for variable, value in zip(
                self.phase.model.metrics_variables, self.metric_values, strict=True
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
        phase = self.phase
        every = phase.checkpoint_every_steps
        global_step = self.epoch * phase.steps_per_epoch + self.step_in_epoch
        if every and global_step % every == 0 and self.step_in_epoch < phase.steps_per_epoch:
            self.checkpoint(self.epoch, self.step_in_epoch)

    def on_epoch_end(self, epoch, logs=None):
        # The loss is a running mean, so a NaN in any batch was caught at that batch.
        if self.diverged_at is not None:
            return
        phase = self.phase
        row = phase.row(epoch, dict(logs or {}))
        row.update(epoch=epoch + 1, seconds=round(self.elapsed, 2))
        _append_csv(phase.files.metrics, phase.columns, row)
        for path, record in phase.jsonl_logs.items():
            with open(path, "a") as handle:
                handle.write(json.dumps({"epoch": epoch + 1, **record(epoch)}) + "\n")
        self.step_in_epoch = 0
        self.checkpoint(epoch + 1, 0)


def test_columns(logs: dict) -> dict:
    """The CSV columns every phase has, from Keras' epoch logs: loss, accuracy and the test's."""
    return {
        "loss": logs.get("loss"),
        "accuracy": logs.get("accuracy"),
        "test_loss": logs.get("val_loss"),
        "test_accuracy": logs.get("val_accuracy"),
    }


def _append_csv(path, columns, row):
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _truncate_logs(phase: Phase, completed_epochs: int) -> None:
    """Drops log rows of epochs after the checkpoint (written before a kill)."""
    csv_path = phase.files.metrics
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= completed_epochs]
        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=phase.columns)
            writer.writeheader()
            writer.writerows(rows)
    for path in phase.jsonl_logs:
        if os.path.exists(path):
            with open(path) as handle:
                lines = [line for line in handle if json.loads(line)["epoch"] <= completed_epochs]
            with open(path, "w") as handle:
                handle.writelines(lines)


def _restore(phase: Phase) -> tuple[dict, list | None]:
    """(state, partial-epoch metric values or None) from the phase's checkpoint, if any."""
    state = {"epoch": 0, "step_in_epoch": 0, "elapsed_seconds": 0.0, "finished": False}
    if not os.path.exists(phase.checkpoint_path):
        print(f"The {phase.name} phase: {phase.epochs} epochs of {phase.steps_per_epoch} steps.")
        return state, None
    state = restore_checkpoint(phase.checkpoint_path, phase.state_variables)
    if phase.after_restore is not None:
        phase.after_restore()
    metric_values = None
    if state["step_in_epoch"]:
        metric_values = [keras.ops.convert_to_numpy(v) for v in phase.model.metrics_variables]
    _truncate_logs(phase, state["epoch"])
    if state["finished"]:
        print(f"The {phase.name} phase already finished its {phase.epochs} epochs.")
    else:
        print(
            f"Resuming the {phase.name} phase at epoch {state['epoch'] + 1}, "
            f"step {state['step_in_epoch']} of {phase.steps_per_epoch}."
        )
    return state, metric_values


def _diverged(phase: Phase, diverged_at) -> TrainingDiverged:
    ckpt = phase.checkpoint_path
    last = read_state(ckpt) if os.path.exists(ckpt) else None
    kept = (
        f"The last good checkpoint (epoch {last['epoch']}, step {last['step_in_epoch']}) "
        f"is kept in {ckpt}"
        if last
        else "No checkpoint had been written yet"
    )
    return TrainingDiverged(
        f"The {phase.name} loss became NaN at epoch {diverged_at[0] + 1}, step "
        f"{diverged_at[1]}. {kept}. {phase.diverged_hint}, then rerun with --resume."
    )


def run_phase(phase: Phase, verbose: int | None = None) -> dict:
    """Trains `phase` to its last epoch, resuming from its checkpoint if there is one.

    Returns the final checkpoint state (epoch, elapsed_seconds, ...). Raises
    TrainingDiverged if the loss became NaN (the last good checkpoint is kept).
    """
    os.makedirs(phase.files.directory, exist_ok=True)
    strategy = phase.model.distribute_strategy
    if verbose is None:
        verbose = (1 if sys.stdout.isatty() else 2) if is_chief(strategy) else 0
    state, metric_values = _restore(phase)
    logger = _PhaseLogger(
        phase, state["epoch"], state["step_in_epoch"], state["elapsed_seconds"], metric_values
    )
    callbacks = [logger, keras.callbacks.TensorBoard(phase.files.tensorboard, write_graph=False)]
    steps = phase.steps_per_epoch
    epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
    # The pipelines arrive shuffled by seed: Keras must not shuffle again.
    fit_kwargs = dict(callbacks=callbacks, verbose=verbose, shuffle=False)
    if phase.test_every and phase.test_data is not None:
        test = evaluation_data(strategy, phase.test_data)
        fit_kwargs.update(
            validation_data=test["x"],
            validation_steps=test["steps"],
            validation_freq=phase.test_every,
        )
    if epoch < phase.epochs and step_in_epoch:
        # The rest of the interrupted epoch, then the remaining epochs.
        phase.model.fit(
            distribute_batches(strategy, phase.dataset(epoch + 1, epoch * steps + step_in_epoch)),
            epochs=epoch + 1,
            initial_epoch=epoch,
            steps_per_epoch=steps - step_in_epoch,
            **fit_kwargs,
        )
        epoch += 1
    if epoch < phase.epochs and logger.diverged_at is None:
        phase.model.fit(
            distribute_batches(strategy, phase.dataset(phase.epochs, epoch * steps)),
            epochs=phase.epochs,
            initial_epoch=epoch,
            steps_per_epoch=steps,
            **fit_kwargs,
        )
    if logger.diverged_at is not None:
        raise _diverged(phase, logger.diverged_at)
    return read_state(phase.checkpoint_path)
