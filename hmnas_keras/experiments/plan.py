"""The plan of an experiment: which runs, in which workdirs, with which flags.

Every (variant, seed) is an ordinary `python -m hmnas_keras.search` run in a
workdir of its own under the experiment's workdir. The runs of one seed share
its supernets, one per encoding, trained by runs of their own:

    EXP/plan.json  results.json  results.md  results.png  logs/
    EXP/seed0/supernet_multi_level/     --phases=supernet
    EXP/seed0/supernet_single_level/    --phases=supernet --nomulti_level
    EXP/seed0/hmnas/                    --phases=mask,finetune (multi-level supernet)
    EXP/seed0/darts_heuristic/          --phases=finetune --derivation=darts
    EXP/seed0/single_level/             --phases=finetune --derivation=darts --nomulti_level
    EXP/seed0/random_arch0/ ...         --phases=finetune --derivation=random --random_sample=K
    EXP/seed0/random_init/              --phases=finetune --finetune_init=scratch
                                        --architecture=EXP/seed0/hmnas/architecture.json
    EXP/seed0/hmnas_darts_size/         --phases=mask,finetune --mask_target=params
                                        --mask_target_value=(darts_heuristic's parameters)

"""

import dataclasses
import json
import os

from hmnas_keras.pipeline.workdir import Workdir

FORMAT = "hmnas_keras/experiment"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the ablation: how its runs are made, and the paper's figure for it."""

    description: str
    encoding: str | None  # the supernet it needs: "multi_level", "single_level" or None
    phases: tuple[str, ...]
    flags: tuple[str, ...] = ()
    # The variant of the same seed whose run this one starts from, and what it takes from it:
    # "architecture" (its architecture.json and masks) or "mask_target_value" (its non-zero
    # parameters, known once it has run).
    needs: str | None = None
    takes: str | None = None
    # Whether the mask-target flags given to the runner apply (the plain HM-NAS runs).
    user_mask_target: bool = False
    # The paper's CIFAR-10 figures (Tables 5, 6): test error %, its ± over runs, params (M).
    paper_error: float | None = None
    paper_error_std: float | None = None
    paper_params_m: float | None = None


VARIANTS = {
    "hmnas": Variant(
        "HM-NAS: multi-level encoding, learned hierarchical masks, inherited weights",
        "multi_level",
        ("mask", "finetune"),
        user_mask_target=True,
        paper_error=2.41,
        paper_error_std=0.05,
        paper_params_m=1.8,
    ),
    "darts_heuristic": Variant(
        "multi-level encoding, DARTS' heuristic (strongest op per edge, top-2 edges by α·β)",
        "multi_level",
        ("finetune",),
        ("--derivation=darts",),
        paper_error=2.7,
        paper_params_m=2.1,
    ),
    "single_level": Variant(
        "single-level encoding (β uniform), DARTS' heuristic",
        "single_level",
        ("finetune",),
        ("--derivation=darts", "--nomulti_level"),
        paper_error=3.1,
        paper_params_m=2.5,
    ),
    "random_arch": Variant(
        "random DARTS-shaped cells from the same space, fine-tuned from the same supernet",
        "multi_level",
        ("finetune",),
        ("--derivation=random",),
        paper_error=3.41,
        paper_error_std=0.15,
        paper_params_m=2.1,
    ),
    "random_init": Variant(
        "the HM-NAS network (its masks too), re-initialised and trained from scratch",
        None,
        ("finetune",),
        ("--finetune_init=scratch",),
        needs="hmnas",
        takes="architecture",
        paper_error=2.95,
        paper_error_std=0.08,
        paper_params_m=1.8,
    ),
    "hmnas_darts_size": Variant(
        "HM-NAS with a parameter target equal to the DARTS-heuristic cell's non-zero parameters",
        "multi_level",
        ("mask", "finetune"),
        ("--mask_target=params",),
        needs="darts_heuristic",
        takes="mask_target_value",
    ),
}
PAPER_VARIANTS = ("hmnas", "darts_heuristic", "single_level", "random_arch", "random_init")

