"""The package's shape: what imports what, and who names the workdir's files."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "hmnas_keras")

# Makes importing TensorFlow, Keras or tf2onnx fail, then runs the code after it.
BLOCK_TENSORFLOW = """
import importlib.abc, sys
BLOCKED = ("tensorflow", "keras", "tf2onnx", "tf_keras")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _modules() -> dict:
    """{module name: path} of every module of the package."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = path
    return modules


def _imports(path: str, modules: dict) -> set:
    """The package's modules that `path` imports, anywhere in the file (functions too)."""
    found = set()
    with open(path) as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_there_are_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    done, active = set(), []

    def visit(name):
        if name in active:
            cycle = active[active.index(name) :] + [name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        active.append(name)
        for other in sorted(graph[name]):
            visit(other)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert len(done) == len(modules) > 30


def test_the_config_imports_no_tensorflow():
    result = _run(
        "import sys\n"
        "from hmnas_keras.config import RunConfig\n"
        "config = RunConfig.from_dict(RunConfig().to_dict())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(config.search_space.num_cells, heavy)\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3", "[]"]


def test_serving_imports_without_tensorflow_and_nothing_from_the_training_side():
    result = _run(
        BLOCK_TENSORFLOW
        + "import hmnas_keras.serving, hmnas_keras.serving.cli, hmnas_keras.serving.http_server\n"
        "import hmnas_keras.serve\n"
        "ours = sorted(m for m in sys.modules if m.startswith('hmnas_keras'))\n"
        "print(' '.join(ours))\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split()
    assert "hmnas_keras.serving.classifier" in loaded
    outside = [m for m in loaded if m not in ("hmnas_keras", "hmnas_keras.serve")]
    assert all(m.startswith("hmnas_keras.serving") for m in outside), loaded
    # And the blocker works: the training side cannot be imported in that process.
    blocked = _run(BLOCK_TENSORFLOW + "import hmnas_keras.pipeline.run\n")
    assert blocked.returncode != 0 and "is blocked" in blocked.stderr


WORKDIR_NAMES = (
    "config.json",
    "checkpoint.npz",
    "metrics.csv",
    "summary.json",
    "arch_history.jsonl",
    "weight_masks.npz",
    "architecture.json",
    "searched.json",
    "model.keras",
    "model.onnx",
    "saved_model",
    "metadata.json",
    "report.json",
    "report.txt",
    "supernet",
    "mask",
    "finetune",
    "export",
    "pictures",
    "tensorboard",
)


def test_only_the_workdir_module_builds_paths_of_the_workdir():
    offenders = []
    for name, path in _modules().items():
        if name == "hmnas_keras.pipeline.workdir":
            continue
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "os.path.join"):
                continue
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    if arg.value.strip("/").split("/")[0] in WORKDIR_NAMES:
                        offenders.append(f"{name}:{node.lineno} {arg.value!r}")
    assert not offenders, offenders
