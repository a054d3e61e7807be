"""Training over several processes with tf.distribute: the cluster, the batches, the agreement."""

import csv
import json
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import TINY_DIGITS

from hmnas_keras.distributed import (
    ClusterError,
    cluster_resolver,
    config_differences,
    config_hash,
    local_ports,
    local_tf_config,
)

TINY = [*TINY_DIGITS, "--ops=sep_conv_3x3,skip_connect", "--warmup_epochs=1"]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def start_workers(workdir, flags_per_worker, ports=None):
    """One `python -m hmnas_keras.search --strategy=multi_worker` per entry of flags_per_worker."""
    ports = ports or local_ports(len(flags_per_worker))
    processes = []
    for index, flags in enumerate(flags_per_worker):
        command = [
            sys.executable,
            "-m",
            "hmnas_keras.search",
            f"--workdir={workdir}",
            "--strategy=multi_worker",
            *flags,
        ]
        env = {**ENV, "TF_CONFIG": local_tf_config(ports, index)}
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    return processes


def search(workdir, *flags, env=None):
    """One `python -m hmnas_keras.search` process on the tiny digits run."""
    return subprocess.run(
        [sys.executable, "-m", "hmnas_keras.search", f"--workdir={workdir}", *TINY, *flags],
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


ONE_EPOCH = ["--phases=supernet", "--supernet_epochs=1", "--warmup_epochs=0"]


def finish(processes, timeout=600):
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ the cluster


@pytest.mark.parametrize(
    "raw, message",
    [
        ("{not json", "is not JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'has no "cluster" object'),
        ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}}', "has jobs ps"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {}}', '"host:port" addresses'),
        ('{"cluster": {"worker": ["a:1", "b:2"]}}', 'has no "task"'),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "not a job"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index 1"),
    ],
)
def test_a_malformed_tf_config_says_what_is_wrong(raw, message):
    with pytest.raises(ClusterError, match=message) as caught:
        cluster_resolver(environ={"TF_CONFIG": raw})
    assert "Expected, e.g.: TF_CONFIG=" in str(caught.value)


def test_no_cluster_at_all_is_refused():
    with pytest.raises(ClusterError, match="needs to know the cluster"):
        cluster_resolver(environ={})


