import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_a_row_per_kind():
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "benchmark.py"),
            "--channels=2",
            "--num_cells=1",
            "--num_nodes=1",
            "--batch_size=2",
            "--image_size=8",
            "--steps=2",
            "--kinds=weight",
            "--kinds=first_order",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    for label in ("weight step", "weight + arch (1st)"):
        values = [float(v) for v in rows[label][-4:]]
        assert all(v > 0 for v in values)
    assert "weight + arch (2nd)" not in rows
