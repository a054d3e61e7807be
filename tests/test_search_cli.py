"""The command line end to end, in subprocesses (as a user runs it)."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_DIGITS

from hmnas_keras.checkpoint import read_state

TINY = ["--phases=supernet", *TINY_DIGITS, "--ops=sep_conv_3x3,skip_connect", "--warmup_epochs=1"]


def search(workdir, *flags, wait=True):
    command = [sys.executable, "-m", "hmnas_keras.search", f"--workdir={workdir}", *TINY, *flags]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def read_metrics(workdir):
    with open(os.path.join(workdir, "supernet", "metrics.csv")) as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_writes_every_artifact(tmp_path):
    workdir = str(tmp_path / "run")
    result = search(workdir, "--supernet_epochs=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Supernet: test accuracy" in result.stdout
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert config["search_space"]["op_names"] == ["sep_conv_3x3", "skip_connect"]
    assert config["supernet"]["epochs"] == 2
    rows = read_metrics(workdir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0]["arch_loss"] == "" and float(rows[0]["arch_step_fraction"]) == 0.0
    assert float(rows[1]["arch_step_fraction"]) == 1.0 and float(rows[1]["arch_loss"]) > 0
    accuracy = float(rows[1]["test_accuracy"])  # over the 50 test images: k / 50
    assert 0.0 <= accuracy <= 1.0 and accuracy * 50 == pytest.approx(round(accuracy * 50), abs=1e-3)
    history = [
        json.loads(line) for line in open(os.path.join(workdir, "supernet", "arch_history.jsonl"))
    ]
    assert [h["epoch"] for h in history] == [1, 2]
    ops = np.array(history[1]["weights"]["reduce"]["ops"])
    assert ops.shape == (5, 2) and np.allclose(ops.sum(axis=1), 1, atol=1e-5)
    summary = json.load(open(os.path.join(workdir, "supernet", "summary.json")))
    assert summary["steps"] == 2 * 10 and summary["weight_parameters"] > 0
    assert os.listdir(os.path.join(workdir, "supernet", "tensorboard", "train"))
    assert read_state(os.path.join(workdir, "supernet", "checkpoint.npz"))["finished"]

    again = search(workdir, "--supernet_epochs=2")
    assert again.returncode == 1
    assert "is not empty. Pass --resume" in again.stderr and "Traceback" not in again.stderr


def test_killed_run_resumes_with_a_continuous_history(tmp_path):
    workdir = str(tmp_path / "run")
    # Bitwise equality with an uninterrupted run: the large test of every phase
    # (tests/test_pipeline.py::test_a_run_killed_in_any_phase_resumes_to_the_same_result).
    flags = ["--supernet_epochs=3", "--checkpoint_every_steps=3"]
    process = search(workdir, *flags, wait=False)
    checkpoint = os.path.join(workdir, "supernet", "checkpoint.npz")
    deadline = time.monotonic() + 300
    state = None
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(checkpoint):
            try:
                state = read_state(checkpoint)
            except (OSError, ValueError, KeyError):
                state = None
            if state and state["global_step"] >= 12:
                break
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = read_state(checkpoint)
    assert 12 <= state["global_step"] < 30 and not state["finished"]

    resumed = search(workdir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming the supernet phase at epoch {state['epoch'] + 1}" in resumed.stdout
    rows = read_metrics(workdir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    final = read_state(checkpoint)
    assert final["finished"] and final["global_step"] == 30
    summary = json.load(open(os.path.join(workdir, "supernet", "summary.json")))
    assert summary["steps"] == 30
    history = [
        json.loads(line)["epoch"]
        for line in open(os.path.join(workdir, "supernet", "arch_history.jsonl"))
    ]
    assert history == [1, 2, 3]


# Trains the same supernet 3 steps on one device and with MirroredStrategy over two logical
# CPUs (the --strategy=mirrored --logical_cpus=2 path), at the same global batch of 16. Each
# batch is two copies of 8 images, so each replica sees the same 8 images and its BN batch
# statistics, loss and gradients are the whole batch's: the two runs must agree. Then both
# evaluate the test split, which must equal the network's own loss and accuracy over it.
MIRRORED_VS_ONE_DEVICE = """
import json
import numpy as np
import tensorflow as tf
from hmnas_keras.runtime import configure_tensorflow
configure_tensorflow(0, 2)
from hmnas_keras.config import DataConfig, RunConfig, SupernetConfig
from hmnas_keras.data import make_search_data
from hmnas_keras.distributed import distribute_batches, evaluation_data, make_strategy
from hmnas_keras.pipeline.supernet_phase import build_search
from hmnas_keras.space.search_space import SearchSpace
config = RunConfig(
    data=DataConfig(dataset="digits", batch_size=16, train_subset=200, augment=False),
    search_space=SearchSpace(num_cells=2, channels=4, num_nodes=2,
                             op_names=("sep_conv_3x3", "max_pool_3x3", "skip_connect")),
    supernet=SupernetConfig(epochs=1, warmup_epochs=0),
)
data = make_search_data(config.data, config.seed)
(wx, wy), (ax, ay) = next(iter(data.bilevel_dataset(1)))
twice = lambda t: tf.concat([t[:8], t[:8]], 0)
batch = ((twice(wx), twice(wy)), (twice(ax), twice(ay)))
dataset = tf.data.Dataset.from_tensors(batch).repeat(3)
runs = {}
for name in ("default", "mirrored"):
    strategy = make_strategy(name)
    with strategy.scope():
        search = build_search(config, data)
        start = [np.array(v) for v in search.supernet.weights]
    search.fit(distribute_batches(strategy, dataset), epochs=1, steps_per_epoch=3, verbose=0)
    # Batches of 359 and 1 images: the last is padded with a weight-0 copy for the other replica.
    test = search.evaluate(**evaluation_data(strategy, data.test_dataset(359)), verbose=0,
                           return_dict=True)
    images = (data.test_images / 255.0 - data.mean) / data.std
    logits = search.supernet(images.astype("float32"), training=False)
    losses = tf.keras.losses.sparse_categorical_crossentropy(
        data.test_labels, logits, from_logits=True)
    reference = {"loss": float(np.mean(losses)),
                 "accuracy": float(np.mean(np.argmax(logits, -1) == data.test_labels))}
    runs[name] = (strategy.num_replicas_in_sync, start,
                  [np.array(v) for v in search.supernet.weights], test, reference)
