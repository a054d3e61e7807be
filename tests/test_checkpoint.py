import keras
import numpy as np
import pytest

from hmnas_keras.checkpoint import (
    CheckpointError,
    read_model_arrays,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from hmnas_keras.config import DataConfig, RunConfig, SupernetConfig
from hmnas_keras.data import make_search_data
from hmnas_keras.pipeline.supernet_phase import build_search
from hmnas_keras.space.search_space import SearchSpace


def tiny_config(**space):
    return RunConfig(
        data=DataConfig(dataset="digits", batch_size=16, train_subset=100, augment=False),
        search_space=SearchSpace(
            num_cells=2, channels=4, num_nodes=2, op_names=("avg_pool_3x3", "skip_connect"), **space
        ),
        supernet=SupernetConfig(epochs=2, warmup_epochs=0),
    )


def test_restore_brings_back_every_variable(tmp_path):
    config = tiny_config()
    data = make_search_data(config.data)
    search = build_search(config, data)
    search.fit(data.bilevel_dataset(1), epochs=1, steps_per_epoch=data.steps_per_epoch, verbose=0)
    variables = search.state_variables
    # Weights, α/β, BN statistics, both optimizers' slots and iterations, metric accumulators.
    assert any("moving_mean" in v.path for v in variables)
    assert any("arch_optimizer" in v.path for v in variables)
    assert any("weight_optimizer" in v.path for v in variables)
    assert set(map(id, search.supernet.arch_variables)) <= set(map(id, variables))
    path = str(tmp_path / "ckpt.npz")
    save_checkpoint(path, variables, {"epoch": 1})
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]

    fresh = build_search(RunConfig(**{**config.__dict__, "seed": 9}), data)
    fresh_variables = fresh.state_variables
    changed = [
        not np.array_equal(keras.ops.convert_to_numpy(v), s) for v, s in zip(fresh_variables, saved)
    ]
    assert sum(changed) > len(changed) // 3
    assert restore_checkpoint(path, fresh_variables) == {"epoch": 1}
    for variable, value in zip(fresh_variables, saved, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
    assert read_state(path) == {"epoch": 1}
    assert not list(tmp_path.glob("*.tmp-*"))


def test_restore_into_a_different_model_is_refused(tmp_path):
    config = tiny_config()
    data = make_search_data(config.data)
    path = str(tmp_path / "ckpt.npz")
    save_checkpoint(path, build_search(config, data).state_variables, {})
    other = build_search(tiny_config(multi_level=False), data)
    with pytest.raises(CheckpointError, match="does not match this model.*beta"):
        restore_checkpoint(path, other.state_variables)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        restore_checkpoint(str(tmp_path / "missing.npz"), [])


def test_damaged_checkpoints_name_the_file_and_what_to_do(tmp_path):
    variables = [keras.Variable(np.arange(6.0).reshape(2, 3), name="w")]
    good = str(tmp_path / "good.npz")
    save_checkpoint(good, variables, {"epoch": 3})
    data = open(good, "rb").read()
    damaged = {
        "empty.npz": (b"", r"it is empty \(0 bytes\)"),
        "junk.npz": (b"not a checkpoint at all" * 10, "damaged or not a checkpoint"),
        "truncated.npz": (data[: len(data) // 2], "damaged or not a checkpoint"),
    }
    for name, (content, reason) in damaged.items():
        path = str(tmp_path / name)
        with open(path, "wb") as handle:
            handle.write(content)
        for read in (read_state, lambda p: restore_checkpoint(p, variables)):
            with pytest.raises(
                CheckpointError, match=rf"Checkpoint {path} is .*{reason}"
            ) as caught:
                read(path)
            assert "--resume" in str(caught.value) and "allow_pickle" not in str(caught.value)
        with pytest.raises(CheckpointError, match="damaged"):
            read_model_arrays(path, "w")
    assert read_state(good) == {"epoch": 3}  # the intact one still reads
