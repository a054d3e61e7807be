"""Datasets: a name in, deterministic tf.data pipelines out.

Sources (`DataConfig.dataset`):
- `digits`: scikit-learn's bundled 8x8 handwritten digits (no download);
- `folder`: an image folder `ROOT/{train,test}/<class>/*.{jpg,jpeg,png}`;
- any other name: a TensorFlow Datasets image-classification dataset.

Images are decoded once into uint8 arrays held in memory. Every pipeline is a
pure function of (seed, position): the order of epoch e is a stateless shuffle
seeded by (seed, e), and augmentation is seeded by (seed, step), so a run
resumed at any step sees exactly the batches an uninterrupted run would have.
"""

import dataclasses
import os
import re
import socket

import numpy as np
import tensorflow as tf

from hmnas_keras.config import DataConfig, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BUILTIN_DATASETS = ("digits", "folder")


@dataclasses.dataclass
class ImageArrays:
    """A decoded dataset: uint8 images [N, H, W, C] and int32 labels per split."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


# ------------------------------------------------------------------ sources


def load_digits_arrays() -> ImageArrays:
    """scikit-learn's 1,797 8x8 digits, split 80/20 (stratified, fixed) into train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype("uint8")[..., None]
    labels = digits.target.astype("int32")
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels
    )
    return ImageArrays(train_x, train_y, test_x, test_y, [str(i) for i in range(10)])


def _resize(image: np.ndarray, image_size: int) -> np.ndarray:
    resized = tf.image.resize(image, (image_size, image_size), antialias=True)
    return np.clip(np.round(resized.numpy()), 0, 255).astype("uint8")


def _resize_all(images: list[np.ndarray], image_size: int, chunk: int = 4096) -> list:
    """`_resize` of each image, images of one shape resized together (one op per chunk)."""
    resized = list(images)
    by_shape = {}
    for index, image in enumerate(images):
        if image.shape[:2] != (image_size, image_size):
            by_shape.setdefault(image.shape, []).append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), chunk):
            part = indices[start : start + chunk]
            batch = _resize(np.stack([images[i] for i in part]), image_size)
            for i, image in zip(part, batch):
                resized[i] = image
    return resized


def _decode_files(paths: list[str]) -> list[np.ndarray]:
    """Decodes image files in parallel; names the file that cannot be read."""
    dataset = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: tf.io.decode_image(tf.io.read_file(path), expand_animations=False),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    try:
        return list(dataset.as_numpy_iterator())
    except tf.errors.OpError:
        for path in paths:
            if os.path.getsize(path) == 0:
                raise DataError(
                    f"Cannot read image file {path}: it is empty (0 bytes). Remove or replace "
                    "the file."
                ) from None
            try:
                tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
            except tf.errors.OpError as error:
                # TensorFlow's messages carry "{{function_node ...}}" internals: drop them.
                reason = re.sub(r"\{\{[^}]*\}\}\s*", "", error.message).strip()
                raise DataError(
                    f"Cannot read image file {path}: {reason}. "
                    "Remove or replace the file (JPEG and PNG are supported)."
                ) from None
        raise


def _stack_images(images: list[np.ndarray], paths: list[str], image_size: int | None) -> np.ndarray:
    channels = 3 if any(image.shape[-1] >= 3 for image in images) else 1
    prepared = []
    for image in images:
        if image.shape[-1] == 4:
            image = image[..., :3]
        elif image.shape[-1] == 2:
            image = image[..., :1]
        if channels == 3 and image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        prepared.append(image)
    if image_size:
        prepared = _resize_all(prepared, image_size)
    sizes = {image.shape[:2] for image in prepared}
    if len(sizes) > 1:
        first = prepared[0].shape[:2]
        other = next(i for i, image in enumerate(prepared) if image.shape[:2] != first)
        raise DataError(
            f"Images have different sizes: {paths[0]} is {first[0]}x{first[1]} but "
            f"{paths[other]} is {prepared[other].shape[0]}x{prepared[other].shape[1]}. "
            "Pass --image_size=N to resize every image to NxN."
        )
    return np.stack(prepared).astype("uint8")