(n1, start, one, test1, ref1), (n2, _, two, test2, ref2) = runs["default"], runs["mirrored"]
print(json.dumps({
    "replicas": [n1, n2],
    "moved": max(float(np.abs(a - b).max()) for a, b in zip(one, start)),
    "difference": max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
    "scale": max(float(np.abs(a).max()) for a in one),
    "tests": [test1, test2],
    "references": [ref1, ref2],
}))
"""


def test_mirrored_strategy_on_two_logical_cpus_matches_one_device():
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_VS_ONE_DEVICE],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["replicas"] == [1, 2]
    assert figures["moved"] > 1e-3  # the steps changed the weights, α and β
    assert figures["difference"] <= 1e-4 * max(1.0, figures["scale"]), figures
    # Evaluation counts every image once, whatever the replicas (padding excluded), and
    # every replica evaluates with the first replica's BatchNorm statistics.
    for test, reference in zip(figures["tests"], figures["references"], strict=True):
        assert test["loss"] == pytest.approx(reference["loss"], abs=1e-5)
        assert test["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)
    one, two = figures["tests"]
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset=folder"], "--dataset=folder needs --data_dir"),
        (["--dataset=folder", "--data_dir=/nonexistent/images"], "does not exist"),
        (["--ops=conv_9x9"], "--ops takes a comma list"),
        (["--batch_size=400"], "fewer than one batch"),
    ],
)
def test_user_mistakes_get_a_message_not_a_traceback(tmp_path, flags, message):
    result = search(str(tmp_path / "run"), *flags)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_without_a_run_is_refused(tmp_path):
    result = search(str(tmp_path / "empty"), "--resume")
    assert result.returncode == 1
    assert "no run to resume" in result.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    result = search(
        workdir, "--supernet_epochs=2", "--learning_rate=1e30", "--checkpoint_every_steps=1"
    )
    assert result.returncode == 1
    assert "The supernet loss became NaN" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoint = os.path.join(workdir, "supernet", "checkpoint.npz")
    state = read_state(checkpoint)
    assert state["global_step"] >= 1 and not state["finished"]
    with np.load(checkpoint) as archive:
        assert all(np.all(np.isfinite(archive[k])) for k in archive.files if k.startswith("v"))


def test_a_run_that_failed_before_training_can_be_started_again(tmp_path):
    workdir = str(tmp_path / "run")
    first = search(workdir, "--dataset=folder")
    assert first.returncode == 1 and "needs --data_dir" in first.stderr
    second = search(workdir, "--dataset=folder", f"--data_dir={tmp_path / 'missing'}")
    assert second.returncode == 1 and "does not exist" in second.stderr
    assert json.load(open(os.path.join(workdir, "config.json")))["data"]["data_dir"].endswith(
        "missing"
    )


@contextlib.contextmanager
def parsed_flags(*argv):
    """hmnas_keras.search with its flags parsed from `argv`, in this process."""
    from hmnas_keras import search as cli

    cli.FLAGS.unparse_flags()
    cli.FLAGS(["hmnas_keras.search", *argv])
    try:
        yield cli
    finally:
        cli.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate=0"], "invalid --learning_rate, expected a positive number"),
        (["--finetune_learning_rate=0"], "invalid --finetune_learning_rate, expected a positive"),
        (["--learning_rate=0.01", "--learning_rate_min=0.1"], "from 0 to --learning_rate"),
        (["--finetune_learning_rate_min=1"], "from 0 to --finetune_learning_rate"),
        (["--mask_threshold=0"], "invalid --mask_threshold, expected a positive number"),
        (["--mask_initial_value=0"], "invalid --mask_initial_value, expected a positive"),
        (
            ["--mask_initial_value=0.001", "--mask_target=params", "--mask_target_ratio=0.5"],
            "no mask could ever be kept",
        ),
    ],
)
def test_invalid_learning_rates_and_mask_values_are_refused(tmp_path, flags, message):
    with parsed_flags(f"--workdir={tmp_path / 'run'}", *flags) as cli:
        with pytest.raises(cli.UsageError, match=message):
            cli.prepare_workdir(cli.FLAGS.workdir, False)


def test_unusable_workdirs_are_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(str(afile), "is a file, not a folder"), (str(afile / "run"), "Cannot write to")]
    if os.path.isdir("/proc"):  # read-only, even for root
        cases.append(("/proc/hmnas-run", "Cannot write to --workdir=/proc/hmnas-run"))
    for workdir, message in cases:
        with parsed_flags(f"--workdir={workdir}") as cli:
            with pytest.raises(cli.UsageError, match=message):
                cli.prepare_workdir(workdir, False)


def test_resume_counts_only_the_flags_given_and_honours_phases(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    first = ("--supernet_epochs=3", "--warmup_epochs=1", "--channels=4")
    with parsed_flags(f"--workdir={workdir}", *first) as cli:
        cli.prepare_workdir(workdir, False)
    warnings = []
    monkeypatch.setattr(cli.logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    given = ("--resume", "--channels=4", "--supernet_epochs=5", "--warmup_epochs=1")
    given += ("--seed=2", "--threads=1", "--recompute")
    with parsed_flags(f"--workdir={workdir}", *given) as cli:
        config = cli.prepare_workdir(workdir, True)
    assert config.supernet.epochs == 3 and config.seed == 0  # the saved run's
    assert config.recompute  # how the steps run: the command line's
    assert config.phases == ("supernet", "mask", "finetune", "export")
    (warning,) = warnings
    named = warning.split("differ from it: ")[1].split(", ")
    assert sorted(named) == ["--seed", "--supernet_epochs"], warning
    with parsed_flags(f"--workdir={workdir}", "--resume", "--phases=export") as cli:
        assert cli.prepare_workdir(workdir, True).phases == ("export",)
    assert len(warnings) == 1


def test_a_missing_workdir_and_a_damaged_checkpoint_are_one_line_each(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "hmnas_keras.search"]
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()], missing.stderr
    assert "--workdir is required" in missing.stderr and not missing.stdout
    # TensorFlow's start-up logs are silenced (oneDNN, CPU features).
    assert "oneDNN" not in missing.stderr and "cpu_feature" not in missing.stderr
    broken = tmp_path / "checkpoint.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    result = search(str(tmp_path / "run"), "--phases=mask", f"--supernet_checkpoint={broken}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"Checkpoint {broken} is damaged or not a checkpoint" in result.stderr
