"""Time per supernet epoch on one process and on several local workers, back to back.

    python tools/worker_benchmark.py --workers=1,2 --epochs=4 --rounds=2

For each worker count N and round: starts N `python -m hmnas_keras.search` processes on
this machine (`--strategy=multi_worker`, TF_CONFIG on localhost ports; N=1 is the default
strategy, one process) on the quickstart configuration (`--flagfile`, supernet phase only,
`--epochs` epochs, the first a warm-up), each process with cores / N intra-op threads,
and reads the chief's metrics.csv. Prints, per N, the first epoch (weight steps, their
tracing included), the second (the first with architecture steps, their tracing included)
and the median of the later ones, and that median's ratio to one process's. The counts
take turns within every round. Measure on an idle machine.
"""

import csv
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")
flags.DEFINE_integer("epochs", 4, "Supernet epochs per run (the first a warm-up).", lower_bound=3)
flags.DEFINE_integer("rounds", 2, "Rounds; each times every worker count once.", lower_bound=1)
flags.DEFINE_string("flagfile_path", "configs/quickstart.cfg", "The run's configuration.")
FLAGS = flags.FLAGS


def run_once(workers: int, folder: str) -> list[float]:
    """Seconds of each epoch of a supernet run on `workers` local processes."""
    workdir = os.path.join(folder, f"w{workers}")
    threads = max(1, (os.cpu_count() or 1) // workers)
    command = [
        sys.executable,
        "-m",
        "hmnas_keras.search",
        f"--flagfile={FLAGS.flagfile_path}",
        f"--workdir={workdir}",
        "--phases=supernet",
        f"--supernet_epochs={FLAGS.epochs}",
        "--warmup_epochs=1",
        f"--threads={threads}",
    ]
    if workers > 1:
        command.append("--strategy=multi_worker")
    from hmnas_keras.distributed import local_ports, local_tf_config

    ports = local_ports(workers)
    processes = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        if workers > 1:
            env["TF_CONFIG"] = local_tf_config(ports, index)
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    for process in processes:
        _, err = process.communicate()
        if process.returncode:
            raise SystemExit(f"A run on {workers} worker(s) failed:\n{err[-2000:]}")
    with open(os.path.join(workdir, "supernet", "metrics.csv")) as handle:
        cumulative = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return [b - a for a, b in zip([0.0, *cumulative], cumulative)]


def main(argv):
    del argv
    counts = [int(n) for n in FLAGS.workers]
    times = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(FLAGS.rounds):
            for n in counts:
                seconds = run_once(n, os.path.join(folder, f"round{round_index}"))
                times[n].append(seconds)
                print(f"round {round_index + 1}, {n} worker(s): epochs {seconds}", flush=True)
    baseline = None
    header = ("workers", "epoch 1 s", "epoch 2 s", "later epochs s", "x one process")
    print("\n" + " ".join(f"{h:>14}" for h in header))
    for n in counts:
        first = statistics.median(run[0] for run in times[n])
        second = statistics.median(run[1] for run in times[n])
        later = statistics.median(s for run in times[n] for s in run[2:])
        baseline = baseline or later
        figures = (
            f"{n}",
            f"{first:.1f}",
            f"{second:.1f}",
            f"{later:.2f}",
            f"{later / baseline:.2f}",
        )
        print(" ".join(f"{f:>14}" for f in figures))


if __name__ == "__main__":
    app.run(main)
