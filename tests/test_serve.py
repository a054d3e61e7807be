"""Serving an exported model with onnxruntime: the Python API, the CLI and the HTTP server.

The CLI and the server run in subprocesses where importing TensorFlow, Keras or
tf2onnx raises ImportError: serving must work on a machine without them.
"""

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import EXPORT_CLASSES, real_images
from PIL import Image

from hmnas_keras.serving import Classifier, ServeError, find_images
from hmnas_keras.serving.runtimes import ImageTooLarge

# Runs `python -m hmnas_keras.serve ARGS` with TensorFlow, Keras and tf2onnx unimportable.
WITHOUT_TENSORFLOW = """
import importlib.abc, runpy, sys
BLOCKED = ("tensorflow", "keras", "tf2onnx", "tf_keras")
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: serving must not need it")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = ["hmnas_keras.serve"] + sys.argv[1:]
runpy.run_module("hmnas_keras.serve", run_name="__main__")
"""


def serve_command(*args):
    return [sys.executable, "-c", WITHOUT_TENSORFLOW, *args]


def model_path(exported_workdir):
    return os.path.join(exported_workdir[0], "export", "model.onnx")


def keras_logits(network, pixels):
    """What the searched network (TensorFlow) says about uint8 pixels, normalised as exported."""
    x = (pixels.astype("float32") / 255.0 - 0.3) / 0.35
    return network(x, training=False).numpy()


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Real digits as 8x8 PNG and a 24x24 JPEG (resized by the server), in nested folders."""
    from hmnas_keras.data import load_digits_arrays

    root = tmp_path_factory.mktemp("images")
    pixels = np.repeat(load_digits_arrays().test_images[:5], 3, axis=-1)
    (root / "a").mkdir()
    (root / "a" / "b").mkdir()
    paths = []
    for i, image in enumerate(pixels):
        path = root / ("a" if i < 3 else "a/b") / f"digit_{i}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")
    return root, paths, pixels


def test_classifier_predicts_like_keras_and_reads_its_metadata(exported_workdir, image_folder):
    _, _, network, _ = exported_workdir
    classifier = Classifier(model_path(exported_workdir))
    assert classifier.class_names == EXPORT_CLASSES
    assert classifier.image_shape == (8, 8, 3)
    _, paths, pixels = image_folder
    expected = softmax(keras_logits(network, pixels))
    predictions = classifier.predict(pixels, top_k=3, batch_size=2)
    for row, prediction in zip(expected, predictions, strict=True):
        assert [p["index"] for p in prediction] == list(np.argsort(-row, kind="stable"))
        assert [p["class"] for p in prediction] == [EXPORT_CLASSES[p["index"]] for p in prediction]
        probabilities = [p["probability"] for p in prediction]
        np.testing.assert_allclose(probabilities, np.sort(row)[::-1], atol=1e-5)
    # Files give the same answers as their pixels (PNG is lossless).
    by_file = classifier.predict_files(paths, top_k=1)
    assert [r["path"] for r in by_file] == paths
    assert [r["predictions"][0]["index"] for r in by_file] == list(expected.argmax(axis=1))
    # An unreadable file keeps its place, with its error, among the readable ones.
    bad = str(image_folder[0] / "notes.txt")
    mixed = classifier.predict_files([paths[1], bad, paths[0]], top_k=1, batch_size=2)
    assert [r["path"] for r in mixed] == [paths[1], bad, paths[0]]
    assert "not an image file" in mixed[1]["error"] and "predictions" not in mixed[1]
    assert [mixed[0]["predictions"], mixed[2]["predictions"]] == [
        by_file[1]["predictions"],
        by_file[0]["predictions"],
    ]
    # Already normalised inputs skip the preprocessing.
    normalized = real_images(4)
    np.testing.assert_allclose(
        classifier.logits(normalized), network(normalized, training=False).numpy(), atol=1e-5
    )
    assert find_images([str(image_folder[0])]) == paths  # files of a folder, then its subfolders


def test_classifier_rejects_bad_inputs_with_clear_messages(exported_workdir, tmp_path):
    classifier = Classifier(model_path(exported_workdir))
    with pytest.raises(ServeError, match=r"shape \[2, 8, 8\].*expects \[batch, 8, 8, 3\]"):
        classifier.predict(np.zeros((2, 8, 8)))
    with pytest.raises(ServeError, match="must be numbers; received text"):
        classifier.predict([[["a"] * 3] * 8] * 8)
    with pytest.raises(ServeError, match="not an image file"):
        classifier.decode(b"hello", "hello.png")
    with pytest.raises(ServeError, match="No model at"):
        Classifier(str(tmp_path / "missing.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(ServeError, match="not a readable ONNX model"):
        Classifier(str(tmp_path / "junk.onnx"))


def png_declaring(width, height):
    """A PNG file that declares width x height pixels but holds no image data: what a
    decompression bomb looks like to a decoder's header check."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_classifier_refuses_oversized_images_before_decoding(exported_workdir, image_folder):
    classifier = Classifier(model_path(exported_workdir))
    assert classifier.max_image_pixels == 1024 * 1024  # 4,096 x 8x8, raised to 1024^2
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        classifier.decode(png_declaring(20000, 20000), "bomb.png")
    with pytest.raises(ImageTooLarge, match="9000x9000 pixels, more than the 1,048,576"):
        classifier.decode(png_declaring(9000, 9000), "big.png")
    # A large JPEG is decoded at 1/8 size: 2048x2048 counts as 256x256.
    buffer = io.BytesIO()
    Image.fromarray(np.full((2048, 2048, 3), 128, "uint8")).save(buffer, format="JPEG")
    pixels, decoded = classifier.decode_counted(buffer.getvalue(), "large.jpg")
    assert pixels.shape == (8, 8, 3) and decoded == 256 * 256
    # Pixels must be 0..255 (any dtype); normalised inputs have their own check.
    _, _, digits = image_folder
    for bad in (np.full((8, 8, 3), 300.0), np.full((8, 8, 3), -1000), np.ones((8, 8, 3), bool)):
        with pytest.raises(ServeError, match="0..255"):
            classifier.predict(bad)
    assert len(classifier.predict(digits.astype("float64"))) == len(digits)


