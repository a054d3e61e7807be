"""The whole pipeline (supernet -> mask -> finetune -> export) and its baselines, from the CLI."""

import csv
import dataclasses
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

TINY = [
    *TINY_DIGITS,
    "--ops=sep_conv_3x3,max_pool_3x3,skip_connect",
    "--warmup_epochs=1",
    "--supernet_epochs=2",
    "--mask_epochs=2",
    "--finetune_epochs=2",
    # Large mask learning rates, so that 24 mask steps prune something; used as given
    # (not scaled by 7,800 / steps), so that every test knows the rates it runs with.
    "--mask_weight_learning_rate=0.01",
    "--mask_arch_learning_rate=0.004",
    "--mask_lr_schedule=paper",
]


def search(workdir, *flags, wait=True):
    command = [sys.executable, "-m", "hmnas_keras.search", f"--workdir={workdir}", *TINY, *flags]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _kill_during(workdir, phase, flags, at_step):
    """Starts the run, SIGKILLs it once `phase` has checkpointed step `at_step`."""
    process = search(workdir, *flags, wait=False)
    checkpoint = os.path.join(workdir, phase, "checkpoint.npz")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if read_state(checkpoint)["global_step"] >= at_step:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    assert process.poll() is None, process.stdout.read().decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not read_state(checkpoint)["finished"]


def load(workdir, *path):
    with open(os.path.join(workdir, *path)) as handle:
        return json.load(handle)


def assert_accuracy_over_50_images(accuracy):
    """An accuracy over the 50 test images of TINY: a whole number of them, k / 50."""
    assert 0.0 <= accuracy <= 1.0 and accuracy * 50 == pytest.approx(round(accuracy * 50), abs=1e-3)


