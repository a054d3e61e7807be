import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from hmnas_keras import data as data_module
from hmnas_keras.config import DataConfig, DataError
from hmnas_keras.data import load_arrays, load_folder_arrays, make_search_data


def write_image(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
    tf.io.write_file(path, encode(array))


def make_folder(root, size=(6, 6), channels=3, per_class=4, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            for i in range(per_class):
                image = rng.integers(0, 255, (*size, channels), dtype=np.uint8)
                write_image(os.path.join(root, split, name, f"{i}.png"), image)
    return root


def test_folder_loads_classes_labels_and_rgb(tmp_path):
    arrays = load_folder_arrays(make_folder(str(tmp_path)))
    assert arrays.class_names == ["cat", "dog"]
    assert arrays.train_images.shape == (8, 6, 6, 3) and arrays.train_images.dtype == np.uint8
    assert arrays.train_labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert arrays.test_images.shape == (8, 6, 6, 3)


def test_folder_grayscale_stays_one_channel_and_jpeg_is_read(tmp_path):
    root = make_folder(str(tmp_path), channels=1)
    write_image(os.path.join(root, "train", "cat", "extra.jpg"), np.full((6, 6, 1), 128, np.uint8))
    arrays = load_folder_arrays(root)
    assert arrays.train_images.shape == (9, 6, 6, 1)


def test_mixed_sizes_need_image_size(tmp_path):
    root = make_folder(str(tmp_path))
    write_image(os.path.join(root, "train", "dog", "big.png"), np.zeros((9, 7, 3), np.uint8))
    with pytest.raises(DataError, match=r"different sizes.*big.png is 9x7.*--image_size"):
        load_folder_arrays(root)
    assert load_folder_arrays(root, image_size=5).train_images.shape == (9, 5, 5, 3)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda root: None, "does not exist"),
        (
            lambda root: make_folder(root) and _remove(os.path.join(root, "test")),
            "Missing split folder",
        ),
        (
            lambda root: make_folder(root) and os.makedirs(os.path.join(root, "train", "emu")),
            "holds no images",
        ),
        (
            lambda root: (
                make_folder(root)
                and open(os.path.join(root, "train", "cat", "broken.jpg"), "wb").write(
                    b"not an image"
                )
            ),
            r"Cannot read image file .*broken.jpg: (?!.*function_node)",
        ),
        (
            lambda root: (
                make_folder(root)
                and open(os.path.join(root, "test", "dog", "empty.png"), "wb").close() is None
            ),
            r"Cannot read image file .*empty.png: it is empty \(0 bytes\)",
        ),
    ],
    ids=["missing-root", "missing-split", "empty-class", "unreadable-image", "zero-byte-image"],
)
def test_bad_folders_get_clear_errors(tmp_path, breakage, message):
    root = str(tmp_path / "data")
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_folder_arrays(root)


def _remove(path):
    import shutil

    shutil.rmtree(path)
    return True


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DataError, match="Unknown dataset 'no_such_set'. Use digits, folder"):
        load_arrays(DataConfig(dataset="no_such_set"))


def test_tfds_offline_fails_fast_with_instructions(tmp_path):
    with mock.patch.object(data_module, "_download_host_reachable", return_value=False):
        with pytest.raises(DataError, match="tfds build mnist --data_dir=DIR"):
            load_arrays(DataConfig(dataset="mnist", tfds_data_dir=str(tmp_path)))