def sample_classes(class_names: list[str], count: int | None, seed: int) -> list[str]:
    """`count` class names drawn by `seed` (all of them when count is None), in sorted order."""
    if count is None or count >= len(class_names):
        return list(class_names)
    if count < 2:
        raise DataError(f"--class_subset={count}: classification needs at least 2 classes.")
    chosen = np.random.default_rng([seed, 11]).choice(len(class_names), count, replace=False)
    return [class_names[i] for i in sorted(chosen)]


def _keep_classes(arrays: ImageArrays, names: list[str]) -> ImageArrays:
    if names == arrays.class_names:
        return arrays
    new_label = np.full(len(arrays.class_names), -1, "int32")
    for label, name in enumerate(names):
        new_label[arrays.class_names.index(name)] = label
    train, test = new_label[arrays.train_labels], new_label[arrays.test_labels]
    return ImageArrays(
        arrays.train_images[train >= 0],
        train[train >= 0],
        arrays.test_images[test >= 0],
        test[test >= 0],
        names,
    )


def _class_folders(split_dir: str) -> list[str]:
    if not os.path.isdir(split_dir):
        raise DataError(
            f"Missing split folder {split_dir}. An image folder needs both train/ and test/, "
            "each with one sub-folder per class."
        )
    names = sorted(
        entry for entry in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, entry))
    )
    if not names:
        raise DataError(
            f"{split_dir} has no class sub-folders. "
            f"Put each class's images in {split_dir}/<class>/."
        )
    return names