# Search flags the runner sets for each run: given to the runner, they are refused.
CONTROLLED_FLAGS = {
    "workdir": "the experiment's workdir is --workdir; each run gets one inside it",
    "resume": "starting the runner again resumes the experiment",
    "phases": "each variant runs the phases it needs",
    "seed": "use --seeds",
    "derivation": "each variant sets it",
    "finetune_init": "each variant sets it",
    "architecture": "random_init takes the HM-NAS run's architecture",
    "supernet_checkpoint": "the runs of a seed share the supernets the runner trains",
    "multi_level": "single_level runs --nomulti_level, the others multi-level",
    "random_sample": "random_arch draws --random_archs samples per seed",
    "scratch_masks": "random_init keeps the HM-NAS masks",
}
# Flags only the runs that learn masks are given (others would refuse them).
MASK_TARGET_FLAGS = ("mask_target", "mask_target_ratio", "mask_target_value")


@dataclasses.dataclass(frozen=True)
class ExperimentFiles:
    """The experiment's own files in its workdir (each run's are its `Workdir`'s)."""

    root: str

    @property
    def plan(self) -> str:
        return os.path.join(self.root, "plan.json")

    @property
    def results(self) -> str:
        return os.path.join(self.root, "results.json")

    @property
    def markdown(self) -> str:
        return os.path.join(self.root, "results.md")

    @property
    def picture(self) -> str:
        return os.path.join(self.root, "results.png")

    def log(self, run: "PlannedRun") -> str:
        return os.path.join(self.root, "logs", run.name.replace("/", "-") + ".log")


class PlanError(ValueError):
    """A mistake in what the runner was asked to plan; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One `hmnas_keras.search` run of the plan."""

    name: str  # "seed0/hmnas", also its workdir below the experiment's
    variant: str | None  # None for a shared supernet run
    seed: int
    sample: int | None  # random_arch's sample index
    workdir: str
    flags: tuple[str, ...]
    needs: tuple[str, ...]  # names of the runs that must have finished first
    # Flags known only once `needs` have run: (flag, the run whose result gives it).
    late_flag: tuple[str, str] | None = None


def parse_seeds(values) -> tuple[int, ...]:
    """The --seeds list as integers (refusing an empty list, negatives, duplicates)."""
    if not values:
        raise PlanError("--seeds is empty: give at least one seed, e.g. --seeds=0,1,2.")
    try:
        seeds = tuple(int(value) for value in values)
    except ValueError:
        raise PlanError(
            f"--seeds takes whole numbers, e.g. --seeds=0,1,2. Received: {','.join(values)}"
        ) from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise PlanError(
            f"--seeds takes distinct numbers >= 0. Received: {','.join(map(str, seeds))}"
        )
    return seeds


def parse_variants(values) -> tuple[str, ...]:
    """The --variants list, checked against VARIANTS."""
    if not values:
        raise PlanError(f"--variants is empty: choose from {', '.join(VARIANTS)}.")
    unknown = [value for value in values if value not in VARIANTS]
    if unknown:
        raise PlanError(
            f"Unknown variant {', '.join(unknown)}: --variants takes a comma list of "
            f"{', '.join(VARIANTS)}."
        )
    if len(set(values)) != len(values):
        raise PlanError(f"--variants lists a variant twice: {','.join(values)}.")
    return tuple(values)


def check_search_flags(search_flags: dict) -> None:
    """Refuses search flags the runner sets itself ({name: serialized flag})."""
    controlled = [name for name in search_flags if name in CONTROLLED_FLAGS]
    if controlled:
        name = controlled[0]
        raise PlanError(
            f"--{name} is set by the experiment runner ({CONTROLLED_FLAGS[name]}); remove it."
        )


def _phases(phases, with_export: bool) -> str:
    return "--phases=" + ",".join(phases + (("export",) if with_export else ()))


