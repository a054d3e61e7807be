"""Training on several devices and machines with tf.distribute.

Three strategies (`--strategy`):
- `default`: one device;
- `mirrored`: every GPU of this machine (or every logical CPU, `--logical_cpus`);
- `multi_worker`: MultiWorkerMirroredStrategy over several processes or machines,
  the cluster read from `TF_CONFIG` or, without it, from Slurm's variables.

Batches: `--batch_size` is the global batch. `distribute_batches` hands replica r
of R the r-th contiguous part of every global batch, so that a run over any
number of workers and devices sees exactly the batches one device would see
(and the per-replica BatchNorm statistics are those of the same images
whatever the cluster's shape).

Workers: every task of a multi-worker cluster runs the same training (the
collectives need them all), but only the chief writes the workdir; the others
work in a temporary copy of it, removed at the end (`Cluster`).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile

import numpy as np
import tensorflow as tf

TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\''
)
# The jobs a MultiWorkerMirroredStrategy cluster may have.
JOBS = ("chief", "worker")
# Upper bound of what `all_gather_json` sends per task.
MAX_MESSAGE_BYTES = 1 << 16


class ClusterError(ValueError):
    """The cluster is described wrongly, or its tasks disagree."""


# ------------------------------------------------------------------ the cluster


def local_ports(count: int) -> list[int]:
    """`count` free TCP ports on localhost (for a cluster of local processes)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def local_tf_config(ports: list[int], index: int) -> str:
    """The TF_CONFIG of worker `index` of a cluster of local processes on `ports`."""
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def _check_tf_config(raw: str) -> dict:
    """The parsed TF_CONFIG, or a ClusterError saying what is wrong with it."""

    def wrong(what):
        return ClusterError(f"TF_CONFIG {what}. Expected, e.g.: {TF_CONFIG_EXAMPLE}")

    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as error:
        raise wrong(f"is not JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise wrong('has no "cluster" object')
    cluster = spec["cluster"]
    unknown = sorted(set(cluster) - set(JOBS))
    if unknown:
        raise wrong(
            f"has jobs {', '.join(unknown)}: MultiWorkerMirroredStrategy takes only "
            f"{' and '.join(JOBS)}"
        )
    if not cluster.get("worker") and not cluster.get("chief"):
        raise wrong('lists no "worker" addresses')
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses
        ):
            raise wrong(f'job "{job}" is not a list of "host:port" addresses')
    if len(cluster.get("chief", [])) > 1:
        raise wrong("has more than one chief")
    task = spec.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise wrong('has no "task" with "type" and "index" (which task this process is)')
    if task["type"] not in cluster:
        raise wrong(f'has task type "{task["type"]}", which is not a job of its cluster')
    index = task["index"]
    if not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise wrong(
            f"has task index {index!r}, outside the {len(cluster[task['type']])} "
            f'"{task["type"]}" addresses'
        )
    return spec


def _slurm_gpu_arguments() -> dict:
    """SlurmClusterResolver's GPU arguments: its own (it asks nvidia-smi and sets
    CUDA_VISIBLE_DEVICES per task) where GPUs may exist; on CPU nodes, "one GPU per task"
    of a notional 1,024, only so that it numbers the ports of a node's tasks (with no GPU it
    numbers none), and no CUDA_VISIBLE_DEVICES."""
    if "CUDA_VISIBLE_DEVICES" in os.environ or shutil.which("nvidia-smi"):
        return {}
    return {"gpus_per_node": 1024, "gpus_per_task": 1, "auto_set_gpu": False}


def cluster_resolver(slurm_port_base: int = 8888, environ=None):
    """The cluster of a multi-worker run: from TF_CONFIG, else from Slurm's variables."""
    environ = os.environ if environ is None else environ
    raw = environ.get("TF_CONFIG", "").strip()
    if raw:
        _check_tf_config(raw)
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        try:
            return tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=slurm_port_base, **_slurm_gpu_arguments()
            )
        except (RuntimeError, ValueError, OSError) as error:
            raise ClusterError(
                f"Slurm's variables do not describe a cluster: {error}. Start the workers "
                "with srun inside the job, or set TF_CONFIG instead."
            ) from None
    raise ClusterError(
        "--strategy=multi_worker needs to know the cluster: set TF_CONFIG on every worker "
        f"(e.g. {TF_CONFIG_EXAMPLE}, with index 0, 1, ... per worker), or start the workers "
        "with srun in a Slurm job."
    )