def test_tfds_loads_a_locally_prepared_dataset(tmp_path):
    import tensorflow_datasets as tfds

    class HmnasTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(4, 4, 3)),
                        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(6), "test": self._generate_examples(3)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image": np.full((4, 4, 3), i * 10, np.uint8), "label": i % 3}

    HmnasTinyImages(data_dir=str(tmp_path)).download_and_prepare()
    with mock.patch.object(data_module, "_download_host_reachable", side_effect=AssertionError):
        arrays = load_arrays(DataConfig(dataset="hmnas_tiny_images", tfds_data_dir=str(tmp_path)))
    assert arrays.class_names == ["a", "b", "c"]
    assert arrays.train_images.shape == (6, 4, 4, 3) and arrays.test_images.shape == (3, 4, 4, 3)
    assert sorted(arrays.train_labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_digits_split_is_deterministic_disjoint_and_80_20():
    config = DataConfig(dataset="digits", batch_size=8)
    first, again = make_search_data(config, seed=1), make_search_data(config, seed=1)
    np.testing.assert_array_equal(first.arch_images, again.arch_images)
    total = len(first.weight_images) + len(first.arch_images)
    assert total == 1437 and len(first.arch_images) == round(0.2 * total)
    weight_rows = {row.tobytes() for row in first.weight_images}
    overlap = sum(row.tobytes() in weight_rows for row in first.arch_images)
    assert overlap < 5  # digits holds a few duplicate images, nothing more
    other = make_search_data(config, seed=2)
    assert not np.array_equal(first.arch_labels, other.arch_labels)
    assert first.image_shape == (8, 8, 1) and first.num_classes == 10


def test_train_subset_and_normalisation():
    data = make_search_data(DataConfig(dataset="digits", batch_size=4, train_subset=100), seed=0)
    assert len(data.weight_images) + len(data.arch_images) == 100
    (x, _), _ = next(iter(data.bilevel_dataset(1)))
    assert x.shape == (4, 8, 8, 1) and x.dtype == tf.float32
    pixels = np.concatenate([data.weight_images, data.arch_images]).astype("float64") / 255
    np.testing.assert_allclose(data.mean, pixels.mean(), rtol=1e-5)


def test_pipeline_resumes_at_any_step_with_the_same_batches():
    data = make_search_data(DataConfig(dataset="digits", batch_size=32, train_subset=300), seed=0)
    full = list(data.bilevel_dataset(3).as_numpy_iterator())
    assert len(full) == 3 * data.steps_per_epoch
    resumed = list(data.bilevel_dataset(3, start_step=11).as_numpy_iterator())
    for a, b in zip(full[11:], resumed, strict=True):
        np.testing.assert_array_equal(a[0][0], b[0][0])
        np.testing.assert_array_equal(a[1][1], b[1][1])
    # Each epoch is a fresh permutation of the weight part.
    steps = data.steps_per_epoch
    epochs = [
        np.concatenate([s[0][0] for s in full[e * steps : (e + 1) * steps]]) for e in range(2)
    ]
    for images in epochs:
        distinct = {row.tobytes() for row in images}
        assert len(distinct) >= len(images) - 3  # no example twice (digits has a few duplicates)
    assert not np.array_equal(epochs[0], epochs[1])


def test_the_architecture_batch_is_made_only_for_steps_that_take_an_architecture_step():
    class Every3rd:  # what the pipeline asks of an ArchStepPolicy
        def decisions(self, start, stop):
            return np.arange(start, stop) % 3 == 0

    data = make_search_data(DataConfig(dataset="digits", batch_size=32, train_subset=300), seed=0)
    full = list(data.bilevel_dataset(2).as_numpy_iterator())
    for start in (0, 5):  # a resumed run too
        skipping = list(data.bilevel_dataset(2, start, arch_steps=Every3rd()).as_numpy_iterator())
        assert len(skipping) == len(full) - start
        for step, (got, expected) in enumerate(zip(skipping, full[start:]), start):
            np.testing.assert_array_equal(got[0][0], expected[0][0])  # the weight batch
            if step % 3 == 0:
                np.testing.assert_array_equal(got[1][0], expected[1][0])
                np.testing.assert_array_equal(got[1][1], expected[1][1])
            else:
                assert got[1][0].shape == (0, 8, 8, 1) and got[1][1].shape == (0,)
                assert got[1][1].dtype == expected[1][1].dtype


def test_flip_is_off_by_default_for_digits_and_on_for_other_data():
    assert DataConfig(dataset="digits").flip is False
    assert DataConfig(dataset="mnist", flip=None).flip is False
    assert DataConfig(dataset="folder", flip=None).flip is True
    assert DataConfig(dataset="digits", flip=True).flip is True  # asked for
    # Without crop padding, unflipped augmentation leaves every image as it is.
    config = DataConfig(dataset="digits", batch_size=16, crop_padding=0, flip=None)
    plain = make_search_data(DataConfig(dataset="digits", batch_size=16, augment=False), seed=0)
    (original, _), _ = next(iter(plain.bilevel_dataset(1)))
    (same, _), _ = next(iter(make_search_data(config, seed=0).bilevel_dataset(1)))
    np.testing.assert_array_equal(same, original)
    flipping = DataConfig(dataset="digits", batch_size=16, crop_padding=0, flip=True)
    (flipped, _), _ = next(iter(make_search_data(flipping, seed=0).bilevel_dataset(1)))
    mirrored = [
        np.array_equal(f, o[:, ::-1]) and not np.array_equal(f, o)
        for f, o in zip(flipped.numpy(), original.numpy(), strict=True)
    ]
    assert 0 < sum(mirrored) < 16


def test_augmentation_crops_flips_and_cutout():
    config = DataConfig(
        dataset="digits", batch_size=16, augment=True, crop_padding=2, cutout_size=4, flip=True
    )
    data = make_search_data(config, seed=0)
    plain = make_search_data(DataConfig(dataset="digits", batch_size=16, augment=False), seed=0)
    (augmented, labels), _ = next(iter(data.bilevel_dataset(1)))
    (original, labels_plain), _ = next(iter(plain.bilevel_dataset(1)))
    np.testing.assert_array_equal(labels, labels_plain)
    assert augmented.shape == original.shape
    assert not np.allclose(augmented, original)
    # Cutout fills a square with the mean, which is zero after normalising.
    no_cut, _ = next(iter(data.train_dataset(1, cutout=False)))
    cut, _ = next(iter(data.train_dataset(1, cutout=True)))
    assert np.sum(cut.numpy() == 0.0) >= np.sum(no_cut.numpy() == 0.0) + 16 * 4


def test_batch_larger_than_the_data_is_refused():
    with pytest.raises(DataError, match="fewer than one batch"):
        make_search_data(DataConfig(dataset="digits", batch_size=64, train_subset=40))


def test_class_subset_keeps_n_classes_drawn_by_seed(tmp_path):
    root = make_folder(str(tmp_path), classes=("a", "b", "c", "d"), per_class=2)
    arrays = load_folder_arrays(root, class_subset=2, seed=3)
    assert len(arrays.class_names) == 2 and set(arrays.class_names) < {"a", "b", "c", "d"}
    assert arrays.train_images.shape[0] == 4 and sorted(set(arrays.train_labels)) == [0, 1]
    digits = load_arrays(DataConfig(dataset="digits", class_subset=3), seed=1)
    assert len(digits.class_names) == 3 and set(digits.test_labels.tolist()) == {0, 1, 2}
    assert (
        load_arrays(DataConfig(dataset="digits", class_subset=3), seed=1).class_names
        == digits.class_names
    )


def test_folder_subsets_decode_only_the_images_kept_and_resize_the_same(tmp_path):
    # --train_subset/--test_subset decode only the kept files; the arrays equal those of
    # decoding everything and drawing the subsets afterwards. Mixed sizes are resized in
    # batches per shape, each image exactly as on its own.
    root = make_folder(str(tmp_path), size=(7, 7), per_class=12, classes=("a", "b", "c"))
    write_image(os.path.join(root, "train", "b", "wide.png"), np.full((5, 9, 3), 77, np.uint8))
    config = DataConfig(
        dataset="folder",
        data_dir=root,
        image_size=4,
        train_subset=20,
        test_subset=9,
        batch_size=4,
    )
    decoded = []
    real_decode = data_module._decode_files
    with mock.patch.object(
        data_module, "_decode_files", lambda paths: decoded.append(len(paths)) or real_decode(paths)
    ):
        data = make_search_data(config, seed=5)
    assert decoded == [20 + 9]
    full = load_folder_arrays(root, image_size=4)
    expected = make_search_data(config, seed=5, arrays=full)
    for name in (
        "weight_images",
        "weight_labels",
        "arch_images",
        "arch_labels",
        "test_images",
        "test_labels",
        "mean",
        "std",
    ):
        np.testing.assert_array_equal(getattr(data, name), getattr(expected, name), err_msg=name)
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 255, shape, dtype=np.uint8)
        for shape in [(7, 7, 3)] * 5 + [(5, 9, 3)] * 2 + [(4, 4, 3)]
    ]
    batched = data_module._resize_all(images, 4, chunk=3)
    for image, resized in zip(images, batched):
        one = image if image.shape[:2] == (4, 4) else data_module._resize(image, 4)
        np.testing.assert_array_equal(resized, one)


