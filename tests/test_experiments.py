"""The experiment runner: its plan (in-process) and its runs (as a user starts it)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_DIGITS

from hmnas_keras.checkpoint import read_state
from hmnas_keras.experiments.plan import (
    PlanError,
    build_plan,
    parse_seeds,
    parse_variants,
    plan_differences,
    plan_record,
)

ALL = ("hmnas", "darts_heuristic", "single_level", "random_arch", "random_init", "hmnas_darts_size")
GIVEN = {
    "supernet_epochs": "--supernet_epochs=2",
    "mask_target": "--mask_target=flops",
    "mask_target_ratio": "--mask_target_ratio=0.5",
}

TINY = [
    *TINY_DIGITS,
    "--ops=sep_conv_3x3,skip_connect",
    # One warm-up epoch: the supernet traces its weight step only (the DARTS cell is still
    # derived from its α, β), to keep the test short.
    "--supernet_epochs=1",
    "--warmup_epochs=1",
    "--test_every=0",
    "--finetune_epochs=3",
    "--checkpoint_every_steps=2",
]


def experiment(workdir, *flags, wait=True):
    command = [sys.executable, "-m", "hmnas_keras.experiments", f"--workdir={workdir}", *flags]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if not wait:
        return subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def test_the_plan_shares_one_supernet_per_seed_and_encoding():
    runs = build_plan("/exp", ALL, (0, 1), 2, GIVEN)
    names = [run.name for run in runs]
    per_seed = [
        "supernet_multi_level",
        "supernet_single_level",
        "hmnas",
        "darts_heuristic",
        "single_level",
        "random_arch0",
        "random_arch1",
        "random_init",
        "hmnas_darts_size",
    ]
    assert names == [f"seed{s}/{n}" for s in (0, 1) for n in per_seed]
    by_name = {run.name: run for run in runs}
    multi = "--supernet_checkpoint=/exp/seed1/supernet_multi_level/supernet/checkpoint.npz"
    for name in ("hmnas", "darts_heuristic", "random_arch0", "random_arch1", "hmnas_darts_size"):
        run = by_name[f"seed1/{name}"]
        assert (
            multi in run.flags and "--seed=1" in run.flags and run.workdir == f"/exp/seed1/{name}"
        )
        assert run.needs[0] == "seed1/supernet_multi_level"
    single = by_name["seed1/single_level"]
    assert "--nomulti_level" in single.flags and "--derivation=darts" in single.flags
    assert "--supernet_checkpoint=/exp/seed1/supernet_single_level/supernet/checkpoint.npz" in (
        single.flags
    )
    assert "--nomulti_level" in by_name["seed1/supernet_single_level"].flags
    assert by_name["seed0/random_arch1"].sample == 1
    assert "--random_sample=1" in by_name["seed0/random_arch1"].flags
    random_init = by_name["seed0/random_init"]
    assert random_init.needs == ("seed0/hmnas",)
    assert "--architecture=/exp/seed0/hmnas/architecture.json" in random_init.flags
    assert "--finetune_init=scratch" in random_init.flags
    assert not any(f.startswith("--supernet_checkpoint") for f in random_init.flags)
    darts_size = by_name["seed0/hmnas_darts_size"]
    assert darts_size.late_flag == ("--mask_target_value", "seed0/darts_heuristic")
    assert "--mask_target=params" in darts_size.flags
    # Every run gets the flags given; the mask-target ones only the HM-NAS runs.
    assert all("--supernet_epochs=2" in run.flags for run in runs)
    with_target = {run.name for run in runs if "--mask_target_ratio=0.5" in run.flags}
    assert with_target == {"seed0/hmnas", "seed1/hmnas"}
    assert {r.flags[r.flags.index("--supernet_epochs=2") + 1] for r in runs} >= {
        "--phases=supernet",
        "--phases=mask,finetune",
        "--phases=finetune",
    }
    exported = build_plan("/exp", ("darts_heuristic",), (0,), 0, {}, with_export=True)
    assert "--phases=finetune,export" in exported[1].flags


def test_plan_mistakes_are_named():
    with pytest.raises(PlanError, match="Unknown variant darts: --variants takes"):
        parse_variants(["hmnas", "darts"])
    with pytest.raises(PlanError, match="--seeds is empty"):
        parse_seeds([])
    with pytest.raises(PlanError, match="whole numbers"):
        parse_seeds(["0", "x"])
    with pytest.raises(PlanError, match="--seed is set by the experiment runner.*--seeds"):
        build_plan("/exp", ("hmnas",), (0,), 1, {"seed": "--seed=3"})
    with pytest.raises(PlanError, match="add hmnas to --variants"):
        build_plan("/exp", ("random_init",), (0,), 1, {})
    saved = plan_record(("hmnas",), (0, 1), 3, {"supernet_epochs": "--supernet_epochs=2"}, False)
    now = plan_record(("hmnas",), (0, 1, 2), 3, {"mask_epochs": "--mask_epochs=1"}, False)
    assert plan_differences(saved, saved) == []
    assert plan_differences(saved, now) == [
        "--seeds: 0,1 in plan.json, 0,1,2 now",
        "--mask_epochs: not given in plan.json, --mask_epochs=1 now",
        "--supernet_epochs: --supernet_epochs=2 in plan.json, not given now",
    ]


def test_a_failed_run_is_recorded_and_its_dependents_are_not_run(tmp_path):
    workdir = str(tmp_path / "exp")
    missing = str(tmp_path / "no-such-folder")
    result = experiment(
        workdir,
        "--seeds=0",
        "--variants=darts_heuristic",
        "--dataset=folder",
        f"--data_dir={missing}",
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert (
        "2 run(s) did not finish: seed0/supernet_multi_level, seed0/darts_heuristic"
        in result.stderr
    )
    results = json.load(open(os.path.join(workdir, "results.json")))
    (supernet,) = results["supernets"]
    assert supernet["status"] == "failed" and missing in supernet["error"]
    (darts,) = results["runs"]
    assert darts["status"] == "not run" and "seed0/supernet_multi_level" in darts["error"]
    assert darts["test_accuracy"] is None
    assert "| darts_heuristic | 0/1 |" in open(os.path.join(workdir, "results.md")).read()


def test_a_killed_experiment_keeps_finished_runs_and_continues_the_interrupted_one(tmp_path):
    workdir = str(tmp_path / "exp")
    flags = ["--seeds=0", "--variants=darts_heuristic", *TINY]
    process = experiment(workdir, *flags, wait=False)
    darts = os.path.join(workdir, "seed0", "darts_heuristic")
    checkpoint = os.path.join(darts, "finetune", "checkpoint.npz")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if read_state(checkpoint)["global_step"] >= 2:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert process.poll() is None, process.stdout.read().decode()[-3000:]
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its run, as a crash would
    process.wait()
    assert not read_state(checkpoint)["finished"]
    supernet_report = os.path.join(workdir, "seed0", "supernet_multi_level", "report.json")
    finished_at = os.stat(supernet_report).st_mtime_ns
    partial = json.load(open(os.path.join(workdir, "results.json")))
    assert [e["status"] for e in partial["supernets"]] == ["finished"]

    again = experiment(workdir, *flags)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 of 2 runs have finished before: skipping them." in again.stdout
    assert "seed0/darts_heuristic: resuming" in again.stdout
    assert "Resuming the finetune phase" in again.stdout
    assert os.stat(supernet_report).st_mtime_ns == finished_at  # not run again
    results = json.load(open(os.path.join(workdir, "results.json")))
    (run,) = results["runs"]
    summary = json.load(open(os.path.join(darts, "finetune", "summary.json")))
    assert run["status"] == "finished" and run["variant"] == "darts_heuristic"
    assert run["test_accuracy"] == summary["test_accuracy"] and 0 <= run["test_accuracy"] <= 1
    assert run["parameters"] == run["parameters_dense"] == summary["parameters"]["dense"] > 0
    assert run["wall_seconds"]["supernet"] > 0 and run["wall_seconds"]["finetune"] > 0
    assert results["plan"]["seeds"] == [0] and results["plan"]["variants"] == ["darts_heuristic"]
    architecture = json.load(open(os.path.join(darts, "architecture.json")))
    weights = [
        (edge["weight"], op["weight"])
        for cell in architecture["cells"].values()
        for edge in cell["edges"]
        for op in edge["ops"]
    ]
    assert weights and set(weights) == {(1.0, 1.0)}  # DARTS' discrete cell: unit weights
    table = open(os.path.join(workdir, "results.md")).read()
    assert f"| darts_heuristic | 1/1 | {100 * run['test_accuracy']:.2f} |" in table
    assert "2.70 % / 2.1 M" in table
    assert os.path.getsize(os.path.join(workdir, "results.png")) > 10_000

    # A different plan in the same workdir is refused, with the difference named.
    plan_before = open(os.path.join(workdir, "plan.json")).read()
    other = experiment(workdir, "--seeds=0", "--variants=darts_heuristic", *TINY[:-2])
    assert other.returncode == 1 and "Traceback" not in other.stderr
    assert "different plan" in other.stderr
    assert "--finetune_epochs: --finetune_epochs=3 in plan.json, not given now" in other.stderr
    assert open(os.path.join(workdir, "plan.json")).read() == plan_before


# Resolves each shipped config in one process: the search configs into a RunConfig, the
# ablation configs into the runner's plan (its --dry_run).
CONFIGS = """
import sys
from absl import flags
from hmnas_keras import search
from hmnas_keras.experiments import __main__ as experiments
workdir, *paths = sys.argv[1:]
for path in paths:
    flags.FLAGS.unparse_flags()
    if "ablation" in path:
        flags.FLAGS(["x", f"--flagfile={path}", f"--workdir={workdir}", "--dry_run"])
        assert experiments.main(["x"]) == 0
    else:
        flags.FLAGS(["x", f"--flagfile={path}", f"--workdir={workdir}"])
        supernet = search.config_from_flags().supernet
        print(path, supernet.arch_step_schedule, supernet.arch_step_final_prob, supernet.epochs)
