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
import urllib.request

import numpy as np
import pytest
from conftest import EXPORT_CLASSES, real_images
from PIL import Image

from hmnas_keras.serving import Classifier, ServeError, find_images

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


def test_cli_reports_user_mistakes_without_a_traceback(exported_workdir, tmp_path):
    model = model_path(exported_workdir)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
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
def http_server(model, *flags):
    """`python -m hmnas_keras.serve --model=MODEL --port=...` (TensorFlow blocked): its URL,
    once /health answers; stopped on exit."""
    port = free_port()
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


@pytest.fixture(scope="module")
def server(exported_workdir):
    with http_server(
        model_path(exported_workdir), "--max_images=3", "--max_request_bytes=20000"
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
            json.dumps({"pixels": np.full((8, 8, 3), 1e39).tolist()}).encode(),
            "application/json",
            400,
            "infinite",
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
    got, result = request(f"{server}/predict?top_k=zero", image, "image/png")
    assert got == 400 and "top_k" in result["error"]
    # Still serving.
    assert request(f"{server}/health")[0] == 200
    assert request(f"{server}/predict", image, "image/png")[0] == 200