def test_channel_statistics_in_chunks_equal_those_of_a_float64_copy():
    from hmnas_keras.data import _channel_statistics

    images = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
    images[..., 2] = 7  # a constant channel: the std floor of 1e-3
    pixels = images.reshape(-1, 3).astype("float64") / 255.0
    mean, std = _channel_statistics(images, chunk=1000)  # 19,200 pixels: a partial last chunk
    np.testing.assert_array_equal(mean, pixels.mean(axis=0).astype("float32"))
    np.testing.assert_array_equal(std, np.maximum(pixels.std(axis=0), 1e-3).astype("float32"))
    assert std[2] == np.float32(1e-3) and mean.dtype == std.dtype == np.float32


def test_every_dataset_of_a_part_reads_the_same_tensors():
    from hmnas_keras.data import load_digits_arrays, make_search_data

    data = make_search_data(DataConfig(dataset="digits", batch_size=16), 0, load_digits_arrays())
    first = [batch[1].numpy() for batch in data.train_dataset(1).take(3)]
    images, labels = data._tensors("train")
    assert data._tensors("train")[0] is images  # made once, not per dataset
    assert images.shape[0] == len(data.weight_images) + len(data.arch_images)
    np.testing.assert_array_equal(labels.numpy()[: len(data.weight_labels)], data.weight_labels)
    again = [batch[1].numpy() for batch in data.train_dataset(1).take(3)]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
