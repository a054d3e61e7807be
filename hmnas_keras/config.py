"""The resolved configuration of a run: frozen dataclasses, written to the workdir as JSON.

Plain data with no dependencies beyond the standard library and numpy:
importing it does not import TensorFlow or Keras (a test checks that), so a
tool can read a run's `config.json` cheaply.
"""

import dataclasses
import math

from hmnas_keras.architecture.derivation import DERIVATIONS
from hmnas_keras.space.search_space import SearchSpace
from hmnas_keras.training.arch_step import SCHEDULES

PHASES = ("supernet", "mask", "finetune", "export")
FINETUNE_INITS = ("inherited", "scratch")
STRATEGIES = ("default", "mirrored", "multi_worker")
MASK_TARGETS = ("none", "params", "flops")
MASK_LR_SCHEDULES = ("paper", "scaled")
WEIGHT_MASKS = ("element", "channel")
# What the export phase can write (hmnas_keras.export); the defaults are the fast ones.
EXPORT_FORMATS = ("keras", "saved_model", "onnx", "tflite", "onnx_int8", "tflite_int8")
DEFAULT_EXPORT_FORMATS = ("keras", "saved_model", "onnx")
INT8_FORMATS = ("onnx_int8", "tflite_int8")
# The paper's masking budget: 20 epochs of ~390 steps on CIFAR-10 (§4.2); the "scaled" mask
# learning rates multiply the paper's by PAPER_MASK_STEPS / (this run's mask steps).
PAPER_MASK_STEPS = 7800


class DataError(ValueError):
    """A dataset could not be loaded; the message says what is wrong and how to fix it."""


# Datasets of digits and letters, where a mirrored image is another symbol: the
# random horizontal flip is off by default for them (--flip).
UNFLIPPED_DATASETS = ("digits", "mnist", "emnist", "kmnist", "svhn_cropped")


def _check_learning_rates(prefix: str, rate: float, rate_min: float) -> None:
    """A cosine schedule from `rate` down to `rate_min` (flags --{prefix}learning_rate[_min])."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(
            f"Received an invalid --{prefix}learning_rate, expected a positive number. "
            f"Received: {rate}"
        )
    if not (math.isfinite(rate_min) and 0 <= rate_min <= rate):
        raise ValueError(
            f"Received an invalid --{prefix}learning_rate_min, expected a number from 0 to "
            f"--{prefix}learning_rate ({rate:g}): the cosine schedule decays towards it. "
            f"Received: {rate_min}"
        )


def _check_epochs(section: str, epochs: int) -> None:
    if epochs < 1:
        raise ValueError(
            f"Received an invalid {section} epochs, expected >= 1. Received: epochs={epochs}"
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it is split, augmented and batched."""

    dataset: str = "digits"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    image_size: int | None = None
    arch_fraction: float = 0.2
    class_subset: int | None = None
    train_subset: int | None = None
    test_subset: int | None = None
    batch_size: int = 64
    augment: bool = True
    # Random horizontal flip when augmenting; None: off for UNFLIPPED_DATASETS, else on.
    flip: bool | None = None
    crop_padding: int = 4
    cutout_size: int = 0

    def __post_init__(self):
        if self.flip is None:
            object.__setattr__(self, "flip", self.dataset not in UNFLIPPED_DATASETS)
        if not 0.0 < self.arch_fraction < 1.0:
            raise DataError(
                "Received an invalid arch_fraction, expected a fraction strictly between 0 and 1. "
                f"Received: arch_fraction={self.arch_fraction}"
            )
        if self.batch_size < 1:
            raise DataError(
                f"Received an invalid batch_size, expected >= 1. Received: {self.batch_size}"
            )


