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
400 (not an image, malformed or too deeply nested JSON, wrong shape or type,
pixels outside 0..255, bad top_k), 408 (a body that does not arrive within
--body_timeout), 413 (body over --max_request_bytes, more than --max_images
images, an image over --max_image_pixels decoded pixels or a request over
--max_request_pixels, decompression bombs), 415 (another content type).
Decoding, JSON parsing and the model run in a worker thread, so a slow request
does not block health checks. A connection that has not sent complete request
headers within --header_timeout seconds is closed (slowloris), and beyond
--max_connections open connections new requests get a 503.
"""

import asyncio
import dataclasses
import json
import re
import socket

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hmnas_keras.serving.classifier import Classifier, ServeError
from hmnas_keras.serving.runtimes import ImageTooLarge
from hmnas_keras.serving.settings import ServerSettings

TOP_K = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit accepts "²"
# The longest a number of a JSON image may reasonably be written ("-0.12345678901234567, ").
JSON_BYTES_PER_VALUE = 24


class RequestError(Exception):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]{1,30}", declared) and int(declared) > limit:
        raise RequestError(
            413, f"The request body has {int(declared):,} bytes; the limit is {limit:,}."
        )
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        413, f"The request body exceeds the limit of {limit:,} bytes."
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408, f"The request body did not arrive within {timeout:g} s (--body_timeout)."
        ) from None
    return b"".join(chunks)


def _leading_count(value) -> int | None:
    """The N of a nested list [N, H, W, C], read without building an array (else None)."""
    probe, depth = value, 0
    while isinstance(probe, list) and probe and depth < 4:
        probe, depth = probe[0], depth + 1
    return len(value) if depth == 4 else None


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

    def __init__(self, classifier: Classifier, settings: ServerSettings):
        self.classifier = classifier
        self.max_images = settings.max_images
        self.max_request_bytes = settings.max_request_bytes
        self.max_request_pixels = settings.max_request_pixels
        self.batch_size = settings.batch_size
        self.body_timeout = settings.body_timeout

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
        # Decoding, JSON parsing and the model run in a worker thread, off the event loop.
        if isinstance(inputs, bytes):  # a JSON body
            inputs, normalized = self.json_inputs(inputs)
        elif isinstance(inputs, list):  # (name, image file bytes) pairs
            inputs = self.decode_all(inputs)
        return self.classifier.predict(inputs, top_k, self.batch_size, normalized)

    def decode_all(self, files) -> list:
        """The images of a request, each refused before decoding if it would take the
        request beyond --max_request_pixels decoded pixels."""
        images, left = [], self.max_request_pixels
        for name, data in files:
            limit = min(self.classifier.max_image_pixels, left)
            try:
                pixels, used = self.classifier.decode_counted(data, name, limit)
            except ImageTooLarge as error:
                if error.pixels is None or error.pixels > self.classifier.max_image_pixels:
                    raise  # too large on its own
                raise ImageTooLarge(
                    f"The request's images decode to more than {self.max_request_pixels:,} "
                    f"pixels in all (--max_request_pixels), at {name}: send fewer or smaller "
                    "images per request."
                ) from error
            images.append(pixels)
            left -= used
        return images

    def json_inputs(self, body: bytes):
        """(array, normalized) of a JSON body {"pixels": ...} or {"inputs": ...}."""
        # Parsing holds the GIL (and the event loop with it) for as long as it takes:
        # refuse a body larger than --max_images images of the model could need.
        limit = self.max_images * int(np.prod(self.classifier.image_shape)) * JSON_BYTES_PER_VALUE
        limit += 4096
        if len(body) > limit:
            raise RequestError(
                413,
                f"The JSON body has {len(body):,} bytes; {self.max_images} images of "
                f"{'x'.join(map(str, self.classifier.image_shape))} need at most {limit:,}.",
            )
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"Malformed JSON: {error}.") from None
        except RecursionError:
            raise RequestError(400, "Malformed JSON: nested too deeply.") from None
        keys = [k for k in ("pixels", "inputs") if isinstance(payload, dict) and k in payload]
        if len(keys) != 1:
            raise RequestError(
                400,
                'The JSON body needs exactly one of "pixels" (0..255) or "inputs" '
                "(normalised), an array [N, H, W, C] or [H, W, C].",
            )
        value = payload[keys[0]]
        count = _leading_count(value)
        if count is not None:
            self.check_count(count)  # before any array is built
        try:
            inputs = self.classifier.check_batch(value, keys[0])
        except RecursionError:
            raise RequestError(400, f"{keys[0]} is nested too deeply.") from None
        self.check_count(len(inputs))
        return inputs, keys[0] == "inputs"

    async def request_inputs(self, request: Request):
        """(inputs, normalized) of a request: image files, or a JSON body (parsed later,
        in a worker thread)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request, self.max_request_bytes, self.body_timeout)
        if not body:
            raise RequestError(400, "The request body is empty: send an image.")
        if content_type == "multipart/form-data":
            files = await _files_of_multipart(request, body)
            self.check_count(len(files))
            return files, False
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return [("the request body", body)], False
        if content_type == "application/json":
            return body, False
        raise RequestError(
            415,
            f"Unsupported content type {content_type or '(none)'}: send "
            "multipart/form-data with image files, one image (image/*), or JSON.",
        )

    async def predict(self, request: Request):
        try:
            raw = request.query_params.get("top_k", "5")
            if not TOP_K.fullmatch(raw) or int(raw) < 1:
                raise RequestError(400, f"top_k must be a positive integer; received {raw!r}.")
            inputs, normalized = await self.request_inputs(request)
            predictions = await run_in_threadpool(self.run_model, inputs, int(raw), normalized)
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ServeError as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except ClientDisconnect:  # the client left mid-body: nobody to answer
            return JSONResponse({"error": "The client disconnected."}, status_code=400)
        return JSONResponse({"predictions": predictions})