def rows_of(workdir, *path):
    with open(os.path.join(workdir, *path)) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline") / "run")
    result = search(workdir, "--deterministic")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_the_whole_pipeline_writes_the_table_3_report(pipeline):
    workdir, result = pipeline
    for name in ("config.json", "architecture.json", "searched.json", "report.json", "report.txt"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert read_state(os.path.join(workdir, "mask", "checkpoint.npz"))["finished"]
    assert read_state(os.path.join(workdir, "finetune", "checkpoint.npz"))["finished"]

    mask_rows = rows_of(workdir, "mask", "metrics.csv")
    assert [int(r["epoch"]) for r in mask_rows] == [1, 2]
    last = mask_rows[-1]
    assert 0 < int(last["weights"]) < int(last["weights_total"])
    assert 1 <= int(last["ops"]) <= 15 and 1 <= int(last["edges"]) <= 5
    assert_accuracy_over_50_images(float(last["test_accuracy"]))

    architecture = load(workdir, "architecture.json")
    assert architecture["format"] == "hmnas_keras/architecture" and architecture["version"] == 2
    assert architecture["derivation"] == "masks" and architecture["degenerate"] is None
    assert architecture["weight_masks"] == "mask/weight_masks.npz"
    with np.load(os.path.join(workdir, "mask", "weight_masks.npz")) as masks:
        kept = sum(int(masks[k].sum()) for k in masks.files)
    assert kept == int(last["weights"])
    parameters = architecture["parameters"]
    assert parameters["searched"]["nonzero"] < parameters["supernet"]["dense"]
    assert architecture["flops"]["searched"]["macs"] <= architecture["flops"]["supernet"]["macs"]
    assert {layer["path"] for layer in architecture["layers"]} >= {
        "stem_conv/kernel",
        "classifier/kernel",
    }

    finetune = load(workdir, "finetune", "summary.json")
    assert finetune["pruned_weights_zero"] is True and finetune["init"] == "inherited"
    assert finetune["parameters"] == parameters["searched"]

    report = load(workdir, "report.json")
    assert list(report["rows"]) == ["supernet", "searched", "finetuned"]
    for row in report["rows"].values():
        assert_accuracy_over_50_images(row["test_accuracy"])
        assert row["parameters"]["dense"] > 0 and row["wall_seconds"] > 0
    searched = report["rows"]["searched"]
    assert searched["reduction_percent"] == pytest.approx(
        100 * (1 - parameters["searched"]["nonzero"] / parameters["supernet"]["dense"]), abs=0.01
    )
    assert "searched network" in result.stdout and "fine-tuned" in result.stdout


def test_the_pipeline_ends_with_exported_models_and_pictures(pipeline):
    from hmnas_keras.serving import Classifier

    workdir, result = pipeline
    export = load(workdir, "export", "summary.json")
    for name in ("model.keras", "model.onnx", "metadata.json", "saved_model/saved_model.pb"):
        assert os.path.getsize(os.path.join(workdir, "export", name)) > 0, name
    parity = export["parity_max_abs_error"]
    assert parity["compact_vs_searched"]["real"] <= 1e-5
    assert max(max(parity[k].values()) for k in ("keras", "saved_model", "onnx")) <= 1e-4
    architecture = load(workdir, "architecture.json")
    counts = export["parameters"]
    assert {k: counts[k] for k in ("dense", "nonzero")} == architecture["parameters"]["searched"]
    assert export["flops"] == architecture["flops"]["searched"]
    report = load(workdir, "report.json")
    assert report["export"] == export
    assert "pictures/cell_normal.png" not in report["pictures"]  # 2 cells: both reduce
    assert {"pictures/cell_reduce.png", "pictures/edge_weights.png"} <= set(report["pictures"])
    assert "Parity (max |logit difference|)" in result.stdout
    # The ONNX model, fed raw test pixels and normalising them with its own metadata,
    # reaches the fine-tuned network's test accuracy.
    from hmnas_keras.data import make_search_data
    from hmnas_keras.pipeline.workdir import Workdir

    config = Workdir(workdir).read_config()
    data = make_search_data(config.data, config.seed)
    classifier = Classifier(os.path.join(workdir, "export", "model.onnx"))
    predictions = classifier.predict(data.test_images, top_k=1)
    hits = [p[0]["index"] == y for p, y in zip(predictions, data.test_labels, strict=True)]
    assert np.mean(hits) == pytest.approx(report["rows"]["finetuned"]["test_accuracy"], abs=1e-6)


# Large (suite time): the DARTS derivation is checked in test_architecture.py, and the
# baseline path shares the finetune and export phases with the tests above.
@pytest.mark.large
def test_darts_baseline_fine_tunes_from_the_same_supernet(pipeline, tmp_path):
    source, _ = pipeline
    workdir = str(tmp_path / "darts")
    supernet = os.path.join(source, "supernet", "checkpoint.npz")
    result = search(
        workdir,
        "--phases=finetune",
        "--derivation=darts",
        f"--supernet_checkpoint={supernet}",
        "--finetune_epochs=1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    architecture = load(workdir, "architecture.json")
    assert architecture["derivation"] == "darts" and architecture["weight_masks"] is None
    for cell in architecture["cells"].values():
        assert cell["incoming_edges"] == {"2": 2, "3": 2}
        assert all(len(edge["ops"]) == 1 for edge in cell["edges"])
    report = load(workdir, "report.json")
    assert report["rows"]["supernet"]["from"] == os.path.dirname(supernet)
    assert report["rows"]["searched"]["test_accuracy"] is not None
    assert report["rows"]["finetuned"]["parameters"]["dense"] > 0


def test_the_hmnas_architecture_retrained_from_scratch(pipeline, tmp_path):
    source, _ = pipeline
    workdir = str(tmp_path / "scratch")
    result = search(
        workdir,
        "--phases=finetune",
        f"--architecture={os.path.join(source, 'architecture.json')}",
        "--finetune_init=scratch",
        "--finetune_epochs=1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    original = load(source, "architecture.json")
    copied = load(workdir, "architecture.json")
    # The paper's random initialisation: the same pruned network, its weight masks kept.
    assert copied["cells"] == original["cells"]
    assert copied["weight_masks"] == original["weight_masks"] == "mask/weight_masks.npz"
    with np.load(os.path.join(source, "mask", "weight_masks.npz")) as a:
        with np.load(os.path.join(workdir, "mask", "weight_masks.npz")) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    report = load(workdir, "report.json")
    assert report["finetune_init"] == "scratch"
    assert list(report["rows"]) == ["supernet", "finetuned"]  # no searched row without weights
    finetune = load(workdir, "finetune", "summary.json")
    assert finetune["pruned_weights_zero"] is True
    hmnas = load(source, "finetune", "summary.json")
    assert finetune["parameters"] == hmnas["parameters"]  # non-zero and dense
    assert finetune["parameters"]["nonzero"] < finetune["parameters"]["dense"]
    # It started from fresh weights: the network fine-tuning builds holds none of the
    # (masked) supernet's kernels, where an inherited start holds them all.
    from hmnas_keras.architecture.searched_network import to_searched
    from hmnas_keras.checkpoint import relative_path
    from hmnas_keras.data import make_search_data
    from hmnas_keras.pipeline.derive_phase import _copy_architecture
    from hmnas_keras.pipeline.finetune_phase import build_finetune
    from hmnas_keras.pipeline.workdir import Workdir

    # --noscratch_masks: every weight of the kept ops trains.
    dense = Workdir(str(tmp_path / "dense"))
    config = dataclasses.replace(Workdir(workdir).read_config(), scratch_masks=False)
    _copy_architecture(config, dense)
    assert load(dense.root, "architecture.json")["weight_masks"] is None
    assert not os.path.exists(dense.weight_masks)

    inherited = to_searched(original, Workdir(source).masked_supernet_arrays())
    for run_dir, init in ((workdir, "scratch"), (source, "inherited")):
        config = Workdir(run_dir).read_config()
        assert config.finetune_init == init
        data = make_search_data(config.data, config.seed)
        network = build_finetune(config, data, Workdir.of_run(run_dir, config), original).network
        kernels = [v for v in network.variables if v.path.endswith("kernel")]
        same = [
            np.array_equal(v.numpy(), inherited[relative_path(v.path)] * (v.numpy() != 0))
            for v in kernels
        ]
        assert kernels and (not any(same) if init == "scratch" else all(same)), (init, same)


# Large (~17 s): training from scratch is covered by the HM-NAS-architecture test above.
@pytest.mark.large
def test_a_random_architecture_from_scratch_needs_no_supernet(tmp_path):
    workdir = str(tmp_path / "random")
    result = search(
        workdir,
        "--phases=finetune",
        "--derivation=random",
        "--finetune_init=scratch",
        "--finetune_epochs=1",
        "--seed=5",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    architecture = load(workdir, "architecture.json")
    assert architecture["derivation"] == "random"
    for cell in architecture["cells"].values():
        assert cell["incoming_edges"] == {"2": 2, "3": 2}
    assert load(workdir, "report.json")["rows"]["finetuned"]["test_accuracy"] is not None


def test_degenerate_masks_are_reported_not_crashed_into(pipeline, tmp_path):
    source, _ = pipeline
    workdir = str(tmp_path / "degenerate")
    result = search(
        workdir,
        "--phases=mask,finetune",
        f"--supernet_checkpoint={os.path.join(source, 'supernet', 'checkpoint.npz')}",
        "--mask_epochs=1",
        "--mask_initial_value=0.001",  # below τ: every mask starts (and stays) at 0
        "--mask_weight_learning_rate=1e-6",
        "--mask_arch_learning_rate=1e-6",
    )
    assert result.returncode == 1
    assert "Nothing to fine-tune: every node of the reduce cell was pruned" in result.stderr
    assert "every mask starts pruned" in result.stdout  # warned before any training
    assert "Traceback" not in result.stderr
    architecture = load(workdir, "architecture.json")
    assert "output no longer depends on its input" in architecture["degenerate"]


def test_killed_mask_phase_resumes_with_a_continuous_history(pipeline, tmp_path):
    source, _ = pipeline
    workdir = str(tmp_path / "run")
    flags = [
        "--phases=mask",
        f"--supernet_checkpoint={os.path.join(source, 'supernet', 'checkpoint.npz')}",
        "--checkpoint_every_steps=3",
        "--deterministic",
    ]
    _kill_during(workdir, "mask", flags, at_step=9)
    checkpoint = os.path.join(workdir, "mask", "checkpoint.npz")
    state = read_state(checkpoint)
    assert 9 <= state["global_step"] < 24 and not state["finished"]

    resumed = search(workdir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming the mask phase at epoch {state['epoch'] + 1}" in resumed.stdout
    rows = rows_of(workdir, "mask", "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    final = read_state(checkpoint)
    assert final["finished"] and final["global_step"] == 24
    assert load(workdir, "mask", "summary.json")["steps"] == 24
    # Determinism: the same seed and flags, killed and resumed in another process, give the
    # pipeline's masks exactly: the same architecture.json and the same metrics.
    assert load(workdir, "architecture.json") == load(source, "architecture.json")
    expected = rows_of(source, "mask", "metrics.csv")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in expected
    ]


def test_channel_masks_reach_a_flops_target_and_shrink_the_export(pipeline, tmp_path):
    source, _ = pipeline
    workdir = str(tmp_path / "channel")
    result = search(
        workdir,
        "--phases=mask,finetune,export",
        f"--supernet_checkpoint={os.path.join(source, 'supernet', 'checkpoint.npz')}",
        "--weight_mask=channel",
        "--mask_target=flops",
        "--mask_target_ratio=0.4",
        "--mask_epochs=3",
        # Scaled to this run's 36 steps (the default schedule): 0.002 and 0.0005.
        "--mask_weight_learning_rate=9.2307e-6",
        "--mask_arch_learning_rate=2.3077e-6",
        "--mask_lr_schedule=scaled",
        "--finetune_epochs=1",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = rows_of(workdir, "mask", "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert float(row["target"]) > 0 and float(row["cost_ratio"]) > 0
        assert row["multiplier"] != "" and int(row["channels"]) <= int(row["channels_total"])
        assert float(row["flops"]) == pytest.approx(float(row["cost_ratio"]) * float(row["target"]))
    assert os.listdir(os.path.join(workdir, "mask", "tensorboard", "cost"))
    assert "of the flops target, λ" in result.stdout

    summary = load(workdir, "mask", "summary.json")
    rates = summary["learning_rates"]
    assert rates["schedule"] == "scaled" and rates["steps"] == 36
    assert rates["weight_masks"] == pytest.approx(9.2307e-6 * 7800 / 36)
    assert rates["arch_masks"] == pytest.approx(2.3077e-6 * 7800 / 36)
    target = summary["target"]
    assert target["kind"] == "flops" and target["ratio"] == 0.4
    assert abs(target["relative_error"]) <= 0.05, target

    architecture = load(workdir, "architecture.json")
    assert architecture["weight_mask"] == "channel" and architecture["weight_masks"] is None
    assert architecture["cost"]["flops"] == round(target["reached"])
    export = load(workdir, "export", "summary.json")
    # Channels are dropped, not zeroed: the exported graph's dense counts are the cost.
    assert export["flops"]["macs"] == architecture["cost"]["flops"]
    assert export["parameters"]["dense"] == architecture["cost"]["params"]
    assert export["flops"]["macs"] <= 0.45 * architecture["flops"]["supernet"]["macs"]
    assert max(export["parity_max_abs_error"]["onnx"].values()) <= 1e-4
    report = load(workdir, "report.json")
    assert report["mask"]["target"] == target
    text = open(os.path.join(workdir, "report.txt")).read()
    assert "Masks: channel weight masks" in text and "target" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mask_target=params", "--mask_target_ratio=1.5"], "expected a fraction in (0, 1]"),
        (["--mask_target=flops", "--mask_target_value=1e6"], "is larger than the supernet"),
        (["--phases=finetune"], "has no architecture.json to fine-tune"),
        (["--derivation=darts"], "leave it out of --phases"),
        (["--phases=finetune", "--architecture=a.json"], "Add --finetune_init=scratch"),
        (["--phases=mask"], "there is no checkpoint at"),
        (["--phases=export"], "export needs a searched and fine-tuned run"),
    ],
)
def test_pipeline_mistakes_get_a_message_not_a_traceback(tmp_path, flags, message):
    result = search(str(tmp_path / "run"), *flags)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_channel_masks_on_an_element_mask_checkpoint_are_refused(pipeline, tmp_path):
    source, _ = pipeline
    result = search(
        str(tmp_path / "run"),
        "--phases=mask",
        f"--supernet_checkpoint={os.path.join(source, 'mask', 'checkpoint.npz')}",
        "--weight_mask=channel",
    )
    assert result.returncode == 1
    assert "--weight_mask=channel on a mask checkpoint trained with element masks" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "The mask phase:" not in result.stdout


def test_resuming_a_finished_run_repeats_no_phase(pipeline):
    workdir, _ = pipeline
    before = load(workdir, "report.json")
    result = search(workdir, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "The supernet phase already finished its 2 epochs." in result.stdout
    assert "The mask phase already finished its 2 epochs and was derived." in result.stdout
    assert "The finetune phase already finished its 2 epochs." in result.stdout
    assert "The export phase already finished" in result.stdout
    after = load(workdir, "report.json")
    assert after["rows"] == before["rows"]


def test_pareto_plots_one_point_per_exported_run(pipeline, tmp_path):
    workdir, _ = pipeline
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    out, points_file = str(tmp_path / "pareto.png"), str(tmp_path / "points.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "tools", "pareto.py"),
            f"--workdirs={workdir},{unfinished}",
            f"--out={out}",
            f"--json={points_file}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Skipped:" in result.stderr and "is it fine-tuned and exported?" in result.stderr
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    (point,) = json.load(open(points_file))
    export = load(workdir, "export", "summary.json")
    assert point["label"] == "masks"
    finetuned = load(workdir, "report.json")["rows"]["finetuned"]
    assert point["test_accuracy"] == finetuned["test_accuracy"]
    assert point["mflops"] == export["flops"]["macs"] / 1e6
    assert point["latency_ms"] == export["speed"]["latency_ms_batch_1"]["onnx"]

    nothing = subprocess.run(
        [sys.executable, os.path.join(root, "tools", "pareto.py"), f"--workdirs={unfinished}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nothing.returncode == 1 and "no workdir had a fine-tuned, exported model" in (
        nothing.stderr
    )
    assert "Traceback" not in nothing.stderr


def test_onnx_speed_times_exported_models_back_to_back(pipeline, tmp_path):
    workdir, _ = pipeline
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tool = os.path.join(root, "tools", "onnx_speed.py")
    out = str(tmp_path / "speed.json")
    result = subprocess.run(
        [sys.executable, tool, f"--workdirs={workdir},{workdir}", "--rounds=2", f"--json={out}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.load(open(out))  # the same model twice is timed once
    assert row["model"].endswith(os.path.join("export", "model.onnx"))
    assert row["latency_ms_batch_1"] > 0 and row["throughput_images_per_s_batch_64"] > 0
    missing = subprocess.run(
        [sys.executable, tool, f"--workdirs={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1 and "has no export/model.onnx" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.large
@pytest.mark.parametrize("phase", ["supernet", "mask", "finetune"])
def test_a_run_killed_in_any_phase_resumes_to_the_same_result(tmp_path, phase):
    flags = [
        "--phases=supernet,mask,finetune",
        "--checkpoint_every_steps=2",
        "--deterministic",
        # σ = 1/2 after warm-up: iterations with and without the architecture step (and its
        # batch), drawn again on resume.
        "--arch_step_schedule=step",
        "--arch_step_final_prob=0.5",
        "--arch_step_decay_epochs=1",
    ]
    uninterrupted = str(tmp_path / "uninterrupted")
    result = search(uninterrupted, *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workdir = str(tmp_path / "killed")
    _kill_during(workdir, phase, flags, at_step=5)
    resumed = search(workdir, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming the {phase} phase" in resumed.stdout
    with open(os.path.join(workdir, "architecture.json"), "rb") as got:
        with open(os.path.join(uninterrupted, "architecture.json"), "rb") as expected:
            assert got.read() == expected.read()
    for done in ("supernet", "mask", "finetune"):
        got = np.load(os.path.join(workdir, done, "checkpoint.npz"))
        expected = np.load(os.path.join(uninterrupted, done, "checkpoint.npz"))
        with got, expected:
            assert sorted(got.files) == sorted(expected.files)
            keys = [k for k in expected.files if k.startswith("v")]
            different = [k for k in keys if not np.array_equal(got[k], expected[k])]
            assert not different, (done, len(different), len(keys))