def _image_files(split_dir: str, classes: list[str]) -> tuple[list[str], np.ndarray]:
    """(paths, labels) of the images of `classes` (label = position in `classes`)."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(
                f"Class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}). "
                "Add images or remove the folder."
            )
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype="int32")


def load_folder_arrays(
    root: str | None,
    image_size: int | None = None,
    class_subset: int | None = None,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> ImageArrays:
    """Reads ROOT/{train,test}/<class>/*.{jpg,jpeg,png}; classes are the train sub-folders.

    With `class_subset`, only that many classes (drawn by `seed`) are decoded;
    with `train_subset` / `test_subset`, only the images `make_search_data`
    would keep of them (the same draw, so the arrays are the same).
    """
    if not root:
        raise DataError("--dataset=folder needs --data_dir=ROOT, a folder with train/ and test/.")
    if not os.path.isdir(root):
        raise DataError(
            f"Data folder {root} does not exist. Expected ROOT/train/<class>/*.jpg and "
            "ROOT/test/<class>/*.jpg; check --data_dir."
        )
    splits, class_names, chosen = {}, None, None
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        names = _class_folders(split_dir)
        if class_names is None:
            class_names, chosen = names, sample_classes(names, class_subset, seed)
        elif names != class_names:
            raise DataError(
                f"The class folders of test/ ({', '.join(names)}) differ from those of train/ "
                f"({', '.join(class_names)}). Both splits need the same class sub-folders."
            )
        paths, labels = _image_files(split_dir, chosen)
        keep = (
            _subset(seed, 0, len(paths), train_subset)
            if split == "train"
            else _subset(0, 1, len(paths), test_subset)
        )
        if keep is not None:
            paths, labels = [paths[i] for i in keep], labels[keep]
        splits[split] = paths, labels
    if len(class_names) < 2:
        raise DataError(
            f"{root} has one class ({class_names[0]}); classification needs at least 2."
        )
    all_paths = splits["train"][0] + splits["test"][0]
    images = _stack_images(_decode_files(all_paths), all_paths, image_size)
    num_train = len(splits["train"][0])
    return ImageArrays(
        images[:num_train], splits["train"][1], images[num_train:], splits["test"][1], chosen
    )


def _download_host_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tfds_arrays(name: str, data_dir: str | None, image_size: int | None = None) -> ImageArrays:
    """Loads a TensorFlow Datasets image-classification dataset into memory.

    A dataset that is not prepared in `data_dir` is downloaded only when the
    download host answers within seconds; offline, this fails at once with a
    message that says how to prepare the data (tfds itself retries for minutes).
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"Unknown dataset {name!r}. Use {', '.join(BUILTIN_DATASETS)} or the name of a "
            "TensorFlow Datasets image-classification dataset (e.g. cifar10, mnist)."
        ) from None
    if not builder.is_prepared():
        if not _download_host_reachable():
            raise DataError(
                f"TensorFlow Datasets has no prepared copy of {name!r} in {builder.data_dir} and "
                "cannot download it (no network). Prepare it on a machine with network access "
                f"(`tfds build {name} --data_dir=DIR`), copy DIR here and pass "
                "--tfds_data_dir=DIR, "
                "or use --dataset=folder --data_dir=ROOT with an image folder."
            )
        builder.download_and_prepare()
    splits = builder.info.splits
    test_split = "test" if "test" in splits else "validation" if "validation" in splits else None
    if "train" not in splits or test_split is None:
        raise DataError(
            f"Dataset {name!r} has splits {', '.join(splits)}; expected 'train' and 'test' "
            "(or 'validation')."
        )
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(
            f"Dataset {name!r} is not an image-classification dataset (it needs 'image' and "
            f"'label' features; it has {', '.join(features)})."
        )
    arrays = {}
    for split in ("train", test_split):
        dataset = builder.as_dataset(split=split, as_supervised=True)
        images, labels = [], []
        for image, label in dataset.as_numpy_iterator():
            images.append(image)
            labels.append(label)
        arrays[split] = (
            _stack_images(images, [f"{name}/{split}[{i}]" for i in range(len(images))], image_size),
            np.asarray(labels, dtype="int32"),
        )
    return ImageArrays(*arrays["train"], *arrays[test_split], list(features["label"].names))


def load_arrays(config: DataConfig, seed: int = 0) -> ImageArrays:
    """Loads the dataset named by `config.dataset` into memory."""
    if config.dataset == "folder":
        return load_folder_arrays(
            config.data_dir,
            config.image_size,
            config.class_subset,
            seed,
            config.train_subset,
            config.test_subset,
        )
    if config.dataset == "digits":
        arrays = load_digits_arrays()
        if config.image_size and config.image_size != 8:
            arrays.train_images = np.stack(
                [_resize(i, config.image_size) for i in arrays.train_images]
            )
            arrays.test_images = np.stack(
                [_resize(i, config.image_size) for i in arrays.test_images]
            )
    else:
        arrays = load_tfds_arrays(config.dataset, config.tfds_data_dir, config.image_size)
    return _keep_classes(arrays, sample_classes(arrays.class_names, config.class_subset, seed))


# ------------------------------------------------------------------ pipelines


def _subset(seed: int, stream: int, total: int, count: int | None) -> np.ndarray | None:
    """The sorted indices of `count` of `total` examples drawn by (seed, stream); None: all."""
    if count is None or count >= total:
        return None
    order = np.random.default_rng([seed, stream]).permutation(total)[:count]
    order.sort()
    return order


def _take(seed: int, stream: int, images: np.ndarray, labels: np.ndarray, count: int | None):
    order = _subset(seed, stream, len(images), count)
    if order is None:
        return images, labels
    return images[order], labels[order]


@dataclasses.dataclass
class SearchData:
    """The train split divided into a weight part and an architecture part, and the test split."""

    config: DataConfig
    seed: int
    weight_images: np.ndarray
    weight_labels: np.ndarray
    arch_images: np.ndarray
    arch_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    mean: np.ndarray
    std: np.ndarray

    def _tensors(self, part: str) -> tuple:
        """(images, labels) of "weight", "arch" or "train" (both) as tensors, made once.

        Every dataset of a part reads the same two tensors, instead of each
        copying (and the train part concatenating) the arrays again.
        """
        cache = self.__dict__.setdefault("_tensor_cache", {})
        if part not in cache:
            if part == "train":
                images = np.concatenate([self.weight_images, self.arch_images])
                labels = np.concatenate([self.weight_labels, self.arch_labels])
            else:
                images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            cache[part] = (tf.constant(images), tf.constant(labels))
        return cache[part]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.weight_images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps_per_epoch(self) -> int:
        """Weight steps per epoch (full batches of the weight part)."""
        return len(self.weight_images) // self.config.batch_size

    @property
    def train_steps_per_epoch(self) -> int:
        """Steps per epoch over the whole training split (masking, fine-tuning)."""
        return (len(self.weight_images) + len(self.arch_images)) // self.config.batch_size

    def bilevel_dataset(self, epochs: int, start_step: int = 0, arch_steps=None) -> tf.data.Dataset:
        """((weight_x, weight_y), (arch_x, arch_y)) for global steps [start_step, epochs·steps).

        The architecture part is shorter than the weight part, so it cycles
        through its own reshuffled epochs. `arch_steps` (an `ArchStepPolicy`, or
        anything with its `decisions(start, stop)`) says which steps take an
        architecture step: the others get an empty architecture batch (no images),
        neither gathered nor augmented. A step's batches depend on the step alone,
        so a step that does take one gets the same batch either way.
        """
        batch = self.config.batch_size
        weight = _BatchSource(self, *self._tensors("weight"), batch, stream=1)
        arch = _BatchSource(self, *self._tensors("arch"), batch, stream=2)
        total = epochs * self.steps_per_epoch
        steps = tf.data.Dataset.range(start_step, total)
        decisions = None
        if arch_steps is not None:
            decisions = np.asarray(arch_steps.decisions(start_step, total), bool)
            if decisions.all():
                decisions = None

        def arch_batch(step):
            if decisions is None:
                return arch.batch(step, self.config.augment)
            return tf.cond(
                tf.constant(decisions)[step - start_step],
                lambda: arch.batch(step, self.config.augment),
                lambda: (
                    tf.zeros((0, *self.image_shape), tf.float32),
                    tf.zeros((0,), self.arch_labels.dtype),
                ),
            )

        return steps.map(
            lambda step: (weight.batch(step, self.config.augment), arch_batch(step)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).prefetch(tf.data.AUTOTUNE)

    def train_dataset(
        self, epochs: int, start_step: int = 0, cutout: bool = False
    ) -> tf.data.Dataset:
        """(x, y) batches of the whole training split (weight + arch parts), for later phases."""
        source = _BatchSource(
            self, *self._tensors("train"), self.config.batch_size, stream=3, cutout=cutout
        )
        steps = tf.data.Dataset.range(start_step, epochs * source.steps_per_epoch)
        return steps.map(
            lambda step: source.batch(step, self.config.augment),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        ).prefetch(tf.data.AUTOTUNE)

    def test_dataset(self, batch_size: int | None = None) -> tf.data.Dataset:
        """Normalised (x, y) batches of the test split, in order, last batch partial."""
        mean, std = self.mean, self.std
        dataset = tf.data.Dataset.from_tensor_slices((self.test_images, self.test_labels))
        return (
            dataset.batch(batch_size or self.config.batch_size)
            .map(lambda x, y: ((tf.cast(x, tf.float32) / 255.0 - mean) / std, y))
            .prefetch(tf.data.AUTOTUNE)
        )


class _BatchSource:
    """Batch number `step` of an endless sequence of reshuffled epochs."""

    def __init__(self, data: SearchData, images, labels, batch_size, stream, cutout=False):
        self.images = images
        self.labels = labels
        self.count = int(images.shape[0])
        self.batch_size = batch_size
        self.steps_per_epoch = self.count // batch_size
        self.seed = data.seed
        self.stream = stream
        self.padding = data.config.crop_padding
        self.flip = data.config.flip
        self.cutout_size = data.config.cutout_size if cutout else 0
        self.mean = tf.constant(data.mean, tf.float32)
        self.std = tf.constant(data.std, tf.float32)

    def batch(self, step, augment: bool):
        step = tf.cast(step, tf.int64)
        epoch = step // self.steps_per_epoch
        positions = (step % self.steps_per_epoch) * self.batch_size + tf.range(
            self.batch_size, dtype=tf.int64
        )
        seed = tf.stack([tf.constant(self.seed, tf.int64), epoch * 8 + self.stream])
        indices = tf.random.experimental.index_shuffle(positions, seed, self.count - 1)
        images = tf.cast(tf.gather(self.images, indices), tf.float32) / 255.0
        labels = tf.gather(self.labels, indices)
        if augment:
            images = self._augment(
                images, tf.stack([tf.constant(self.seed, tf.int64), step * 8 + self.stream])
            )
        return (images - self.mean) / self.std, labels

    def _augment(self, images, seed):
        """Random crop with zero padding and (config.flip) random horizontal flip, per image."""
        batch = self.batch_size
        height, width = images.shape[1], images.shape[2]
        seeds = tf.random.experimental.stateless_split(seed, 4)
        if self.padding:
            pad = self.padding
            # Pad with the mean so that the padding is zero after normalisation.
            padded = (
                tf.pad(images - self.mean, [[0, 0], [pad, pad], [pad, pad], [0, 0]]) + self.mean
            )
            offsets = tf.random.stateless_uniform(
                [batch, 2], seeds[0], minval=0, maxval=2 * pad + 1, dtype=tf.int32
            )
            rows = offsets[:, :1] + tf.range(height)[None, :]
            cols = offsets[:, 1:] + tf.range(width)[None, :]
            images = tf.gather(padded, rows, axis=1, batch_dims=1)
            images = tf.gather(images, cols, axis=2, batch_dims=1)
        if self.flip:
            flip = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[1]) < 0.5
            images = tf.where(flip, tf.reverse(images, axis=[2]), images)
        if self.cutout_size:
            centres = tf.random.stateless_uniform([batch, 2], seeds[2], 0, 1) * [height, width]
            half = self.cutout_size / 2
            row = tf.range(height, dtype=tf.float32)[None, :, None] + 0.5
            col = tf.range(width, dtype=tf.float32)[None, None, :] + 0.5
            inside = (tf.abs(row - centres[:, 0, None, None]) < half) & (
                tf.abs(col - centres[:, 1, None, None]) < half
            )
            images = tf.where(inside[..., None], self.mean, images)
        return images


def _channel_statistics(images: np.ndarray, chunk: int = 1 << 20) -> tuple:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1] (float32).

    In float64, `chunk` pixels at a time: a float64 copy of CIFAR-10's training
    split would take 1.2 GB (it was the data's peak memory).
    """
    pixels = images.reshape(-1, images.shape[-1])
    parts = [pixels[start : start + chunk] for start in range(0, len(pixels), chunk)]
    mean = sum(part.sum(axis=0, dtype="float64") for part in parts) / (255.0 * len(pixels))
    squares = sum(((part / 255.0 - mean) ** 2).sum(axis=0) for part in parts)
    std = np.sqrt(squares / len(pixels))
    return mean.astype("float32"), np.maximum(std, 1e-3).astype("float32")


def make_search_data(
    config: DataConfig, seed: int = 0, arrays: ImageArrays | None = None
) -> SearchData:
    """Loads (unless given) the data and splits the training part, deterministically by `seed`."""
    arrays = arrays or load_arrays(config, seed)
    train_x, train_y = _take(seed, 0, arrays.train_images, arrays.train_labels, config.train_subset)
    test_x, test_y = _take(0, 1, arrays.test_images, arrays.test_labels, config.test_subset)
    order = np.random.default_rng([seed, 7]).permutation(len(train_x))
    num_arch = int(round(len(train_x) * config.arch_fraction))
    arch_idx, weight_idx = np.sort(order[:num_arch]), np.sort(order[num_arch:])
    for part, size in (("weight", len(weight_idx)), ("architecture", len(arch_idx))):
        if size < config.batch_size:
            raise DataError(
                f"The {part} part of the training split has {size} examples, fewer than one "
                f"batch of {config.batch_size}. Lower --batch_size, or use more training data "
                "(--train_subset, --arch_fraction)."
            )
    mean, std = _channel_statistics(train_x)
    return SearchData(
        config,
        seed,
        train_x[weight_idx],
        train_y[weight_idx],
        train_x[arch_idx],
        train_y[arch_idx],
        test_x,
        test_y,
        list(arrays.class_names),
        mean,
        std,
    )


def describe(data: SearchData) -> str:
    """One line for logs: sizes of each part and the image shape."""
    h, w, c = data.image_shape
    return (
        f"{data.config.dataset}: {data.num_classes} classes, {h}x{w}x{c} images, "
        f"{len(data.weight_images)} weight / {len(data.arch_images)} arch / "
        f"{len(data.test_images)} test examples"
    )
