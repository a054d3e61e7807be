"""An exported model, ready to classify images: onnxruntime (or LiteRT), numpy and Pillow only.

Everything it needs to prepare an image — input size, colour mode,
normalisation, class names — is read from the model's metadata
(`hmnas_keras.serving.metadata`).

    from hmnas_keras.serving import Classifier
    classifier = Classifier("runs/quickstart/export/model.onnx")   # or .int8.onnx, .tflite
    classifier.predict_files(["cat.jpg"], top_k=3)   # [{"path", "predictions": [...]}]
    classifier.predict(pixels)                       # uint8 [N, H, W, C] -> top-k per image
"""

import io
import os

import numpy as np

from hmnas_keras.serving.metadata import METADATA_FORMAT, METADATA_KEY
from hmnas_keras.serving.runtimes import ImageTooLarge, ServeError, open_model

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def default_max_image_pixels(height: int, width: int) -> int:
    """The default bound on an image's decoded pixels: 4,096 times the model's input
    (2,048² for a 32x32 model), at least 1,024² and at most 8,192²."""
    return int(min(max(4096 * height * width, 1024 * 1024), 8192 * 8192))


class Classifier:
    """An exported hmnas_keras model, ready to classify images.

    Args:
        model_path: a model written by the export phase: `model.onnx` or
            `model.int8.onnx` (onnxruntime), `model.tflite` or
            `model.int8.tflite` (the LiteRT interpreter, the `tflite` extra).
        threads: the runtime's intra-op threads (0: onnxruntime's default, or
            every core for LiteRT).
        max_image_pixels: the most pixels an image file may decode to (after
            JPEG's reduced-size decoding); larger ones raise ImageTooLarge
            (HTTP 413) before they are decoded. Default (None):
            `default_max_image_pixels` of the model's input size.
    """

    def __init__(self, model_path: str, threads: int = 0, max_image_pixels: int | None = None):
        if not os.path.isfile(model_path):
            raise ServeError(
                f"No model at {model_path}. Pass the model.onnx (or .int8.onnx, .tflite, "
                ".int8.tflite) of an exported run (WORKDIR/export/model.onnx)."
            )
        self.model = open_model(model_path, threads)
        if self.model.metadata is None:
            raise ServeError(
                f"{model_path} has no {METADATA_KEY} metadata: it was not exported by "
                "hmnas_keras (python -m hmnas_keras.search --phases=...,export, or "
                "tools/export_model.py)."
            )
        self.metadata = self.model.metadata
        if self.metadata.get("format") != METADATA_FORMAT:
            raise ServeError(f"{model_path}: unknown metadata format {self.metadata.get('format')}")
        self.model_path = model_path
        self.class_names = list(self.metadata["class_names"])
        model_input = self.metadata["input"]
        _, self.height, self.width, self.channels = model_input["shape"]
        self.color = model_input["color"]
        preprocessing = self.metadata["preprocessing"]
        self.scale = np.float32(preprocessing["scale"])
        self.mean = np.asarray(preprocessing["mean"], "float32")
        self.std = np.asarray(preprocessing["std"], "float32")
        self.max_image_pixels = max_image_pixels or default_max_image_pixels(
            self.height, self.width
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    # Images -> normalised arrays.

    def decode(self, data: bytes, name: str = "image") -> np.ndarray:
        """Image file bytes -> uint8 [H, W, C] in the model's size and colour mode."""
        return self.decode_counted(data, name)[0]

    def decode_counted(self, data: bytes, name: str = "image", limit: int | None = None):
        """(uint8 [H, W, C], pixels decoded) of image file bytes.

        Raises ImageTooLarge, before decoding, for an image of more than
        `limit` (default `max_image_pixels`) pixels; a JPEG is first decoded
        at the smallest reduced size (1/2, 1/4, 1/8) still as large as the
        model's input.
        """
        from PIL import Image, UnidentifiedImageError

        limit = self.max_image_pixels if limit is None else limit
        mode = "RGB" if self.channels == 3 else "L"
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.draft(mode, (self.width, self.height))  # JPEG only; others unchanged
                pixels = image.size[0] * image.size[1]
                if pixels > limit:
                    raise ImageTooLarge(
                        f"{name} is {image.size[0]}x{image.size[1]} pixels, more than the "
                        f"{limit:,} this server decodes per image (--max_image_pixels): "
                        f"send it smaller (the model reads {self.width}x{self.height}).",
                        pixels,
                    )
                image = image.convert(mode)
                if image.size != (self.width, self.height):
                    image = image.resize((self.width, self.height), Image.Resampling.BILINEAR)
                result = np.asarray(image, dtype="uint8")
        except UnidentifiedImageError:
            raise ServeError(
                f"Cannot decode {name}: not an image file Pillow recognises (JPEG, PNG, BMP, "
                "GIF, WebP, TIFF)."
            ) from None
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(f"{name} is refused as a decompression bomb: {error}") from None
        except (OSError, ValueError, SyntaxError) as error:
            if isinstance(error, ServeError):
                raise
            raise ServeError(f"Cannot decode {name} as an image: {error}.") from None
        return result.reshape(self.image_shape), pixels

    def load_image(self, path: str) -> np.ndarray:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise ServeError(f"Cannot read {path}: {error.strerror}.") from None
        return self.decode(data, path)

    def check_batch(self, images, what: str = "images") -> np.ndarray:
        """A numeric array [N, H, W, C] (or one [H, W, C] image) with the model's shape."""
        try:
            array = np.asarray(images)
        except (ValueError, TypeError):
            raise ServeError(f"{what} must be a rectangular numeric array.") from None
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            kind = {"U": "text", "S": "bytes"}.get(array.dtype.kind, f"{array.dtype} values")
            raise ServeError(f"{what} must be numbers; received {kind}.")
        shape = list(array.shape)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1:] != self.image_shape:
            raise ServeError(
                f"{what} have shape {shape}; this model expects "
                f"[batch, {self.height}, {self.width}, {self.channels}] (or one "
                f"[{self.height}, {self.width}, {self.channels}] image)."
            )
        return array

    def normalize(self, pixels) -> np.ndarray:
        """uint8-range pixels [N, H, W, C] (0..255) -> the model's input."""
        pixels = self.check_batch(pixels, "pixels")
        if pixels.dtype == bool:
            raise ServeError("pixels must be numbers 0..255; received booleans.")
        if pixels.dtype != np.uint8 and pixels.size:
            low, high = np.min(pixels), np.max(pixels)
            if not (low >= 0 and high <= 255):  # also refuses NaN
                raise ServeError(
                    f"pixels must be 0..255; received values from {low:g} to {high:g} "
                    '(send normalised values as "inputs" instead).'
                )
        return (pixels.astype("float32") * self.scale - self.mean) / self.std

    # Prediction.

    def logits(self, inputs, batch_size: int = 64) -> np.ndarray:
        """Normalised inputs [N, H, W, C] -> logits [N, classes], `batch_size` at a time."""
        inputs = self.check_batch(inputs, "inputs").astype("float32")
        if not np.isfinite(inputs).all():
            raise ServeError(
                "The inputs hold NaN or infinite values (or values beyond float32's range)."
            )
        outputs = [
            self.model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)
        ]
        if not outputs:
            return np.zeros((0, len(self.class_names)), "float32")
        return np.concatenate(outputs)

    def top_k(self, logits: np.ndarray, k: int = 5) -> list[list[dict]]:
        """Per row of logits, the k most probable classes: {"class", "index", "probability"}."""
        k = max(1, min(int(k), len(self.class_names)))
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        result = []
        for row in probabilities:
            order = np.argsort(-row, kind="stable")[:k]
            result.append(
                [
                    {
                        "class": self.class_names[i],
                        "index": int(i),
                        "probability": round(float(row[i]), 6),
                    }
                    for i in order
                ]
            )
        return result

    def predict(self, images, top_k: int = 5, batch_size: int = 64, normalized=False):
        """Top-k classes of each image.

        `images`: pixels [N, H, W, C] or [H, W, C] in 0..255 (any numeric
        dtype), or, with `normalized=True`, inputs already normalised as the
        metadata says.
        """
        inputs = self.check_batch(images) if normalized else self.normalize(images)
        return self.top_k(self.logits(inputs, batch_size), top_k)

    def predict_files(self, paths, top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """Top-k classes of each image file: [{"path", "predictions"}] or {"path", "error"}."""
        results = []
        for start in range(0, len(paths), batch_size):
            loaded = []
            for path in paths[start : start + batch_size]:
                try:
                    loaded.append((path, self.load_image(path)))
                except ServeError as error:
                    loaded.append((path, error))
            pixels = [item for _, item in loaded if not isinstance(item, ServeError)]
            predictions = iter(self.predict(np.stack(pixels), top_k, batch_size) if pixels else [])
            for path, item in loaded:
                if isinstance(item, ServeError):
                    results.append({"path": path, "error": str(item)})
                else:
                    results.append({"path": path, "predictions": next(predictions)})
        return results


def find_images(paths) -> list[str]:
    """Image files among `paths`; folders are searched recursively (sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [
                    os.path.join(root, name)
                    for name in sorted(names)
                    if name.lower().endswith(IMAGE_EXTENSIONS)
                ]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise ServeError(f"No such file or folder: {path}.")
    return found