def build_plan(
    root: str,
    variants,
    seeds,
    random_archs: int,
    search_flags: dict,
    with_export: bool = False,
) -> list[PlannedRun]:
    """The runs of the experiment, in the order a single worker runs them: seed by seed.

    `search_flags`: {flag name: serialized flag} given to the runner, passed
    to every run (the mask-target ones only to runs that learn masks).
    """
    check_search_flags(search_flags)
    if "random_arch" in variants and random_archs < 1:
        raise PlanError("--random_archs must be >= 1 with the random_arch variant.")
    common = tuple(
        flag for name, flag in sorted(search_flags.items()) if name not in MASK_TARGET_FLAGS
    )
    mask_target = tuple(search_flags[name] for name in MASK_TARGET_FLAGS if name in search_flags)
    runs = []
    for seed in seeds:
        seed_dir = f"seed{seed}"

        def path(name, seed_dir=seed_dir):
            return os.path.join(root, seed_dir, name)

        supernets = {}
        for encoding in ("multi_level", "single_level"):
            if any(VARIANTS[v].encoding == encoding for v in variants):
                name = f"{seed_dir}/supernet_{encoding}"
                level = ("--nomulti_level",) if encoding == "single_level" else ()
                runs.append(
                    PlannedRun(
                        name,
                        None,
                        seed,
                        None,
                        path(f"supernet_{encoding}"),
                        (*common, "--phases=supernet", f"--seed={seed}", *level),
                        (),
                    )
                )
                supernets[encoding] = name
        # The variants that start from another's run come after the others.
        ordered = sorted(variants, key=lambda v: (bool(VARIANTS[v].needs), list(VARIANTS).index(v)))
        for variant in ordered:
            spec = VARIANTS[variant]
            samples = range(random_archs) if variant == "random_arch" else [None]
            for sample in samples:
                leaf = variant if sample is None else f"{variant}{sample}"
                flags = [*common, _phases(spec.phases, with_export), f"--seed={seed}", *spec.flags]
                needs = []
                late = None
                if spec.encoding is not None:
                    supernet = supernets[spec.encoding]
                    checkpoint = Workdir(path(f"supernet_{spec.encoding}")).supernet.checkpoint
                    flags.append(f"--supernet_checkpoint={checkpoint}")
                    needs.append(supernet)
                if spec.user_mask_target:
                    flags += mask_target
                if sample is not None:
                    flags.append(f"--random_sample={sample}")
                if spec.needs:
                    source = f"{seed_dir}/{spec.needs}"
                    if source not in {run.name for run in runs}:
                        raise PlanError(
                            f"The {variant} variant needs the {spec.needs} variant of the "
                            f"same seed: add {spec.needs} to --variants."
                        )
                    needs.append(source)
                    if spec.takes == "architecture":
                        flags.append(f"--architecture={Workdir(path(spec.needs)).architecture}")
                    else:
                        late = (f"--{spec.takes}", source)
                runs.append(
                    PlannedRun(
                        f"{seed_dir}/{leaf}",
                        variant,
                        seed,
                        sample,
                        path(leaf),
                        tuple(flags),
                        tuple(needs),
                        late,
                    )
                )
    return runs


def plan_record(variants, seeds, random_archs, search_flags, with_export) -> dict:
    """What plan.json holds: everything that decides what the runs compute."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "variants": list(variants),
        "seeds": list(seeds),
        "random_archs": random_archs if "random_arch" in variants else None,
        "with_export": with_export,
        "search_flags": dict(sorted(search_flags.items())),
    }


def plan_differences(saved: dict, current: dict) -> list[str]:
    """How `current` (this command's plan) differs from `saved` (plan.json), one line each."""
    lines = []

    def show(value):
        if isinstance(value, list):
            return ",".join(map(str, value)) or "(none)"
        return json.dumps(value)

    for key in ("variants", "seeds", "random_archs", "with_export"):
        if saved.get(key) != current.get(key):
            lines.append(
                f"--{key}: {show(saved.get(key))} in plan.json, {show(current.get(key))} now"
            )
    before, after = saved.get("search_flags", {}), current.get("search_flags", {})
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            lines.append(
                f"--{name}: {before.get(name, 'not given')} in plan.json, "
                f"{after.get(name, 'not given')} now"
            )
    return lines
