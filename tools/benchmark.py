"""Speed and memory of every phase's step, each kind in a process of its own.

    python tools/benchmark.py --channels=8 --num_cells=3 --batch_size=32
    python tools/benchmark.py --channels=16 --num_cells=8 --batch_size=64 --kinds=weight,first_order
    python tools/benchmark.py --channels=8 --num_cells=3 --json_out=runs/bench.jsonl

Kinds (--kinds): the supernet's weight step (`weight`), weight + first-order and
weight + second-order architecture step (`first_order`, `second_order`), the
hierarchical-masking step (`mask`), the fine-tuning step of a derived network
(`finetune`, a DARTS-shaped cell drawn by seed 0) and the supernet's
evaluation step (`eval`). Each is built by the same code as its phase
(`build_search`, `build_masked_search`, `build_finetune`, the evaluation
trainer) on synthetic CIFAR-sized data, and runs in its own process, so that
its peak resident memory is its own.

For each: the first call split into tracing (Python tracing and building the
graph: `get_concrete_function`) and the first execution (graph optimisation,
kernel creation and one step; "first run - median" estimates the one-time part),
then the median ms and images/s over --steps timed calls, and the peak RSS.
The step runs as a `tf.function` over one batch, as the phases' steps do; the
supernet's kinds run as the search's iterations (`iteration_function`: the
architecture step and the weight step, two traced functions), and an
iteration with the architecture step traces the weight step while the
architecture step's first call runs, so its first call has no split ("–").
--json_out=FILE appends one JSON line per kind: kind, first_call_s,
tracing_s, first_execution_s, median_ms, images_per_s, peak_rss_mib,
rss_anon_mib and rss_file_mib (the resident memory after the timed calls: the
process's own pages and those of mapped files, mostly the libraries'; the table's
"in files MiB"), graph_nodes (the step's graph with its function calls inlined: what the first
call instantiates) and the configuration. With --darts_dir, official DARTS' weight and first-order
iterations run right after ours, each in its own process (a DARTS line has
"peer": "darts"), so that both are measured in one run:

    python tools/benchmark.py --channels=16 --num_cells=5 --kinds=weight,first_order \
        --darts_dir=/tmp/darts/cnn --darts_python=/tmp/torch-env/bin/python
"""

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from absl import app, flags
from resident_memory import resident_split  # tools/, beside this script

from hmnas_keras import quiet_logs  # noqa: F401  (first: before TensorFlow loads)
from hmnas_keras.runtime import GRAPH_OPTIMIZATION

