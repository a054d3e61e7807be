"""An HTTP server for an exported model (Starlette on uvicorn; the `http` extra).

    python -m hmnas_keras.serve --model=runs/quickstart/export/model.onnx --port=8000

Endpoints (JSON responses):

- `GET /health` — `{"status": "ok", "model", "classes", "input_shape"}`;
- `GET /metadata` — the model's metadata (classes, preprocessing);
- `POST /predict[?top_k=K]` — the top-K classes of each image, in order:
  `{"predictions": [[{"class", "index", "probability"}, ...], ...]}`. The body is
  * `multipart/form-data` with one or more image files (any field names):
    `curl -F image=@cat.jpg -F image=@dog.png http://127.0.0.1:8000/predict`;
  * one image file as the body (`Content-Type: image/...` or
    `application/octet-stream`): `curl --data-binary @cat.jpg -H
    'Content-Type: image/jpeg' http://127.0.0.1:8000/predict`;
  * JSON `{"pixels": [...]}` (0..255, shape [N, H, W, C] or [H, W, C]) or
    `{"inputs": [...]}` (already normalised).

Bad requests get a 4xx with `{"error": message}` and the server keeps serving:
400 (not an image, malformed JSON, wrong shape or type, bad top_k), 413 (body
over --max_request_bytes, more than --max_images images), 415 (another content
type). Decoding and the model run in a worker thread, so a slow request does
not block health checks.
"""

import json

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hmnas_keras.serving.classifier import Classifier, ServeError


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413, f"The request body has {int(declared):,} bytes; the limit is {limit:,}."
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body exceeds the limit of {limit:,} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def _files_of_multipart(request: Request, body: bytes) -> list:
    """(file name, bytes) of every file field; the body is already bounded in size."""

    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers,
        stream(),
        max_files=len(body),
        max_fields=len(body),
        max_part_size=len(body) + 1,
    )
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestError(400, f"Malformed multipart body: {error.message}") from None
    files = []
    for name, value in form.multi_items():
        if isinstance(value, str):
            continue  # ordinary form fields are ignored
        files.append((value.filename or name, await value.read()))
    if not files:
        raise RequestError(400, "The multipart body holds no file: send images as file fields.")
    return files


class _Handlers:
    """The endpoints of one served classifier, with the request limits."""

    def __init__(self, classifier: Classifier, max_images: int, max_request_bytes: int, batch_size):
        self.classifier = classifier
        self.max_images = max_images
        self.max_request_bytes = max_request_bytes
        self.batch_size = batch_size

    async def health(self, request: Request):
        classifier = self.classifier
        return JSONResponse(
            {
                "status": "ok",
                "model": classifier.model_path,
                "classes": len(classifier.class_names),
                "input_shape": list(classifier.image_shape),
            }
        )

    async def metadata(self, request: Request):
        return JSONResponse(self.classifier.metadata)

    def check_count(self, count: int) -> None:
        if count > self.max_images:
            raise RequestError(
                413, f"Too many images: {count} in one request, at most {self.max_images}."
            )

    def run_model(self, inputs, top_k: int, normalized: bool):
        # Decoding and the model both run in a worker thread, off the event loop.
        if isinstance(inputs, list):  # (name, image file bytes) pairs
            inputs = [self.classifier.decode(data, name) for name, data in inputs]
        return self.classifier.predict(inputs, top_k, self.batch_size, normalized)

    def json_inputs(self, body: bytes):
        """(array, normalized) of a JSON body {"pixels": ...} or {"inputs": ...}."""
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"Malformed JSON: {error}.") from None
        keys = [k for k in ("pixels", "inputs") if isinstance(payload, dict) and k in payload]
        if len(keys) != 1:
            raise RequestError(
                400,
                'The JSON body needs exactly one of "pixels" (0..255) or "inputs" '
                "(normalised), an array [N, H, W, C] or [H, W, C].",
            )
        inputs = self.classifier.check_batch(payload[keys[0]], keys[0])
        self.check_count(len(inputs))
        return inputs, keys[0] == "inputs"

    async def request_inputs(self, request: Request):
        """(inputs, normalized) of a request: image files, or an array from JSON."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, self.max_request_bytes)
        if not body:
            raise RequestError(400, "The request body is empty: send an image.")
        if content_type == "multipart/form-data":
            files = await _files_of_multipart(request, body)
            self.check_count(len(files))
            return files, False
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return [("the request body", body)], False
        if content_type == "application/json":
            return self.json_inputs(body)
        raise RequestError(
            415,
            f"Unsupported content type {content_type or '(none)'}: send "
            "multipart/form-data with image files, one image (image/*), or JSON.",
        )

    async def predict(self, request: Request):
        try:
            raw = request.query_params.get("top_k", "5")
            if not raw.isdigit() or int(raw) < 1:
                raise RequestError(400, f"top_k must be a positive integer; received {raw!r}.")
            inputs, normalized = await self.request_inputs(request)
            predictions = await run_in_threadpool(self.run_model, inputs, int(raw), normalized)
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ServeError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"predictions": predictions})


def create_app(
    classifier: Classifier,
    max_images: int = 64,
    max_request_bytes: int = 16 * 1024 * 1024,
    batch_size: int = 64,
) -> Starlette:
    """The Starlette application serving `classifier`."""
    handlers = _Handlers(classifier, max_images, max_request_bytes, batch_size)
    return Starlette(
        routes=[
            Route("/health", handlers.health, methods=["GET"]),
            Route("/metadata", handlers.metadata, methods=["GET"]),
            Route("/predict", handlers.predict, methods=["POST"]),
        ]
    )


def serve_forever(classifier: Classifier, host: str, port: int, **settings) -> None:
    """Runs the server until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(classifier, **settings)
    print(
        f"Serving {classifier.model_path} ({len(classifier.class_names)} classes) on "
        f"http://{host}:{port} — POST /predict, GET /health, GET /metadata",
        flush=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