def make_strategy(name: str, slurm_port_base: int = 8888) -> tf.distribute.Strategy:
    """The tf.distribute strategy called `name`.

    Create it before TensorFlow runs anything: a multi-worker strategy sets up
    the collective ops of the process, and it waits until every task is up.
    """
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=cluster_resolver(slurm_port_base)
        )
    return tf.distribute.get_strategy()


def is_multi_worker(strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def task_of(strategy) -> tuple[str, int, int]:
    """(task type, task index, number of tasks) of this process (("chief", 0, 1) on one)."""
    if not is_multi_worker(strategy):
        return "chief", 0, 1
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec()
    tasks = sum(spec.num_tasks(job) for job in spec.jobs)
    return resolver.task_type, int(resolver.task_id or 0), tasks


def is_chief(strategy) -> bool:
    """True for the task that writes: the chief, or worker 0 of a cluster without one."""
    if not is_multi_worker(strategy):
        return True
    task_type, task_id, _ = task_of(strategy)
    has_chief = "chief" in strategy.cluster_resolver.cluster_spec().jobs
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)


def task_name(strategy) -> str:
    task_type, task_id, tasks = task_of(strategy)
    return f"{task_type} {task_id} of {tasks} tasks"


# ------------------------------------------------------------------ batches


def _replica_part(element, replica: int, replicas: int):
    """The `replica`-th of `replicas` contiguous parts of every tensor of a batch."""
    leaves = tf.nest.flatten(element)
    size = leaves[0].shape[0]
    if size is not None and size % replicas == 0:
        part = size // replicas
        start, end = replica * part, (replica + 1) * part
    else:  # unknown (the padded test batches) or uneven size: near-equal parts at run time
        size = tf.shape(leaves[0], out_type=tf.int64)[0]
        start, end = replica * size // replicas, (replica + 1) * size // replicas
    return tf.nest.map_structure(lambda tensor: tensor[start:end], element)


