"""The resolved configuration of a run: frozen dataclasses, written to the workdir as JSON."""

import dataclasses
import json
import os

from hmnas_keras.bilevel import SCHEDULES
from hmnas_keras.data import DataConfig
from hmnas_keras.supernet import SearchSpace

PHASES = ("supernet",)
STRATEGIES = ("default", "mirrored")
CONFIG_FILE = "config.json"


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
    # Iterations over which σ decays, in epochs; 0 means all epochs after warm-up.
    arch_step_decay_epochs: int = 0
    # Evaluate on the test split every this many epochs (0: only after the last).
    test_every: int = 1
    # Also checkpoint every this many steps inside an epoch (0: only at epoch ends).
    checkpoint_every_steps: int = 0

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(
                f"Received an invalid epochs, expected >= 1. Received: epochs={self.epochs}"
            )
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
class RunConfig:
    """Everything a run needs; library code receives this, never flags."""

    data: DataConfig = DataConfig()
    search_space: SearchSpace = SearchSpace()
    supernet: SupernetConfig = SupernetConfig()
    phases: tuple[str, ...] = PHASES
    seed: int = 0
    strategy: str = "default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        space = dict(values["search_space"])
        space["op_names"] = tuple(space["op_names"])
        return cls(
            data=DataConfig(**values["data"]),
            search_space=SearchSpace(**space),
            supernet=SupernetConfig(**values["supernet"]),
            phases=tuple(values["phases"]),
            seed=values["seed"],
            strategy=values["strategy"],
        )


def write_config(config: RunConfig, workdir: str) -> str:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path, "w") as handle:
        json.dump(config.to_dict(), handle, indent=2)
        handle.write("\n")
    return path


def read_config(workdir: str) -> RunConfig:
    with open(os.path.join(workdir, CONFIG_FILE)) as handle:
        return RunConfig.from_dict(json.load(handle))
