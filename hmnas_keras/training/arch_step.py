"""σ: when the supernet takes an architecture step (paper §3.2, "stochastic updates").

After warm-up, iteration t also updates α and β with probability σ(t),
σ non-increasing with σ(0) = 1, t counted from the start of training as in
the paper (so a decay that begins at t = 0 has already begun when warm-up
ends). The decision is drawn on the host from a
generator seeded by (seed, iteration), so a resumed run takes exactly the
decisions an uninterrupted one would. Plain Python and numpy: no TensorFlow.
"""

import dataclasses
import math

import numpy as np

SCHEDULES = ("constant", "linear", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class ArchStepSchedule:
    """σ(t): the probability of an architecture step at iteration t of training.

    σ(0) = 1 and σ is non-increasing:
    - constant: 1 forever;
    - linear: from 1 down to `final_prob` over `decay_steps`, then flat;
    - cosine: half a cosine from 1 down to `final_prob` over `decay_steps`;
    - step: 1 for `decay_steps` iterations, then `final_prob`.
    """

    kind: str = "constant"
    final_prob: float = 0.0
    decay_steps: int = 1

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(
                f"Received an unknown schedule, expected one of {', '.join(SCHEDULES)}. "
                f"Received: kind={self.kind!r}"
            )
        if not 0.0 <= self.final_prob <= 1.0:
            raise ValueError(
                "Received an invalid final_prob, expected a probability in [0, 1]. "
                f"Received: final_prob={self.final_prob}"
            )
        if self.decay_steps < 1:
            raise ValueError(
                "Received an invalid decay_steps, expected a positive integer. "
                f"Received: decay_steps={self.decay_steps}"
            )

    def __call__(self, t: int) -> float:
        if self.kind == "constant":
            return 1.0
        progress = min(max(t, 0), self.decay_steps) / self.decay_steps
        if self.kind == "linear":
            return 1.0 - (1.0 - self.final_prob) * progress
        if self.kind == "cosine":
            return self.final_prob + (1.0 - self.final_prob) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        return 1.0 if t < self.decay_steps else self.final_prob


@dataclasses.dataclass(frozen=True)
class ArchStepPolicy:
    """Decides, for a global iteration, whether α and β are updated.

    Stateless: the decision for iteration i depends only on (seed, i), so a
    resumed run takes exactly the same decisions as an uninterrupted one.
    """

    warmup_steps: int = 0
    schedule: ArchStepSchedule = ArchStepSchedule()
    seed: int = 0

    def probability(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return 0.0
        return self.schedule(iteration)

    def should_step(self, iteration: int) -> bool:
        probability = self.probability(iteration)
        if probability >= 1.0:
            return True
        if probability <= 0.0:
            return False
        return bool(np.random.default_rng([self.seed, iteration]).random() < probability)

    def decisions(self, start: int, stop: int) -> np.ndarray:
        """`should_step(i)` for i in [start, stop), as a boolean array (the data pipeline
        builds the architecture batch of an iteration only where it is True)."""
        return np.array([self.should_step(i) for i in range(start, stop)], bool)
