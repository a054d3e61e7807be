"""Atomic, complete checkpoints of a training state.

A checkpoint is one `.npz` file holding every variable it was given, in order,
with its path and shape, plus a JSON state (epoch, step, ...). It is written to
a temporary file, synced, then renamed over the old one, so a kill at any moment
leaves either the previous or the new checkpoint, never a torn one. Restoring
checks that the checkpoint holds exactly the expected variables, by path and
shape; nothing is silently skipped (unlike `tf.train.Checkpoint`, which misses
variables held in plain Python lists).
"""

import contextlib
import json
import os
import zipfile
import zlib

import numpy as np
from keras import ops


class CheckpointError(ValueError):
    """A checkpoint is missing or does not match the model it is restored into."""


class NonFiniteState(ValueError):
    """A variable holds NaN or infinite values: a diverged state, not worth a checkpoint."""


def save_checkpoint(path: str, variables: list, state: dict, require_finite: bool = False) -> None:
    """Writes `variables` and the JSON-serialisable `state` to `path` atomically.

    With `require_finite`, raises NonFiniteState (and writes nothing) if a
    floating-point variable holds NaN or infinite values, so that the last
    checkpoint on disk stays a good one.
    """
    arrays = {f"v{i:05d}": ops.convert_to_numpy(v) for i, v in enumerate(variables)}
    if require_finite:
        for variable, array in zip(variables, arrays.values(), strict=True):
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise NonFiniteState(f"{variable.path} holds NaN or infinite values.")
    arrays["__paths__"] = np.asarray(json.dumps([v.path for v in variables]))
    arrays["__state__"] = np.asarray(json.dumps(state))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_path, path)


@contextlib.contextmanager
def checkpoint_reading(path: str):
    """Turns what a damaged file raises while it is read into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"No checkpoint at {path}.") from None
    except (
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        zlib.error,
    ) as error:
        if os.path.exists(path) and os.path.getsize(path) == 0:
            reason = "it is empty (0 bytes)"
        elif "pickle" in str(error):  # numpy's guess for any file that is not an .npz
            reason = "it is not an .npz archive"
        else:
            reason = f"{type(error).__name__}: {error}"
        raise CheckpointError(
            f"Checkpoint {path} is damaged or not a checkpoint ({reason}). If it is this "
            "run's own, delete it: --resume then runs its phase again from the previous "
            "phase's result. If it came from --supernet_checkpoint, give an intact "
            "supernet/checkpoint.npz."
        ) from None


def read_state(path: str) -> dict:
    """The JSON state stored in a checkpoint."""
    with checkpoint_reading(path), np.load(path) as archive:
        return json.loads(str(archive["__state__"]))


def restore_checkpoint(path: str, variables: list) -> dict:
    """Assigns every variable from `path` and returns the stored state.

    Raises CheckpointError unless the checkpoint holds exactly these variables
    (same count, paths and shapes, in the same order).
    """
    if not os.path.exists(path):
        raise CheckpointError(f"No checkpoint at {path}.")
    with checkpoint_reading(path), np.load(path) as archive:
        paths = json.loads(str(archive["__paths__"]))
        expected = [v.path for v in variables]
        if paths != expected:
            missing = sorted(set(expected) - set(paths))
            unexpected = sorted(set(paths) - set(expected))
            raise CheckpointError(
                f"Checkpoint {path} does not match this model: it holds {len(paths)} variables, "
                f"the model has {len(expected)}. Missing: {missing[:5]}; unexpected: "
                f"{unexpected[:5]}. Was it written with a different configuration?"
            )
        values = [archive[f"v{i:05d}"] for i in range(len(variables))]
        for variable, value in zip(variables, values, strict=True):
            if tuple(variable.shape) != value.shape:
                raise CheckpointError(
                    f"Checkpoint {path}: variable {variable.path} has shape {value.shape}, "
                    f"the model expects {tuple(variable.shape)}."
                )
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
        return json.loads(str(archive["__state__"]))


def relative_path(path: str) -> str:
    """A variable path without the model's name: 'supernet/cell_0/...' -> 'cell_0/...'."""
    return path.split("/", 1)[1]


def read_model_arrays(path: str, model_name: str) -> dict:
    """{relative path: array} of the variables of the model named `model_name` in a checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"No checkpoint at {path}.")
    prefix = f"{model_name}/"
    with checkpoint_reading(path), np.load(path) as archive:
        paths = json.loads(str(archive["__paths__"]))
        return {
            relative_path(p): archive[f"v{i:05d}"]
            for i, p in enumerate(paths)
            if p.startswith(prefix)
        }


def assign_by_path(model, arrays: dict, mismatch) -> None:
    """Assigns every variable of the built `model` from `arrays` ({relative path: array}).

    `mismatch(path)` makes the exception raised, before anything is assigned,
    for the first variable that has no array or an array of another shape.
    """
    for variable in model.variables:
        path = relative_path(variable.path)
        if path not in arrays or arrays[path].shape != tuple(variable.shape):
            raise mismatch(path)
    for variable in model.variables:
        variable.assign(arrays[relative_path(variable.path)])


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON to `path` atomically (a kill leaves old or new)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
    os.replace(tmp_path, path)
