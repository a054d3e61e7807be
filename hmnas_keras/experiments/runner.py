"""Running a plan: one `python -m hmnas_keras.search` process per run, N at a time.

A run whose report exists has finished and is skipped; a run whose workdir
holds a configuration continues with `--resume`; the others start. A run
starts once the runs it needs have finished; when one of them failed it is
recorded as not run. Each run's output goes to EXP/logs/<seed>-<run>.log (kept
across restarts) and, prefixed with its name, to the console. results.json is
rewritten after every run, so a killed runner loses no finished run.
"""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from hmnas_keras.experiments import results
from hmnas_keras.experiments.plan import PlannedRun
from hmnas_keras.pipeline.workdir import Workdir


def visible_gpus() -> list[str]:
    """The GPUs a run can be given through CUDA_VISIBLE_DEVICES (without importing TensorFlow)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def _late_value(run: PlannedRun, plan: list[PlannedRun]) -> str | None:
    """The value of `run.late_flag`: the non-zero parameters of the run it names."""
    flag, source = run.late_flag
    parameters = results.run_entry(next(r for r in plan if r.name == source), plan, "finished")[
        "parameters"
    ]
    return None if parameters is None else f"{flag}={parameters}"


def command(run: PlannedRun, plan: list[PlannedRun]) -> list[str]:
    """The command line of `run` (with --resume when its workdir holds a configuration)."""
    flags = list(run.flags)
    if run.late_flag is not None:
        late = _late_value(run, plan)
        flags.append(late if late else f"{run.late_flag[0]}=<from {run.late_flag[1]}>")
    if os.path.exists(Workdir(run.workdir).config):
        flags.append("--resume")
    return [sys.executable, "-m", "hmnas_keras.search", f"--workdir={run.workdir}", *flags]


@dataclasses.dataclass
class _Process:
    run: PlannedRun
    popen: subprocess.Popen
    slot: int
    started: float
    reader: threading.Thread
    last_lines: list


def _error_of(lines: list[str], returncode: int) -> str:
    """A failed run's error: its "Error: ..." line, else its last line, else the exit code."""
    for line in reversed(lines):
        if line.startswith("Error: "):
            return line[len("Error: ") :]
    for line in reversed(lines):
        if line.strip():
            return f"{line.strip()} (exit code {returncode})"
    return f"exit code {returncode}"


class Runner:
    """Runs the plan's unfinished runs, at most `parallel` at a time."""

    def __init__(self, files, plan, record, parallel=1, threads_given=False):
        self.files = files
        self.plan = plan
        self.record = record
        self.parallel = parallel
        self.threads_given = threads_given
        self.gpus = visible_gpus()
        self.status = {}
        self.errors = {}
        self.print_lock = threading.Lock()
        self.running: list[_Process] = []

    def say(self, line: str) -> None:
        with self.print_lock:
            print(line, flush=True)

    def entries(self) -> list[dict]:
        return [
            results.run_entry(
                run, self.plan, self.status.get(run.name, "pending"), self.errors.get(run.name)
            )
            for run in self.plan
        ]

    def write(self) -> None:
        results.write_results(self.files, self.record, self.entries())

    def _environment(self, slot: int) -> tuple[dict, list[str]]:
        environment = dict(os.environ)
        extra = []
        if self.gpus:
            environment["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        elif self.parallel > 1 and not self.threads_given:
            extra.append(f"--threads={max(1, (os.cpu_count() or 2) // self.parallel)}")
        return environment, extra

    def _start(self, run: PlannedRun, slot: int, position: str) -> None:
        environment, extra = self._environment(slot)
        line = command(run, self.plan) + extra
        log_path = self.files.log(run)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log = open(log_path, "a")
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(line)}\n")
        log.flush()
        resumed = "--resume" in line
        device = f", GPU {environment['CUDA_VISIBLE_DEVICES']}" if self.gpus else ""
        self.say(
            f"{position} {run.name}: {'resuming' if resumed else 'starting'}{device} "
            f"(log: {log_path})"
        )
        popen = subprocess.Popen(
            line,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=environment,
        )
        last_lines = []

        def read():
            for text in popen.stdout:
                log.write(text)
                log.flush()
                last_lines.append(text.rstrip("\n"))
                del last_lines[:-50]
                self.say(f"  [{run.name}] {text.rstrip()}")
            log.close()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.running.append(_Process(run, popen, slot, time.monotonic(), reader, last_lines))

    def _finish(self, process: _Process, position: str) -> None:
        process.reader.join()
        run = process.run
        seconds = time.monotonic() - process.started
        if process.popen.returncode == 0 and results.is_finished(run):
            self.status[run.name] = "finished"
            entry = results.run_entry(run, self.plan, "finished")
            figures = ""
            if entry["test_accuracy"] is not None:
                figures = (
                    f": test accuracy {100 * entry['test_accuracy']:.2f}%, "
                    f"{entry['parameters']:,} non-zero / {entry['parameters_dense']:,} "
                    "dense parameters"
                )
            self.say(f"{position} {run.name}: finished in {seconds:.0f} s{figures}")
        else:
            self.status[run.name] = "failed"
            self.errors[run.name] = _error_of(process.last_lines, process.popen.returncode)
            self.say(
                f"{position} {run.name}: FAILED after {seconds:.0f} s: {self.errors[run.name]}"
            )
        self.write()

    def stop(self) -> None:
        """Stops the running runs (their checkpoints let the next start resume them)."""
        for process in self.running:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()

    def run(self) -> bool:
        """Runs what is left of the plan; True if every run finished."""
        total = len(self.plan)
        pending = []
        for run in self.plan:
            if results.is_finished(run):
                self.status[run.name] = "finished"
            else:
                pending.append(run)
        skipped = total - len(pending)
        if skipped:
            self.say(f"{skipped} of {total} runs have finished before: skipping them.")
        self.write()
        order = {run.name: index + 1 for index, run in enumerate(self.plan)}

        def position(run):
            return f"[{order[run.name]}/{total}]"

        while pending or self.running:
            for run in list(pending):
                states = [self.status.get(name) for name in run.needs]
                if any(state in ("failed", "not run") for state in states):
                    pending.remove(run)
                    self.status[run.name] = "not run"
                    failed = [n for n in run.needs if self.status.get(n) in ("failed", "not run")]
                    self.errors[run.name] = f"needs {', '.join(failed)}, which did not finish"
                    self.say(f"{position(run)} {run.name}: not run: {self.errors[run.name]}")
                    self.write()
                elif (
                    all(state == "finished" for state in states)
                    and len(self.running) < self.parallel
                ):
                    pending.remove(run)
                    used = {process.slot for process in self.running}
                    slot = min(set(range(self.parallel)) - used)
                    self._start(run, slot, position(run))
            for process in list(self.running):
                if process.popen.poll() is not None:
                    self.running.remove(process)
                    self._finish(process, position(process.run))
            if self.running and not any(p.popen.poll() is not None for p in self.running):
                time.sleep(0.5)
        return all(self.status.get(run.name) == "finished" for run in self.plan)
