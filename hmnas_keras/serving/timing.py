"""onnxruntime speed of exported models: timed back to back (`measure`, for
tools/onnx_speed.py and tools/fusion_speed.py) and per op kind from onnxruntime's
profiler (`profile`, for tools/onnx_profile.py). Needs onnxruntime, onnx and numpy only."""

import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np

THROUGHPUT_BATCH = 64


def _session(path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    shape = [int(d) for d in model_input.shape[1:]]
    return session, model_input.name, shape


def _seconds_per_call(session, name: str, batch: np.ndarray, calls: int) -> float:
    session.run(None, {name: batch})  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        session.run(None, {name: batch})
    return (time.perf_counter() - started) / calls


def measure(paths: list[str], rounds: int, latency_calls: int, throughput_calls: int) -> list:
    """Per model: median batch-1 latency (ms) and batch-64 throughput (images/s)."""
    rng = np.random.default_rng(0)
    models = []
    for path in paths:
        session, name, shape = _session(path)
        models.append(
            {
                "path": path,
                "session": session,
                "name": name,
                "single": rng.normal(size=(1, *shape)).astype("float32"),
                "batch": rng.normal(size=(THROUGHPUT_BATCH, *shape)).astype("float32"),
                "latency": [],
                "throughput": [],
            }
        )
    for _ in range(rounds):
        for model in models:
            args = (model["session"], model["name"])
            model["latency"].append(_seconds_per_call(*args, model["single"], latency_calls))
            model["throughput"].append(_seconds_per_call(*args, model["batch"], throughput_calls))
    return [
        {
            "model": model["path"],
            "latency_ms_batch_1": round(1e3 * statistics.median(model["latency"]), 3),
            "throughput_images_per_s_batch_64": round(
                THROUGHPUT_BATCH / statistics.median(model["throughput"]), 1
            ),
        }
        for model in models
    ]


def _kinds(optimized_path: str) -> dict:
    """Node name -> op kind, with convolutions split into depthwise and the rest."""
    import onnx

    kinds = {}
    for node in onnx.load(optimized_path).graph.node:
        kind = node.op_type
        if "Conv" in kind:
            groups = [a.i for a in node.attribute if a.name == "group"]
            kind += " (depthwise)" if groups and groups[0] > 1 else ""
        kinds[node.name] = kind
    return kinds


def profile(path: str, batch_size: int, runs: int, warmup: int) -> dict:
    """{"total_ms", "ops": {kind: {"ms", "count"}}} per call, from onnxruntime's profiler."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        options.log_severity_level = 3  # the note that the optimised graph is machine-specific
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        kinds = _kinds(options.optimized_model_filepath)
        (model_input,) = session.get_inputs()
        shape = [batch_size, *[int(d) for d in model_input.shape[1:]]]
        batch = np.random.default_rng(0).normal(size=shape).astype("float32")
        for _ in range(warmup + runs):
            session.run(None, {model_input.name: batch})
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    # Only the kernels of the timed calls: those after the end of the last warm-up call.
    calls = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    start = calls[warmup - 1] if warmup else 0
    totals, counts = collections.Counter(), collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event["ts"] < start:
            continue
        kind = kinds.get(name[: -len("_kernel_time")], event["args"].get("op_name", "?"))
        totals[kind] += event["dur"]
        counts[kind] += 1
    ops = {
        kind: {"ms": round(totals[kind] / runs / 1e3, 3), "count": counts[kind] // runs}
        for kind, _ in totals.most_common()
    }
    return {"total_ms": round(sum(totals.values()) / runs / 1e3, 3), "ops": ops}