def create_app(classifier: Classifier, settings: ServerSettings | None = None) -> Starlette:
    """The Starlette application serving `classifier`."""
    settings = settings or ServerSettings()
    if settings.max_request_pixels is None:
        pixels = 4 * classifier.max_image_pixels
        settings = dataclasses.replace(settings, max_request_pixels=pixels)
    handlers = _Handlers(classifier, settings)
    return Starlette(
        routes=[
            Route("/health", handlers.health, methods=["GET"]),
            Route("/metadata", handlers.metadata, methods=["GET"]),
            Route("/predict", handlers.predict, methods=["POST"]),
        ]
    )


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete
    `header_timeout` seconds after it opened or after its last response (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _cancel_header_timer(self):
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = None

        def _headers_late(self):
            self._header_timer = None
            waiting = self.conn.their_state is h11.IDLE  # no complete request headers yet
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening; ServeError (one line) if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so, and without it Nagle's algorithm delays every response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise ServeError(
            f"Cannot serve on {host}:{port}: {error.strerror or error}. Choose another --port "
            "(or stop what is using it), or another --host."
        ) from None
    except OverflowError:
        sock.close()
        raise ServeError(f"--port must be 0..65535; received {port}.") from None
    return sock


def _raise_open_files_limit(wanted: int) -> None:
    """Lifts the soft limit on open files towards `wanted` (a connection is a file)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def serve_forever(
    classifier: Classifier, host: str, port: int, settings: ServerSettings | None = None
) -> None:
    """Binds host:port, says so, and serves until interrupted (Ctrl-C)."""
    import uvicorn

    settings = settings or ServerSettings()
    _raise_open_files_limit(settings.max_connections + 64)
    sock = listen(host, port)
    config = uvicorn.Config(
        create_app(classifier, settings),
        log_level="warning",
        http=_protocol(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
    )
    print(
        f"Serving {classifier.model_path} ({len(classifier.class_names)} classes) on "
        f"http://{host}:{sock.getsockname()[1]} — POST /predict, GET /health, GET /metadata",
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])
