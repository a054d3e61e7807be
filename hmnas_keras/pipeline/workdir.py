"""A run's work directory: every path, and how each phase's checkpoint is read back.

One `Workdir` per run. The phases receive it and ask it for paths; no other
module spells a file name of the workdir. Its layout (README.md, "What a run
leaves in its workdir"):

    config.json
    supernet/   checkpoint.npz  metrics.csv  arch_history.jsonl  tensorboard/  summary.json
    mask/       checkpoint.npz  metrics.csv  weight_masks.npz    tensorboard/  summary.json
    architecture.json  searched.json
    finetune/   checkpoint.npz  metrics.csv  tensorboard/  summary.json
    export/     model.keras  saved_model/  model.onnx  metadata.json  summary.json
                (with --export_formats also model.tflite, model.int8.onnx, model.int8.tflite)
    pictures/   report.json  report.txt

Checkpoints store variables by path, and a path starts with the name of the
model that owns it: `SUPERNET_MODEL` for the supernet (supernet and mask
phases), `SEARCHED_MODEL` for the searched network (fine-tuning). The phases
build their models with these names; `*_arrays()` read them back keyed by
the path below the model (`hmnas_keras.checkpoint.relative_path`).
"""

import dataclasses
import json
import os

from hmnas_keras.checkpoint import CheckpointError, read_model_arrays, write_json
from hmnas_keras.config import RunConfig

SUPERNET_MODEL = "supernet"
SEARCHED_MODEL = "searched"


@dataclasses.dataclass(frozen=True)
class PhaseFiles:
    """The files every training phase keeps in its directory (see `hmnas_keras.pipeline.phase`)."""

    directory: str

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.directory, "checkpoint.npz")

    @property
    def metrics(self) -> str:
        return os.path.join(self.directory, "metrics.csv")

    @property
    def tensorboard(self) -> str:
        return os.path.join(self.directory, "tensorboard")

    @property
    def summary(self) -> str:
        return os.path.join(self.directory, "summary.json")

    def tensorboard_run(self, name: str) -> str:
        """A TensorBoard run of the phase's own (beside Keras' train/ and validation/)."""
        return os.path.join(self.tensorboard, name)

    def file(self, name: str) -> str:
        return os.path.join(self.directory, name)


@dataclasses.dataclass(frozen=True)
class ExportFiles:
    """The files of the export phase."""

    directory: str

    @property
    def keras_file(self) -> str:
        return os.path.join(self.directory, "model.keras")

    @property
    def saved_model(self) -> str:
        return os.path.join(self.directory, "saved_model")

    @property
    def onnx(self) -> str:
        return os.path.join(self.directory, "model.onnx")

    @property
    def tflite(self) -> str:
        return os.path.join(self.directory, "model.tflite")

    @property
    def onnx_int8(self) -> str:
        return os.path.join(self.directory, "model.int8.onnx")

    @property
    def tflite_int8(self) -> str:
        return os.path.join(self.directory, "model.int8.tflite")

    @property
    def metadata(self) -> str:
        return os.path.join(self.directory, "metadata.json")

    @property
    def summary(self) -> str:
        return os.path.join(self.directory, "summary.json")

    @property
    def models(self) -> dict:
        """Every model file the export can write, by format (config.EXPORT_FORMATS)."""
        return {
            "keras": self.keras_file,
            "saved_model": self.saved_model,
            "onnx": self.onnx,
            "tflite": self.tflite,
            "onnx_int8": self.onnx_int8,
            "tflite_int8": self.tflite_int8,
        }


