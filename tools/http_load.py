"""Load test of the HTTP server: requests at a fixed concurrency, latency percentiles, memory.

    python tools/http_load.py --model=runs/quickstart/export/model.onnx \
        --requests=10000 --concurrency=16
    python tools/http_load.py --model=... --python=/path/to/other/venv/bin/python
    python tools/http_load.py --model=... --abuse

Starts `python -m hmnas_keras.serve --model=MODEL --port=...` (with the given
`--python`, so that another checkout's server can be measured the same way),
waits for /health, then sends `--requests` POST /predict requests, one PNG
image each (a test digit, or random pixels in the model's input size), from
`--concurrency` threads with keep-alive connections. Prints the count of
each status, the p50 / p95 / p99 / max latency and the server's resident
memory before, right after, and `--settle` seconds after the load. Measure on
an idle machine.

`--abuse` sends instead what a hostile or careless client sends, each while
/health is polled: 6 concurrent 9000x9000 PNG images (236 KB each, 81 M
pixels), 4 concurrent JSON bodies of about 15 MB, and 1,000 connections that
never finish their headers (held 12 s); it prints the statuses, the slowest
/health answer and the server's memory after each.
"""

import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags
from resident_memory import resident_mib  # tools/, beside this script

flags.DEFINE_string("model", None, "The exported model the server serves.")
flags.DEFINE_integer("requests", 10000, "Requests in all.", lower_bound=1)
flags.DEFINE_integer("concurrency", 16, "Client threads.", lower_bound=1)
flags.DEFINE_string("python", sys.executable, "The Python that runs the server.")
flags.DEFINE_string("cwd", None, "Directory the server runs in (default: this one).")
flags.DEFINE_integer("settle", 30, "Seconds to wait before the last memory reading.")
flags.DEFINE_bool("abuse", False, "Send oversized, slow and hostile requests instead.")
FLAGS = flags.FLAGS


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(shape) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype="uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()


def _wait_for_health(port: int, process) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not answer /health within 120 s")


def _client(port, body, count, latencies, statuses, lock):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(count):
        started = time.perf_counter()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": "image/png"})
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as error:
            status = type(error).__name__
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        elapsed = time.perf_counter() - started
        with lock:
            latencies.append(elapsed)
            statuses[status] = statuses.get(status, 0) + 1
    connection.close()


def _post(port, body, content_type):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", "/predict", body, {"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        connection.close()


def _while_polling_health(port, work):
    """Runs work() while /health is polled; (its result, slowest /health answer in ms)."""
    slowest, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request("GET", "/health")
            connection.getresponse().read()
            connection.close()
            slowest[0] = max(slowest[0], (time.perf_counter() - started) * 1e3)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = work()
    finally:
        done.set()
        poller.join()
    return result, slowest[0]


def _concurrently(count, function):
    results = [None] * count

    def run(index):
        results[index] = function()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _abuse(port, pid):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG", optimize=True)
    big = buffer.getvalue()
    pixels = json.dumps({"pixels": np.zeros((64, 128, 128, 3), "uint8").tolist()}).encode()

    def slowloris():
        sockets = []
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            sockets.append(sock)
        time.sleep(12)
        closed = 0
        for sock in sockets:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except OSError:
                pass
            sock.close()
        return [f"{closed} of 1000 closed by the server"]

    cases = [
        (
            f"6 x {len(big) / 1e3:.0f} KB 9000x9000 PNG",
            lambda: _concurrently(6, lambda: _post(port, big, "image/png")),
        ),
        (
            f"4 x {len(pixels) / 1e6:.1f} MB JSON",
            lambda: _concurrently(4, lambda: _post(port, pixels, "application/json")),
        ),
        ("1,000 slowloris connections", slowloris),
    ]
    for name, work in cases:
        started = time.perf_counter()
        statuses, slowest = _while_polling_health(port, work)
        print(
            f"{name}: {sorted(statuses, key=str)} in {time.perf_counter() - started:.1f} s; "
            f"slowest /health {slowest:.0f} ms; server RSS {resident_mib(pid):.0f} MiB"
        )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model:
        raise app.UsageError("--model is required: an exported model.onnx.")
    port = _free_port()
    model = os.path.abspath(FLAGS.model)
    process = subprocess.Popen(
        [FLAGS.python, "-m", "hmnas_keras.serve", f"--model={model}", f"--port={port}"],
        cwd=FLAGS.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = _wait_for_health(port, process)
        if FLAGS.abuse:
            print(f"server: {FLAGS.python} ({FLAGS.cwd or os.getcwd()})")
            _abuse(port, process.pid)
            return 0
        body = _png(health["input_shape"])
        rss_before = resident_mib(process.pid)
        latencies, statuses, lock = [], {}, threading.Lock()
        share = [FLAGS.requests // FLAGS.concurrency] * FLAGS.concurrency
        for i in range(FLAGS.requests % FLAGS.concurrency):
            share[i] += 1
        threads = [
            threading.Thread(target=_client, args=(port, body, n, latencies, statuses, lock))
            for n in share
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        rss_after = resident_mib(process.pid)
        time.sleep(FLAGS.settle)
        rss_settled = resident_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
    ms = np.asarray(latencies) * 1e3
    print(f"server: {FLAGS.python} ({FLAGS.cwd or os.getcwd()})")
    print(
        f"{FLAGS.requests} requests at concurrency {FLAGS.concurrency} in {wall:.1f} s "
        f"({FLAGS.requests / wall:,.0f}/s); statuses {dict(sorted(statuses.items(), key=str))}"
    )
    print(
        f"latency ms: p50 {statistics.median(ms):.1f}  p95 {np.percentile(ms, 95):.1f}  "
        f"p99 {np.percentile(ms, 99):.1f}  max {ms.max():.1f}"
    )
    print(
        f"server RSS MiB: before {rss_before:.0f}, after {rss_after:.0f}, "
        f"{FLAGS.settle} s later {rss_settled:.0f}"
    )
    return 0


if __name__ == "__main__":
    app.run(main)