"""


def test_shipped_configs_resolve_and_the_paper_configs_decay_sigma(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = ("cifar10.cfg", "imagenet.cfg", "ablation_cifar10_small.cfg", "ablation_cifar10.cfg")
    configs = [os.path.join(root, "configs", name) for name in names]
    workdir = str(tmp_path / "exp")
    result = subprocess.run(
        [sys.executable, "-c", CONFIGS, workdir, *configs],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")
    for path in configs[:2]:
        assert f"{path} cosine 0.0 100" in lines
    plans = [line for line in lines if line.startswith("Plan: ")]
    assert [plan.split(" (")[0] for plan in plans] == ["Plan: 27 runs", "Plan: 39 runs"]
    assert all("single_level, random_arch, random_init, hmnas_darts_size;" in p for p in plans)
    assert result.stdout.count("--arch_step_schedule=cosine") == 27 + 39
    assert result.stdout.count("--second_order") == 39
    assert not os.path.exists(workdir)  # a dry run writes nothing


def test_parallel_runs_get_a_gpu_each_or_a_share_of_the_cores(monkeypatch):
    from hmnas_keras.experiments.plan import ExperimentFiles
    from hmnas_keras.experiments.runner import Runner

    def environment(parallel, threads_given=False, slot=0):
        runner = Runner(ExperimentFiles("/exp"), [], {}, parallel, threads_given)
        return runner._environment(slot)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [environment(2, slot=s)[0]["CUDA_VISIBLE_DEVICES"] for s in (0, 1)] == ["3", "5"]
    assert environment(3, slot=2)[0]["CUDA_VISIBLE_DEVICES"] == "3"  # round robin
    assert environment(2)[1] == []  # a GPU each: TensorFlow's own threads
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the cores are shared
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert environment(2)[1] == ["--threads=4"] and environment(16)[1] == ["--threads=1"]
    assert environment(1)[1] == [] and environment(2, threads_given=True)[1] == []


def test_results_tabulate_mean_and_std_per_variant_and_hmnas_by_stage():
    from hmnas_keras.experiments.results import results_markdown

    def entry(name, variant, seed, status, accuracy, parameters, searched=None):
        return {
            "name": name,
            "variant": variant,
            "seed": seed,
            "status": status,
            "error": None if status == "finished" else "boom | bang",
            "test_accuracy": accuracy,
            "searched_test_accuracy": searched,
            "searched_parameters": parameters,
            "parameters": parameters,
            "parameters_dense": 2 * parameters if parameters else None,
            "mflops": 1.5 if parameters else None,
            "wall_seconds": {"supernet": 10.0, "finetune": 4.0},
        }

    entries = [
        entry("seed0/supernet_multi_level", None, 0, "finished", 0.5, 900),
        entry("seed1/supernet_multi_level", None, 1, "finished", 0.7, 900),
        entry("seed0/hmnas", "hmnas", 0, "finished", 0.30, 100, searched=0.2),
        entry("seed1/hmnas", "hmnas", 1, "finished", 0.40, 300, searched=0.3),
        entry("seed0/darts_heuristic", "darts_heuristic", 0, "failed", None, None),
    ]
    record = plan_record(("hmnas", "darts_heuristic"), (0, 1), 3, {"x": "--x=1"}, False)
    table = results_markdown(record, entries)
    assert (
        "| hmnas | 2/2 | 35.00 ± 7.07 | 65.00 ± 7.07 | 200 ± 141 | 400 ± 283 | 1.50 ± 0.00" in table
    )
    assert "| 2.41 ± 0.05 % / 1.8 M |" in table
    assert "| darts_heuristic | 0/1 | – | – | – | – | – | – | – | – | 2.70 % / 2.1 M |" in table
    assert "| supernet | 60.00 ± 14.14 | 40.00 ± 14.14 | 900 ± 0 | 4.20 % / 3.0 M |" in table
    assert "| searched network (inherited weights) | 25.00 ± 7.07 |" in table
    assert "| seed0/darts_heuristic | failed | – | – | – | – | – | boom / bang |" in table
    assert "`--x=1`" in table