class Workdir:
    """The paths of a run's work directory.

    Args:
        root: the directory (`--workdir`).
        supernet_checkpoint: a trained supernet from another run
            (`--supernet_checkpoint`); None: this run's own.
    """

    CONFIG = "config.json"
    ARCHITECTURE = "architecture.json"
    # architecture.json names the weight masks by this path, relative to the workdir.
    WEIGHT_MASKS = os.path.join("mask", "weight_masks.npz")
    # What the other tasks of a multi-worker run leave out of their copy of the workdir:
    # what only the chief writes, and nothing reads back.
    CHIEF_ONLY = ("export", "pictures", "tensorboard")

    def __init__(self, root: str, supernet_checkpoint: str | None = None):
        self.root = root
        self.supernet = PhaseFiles(os.path.join(root, "supernet"))
        self.mask = PhaseFiles(os.path.join(root, "mask"))
        self.finetune = PhaseFiles(os.path.join(root, "finetune"))
        self.export = ExportFiles(os.path.join(root, "export"))
        self._supernet_checkpoint = supernet_checkpoint

    @classmethod
    def of_run(cls, root: str, config: RunConfig) -> "Workdir":
        return cls(root, config.supernet_checkpoint)

    # ------------------------------------------------------------- files

    @property
    def config(self) -> str:
        return os.path.join(self.root, self.CONFIG)

    @property
    def arch_history(self) -> str:
        """softmax(α), softmax(β) per supernet epoch (JSON lines)."""
        return self.supernet.file("arch_history.jsonl")

    @property
    def weight_masks(self) -> str:
        return os.path.join(self.root, self.WEIGHT_MASKS)

    @property
    def architecture(self) -> str:
        return os.path.join(self.root, self.ARCHITECTURE)

    @property
    def searched_summary(self) -> str:
        """The searched network before fine-tuning (searched.json)."""
        return os.path.join(self.root, "searched.json")

    @property
    def pictures(self) -> str:
        return os.path.join(self.root, "pictures")

    @property
    def report(self) -> str:
        return os.path.join(self.root, "report.json")

    @property
    def report_text(self) -> str:
        return os.path.join(self.root, "report.txt")

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    # ------------------------------------------------- the trained supernet

    @property
    def trained_supernet(self) -> str:
        """The checkpoint of the trained supernet this run derives from."""
        return self._supernet_checkpoint or self.supernet.checkpoint

    @property
    def uses_other_supernet(self) -> bool:
        return os.path.dirname(self.trained_supernet) != self.supernet.directory

    @property
    def trained_supernet_summary(self) -> str:
        return os.path.join(os.path.dirname(self.trained_supernet), "summary.json")

    # ---------------------------------------------------------- contents

    def has_run(self) -> bool:
        """True if it holds more than the config.json of a run that failed before training."""
        return os.path.isdir(self.root) and bool(set(os.listdir(self.root)) - {self.CONFIG})

    def write_config(self, config: RunConfig) -> None:
        os.makedirs(self.root, exist_ok=True)
        write_json(self.config, config.to_dict())

    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(read_json(self.config))

    def supernet_arrays(self, what: str = "a trained supernet") -> dict:
        """{relative path: array} of the trained supernet; `what` says what needs it."""
        try:
            return read_model_arrays(self.trained_supernet, SUPERNET_MODEL)
        except CheckpointError:
            raise CheckpointError(
                f"This step needs {what}, and there is no checkpoint at {self.trained_supernet}. "
                "Run the supernet phase first (--phases=supernet,...), or point "
                "--supernet_checkpoint at another run's supernet/checkpoint.npz."
            ) from None

    def masked_supernet_arrays(self) -> dict:
        """{relative path: array} of the supernet as the mask phase left it (BN statistics)."""
        try:
            return read_model_arrays(self.mask.checkpoint, SUPERNET_MODEL)
        except CheckpointError:
            raise CheckpointError(
                f"This step needs the masked supernet, and there is no checkpoint at "
                f"{self.mask.checkpoint}. Run the mask phase first."
            ) from None

    def finetuned_arrays(self) -> dict:
        """{relative path: array} of the fine-tuned searched network."""
        return read_model_arrays(self.finetune.checkpoint, SEARCHED_MODEL)


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def read_json_if_exists(path: str) -> dict | None:
    return read_json(path) if os.path.exists(path) else None