flags.DEFINE_integer("channels", 8, "Initial channels C.", lower_bound=1)
flags.DEFINE_integer("num_cells", 3, "Cells.", lower_bound=1)
flags.DEFINE_integer("num_nodes", 4, "Intermediate nodes per cell.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("image_size", 32, "Image height and width.", lower_bound=4)
flags.DEFINE_integer("num_classes", 10, "Classes.", lower_bound=2)
flags.DEFINE_integer("steps", 10, "Timed calls per kind (after the first).", lower_bound=1)
flags.DEFINE_integer(
    "threads", 0, "TensorFlow intra-op threads (0: half the cores).", lower_bound=0
)
flags.DEFINE_enum(
    "graph_optimization",
    "auto",
    list(GRAPH_OPTIMIZATION),
    "TensorFlow's graph optimiser on the traced steps (auto: off without a GPU), as "
    "hmnas_keras.search's flag of that name.",
)
flags.DEFINE_bool(
    "recompute",
    False,
    "Recompute the supernet's edges in the backward pass, as hmnas_keras.search's flag of "
    "that name (the supernet and mask kinds).",
)
KINDS = {
    "weight": "weight step",
    "first_order": "weight + arch (1st)",
    "second_order": "weight + arch (2nd)",
    "mask": "mask step",
    "finetune": "fine-tuning step",
    "eval": "evaluation step",
}
flags.DEFINE_multi_string(
    "kinds",
    list(KINDS),
    f"Which steps to time, of: {', '.join(KINDS)} (a comma list, or the flag repeated).",
)
flags.DEFINE_string("json_out", None, "Append one JSON line per kind to this file.")
flags.DEFINE_string(
    "darts_dir",
    None,
    "Also time official DARTS (quark0/darts' cnn/ folder) on the weight and first_order "
    "kinds, each right after ours, with tools/darts_official_benchmark.py.",
)
flags.DEFINE_string(
    "darts_python", "python", "The Python (with PyTorch) that runs DARTS for --darts_dir."
)
flags.DEFINE_integer("darts_threads", 2, "PyTorch threads of the DARTS peer.", lower_bound=1)
flags.DEFINE_string("one_kind", None, "(internal) measure this kind in this process.")
FLAGS = flags.FLAGS
OWN_FLAGS = (
    "channels",
    "num_cells",
    "num_nodes",
    "batch_size",
    "image_size",
    "num_classes",
    "steps",
    "threads",
    "graph_optimization",
    "recompute",
)


def _kinds(values) -> list[str]:
    return [kind for value in values for kind in value.split(",") if kind]


flags.register_validator(
    "kinds",
    lambda values: bool(_kinds(values)) and all(kind in KINDS for kind in _kinds(values)),
    message=f"--kinds takes a comma list of: {', '.join(KINDS)}.",
)


def _config():
    from hmnas_keras.config import DataConfig, FinetuneConfig, MaskConfig, RunConfig
    from hmnas_keras.space.search_space import SearchSpace

    return RunConfig(
        data=DataConfig(dataset="synthetic", batch_size=FLAGS.batch_size, augment=False),
        search_space=SearchSpace(
            num_cells=FLAGS.num_cells, channels=FLAGS.channels, num_nodes=FLAGS.num_nodes
        ),
        mask=MaskConfig(epochs=1),
        finetune=FinetuneConfig(epochs=1),
        phases=("finetune",),
        recompute=FLAGS.recompute,
    )


def _data(config):
    """Synthetic CIFAR-sized images: enough for a few batches of each part of the split."""
    import numpy as np

    from hmnas_keras.data import ImageArrays, make_search_data

    rng = np.random.default_rng(0)
    count = 8 * FLAGS.batch_size
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    arrays = ImageArrays(
        rng.integers(0, 255, (count, *shape), dtype=np.uint8),
        rng.integers(0, FLAGS.num_classes, count).astype("int32"),
        rng.integers(0, 255, (FLAGS.batch_size, *shape), dtype=np.uint8),
        rng.integers(0, FLAGS.num_classes, FLAGS.batch_size).astype("int32"),
        [str(i) for i in range(FLAGS.num_classes)],
    )
    return make_search_data(config.data, 0, arrays)


@dataclasses.dataclass(frozen=True)
class _Step:
    """A kind's step, ready to time: `call()` runs one step and returns its logs; `trace()`
    traces it alone (None: its first call traces while it runs); `concrete_functions()`
    lists its traced functions; `weights`: the network weights it trains."""

    call: Callable[[], dict]
    trace: Callable[[], object] | None
    concrete_functions: Callable[[], list]
    weights: list


def _one_function(step, batch, weights) -> _Step:
    """`step(batch)` (a `NetworkTrainer`'s step) as one traced function, as the phases run it
    (`replica_function`)."""
    function = step.__self__.replica_function(step, on_batch=True)
    return _Step(
        call=lambda: function(batch),
        trace=lambda: function.get_concrete_function(batch),
        concrete_functions=lambda: [function.get_concrete_function(batch)],
        weights=weights,
    )


def _step(kind: str) -> _Step:
    """The step of `kind`, built by its phase's code on synthetic data."""
    import shutil

    config = _config()
    data = _data(config)

    def batch_of(dataset):
        return next(iter(dataset))

    if kind in ("weight", "first_order", "second_order"):
        import itertools

        import tensorflow as tf

        from hmnas_keras.pipeline.supernet_phase import build_search

        supernet = dataclasses.replace(config.supernet, second_order=kind == "second_order")
        search = build_search(dataclasses.replace(config, supernet=supernet), data)
        take_arch_step = kind != "weight"
        batch = batch_of(data.bilevel_dataset(1))
        run, iterator = search.iteration_function(), itertools.repeat(batch)
        arch, weight = search.traced_steps
        arguments = {arch: (batch,), weight: ((batch[0],), tf.constant(float(take_arch_step)))}

        def concrete_functions():
            return [
                function.get_concrete_function(*arguments[function])
                for function in (arch, weight)
                if function.experimental_get_tracing_count()
            ]

        return _Step(
            # The search's own iteration: the architecture step and the weight step.
            call=lambda: run(iterator, take_arch_step),
            # One traced function can be traced apart; with the architecture step the
            # weight step is traced while the architecture step's first call runs.
            trace=None
            if take_arch_step
            else lambda: weight.get_concrete_function(*arguments[weight]),
            concrete_functions=concrete_functions,
            weights=search.supernet.weight_variables,
        )
    if kind == "mask":
        from hmnas_keras.pipeline.mask_phase import build_masked_search

        masked = build_masked_search(dataclasses.replace(config, phases=("mask",)), data, None)
        return _one_function(
            masked.train_step, batch_of(data.train_dataset(1)), masked.supernet.weight_variables
        )
    if kind == "finetune":
        from hmnas_keras.pipeline.derive_phase import build_supernet, derive_architecture
        from hmnas_keras.pipeline.finetune_phase import build_finetune
        from hmnas_keras.pipeline.workdir import Workdir

        random = dataclasses.replace(config, derivation="random", finetune_init="scratch")
        workdir = Workdir(tempfile.mkdtemp(prefix="hmnas-benchmark-"))
        architecture, _ = derive_architecture(
            random, data, workdir, build_supernet(random, data), inherit=False
        )
        finetune = build_finetune(random, data, workdir, architecture)
        shutil.rmtree(workdir.root)
        return _one_function(
            finetune.train_step,
            batch_of(data.train_dataset(1)),
            finetune.network.trainable_variables,
        )
    from hmnas_keras.pipeline.derive_phase import build_supernet
    from hmnas_keras.training.trainer import NetworkTrainer

    supernet = build_supernet(config, data)
    evaluator = NetworkTrainer(supernet, name="evaluate")
    evaluator.compile(jit_compile=False)
    return _one_function(
        evaluator.test_step, batch_of(data.test_dataset()), supernet.weight_variables
    )


def measure(kind: str) -> dict:
    """Times `kind` in this process (see the module doc)."""
    import numpy as np
    import tensorflow as tf

    from hmnas_keras.runtime import configure_tensorflow, graph_nodes

    configure_tensorflow(FLAGS.threads, graph_optimization=FLAGS.graph_optimization)
    step = _step(kind)

    def run() -> float:
        started = time.perf_counter()
        logs = step.call()
        float(logs["loss"])  # waits for the step to finish
        return time.perf_counter() - started

    tracing = None
    if step.trace is not None:
        started = time.perf_counter()
        step.trace()
        tracing = time.perf_counter() - started
    first = run()
    times = [run() for _ in range(FLAGS.steps)]
    median = statistics.median(times)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before as_graph_def
    return {
        "kind": kind,
        "first_call_s": round((tracing or 0.0) + first, 3),
        # The first iteration with an architecture step traces while it runs: no split.
        "tracing_s": None if tracing is None else round(tracing, 3),
        "first_execution_s": None if tracing is None else round(first, 3),
        "one_time_s": round(max((tracing or 0.0) + first - median, 0.0), 3),
        "median_ms": round(1000 * median, 2),
        "images_per_s": round(FLAGS.batch_size / median, 1),
        "peak_rss_mib": round(peak_rss, 1),
        **resident_split(),  # after the timed steps: anonymous and mapped-file pages
        "graph_nodes": sum(graph_nodes(f.graph.as_graph_def()) for f in step.concrete_functions()),
        "recompute": FLAGS.recompute,
        "graph_optimizer": not tf.config.optimizer.get_experimental_options().get(
            "disable_meta_optimizer", False
        ),
        "weights": sum(int(np.prod(v.shape)) for v in step.weights),
    }


def _in_own_process(kind: str) -> dict:
    """`measure(kind)` in a fresh Python process (its own peak RSS)."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        *(FLAGS[name].serialize() for name in OWN_FLAGS),
        f"--one_kind={kind}",
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def _darts(kind: str) -> dict:
    """Official DARTS' `kind` iteration in its own process (darts_official_benchmark.py)."""
    command = [
        FLAGS.darts_python,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "darts_official_benchmark.py"),
        f"--darts_dir={FLAGS.darts_dir}",
        f"--channels={FLAGS.channels}",
        f"--num_cells={FLAGS.num_cells}",
        f"--batch_size={FLAGS.batch_size}",
        f"--image_size={FLAGS.image_size}",
        f"--steps={FLAGS.steps}",
        f"--threads={FLAGS.darts_threads}",
        f"--kind={kind}",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"DARTS {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def _row(label: str, result: dict) -> str:
    def seconds(key):
        value = result.get(key)
        return f"{'–' if value is None else f'{value:.2f}':>13}"  # a tiny step's: < 0.05 s

    return (
        f"{label:<22}{seconds('first_call_s')}{seconds('tracing_s')}"
        f"{seconds('first_execution_s')}{result['median_ms']:>13.0f}"
        f"{result['images_per_s']:>13.1f}{result['peak_rss_mib']:>13.0f}"
        f"{result.get('rss_file_mib', float('nan')):>13.0f}"
    )


def _ratios(ours: dict, darts: dict) -> str:
    """DARTS' step time and peak RSS over ours, and the peak RSS less the mapped files'
    pages (the libraries': see resident_memory) where both measured them."""
    line = (
        f"  DARTS / ours: {darts['median_ms'] / ours['median_ms']:.2f}x step time, "
        f"{darts['peak_rss_mib'] / ours['peak_rss_mib']:.2f}x peak RSS"
    )
    if "rss_file_mib" in ours and "rss_file_mib" in darts:
        own = [r["peak_rss_mib"] - r["rss_file_mib"] for r in (darts, ours)]
        line += f", {own[0] / own[1]:.2f}x without the pages of mapped files (libraries)"
    return line


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.one_kind:
        print(json.dumps(measure(FLAGS.one_kind)), flush=True)
        return 0
    import tensorflow as tf

    from hmnas_keras.runtime import graph_optimization_enabled

    optimizer = "on" if graph_optimization_enabled(FLAGS.graph_optimization) else "off"
    print(
        f"C={FLAGS.channels} cells={FLAGS.num_cells} nodes={FLAGS.num_nodes} "
        f"B={FLAGS.batch_size} {FLAGS.image_size}x{FLAGS.image_size}, {FLAGS.steps} timed steps, "
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, threads={FLAGS.threads or 'half'}, "
        f"graph optimiser {optimizer}{', edges recomputed' if FLAGS.recompute else ''}; "
        "each kind in its own process"
    )
    header = (
        "step",
        "first call s",
        "tracing s",
        "1st run s",
        "median ms",
        "images/s",
        "RSS MiB",
        "in files MiB",
    )
    print(f"{header[0]:<22}" + "".join(f"{h:>13}" for h in header[1:]))
    for kind in _kinds(FLAGS.kinds):
        results = [_in_own_process(kind)]
        print(_row(KINDS[kind], results[0]), flush=True)
        if FLAGS.darts_dir and kind in ("weight", "first_order"):
            results.append(_darts(kind))
            print(_row("  DARTS (official)", results[1]), flush=True)
            print(_ratios(*results), flush=True)
        if FLAGS.json_out:
            os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json_out)), exist_ok=True)
            with open(FLAGS.json_out, "a") as handle:
                for result in results:
                    config = {
                        "channels": FLAGS.channels,
                        "num_cells": FLAGS.num_cells,
                        "batch_size": FLAGS.batch_size,
                    }
                    handle.write(json.dumps({**config, **result}) + "\n")
    return 0


if __name__ == "__main__":
    app.run(main)
