"""Pictures of what a search found: cells, incoming edges, ops per edge, edge weights."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from hmnas_keras.pipeline.pictures import draw_workdir
from hmnas_keras.pipeline.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _history(path, epochs=3, num_edges=9):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        for epoch in range(1, epochs + 1):
            weights = {
                t: {
                    "ops": rng.random((num_edges, 5)).tolist(),
                    "edges": rng.random(num_edges).tolist(),
                }
                for t in ("normal", "reduce")
            }
            handle.write(json.dumps({"epoch": epoch, "weights": weights}) + "\n")


def test_pictures_are_written_for_a_tiny_run(exported_workdir, tmp_path):
    source, architecture, _, _ = exported_workdir
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    shutil.copy(os.path.join(source, "architecture.json"), workdir)
    _history(os.path.join(workdir, "supernet", "arch_history.jsonl"))
    written = draw_workdir(Workdir(workdir))
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(
        [f"cell_{t}.{e}" for t in ("normal", "reduce") for e in ("png", "svg", "dot")]
        + ["incoming_edges.png", "ops_per_edge.png", "edge_weights.png"]
    )
    for path in written:
        with open(path, "rb") as handle:
            content = handle.read()
        assert len(content) > 500, path
        if path.endswith(".png"):
            assert content.startswith(PNG), path
        if path.endswith(".svg"):
            assert b"<svg" in content[:1000], path
    with open(os.path.join(workdir, "pictures", "cell_normal.dot")) as handle:
        dot = handle.read()
    cell = architecture["cells"]["normal"]
    for edge in cell["edges"]:
        assert f"n{edge['source']} -> n{edge['target']} " in dot
    for edge in cell["pruned_edges"]:
        assert f"n{edge['source']} -> n{edge['target']} " not in dot
    assert "dashed" in dot.split("n2 [")[1].split("\n")[0]  # the dead node 2 is drawn dashed
    assert dot.count("-> out") == len(cell["alive_nodes"])


def test_draw_cells_tool_on_an_existing_workdir(exported_workdir, tmp_path):
    source = exported_workdir[0]
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(os.path.join(source, "architecture.json"), workdir)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "draw_cells.py"), f"--workdir={workdir}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.split()
    assert len(printed) == 8 and all(os.path.getsize(p) > 500 for p in printed)
    missing = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "draw_cells.py"), f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "run the mask phase" in missing.stderr
    assert "Traceback" not in missing.stderr