@dataclasses.dataclass(frozen=True)
class SupernetConfig:
    """Supernet training (paper §4.2 defaults)."""

    epochs: int = 100
    warmup_epochs: int = 10
    learning_rate: float = 0.1
    learning_rate_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip_norm: float = 5.0
    arch_learning_rate: float = 3e-4
    arch_beta_1: float = 0.5
    arch_weight_decay: float = 1e-3
    second_order: bool = False
    arch_step_schedule: str = "constant"
    arch_step_final_prob: float = 0.0
    # Iterations over which σ decays, in epochs from the start of training; 0: all epochs.
    arch_step_decay_epochs: int = 0
    # Evaluate on the test split every this many epochs (0: only after the last).
    test_every: int = 1
    # Also checkpoint every this many steps inside an epoch (0: only at epoch ends).
    checkpoint_every_steps: int = 0

    def __post_init__(self):
        _check_epochs("supernet", self.epochs)
        _check_learning_rates("", self.learning_rate, self.learning_rate_min)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                "Received an invalid warmup_epochs, expected an integer in [0, epochs]. "
                f"Received: warmup_epochs={self.warmup_epochs}, epochs={self.epochs}"
            )
        if self.arch_step_schedule not in SCHEDULES:
            raise ValueError(
                f"Received an invalid arch_step_schedule, expected one of {', '.join(SCHEDULES)}. "
                f"Received: {self.arch_step_schedule!r}"
            )


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Hierarchical masking (paper §4.2 defaults), and what this product adds to it.

    `lr_schedule`: "paper" uses the two learning rates as given; "scaled"
    multiplies them by PAPER_MASK_STEPS / (the run's mask steps), so that a
    short run moves its masks as far as the paper's 20 epochs on CIFAR-10.
    `weight_mask`: "element" (the paper's: one mask per kernel entry) or
    "channel" (one mask per channel, which the export drops physically).
    `target`: "none" (the paper's objective), or "params" / "flops": a
    resource target in the objective, given as `target_ratio` (fraction of the
    supernet's dense count) or `target_value` (parameters, or MFLOPs per image).
    """

    epochs: int = 20
    weight_learning_rate: float = 1e-4
    arch_learning_rate: float = 1e-5
    # Both learning rates are multiplied by decay_factor after decay_epochs epochs.
    decay_epochs: int = 10
    decay_factor: float = 0.1
    initial_value: float = 1e-2
    threshold: float = 5e-3
    test_every: int = 1
    checkpoint_every_steps: int = 0
    lr_schedule: str = "scaled"
    weight_mask: str = "element"
    target: str = "none"
    target_ratio: float | None = None
    target_value: float | None = None

    def __post_init__(self):
        _check_epochs("mask", self.epochs)
        for name, value, known in (
            ("mask_lr_schedule", self.lr_schedule, MASK_LR_SCHEDULES),
            ("weight_mask", self.weight_mask, WEIGHT_MASKS),
            ("mask_target", self.target, MASK_TARGETS),
        ):
            if value not in known:
                raise ValueError(
                    f"Received an unknown --{name}, expected one of {', '.join(known)}. "
                    f"Received: {value!r}"
                )
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(
                "Received an invalid --mask_threshold, expected a positive number (a mask is "
                f"kept where its real value is at least the threshold). Received: {self.threshold}"
            )
        if not (math.isfinite(self.initial_value) and self.initial_value > 0):
            raise ValueError(
                "Received an invalid --mask_initial_value, expected a positive number (above "
                f"--mask_threshold, {self.threshold:g}, to start with everything kept). "
                f"Received: {self.initial_value}"
            )
        self._check_target()
        if self.target != "none" and 2 * self.initial_value < self.threshold:
            raise ValueError(
                f"--mask_target keeps the real-valued masks in [0, 2 x --mask_initial_value] = "
                f"[0, {2 * self.initial_value:g}], below --mask_threshold ({self.threshold:g}): "
                "no mask could ever be kept. Raise --mask_initial_value above the threshold."
            )

    def _check_target(self) -> None:
        given = [n for n in ("target_ratio", "target_value") if getattr(self, n) is not None]
        if self.target == "none":
            if given:
                raise ValueError(
                    f"--mask_{given[0]} needs --mask_target=params or flops (what it counts)."
                )
            return
        if len(given) != 1:
            raise ValueError(
                f"--mask_target={self.target} needs exactly one of --mask_target_ratio (a "
                "fraction of the supernet) or --mask_target_value (parameters, or MFLOPs per "
                f"image). Received: {', '.join('--mask_' + n for n in given) or 'neither'}."
            )
        if self.target_ratio is not None and not 0.0 < self.target_ratio <= 1.0:
            raise ValueError(
                "Received an invalid --mask_target_ratio, expected a fraction in (0, 1]. "
                f"Received: {self.target_ratio}"
            )
        if self.target_value is not None and self.target_value <= 0:
            raise ValueError(
                "Received an invalid --mask_target_value, expected a positive number. "
                f"Received: {self.target_value}"
            )

    def effective_learning_rates(self, steps: int) -> tuple[float, float]:
        """(weight-mask, α/β-mask) learning rates for a run of `steps` mask steps."""
        factor = PAPER_MASK_STEPS / steps if self.lr_schedule == "scaled" else 1.0
        return self.weight_learning_rate * factor, self.arch_learning_rate * factor


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the searched network (paper §3.4, §4.2: 200 epochs, cutout)."""

    epochs: int = 200
    learning_rate: float = 0.025
    learning_rate_min: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip_norm: float = 5.0
    test_every: int = 1
    checkpoint_every_steps: int = 0

    def __post_init__(self):
        _check_epochs("finetune", self.epochs)
        _check_learning_rates("finetune_", self.learning_rate, self.learning_rate_min)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the export phase writes and how it checks it (`hmnas_keras.export`).

    `formats`: a subset of EXPORT_FORMATS. The int8 models are calibrated on
    `calibration_images` training images (never test images); every model's
    top-1 accuracy is measured on up to `accuracy_images` test images. An int8
    model more than `quantization_tolerance` points below the Keras model is
    kept but flagged. `tflite_int8_io`: model.int8.tflite takes and returns
    int8 tensors instead of float32. `fuse_nodes`: the files hold the fused
    form of the compact model (each node's ops as a few wide layers; the same
    function, several times fewer layers), or the form with a few layers per op.
    """

    formats: tuple[str, ...] = DEFAULT_EXPORT_FORMATS
    calibration_images: int = 256
    accuracy_images: int = 1000
    quantization_tolerance: float = 2.0
    tflite_int8_io: bool = False
    fuse_nodes: bool = True

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown or not self.formats:
            raise ValueError(
                f"Received an invalid --export_formats, expected a comma list of "
                f"{', '.join(EXPORT_FORMATS)}. Received: {','.join(self.formats) or '(empty)'}"
            )
        for name in ("calibration_images", "accuracy_images"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Received an invalid --{name}, expected a positive number of images. "
                    f"Received: {getattr(self, name)}"
                )
        if self.quantization_tolerance < 0:
            raise ValueError(
                "Received an invalid --quantization_tolerance, expected accuracy points >= 0. "
                f"Received: {self.quantization_tolerance}"
            )

    @property
    def quantized(self) -> bool:
        return any(f in INT8_FORMATS for f in self.formats)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; library code receives this, never flags.

    `derivation` picks how the architecture is derived (learned masks, DARTS'
    heuristic, random); `finetune_init` whether the searched network starts
    from the supernet's weights or from scratch; `architecture` an existing
    architecture.json to train instead of deriving one; `supernet_checkpoint`
    a trained supernet from another run for runs without the supernet phase.
    `jit_compile`: XLA-compile each training and test step (one replica only).
    `mixed_precision`: train with Keras' mixed_float16 policy and dynamic loss scaling.
    `deterministic`: TensorFlow's op determinism on top of the seeds, so that a
    run (and a killed, resumed one) gives bitwise the same result.
    `scratch_masks`: with `finetune_init="scratch"`, keep the architecture's
    weight masks (the paper's random-initialisation baseline: the same pruned
    network, re-initialised); False trains every weight of the kept ops.
    `random_sample`: which of the random architectures of a seed to draw.
    `recompute`: the supernet's edges keep no activations for the backward pass and
    compute them again there (supernet and mask phases): less memory, slower steps.
    """

    data: DataConfig = DataConfig()
    search_space: SearchSpace = SearchSpace()
    supernet: SupernetConfig = SupernetConfig()
    mask: MaskConfig = MaskConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    export: ExportConfig = ExportConfig()
    phases: tuple[str, ...] = PHASES
    derivation: str = "masks"
    finetune_init: str = "inherited"
    architecture: str | None = None
    supernet_checkpoint: str | None = None
    seed: int = 0
    strategy: str = "default"
    deterministic: bool = False
    jit_compile: bool = False
    mixed_precision: bool = False
    scratch_masks: bool = True
    random_sample: int = 0
    recompute: bool = False

    def __post_init__(self):
        if self.random_sample < 0:
            raise ValueError(
                f"Received an invalid --random_sample, expected an index >= 0. "
                f"Received: {self.random_sample}"
            )
        if self.derivation not in DERIVATIONS:
            raise ValueError(
                f"Received an unknown derivation, expected one of {', '.join(DERIVATIONS)}. "
                f"Received: {self.derivation!r}"
            )
        if self.finetune_init not in FINETUNE_INITS:
            raise ValueError(
                f"Received an unknown finetune_init, expected one of "
                f"{', '.join(FINETUNE_INITS)}. Received: {self.finetune_init!r}"
            )
        if "mask" in self.phases and self.derivation != "masks":
            raise ValueError(
                f"The mask phase learns the masks of --derivation=masks; with "
                f"--derivation={self.derivation} leave it out of --phases."
            )
        if self.architecture and self.finetune_init != "scratch":
            raise ValueError(
                "--architecture trains an existing architecture.json from scratch: its weights "
                "belong to another run. Add --finetune_init=scratch."
            )
        if self.architecture and not set(self.phases) <= {"finetune", "export"}:
            raise ValueError(
                "--architecture goes with --phases=finetune (or finetune,export) only."
            )
        if self.mask.target != "none" and self.derivation != "masks":
            raise ValueError(
                f"--mask_target={self.mask.target} steers the learned masks; "
                f"--derivation={self.derivation} does not learn masks. Drop --mask_target or "
                "use --derivation=masks."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls(
            # Runs written before --flip existed flipped whenever they augmented.
            data=DataConfig(**{"flip": True, **values["data"]}),
            search_space=SearchSpace.from_dict(values["search_space"]),
            supernet=SupernetConfig(**values["supernet"]),
            # Runs written before --mask_lr_schedule existed used the rates as given.
            mask=MaskConfig(**{"lr_schedule": "paper", **values["mask"]}),
            finetune=FinetuneConfig(**values["finetune"]),
            # Runs written before --export_formats existed exported the defaults.
            export=ExportConfig(**values.get("export", {})),
            phases=tuple(values["phases"]),
            derivation=values["derivation"],
            finetune_init=values["finetune_init"],
            architecture=values["architecture"],
            supernet_checkpoint=values["supernet_checkpoint"],
            seed=values["seed"],
            strategy=values["strategy"],
            deterministic=values.get("deterministic", False),
            jit_compile=values.get("jit_compile", False),
            mixed_precision=values.get("mixed_precision", False),
            # Runs written before --scratch_masks existed trained from scratch densely.
            scratch_masks=values.get("scratch_masks", False),
            random_sample=values.get("random_sample", 0),
            recompute=values.get("recompute", False),
        )