def distribute_batches(strategy, dataset: tf.data.Dataset):
    """`dataset` of global batches as a distributed dataset: replica r of R gets the r-th
    contiguous part of each batch (one device: `dataset` itself)."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 and not is_multi_worker(strategy):
        return dataset

    def dataset_fn(context: tf.distribute.InputContext):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def parts(*element):
            element = element if len(element) > 1 else element[0]
            return tf.data.Dataset.range(first, first + local).map(
                lambda replica: _replica_part(element, replica, replicas)
            )

        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return dataset.flat_map(parts).with_options(options)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _padded(replicas: int):
    """(images, labels) -> (images, labels, weights), padded with weight-0 copies of the first
    image to a multiple of `replicas`, so that no replica gets an empty part."""

    def pad(images, labels):
        count = tf.shape(labels)[0]
        padded = (count + replicas - 1) // replicas * replicas
        indices = tf.concat([tf.range(count), tf.zeros([padded - count], tf.int32)], 0)
        weights = tf.cast(tf.range(padded) < count, tf.float32)
        return tf.gather(images, indices), tf.gather(labels, indices), weights

    return pad


def evaluation_data(strategy, dataset: tf.data.Dataset) -> dict:
    """`evaluate()`'s x and steps for a finite `dataset` of (images, labels) global batches.

    Under several replicas a partial batch is padded with weight-0 images to a multiple of
    the replicas (a replica's empty part breaks strided ops); a distributed dataset has no
    length of its own, and Keras would warn when it ends, hence the steps.
    """
    steps = int(dataset.cardinality())
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        dataset = dataset.map(_padded(replicas))
    return {"x": distribute_batches(strategy, dataset), "steps": steps}


def check_settings(strategy, config) -> None:
    """Refuses what the strategy cannot run as asked (a ClusterError saying what to do)."""
    replicas = strategy.num_replicas_in_sync
    batch_size = config.data.batch_size
    if replicas > 1 and config.supernet.second_order and "supernet" in config.phases:
        raise ClusterError(
            f"--second_order under {replicas} replicas would take each replica's unrolled step "
            "on its own part of the batch, which is not one device's architecture gradient. "
            "Search with second order on one device (--strategy=default, one GPU), or drop "
            "--second_order."
        )
    if config.mixed_precision and config.supernet.second_order and "supernet" in config.phases:
        raise ClusterError(
            "--second_order takes finite differences of gradients (ε ~ 0.01 / ‖∇‖), which "
            "float16 cannot resolve: drop --mixed_precision or --second_order."
        )
    if replicas > 1 and config.jit_compile:
        raise ClusterError(
            f"--jit_compile compiles one device's step; under {replicas} replicas the step's "
            "variables live on several devices, which XLA cannot compile. Drop --jit_compile, "
            "or train on one device."
        )
    if batch_size % replicas:
        raise ClusterError(
            f"--batch_size={batch_size} is the global batch, split over {replicas} replicas: "
            f"it must be a multiple of {replicas} "
            f"(e.g. {max(1, batch_size // replicas) * replicas})."
        )


# ------------------------------------------------------------------ agreement


def all_gather_json(strategy, message) -> list:
    """Every task's `message` (JSON-serialisable), in task order; a collective: every task
    must call it at the same point."""
    if not is_multi_worker(strategy):
        return [message]
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE_BYTES - 4:
        raise ClusterError(f"A message of {len(data):,} bytes is too long to share.")
    buffer = np.zeros(MAX_MESSAGE_BYTES // 4, np.int32)
    raw = np.frombuffer(data.ljust(MAX_MESSAGE_BYTES - 4, b"\0"), np.uint8)
    buffer[0] = len(data)
    buffer[1:] = raw.view("<i4")
    local = strategy.extended.worker_devices

    def value(context):
        return tf.constant(buffer)

    per_replica = strategy.experimental_distribute_values_from_function(value)
    gathered = strategy.gather(per_replica, axis=0).numpy().reshape(-1, buffer.size)
    messages = []
    for row in gathered[:: len(local)]:
        length = int(row[0])
        messages.append(json.loads(row[1:].view(np.uint8)[:length].tobytes().decode()))
    return messages


def barrier(strategy) -> None:
    """Returns once every task got here."""
    all_gather_json(strategy, None)


# ------------------------------------------------------------------ the workers' folders


@dataclasses.dataclass
class Cluster:
    """This process's place in the run: which task it is, and where it writes.

    The chief (and a process on its own) writes the workdir; every other task
    of a multi-worker cluster writes a temporary copy of it, removed at the end.
    """

    strategy: tf.distribute.Strategy
    root: str
    multi_worker: bool
    chief: bool
    name: str
    scratch: str | None = None

    @classmethod
    def of(cls, strategy, root: str) -> "Cluster":
        return cls(
            strategy, root, is_multi_worker(strategy), is_chief(strategy), task_name(strategy)
        )

    def own_root(self, leave_out: tuple[str, ...] = ()) -> str:
        """The folder this task writes: the workdir for the chief; for another task of a
        cluster, a temporary copy of what the chief's workdir holds now (checkpoints to
        resume from, earlier phases' outputs) without the names in `leave_out`. A collective
        in a cluster: the chief goes on once every copy is made."""
        if not self.multi_worker:
            return self.root
        if not self.chief and self.scratch is None:
            task_type, task_id, _ = task_of(self.strategy)
            self.scratch = tempfile.mkdtemp(prefix=f"hmnas-{task_type}{task_id}-")
            if os.path.isdir(self.root):
                shutil.copytree(
                    self.root,
                    self.scratch,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(*leave_out, ".write-test*"),
                )
            # SIGTERM ends the process through Python, so that `cleanup` still runs.
            signal.signal(signal.SIGTERM, lambda signum, frame: _exit_on_signal(signum))
        barrier(self.strategy)
        return self.scratch or self.root

    def cleanup(self) -> None:
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


# What a collective raises once TensorFlow's health check found a task gone.
_PEER_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
    tf.errors.AbortedError,
    tf.errors.FailedPreconditionError,
    tf.errors.InternalError,
)


def cluster_failure(error: BaseException, cluster: "Cluster | None") -> str | None:
    """The one-line message for a collective that failed because a task stopped (None if
    `error` is not that)."""
    if cluster is None or not cluster.multi_worker or not isinstance(error, _PEER_FAILURES):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next(
        (line for line in lines if "abort" in line.lower() or "down" in line.lower()),
        lines[0] if lines else type(error).__name__,
    )
    return (
        f"{cluster.name}: the cluster lost a task, so every task stops ({cause[:300]}). "
        "Restart every task with --resume: the run continues from the chief's last "
        "checkpoint in its workdir."
    )


def _exit_on_signal(signum):
    raise SystemExit(128 + signum)


def config_differences(mine: dict, chief: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configuration dictionaries."""
    keys = sorted(set(mine) | set(chief))
    found = []
    for key in keys:
        a, b = mine.get(key), chief.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, name + ".")
        elif json.dumps(a) != json.dumps(b):
            found.append(f"{name}: {json.dumps(b)} on the chief, {json.dumps(a)} here")
    return found


def config_hash(config: dict) -> str:
    """A short hash of a configuration dictionary, as the tasks compare it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