def run_cli(*args):
    return subprocess.run(
        serve_command(*args), capture_output=True, text=True, timeout=120, env=os.environ
    )


def test_cli_predicts_a_folder_without_tensorflow(exported_workdir, image_folder):
    _, _, network, _ = exported_workdir
    root, paths, pixels = image_folder
    model = model_path(exported_workdir)
    result = run_cli(f"--model={model}", "--images", str(root), "--format=jsonl", "--top_k=2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == paths
    expected = keras_logits(network, pixels).argmax(axis=1)
    by_path = {r["path"]: r["predictions"] for r in rows}
    assert [by_path[p][0]["index"] for p in paths] == list(expected)
    assert all(len(r["predictions"]) == 2 for r in rows)

    table = run_cli(f"--model={model}", f"--images={paths[0]}", paths[1], "--batch_size=1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("path") and len(lines) == 3
    assert lines[1].startswith(paths[0]) and EXPORT_CLASSES[expected[0]] + ": " in lines[1]


def test_cli_reports_user_mistakes_without_a_traceback(exported_workdir, tmp_path, image_folder):
    model = model_path(exported_workdir)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    # A decompression bomb is one file's error; the other files are still classified.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    good = image_folder[1][0]
    result = run_cli(f"--model={model}", "--images", str(bomb), good, "--format=jsonl")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "decompression bomb" in rows[0]["error"] and rows[1]["predictions"]
    assert "1 of 2 files could not be read" in result.stderr
    cases = [
        ([f"--model={tmp_path / 'none.onnx'}", "--images", str(bad)], "No model at"),
        ([f"--model={model}", "--images", str(tmp_path / "missing")], "No such file or folder"),
        ([f"--model={model}", "--images", str(bad)], "not an image file"),
        ([f"--model={model}", "--images", str(bad), "--top_k=0"], "--top_k must be at least 1"),
        ([f"--model={model}"], "give --images PATH"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode != 0, args
        assert message in result.stderr + result.stdout, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url, body=None, content_type=None):
    """(status, JSON body) of a GET (no body) or POST."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(
        url, data=body, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(files):
    boundary = "hmnasboundary1234"
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def http_server(model, *flags, output=None, port=None):
    """`python -m hmnas_keras.serve --model=MODEL --port=...` (TensorFlow blocked): its URL,
    once /health answers; stopped on exit, its console output appended to `output`."""
    port = port or free_port()
    process = subprocess.Popen(
        serve_command(f"--model={model}", f"--port={port}", *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if request(f"{url}/health")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the server did not start: {process.stdout.read()}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        if output is not None:
            output.append(process.stdout.read())


@pytest.fixture(scope="module")
def server(exported_workdir):
    with http_server(
        model_path(exported_workdir),
        "--max_images=3",
        "--max_request_bytes=20000",
        "--max_request_pixels=2000",
    ) as url:
        yield url


def png_bytes(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_http_health_and_predict_over_loopback(server, exported_workdir, image_folder):
    _, _, network, _ = exported_workdir
    _, _, pixels = image_folder
    expected = keras_logits(network, pixels).argmax(axis=1)
    status, health = request(f"{server}/health")
    assert status == 200 and health["status"] == "ok" and health["input_shape"] == [8, 8, 3]
    status, metadata = request(f"{server}/metadata")
    assert status == 200 and metadata["class_names"] == EXPORT_CLASSES

    body, content_type = multipart([(f"{i}.png", png_bytes(p)) for i, p in enumerate(pixels[:3])])
    status, result = request(f"{server}/predict?top_k=2", body, content_type)
    assert status == 200, result
    assert [p[0]["index"] for p in result["predictions"]] == list(expected[:3])
    assert all(len(p) == 2 for p in result["predictions"])

    status, result = request(f"{server}/predict?top_k=1", png_bytes(pixels[3]), "image/png")
    assert status == 200 and result["predictions"][0][0]["index"] == expected[3]

    # A larger RGB JPEG is resized to the model's 8x8 by the server.
    big = np.asarray(Image.fromarray(pixels[4]).resize((24, 24)))
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="JPEG")
    status, result = request(f"{server}/predict", buffer.getvalue(), "image/jpeg")
    assert status == 200 and len(result["predictions"][0]) == 3

    payload = json.dumps({"pixels": pixels[:2].tolist()}).encode()
    status, result = request(f"{server}/predict?top_k=1", payload, "application/json")
    assert status == 200
    assert [p[0]["index"] for p in result["predictions"]] == list(expected[:2])


def test_http_bad_requests_get_4xx_and_the_server_keeps_serving(server, image_folder):
    _, _, pixels = image_folder
    image = png_bytes(pixels[0])
    cases = [
        (b"hello", "image/png", 400, "not an image file"),
        (*multipart([("a.png", image), ("b.txt", b"text")]), 400, "not an image file"),
        (json.dumps({"pixels": [[1, 2], [3, 4]]}).encode(), "application/json", 400, "expects"),
        (
            json.dumps({"pixels": [[[["x"] * 3] * 8] * 8]}).encode(),
            "application/json",
            400,
            "must be numbers",
        ),
        (json.dumps({"pixels": [[1, 2], [3]]}).encode(), "application/json", 400, "rectangular"),
        (b"{not json", "application/json", 400, "Malformed JSON"),
        (
            json.dumps({"inputs": np.full((8, 8, 3), 1e39).tolist()}).encode(),
            "application/json",
            400,
            "infinite",
        ),
        (
            json.dumps({"pixels": np.full((8, 8, 3), 1e30).tolist()}).encode(),
            "application/json",
            400,
            "0..255",
        ),
        (
            json.dumps({"pixels": np.full((8, 8, 3), -1000).tolist()}).encode(),
            "application/json",
            400,
            "0..255",
        ),
        (
            json.dumps({"pixels": np.full((8, 8, 3), 300).tolist()}).encode(),
            "application/json",
            400,
            "0..255",
        ),
        (
            json.dumps({"pixels": np.ones((8, 8, 3), bool).tolist()}).encode(),
            "application/json",
            400,
            "booleans",
        ),
        (b"[" * 5000 + b"]" * 5000, "application/json", 400, "nested too deeply"),
        (b'{"pixels": ' + b"[" * 4000 + b"]" * 4000 + b"}", "application/json", 400, "nested"),
        (b'{"pixels": [' + b"0, " * 6300 + b"0]}", "application/json", 413, "need at most"),
        (png_declaring(20000, 20000), "image/png", 413, "decompression bomb"),
        (png_declaring(9000, 9000), "image/png", 413, "--max_image_pixels"),
        (
            *multipart([(f"{i}.png", png_bytes(np.zeros((30, 30, 3), "uint8"))) for i in range(3)]),
            413,
            "--max_request_pixels",
        ),
        (json.dumps({"images": []}).encode(), "application/json", 400, "exactly one of"),
        (b"x" * 30000, "image/png", 413, "limit"),
        (*multipart([(f"{i}.png", image) for i in range(4)]), 413, "Too many images"),
        (
            json.dumps({"pixels": [pixels[0].tolist()] * 4}).encode(),
            "application/json",
            413,
            "Too many images",
        ),
        (b"hello", "text/plain", 415, "Unsupported content type"),
        (b"", "image/png", 400, "empty"),
    ]
    for body, content_type, status, message in cases:
        got, result = request(f"{server}/predict", body, content_type)
        assert got == status and message in result["error"], (content_type, got, result)
    for top_k in ("zero", "²", "1" * 5000):
        got, result = request(
            f"{server}/predict?top_k={urllib.parse.quote(top_k)}", image, "image/png"
        )
        assert got == 400 and "top_k" in result["error"], (top_k, got, result)
    # Still serving.
    assert request(f"{server}/health")[0] == 200
    assert request(f"{server}/predict", image, "image/png")[0] == 200


def test_http_timeouts_close_slow_clients_and_a_busy_port_is_one_line(exported_workdir):
    model = model_path(exported_workdir)
    output = []
    with http_server(model, "--header_timeout=1", "--body_timeout=1", output=output) as url:
        port = int(url.rsplit(":", 1)[1])
        # Slowloris: 100 connections that never finish their headers are closed.
        slow = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        assert request(f"{url}/health")[0] == 200  # still serving meanwhile
        started = time.monotonic()
        assert all(sock.recv(100) == b"" for sock in slow)  # closed by the server
        assert time.monotonic() - started < 8
        # A body that never arrives: 408 after --body_timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000\r\n\r\nabc"
            )
            assert sock.recv(1000).startswith(b"HTTP/1.1 408")
        # A client that leaves mid-body.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        # A second server on the same port: one line, before anything says "Serving".
        busy = run_cli(f"--model={model}", f"--port={port}")
        assert busy.returncode == 1
        assert busy.stderr.strip().startswith(f"Error: Cannot serve on 127.0.0.1:{port}")
        assert "Serving" not in busy.stdout and "Traceback" not in busy.stderr
        for sock in slow:
            sock.close()
        assert request(f"{url}/health")[0] == 200
    assert "Traceback" not in output[0] and "Serving" in output[0], output[0]
