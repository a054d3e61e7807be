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

from hmnas_keras.serve import Classifier, ServeError


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


def create_app(
    classifier: Classifier,
    max_images: int = 64,
    max_request_bytes: int = 16 * 1024 * 1024,
    batch_size: int = 64,
) -> Starlette:
    """The Starlette application serving `classifier`."""

    async def health(request: Request):
        return JSONResponse(
            {
                "status": "ok",
                "model": classifier.model_path,
                "classes": len(classifier.class_names),
                "input_shape": list(classifier.image_shape),
            }
        )

    async def metadata(request: Request):
        return JSONResponse(classifier.metadata)

    def top_k_of(request: Request) -> int:
        raw = request.query_params.get("top_k", "5")
        if not raw.isdigit() or int(raw) < 1:
            raise RequestError(400, f"top_k must be a positive integer; received {raw!r}.")
        return int(raw)

    def check_count(count: int) -> None:
        if count > max_images:
            raise RequestError(
                413, f"Too many images: {count} in one request, at most {max_images}."
            )

    def run_model(inputs, top_k: int, normalized: bool):
        # Decoding and the model both run in a worker thread, off the event loop.
        if isinstance(inputs, list):  # (name, image file bytes) pairs
            inputs = [classifier.decode(data, name) for name, data in inputs]
        return classifier.predict(inputs, top_k, batch_size, normalized)

    async def predict(request: Request):
        try:
            top_k = top_k_of(request)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await _read_body(request, max_request_bytes)
            if not body:
                raise RequestError(400, "The request body is empty: send an image.")
            if content_type == "multipart/form-data":
                files = await _files_of_multipart(request, body)
                check_count(len(files))
                inputs, normalized = files, False
            elif content_type.startswith("image/") or content_type == "application/octet-stream":
                inputs, normalized = [("the request body", body)], False
            elif content_type == "application/json":
                try:
                    payload = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise RequestError(400, f"Malformed JSON: {error}.") from None
                keys = [
                    k for k in ("pixels", "inputs") if isinstance(payload, dict) and k in payload
                ]
                if len(keys) != 1:
                    raise RequestError(
                        400,
                        'The JSON body needs exactly one of "pixels" (0..255) or "inputs" '
                        "(normalised), an array [N, H, W, C] or [H, W, C].",
                    )
                inputs = classifier.check_batch(payload[keys[0]], keys[0])
                check_count(len(inputs))
                normalized = keys[0] == "inputs"
            else:
                raise RequestError(
                    415,
                    f"Unsupported content type {content_type or '(none)'}: send "
                    "multipart/form-data with image files, one image (image/*), or JSON.",
                )
            predictions = await run_in_threadpool(run_model, inputs, top_k, normalized)
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ServeError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse({"predictions": predictions})

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metadata", metadata, methods=["GET"]),
            Route("/predict", predict, methods=["POST"]),
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