def test_a_slurm_job_is_the_cluster_without_tf_config(tmp_path, monkeypatch):
    # Slurm's resolver expands the node list with `scontrol show hostnames`.
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'node1\\nnode2\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    slurm = {
        "SLURM_PROCID": "1",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    resolver = cluster_resolver(slurm_port_base=9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node2:9000"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_configuration_differences_name_each_key():
    chief = {"seed": 0, "supernet": {"learning_rate": 0.05, "epochs": 2}}
    mine = {"seed": 0, "supernet": {"learning_rate": 0.1, "epochs": 2}}
    assert config_differences(mine, chief) == [
        "supernet.learning_rate: 0.05 on the chief, 0.1 here"
    ]
    assert config_differences(chief, chief) == []
    assert config_hash(mine) != config_hash(chief) and config_hash(chief) == config_hash(
        json.loads(json.dumps(chief))
    )


def test_multi_worker_without_a_cluster_is_one_line(tmp_path):
    env = {k: v for k, v in ENV.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    for extra_env, message in (
        ({}, "needs to know the cluster"),
        ({"TF_CONFIG": '{"cluster": {"worker": ["localhost:1"]}'}, "TF_CONFIG is not JSON"),
    ):
        result = search(tmp_path / "run", "--strategy=multi_worker", env={**env, **extra_env})
        assert result.returncode == 1
        assert message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ several processes


def test_workers_started_with_different_flags_refuse_together(tmp_path):
    workdir = tmp_path / "run"
    started = time.monotonic()
    results = finish(
        start_workers(workdir, [[*TINY, "--learning_rate=0.05"], [*TINY, "--learning_rate=0.1"]]),
        timeout=300,
    )
    for code, _, err in results:
        assert code == 1, err[-2000:]
        assert "started with different configurations" in err
        assert "worker 1 of 2 tasks: supernet.learning_rate: 0.05 on the chief, 0.1 here" in err
        assert "Traceback" not in err
    assert time.monotonic() - started < 120
    # Only the chief wrote, and only its configuration.
    assert sorted(os.listdir(workdir)) == ["config.json"]


def test_a_cluster_of_one_task_trains_alone_and_says_so(tmp_path):
    flags = [*TINY, *ONE_EPOCH]
    ((code, out, err),) = finish(start_workers(tmp_path / "run", [flags]))
    assert code == 0, err[-3000:]
    assert "multi_worker with a single task" in out and "1 replica(s), worker 0 of 1" in out
    assert len(read_csv(tmp_path / "run" / "supernet" / "metrics.csv")) == 1


# Trains the tiny supernet one epoch (10 steps, batch 16) on two worker processes and, in one
# process, with MirroredStrategy over two logical CPUs: the same global batches and the same two
# replicas (each BatchNorm normalising the same 8 images), so the two runs must agree.
def test_two_workers_train_as_two_mirrored_replicas(tmp_path):
    flags = [*TINY, *ONE_EPOCH]
    workers = start_workers(tmp_path / "workers", [flags, flags])
    mirrored = search(tmp_path / "mirrored", *ONE_EPOCH, "--strategy=mirrored", "--logical_cpus=2")
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    (chief_code, chief_out, chief_err), (code, out, err) = finish(workers)
    assert chief_code == 0, chief_err[-3000:]
    assert code == 0, err[-3000:]
    assert "worker 0 of 2 tasks" in chief_out and "2 replica(s)" in chief_out
    # The worker wrote only into its own temporary folder, gone now.
    scratch = next(
        line.split(" writes only to ")[1].split(" (removed")[0]
        for line in out.splitlines()
        if "writes only to" in line
    )
    assert not os.path.exists(scratch)
    assert "Report:" in chief_out and "Report:" not in out
    (one,) = read_csv(tmp_path / "workers" / "supernet" / "metrics.csv")
    (two,) = read_csv(tmp_path / "mirrored" / "supernet" / "metrics.csv")
    for column in ("loss", "accuracy", "arch_loss", "test_loss", "test_accuracy"):
        assert float(one[column]) == pytest.approx(float(two[column]), abs=1e-4), column
    assert os.path.exists(tmp_path / "workers" / "report.json")


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


# The whole pipeline on two workers: one is killed mid-supernet, the other stops with a message
# within a minute; both restarted with --resume finish every phase from the chief's checkpoint,
# and the chief's export equals one exported by a single process from the same checkpoint.
@pytest.mark.large
def test_a_killed_worker_stops_the_cluster_and_resume_finishes_every_phase(tmp_path):
    workdir = tmp_path / "run"
    flags = [
        *TINY,
        "--supernet_epochs=6",
        "--checkpoint_every_steps=5",
        "--mask_epochs=1",
        "--finetune_epochs=1",
        "--export_formats=keras,onnx",
    ]
    ports = local_ports(2)
    chief, worker = start_workers(workdir, [flags, flags], ports)
    checkpoint = workdir / "supernet" / "checkpoint.npz"
    wait_for(checkpoint.exists, 300, "the chief's first checkpoint")
    worker.kill()
    killed = time.monotonic()
    _, err = chief.communicate(timeout=120)
    assert time.monotonic() - killed < 60
    assert chief.returncode == 1
    assert "the cluster lost a task" in err and "--resume" in err
    assert "Traceback" not in err
    worker.communicate()

    resumed = finish(start_workers(workdir, [[*flags, "--resume"]] * 2, ports))
    for code, _, err in resumed:
        assert code == 0, err[-3000:]
    assert "Resuming the supernet phase" in resumed[0][1]
    epochs = [int(row["epoch"]) for row in read_csv(workdir / "supernet" / "metrics.csv")]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert json.load(open(workdir / "report.json"))["phases"]

    # The same checkpoint exported by one process gives the same model.
    import numpy as np
    import onnxruntime as ort

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.json", "architecture.json", "finetune", "mask"):
        source = workdir / name
        target = alone / name
        if source.is_dir():
            import shutil

            shutil.copytree(source, target)
        else:
            target.write_bytes(source.read_bytes())
    result = subprocess.run(
        [sys.executable, "tools/export_model.py", f"--workdir={alone}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    outputs = []
    for root in (workdir, alone):
        session = ort.InferenceSession(str(root / "export" / "model.onnx"))
        outputs.append(session.run(None, {session.get_inputs()[0].name: images})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


class _Replicas:
    def __init__(self, count):
        self.num_replicas_in_sync = count


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"data": {"batch_size": 15}}, "must be a multiple of 2"),
        ({"supernet": {"second_order": True}}, "--second_order under 2 replicas"),
        ({"jit_compile": True}, "--jit_compile compiles one device's step"),
    ],
)
def test_what_several_replicas_cannot_run_is_refused(changes, message):
    from hmnas_keras.config import RunConfig
    from hmnas_keras.distributed import check_settings

    values = RunConfig().to_dict()
    for key, value in changes.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    config = RunConfig.from_dict(values)
    check_settings(_Replicas(1), config)  # one replica runs all of them
    with pytest.raises(ClusterError, match=message):
        check_settings(_Replicas(2), config)


def trains_one_epoch_with(tmp_path, setting):
    """The workdir of a one-epoch supernet run with --`setting`, checked: the setting is in
    config.json, and the weight and architecture losses are finite and below chance's."""
    workdir = tmp_path / "run"
    result = search(workdir, *ONE_EPOCH, f"--{setting}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(workdir / "config.json"))[setting] is True
    (row,) = read_csv(workdir / "supernet" / "metrics.csv")
    assert 0.0 < float(row["loss"]) < 2.5 and 0.0 < float(row["arch_loss"]) < 2.5
    return workdir


def test_jit_compile_trains_on_one_device(tmp_path):
    workdir = trains_one_epoch_with(tmp_path, "jit_compile")
    assert (workdir / "supernet" / "checkpoint.npz").stat().st_size > 0


# ------------------------------------------------------------------ mixed precision


def test_mixed_precision_with_second_order_is_refused_on_any_device():
    from hmnas_keras.config import RunConfig, SupernetConfig
    from hmnas_keras.distributed import check_settings

    config = RunConfig(supernet=SupernetConfig(second_order=True), mixed_precision=True)
    with pytest.raises(ClusterError, match="float16 cannot resolve"):
        check_settings(_Replicas(1), config)


def test_loss_scaling_unscales_clips_and_skips_steps_that_overflow():
    import keras
    import numpy as np
    import tensorflow as tf

    from hmnas_keras.training.trainer import apply_weight_gradients, mixed_precision_optimizer

    variable = keras.Variable(np.ones(2, "float32"))
    optimizer = mixed_precision_optimizer(keras.optimizers.SGD(0.5, name="sgd"), True)
    optimizer.build([variable])
    scale = float(optimizer.dynamic_scale)
    assert scale > 1.0
    # Gradients of the scaled loss: the step unscales them before the clip (norm 5 -> 1).
    apply_weight_gradients(optimizer, [tf.constant([3.0, 4.0]) * scale], [variable], 0.0, 1.0)
    np.testing.assert_allclose(variable.numpy(), [1 - 0.5 * 0.6, 1 - 0.5 * 0.8], rtol=1e-6)
    before = variable.numpy()
    apply_weight_gradients(optimizer, [tf.constant([np.inf, 1.0])], [variable], 0.0, 1.0)
    np.testing.assert_array_equal(variable.numpy(), before)  # the step was skipped
    assert float(optimizer.dynamic_scale) == scale / 2


def test_under_mixed_precision_only_convolutions_and_pools_compute_in_float16():
    import keras
    import numpy as np

    from hmnas_keras.space.search_space import SearchSpace
    from hmnas_keras.space.supernet import Supernet

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        space = SearchSpace(num_cells=2, channels=4, num_nodes=2)
        supernet = Supernet(space, 10)
        logits = supernet(np.zeros((2, 8, 8, 3), "float32"), training=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    assert {v.dtype for v in supernet.variables} == {"float32"}
    layers = {type(layer).__name__: layer.compute_dtype for layer in supernet._flatten_layers()}
    for name in ("PointwiseConv", "MaskableDepthwiseConv2D", "MaskableConv2D", "MaxPooling2D"):
        assert layers[name] == "float16", name
    for name in ("FusedBatchNorm", "MaskableBatchNormalization", "MaskableDense", "Cell"):
        assert layers[name] == "float32", name


def test_mixed_precision_trains_and_checkpoints_its_loss_scale(tmp_path):
    import numpy as np

    workdir = trains_one_epoch_with(tmp_path, "mixed_precision")
    checkpoint = np.load(workdir / "supernet" / "checkpoint.npz")
    paths = json.loads(str(checkpoint["__paths__"]))
    scales = [p for p in paths if p.endswith("dynamic_scale")]
    assert scales == [
        "weight_optimizer_loss_scale/dynamic_scale",
        "arch_optimizer_loss_scale/dynamic_scale",
    ]
    arrays = [checkpoint[f"v{i:05d}"] for i in range(len(paths))]
    assert not any(a.dtype == np.float16 for a in arrays)
