import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_DIGITS

from hmnas_keras.runtime import graph_optimization_enabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tiny_benchmark(*flags):
    """tools/benchmark.py on a tiny network (2 channels, 1 cell, 1 node, batch 2, 8x8)."""
    command = [
        sys.executable,
        os.path.join(ROOT, "tools", "benchmark.py"),
        "--channels=2",
        "--num_cells=1",
        "--num_nodes=1",
        "--batch_size=2",
        "--image_size=8",
        "--steps=2",
        *flags,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def test_benchmark_prints_a_row_per_kind(tmp_path):
    # The mask step and the fine-tuning step of a derived network, each in its own process
    # (the supernet's kinds share the mask step's supernet and the phases' builders).
    json_out = tmp_path / "bench.jsonl"
    result = run_tiny_benchmark(
        "--kinds=mask,finetune,first_order",
        f"--json_out={json_out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "oneDNN" not in result.stderr  # TensorFlow's start-up logs are silenced
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    for label in ("mask step", "fine-tuning step"):
        values = [float(v) for v in rows[label][-7:]]
        assert all(v > 0 for v in values), (label, values)
    assert "weight step" not in rows and "evaluation step" not in rows
    # The iteration with the architecture step traces while its first call runs: no split.
    assert rows["weight + arch (1st)"][-6:-4] == ["–", "–"]
    lines = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["mask", "finetune", "first_order"]
    bilevel = lines.pop()
    assert bilevel["tracing_s"] is None and bilevel["first_execution_s"] is None
    assert bilevel["first_call_s"] > 0 and bilevel["median_ms"] > 0
    assert bilevel["weights"] == lines[0]["weights"]  # the same supernet as the mask step's
    assert bilevel["graph_nodes"] > lines[0]["graph_nodes"]  # two passes: arch and weight
    for line in lines:
        assert line["first_call_s"] == pytest.approx(
            line["tracing_s"] + line["first_execution_s"], abs=2e-3
        )
        assert line["median_ms"] > 0 and line["peak_rss_mib"] > 100
        # The resident pages after the steps: TensorFlow's libraries, the process's own; at
        # most the peak.
        assert line["rss_file_mib"] > 100 and line["rss_anon_mib"] > 100
        assert line["rss_file_mib"] + line["rss_anon_mib"] <= line["peak_rss_mib"] + 1
        assert line["images_per_s"] == pytest.approx(2 / (line["median_ms"] / 1000), rel=0.01)
        # --graph_optimization=auto: the optimiser the process really ran with (off without a GPU).
        assert line["graph_optimizer"] is graph_optimization_enabled("auto")
    # The supernet's weights, then the derived cell's (fewer), and so the graphs.
    assert lines[0]["weights"] > lines[1]["weights"] > 0
    assert lines[0]["graph_nodes"] > lines[1]["graph_nodes"] > 100


def test_benchmark_runs_the_darts_peer_after_ours_and_prints_the_ratios(tmp_path):
    # A stand-in for PyTorch's Python: it checks the arguments and answers as
    # tools/darts_official_benchmark.py does.
    fake = tmp_path / "torch-python"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *darts_official_benchmark.py*--darts_dir=/darts/cnn*--channels=2*'
        '--kind=weight*) ;; *) echo "bad arguments: $*" >&2; exit 2;; esac\n'
        'echo \'{"kind": "weight", "peer": "darts", "first_call_s": 1.5, "median_ms": 90.0, '
        '"images_per_s": 22.2, "peak_rss_mib": 700.0, "rss_anon_mib": 550.0, '
        '"rss_file_mib": 100.0}\'\n'
    )
    fake.chmod(0o755)
    json_out = tmp_path / "bench.jsonl"
    result = run_tiny_benchmark(
        "--kinds=weight",
        "--darts_dir=/darts/cnn",
        f"--darts_python={fake}",
        f"--json_out={json_out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ours, darts = [json.loads(line) for line in json_out.read_text().splitlines()]
    assert ours["kind"] == darts["kind"] == "weight" and darts["peer"] == "darts"
    assert "peer" not in ours and ours["channels"] == darts["channels"] == 2
    ratio = f"DARTS / ours: {90.0 / ours['median_ms']:.2f}x step time, "
    assert ratio + f"{700.0 / ours['peak_rss_mib']:.2f}x peak RSS" in result.stdout
    # The peak less the mapped files' pages (TensorFlow's libraries outweigh PyTorch's).
    own = (700.0 - 100.0) / (ours["peak_rss_mib"] - ours["rss_file_mib"])
    assert f"{own:.2f}x without the pages of mapped files (libraries)" in result.stdout


@pytest.mark.large
def test_worker_benchmark_times_one_process_and_two_workers(tmp_path):
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text("\n".join([*TINY_DIGITS, "--ops=sep_conv_3x3,skip_connect"]))
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "worker_benchmark.py"),
            "--workers=1,2",
            "--epochs=3",
            "--rounds=1",
            f"--flagfile_path={flagfile}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1] in "12"]
    table = {row[0]: [float(v) for v in row[1:]] for row in rows if len(row) == 5}
    assert set(table) == {"1", "2"}
    assert all(v > 0 for values in table.values() for v in values)
    assert table["1"][-1] == 1.0
