"""The command line end to end, in subprocesses (as a user runs it)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hmnas_keras.checkpoint import read_state

TINY = [
    "--phases=supernet",
    "--dataset=digits",
    "--noaugment",
    "--num_cells=2",
    "--channels=4",
    "--num_nodes=2",
    "--ops=sep_conv_3x3,skip_connect",
    "--batch_size=16",
    "--train_subset=200",
    "--test_subset=50",
    "--warmup_epochs=1",
    "--threads=2",
]


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


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    workdir = str(tmp_path / "run")
    result = search(workdir, "--supernet_epochs=2", "--strategy=mirrored", "--logical_cpus=2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(workdir)
    assert float(rows[1]["arch_step_fraction"]) == 1.0
    assert np.isfinite(float(rows[1]["loss"]))
    assert "Strategy: mirrored, 2 replica(s)" in result.stdout


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
