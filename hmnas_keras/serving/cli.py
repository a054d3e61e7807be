"""The serving command line: classify image files, or serve over HTTP.

    python -m hmnas_keras.serve --model=runs/quickstart/export/model.onnx --images PATH...
    python -m hmnas_keras.serve --model=... --images PATH... --format=jsonl --top_k=3
    python -m hmnas_keras.serve --model=runs/quickstart/export/model.onnx --port=8000
    python -m hmnas_keras.serve --model=runs/quickstart/export/model.int8.tflite --images PATH...

`--model` takes model.onnx or model.int8.onnx (onnxruntime), model.tflite or
model.int8.tflite (the LiteRT interpreter: the `tflite` extra).

`--port` serves over HTTP (binds 127.0.0.1 unless --host says otherwise; needs
the `http` extra, see `hmnas_keras.serving.http_server`).
"""

import argparse
import json
import sys

from hmnas_keras.serving.classifier import IMAGE_EXTENSIONS, Classifier, ServeError, find_images
from hmnas_keras.serving.settings import ServerSettings

DEFAULTS = ServerSettings()


def format_table(results: list[dict]) -> str:
    width = max([len(r["path"]) for r in results] + [4])
    lines = [f"{'path':<{width}}  predictions (class: probability)"]
    for result in results:
        if "error" in result:
            cells = f"error: {result['error']}"
        else:
            cells = "  ".join(
                f"{p['class']}: {p['probability']:.4f}" for p in result["predictions"]
            )
        lines.append(f"{result['path']:<{width}}  {cells}")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m hmnas_keras.serve",
        description="Classify images with an exported hmnas_keras model (.onnx or .int8.onnx in "
        "onnxruntime, .tflite or .int8.tflite in LiteRT), from the command line or as an HTTP "
        "server.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="The exported model: model.onnx, model.int8.onnx, model.tflite or model.int8.tflite.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        action="extend",
        default=[],
        help="Image files or folders (searched recursively).",
    )
    parser.add_argument("more_images", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument(
        "--batch_size", type=int, default=DEFAULTS.batch_size, help="Images per model call."
    )
    parser.add_argument("--top_k", type=int, default=5, help="Classes shown per image.")
    parser.add_argument(
        "--format", choices=("table", "jsonl"), default="table", help="Output format."
    )
    parser.add_argument("--threads", type=int, default=0, help="Runtime threads (0: auto).")
    parser.add_argument("--port", type=int, help="Serve over HTTP on this port instead.")
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address the server binds (default 127.0.0.1)."
    )
    parser.add_argument(
        "--max_images",
        type=int,
        default=DEFAULTS.max_images,
        help="Most images in one HTTP request.",
    )
    parser.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULTS.max_request_bytes,
        help="Largest HTTP request body accepted.",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=0,
        help="Most pixels an image file may decode to (0: 4,096 times the model's input, "
        "at least 1024x1024, at most 8192x8192); larger ones are refused before decoding "
        "(HTTP 413, or a per-file error).",
    )
    parser.add_argument(
        "--max_request_pixels",
        type=int,
        default=0,
        help="Most decoded pixels of all the images of one HTTP request (0: 4x "
        "--max_image_pixels).",
    )
    parser.add_argument(
        "--header_timeout",
        type=float,
        default=DEFAULTS.header_timeout,
        help="Seconds a connection may take to send complete request headers before it is closed.",
    )
    parser.add_argument(
        "--body_timeout",
        type=float,
        default=DEFAULTS.body_timeout,
        help="Seconds a request body may take to arrive (then HTTP 408).",
    )
    parser.add_argument(
        "--max_connections",
        type=int,
        default=DEFAULTS.max_connections,
        help="Open connections beyond which new requests get HTTP 503.",
    )
    args = parser.parse_args(argv)
    args.images += args.more_images
    for name in ("batch_size", "top_k", "max_images", "max_request_bytes", "max_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1; received {getattr(args, name)}.")
    for name in ("max_image_pixels", "max_request_pixels"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be 0 (automatic) or more; received {getattr(args, name)}.")
    for name in ("header_timeout", "body_timeout"):
        if not getattr(args, name) > 0:
            parser.error(
                f"--{name} must be a positive number of seconds; received {getattr(args, name)}."
            )
    if args.port is None and not args.images:
        parser.error("give --images PATH... to classify files, or --port=N to serve over HTTP.")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        classifier = Classifier(
            args.model, threads=args.threads, max_image_pixels=args.max_image_pixels or None
        )
        if args.port is not None:
            try:
                from hmnas_keras.serving.http_server import serve_forever
            except ImportError as error:
                raise ServeError(
                    f"The HTTP server needs the http extra ({error.name} is missing): in a "
                    'checkout, pip install -e ".[cpu,http]" (keeps the editable install); '
                    "elsewhere pip install starlette==1.10.0 uvicorn==0.54.0 "
                    "python-multipart==0.0.34."
                ) from None

            settings = ServerSettings(
                max_images=args.max_images,
                max_request_bytes=args.max_request_bytes,
                max_request_pixels=args.max_request_pixels or None,
                batch_size=args.batch_size,
                header_timeout=args.header_timeout,
                body_timeout=args.body_timeout,
                max_connections=args.max_connections,
            )
            serve_forever(classifier, host=args.host, port=args.port, settings=settings)
            return 0
        paths = find_images(args.images)
        if not paths:
            raise ServeError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {args.images}.")
        results = classifier.predict_files(paths, args.top_k, args.batch_size)
    except ServeError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    if args.format == "jsonl":
        for result in results:
            print(json.dumps(result))
    else:
        print(format_table(results))
    failed = sum("error" in r for r in results)
    if failed:
        print(f"{failed} of {len(results)} files could not be read.", file=sys.stderr)
        return 1
    return 0
