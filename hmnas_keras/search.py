"""Runs HM-NAS from the command line.

    python -m hmnas_keras.search --flagfile=configs/quickstart.cfg --workdir=runs/quickstart
    python -m hmnas_keras.search --flagfile=configs/cifar10.cfg --workdir=runs/cifar10 \\
        --dataset=folder --data_dir=$HOME/.cache/hmnas/cifar10
    python -m hmnas_keras.search --workdir=runs/quickstart --resume

Phases (--phases, default all): supernet -> mask -> finetune -> export; the
run ends with WORKDIR/report.json and draws the cells in WORKDIR/pictures/.
--derivation, --finetune_init, --architecture and --supernet_checkpoint select
the paper's baselines (see README.md).

The resolved configuration is written to WORKDIR/config.json. A workdir that
already holds files is refused unless --resume is given; --resume continues a
killed run from its last checkpoint with the configuration saved in the workdir.
"""

import dataclasses
import json
import os
import sys

from absl import app, flags, logging

from hmnas_keras import quiet_logs  # noqa: F401  (first: before TensorFlow loads)
from hmnas_keras.architecture.derivation import DERIVATIONS
from hmnas_keras.config import (
    FINETUNE_INITS,
    MASK_LR_SCHEDULES,
    MASK_TARGETS,
    PHASES,
    STRATEGIES,
    WEIGHT_MASKS,
    DataConfig,
    DataError,
    FinetuneConfig,
    MaskConfig,
    RunConfig,
    SupernetConfig,
)
from hmnas_keras.export import options as export_options
from hmnas_keras.pipeline.workdir import Workdir
from hmnas_keras.runtime import GRAPH_OPTIMIZATION, configure_tensorflow
from hmnas_keras.space.search_space import OP_NAMES, SearchSpace
from hmnas_keras.training.arch_step import SCHEDULES

FLAGS = flags.FLAGS

# Run.
flags.DEFINE_string("workdir", None, "Directory for the run's outputs (required).")
flags.DEFINE_list("phases", list(PHASES), f"Phases to run, in order. Known: {', '.join(PHASES)}.")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last checkpoint.")
flags.DEFINE_enum(
    "derivation",
    "masks",
    DERIVATIONS,
    "How the architecture is derived: learned hierarchical masks (HM-NAS), DARTS' heuristic "
    "(strongest op per edge, top-2 edges per node), or a random DARTS-shaped cell.",
)
flags.DEFINE_enum(
    "finetune_init",
    "inherited",
    FINETUNE_INITS,
    "Fine-tune from the supernet's (masked) weights, or train from scratch.",
)
flags.DEFINE_bool(
    "scratch_masks",
    True,
    "With --finetune_init=scratch: keep the architecture's weight masks, so the same pruned "
    "network is re-initialised (the paper's random-initialisation baseline, Table 6); "
    "--noscratch_masks trains every weight of the kept ops.",
)
flags.DEFINE_integer(
    "random_sample",
    0,
    "With --derivation=random: which random architecture of this seed to draw (0, 1, ...), "
    "so that one seed's supernet serves several.",
    lower_bound=0,
)
flags.DEFINE_string(
    "architecture",
    None,
    "Train this architecture.json (from another run) from scratch: with "
    "--phases=finetune --finetune_init=scratch.",
)
flags.DEFINE_string(
    "supernet_checkpoint",
    None,
    "A trained supernet from another run (its supernet/checkpoint.npz), for runs without "
    "the supernet phase.",
)
flags.DEFINE_integer("seed", 0, "Seed for data splits, shuffling, initialisation and arch steps.")
flags.DEFINE_bool(
    "deterministic",
    False,
    "TensorFlow op determinism on top of the seeds: the same run, killed and resumed or not, "
    "gives bitwise the same architecture.json and weights on the same machine (a little "
    "slower).",
)
flags.DEFINE_enum(
    "strategy",
    "default",
    STRATEGIES,
    "tf.distribute strategy: one device, mirrored (every GPU, or logical CPU, of this machine) "
    "or multi_worker (MultiWorkerMirroredStrategy over the tasks of TF_CONFIG or of a Slurm job; "
    "--batch_size is the global batch).",
)
flags.DEFINE_bool(
    "jit_compile",
    False,
    "XLA-compile every training and test step (for a GPU; on a CPU it made the supernet step "
    "slower). One replica only: XLA cannot compile a step whose variables live on several "
    "devices.",
)
flags.DEFINE_bool(
    "recompute",
    False,
    "Keep none of the supernet's edge activations for the backward pass: compute each edge "
    "again there (supernet and mask phases). Less memory, slower steps (C=8, 3 cells, batch "
    "32 on 2 CPU cores: peak memory 1,366 -> 1,075 MiB, weight step +15%; docs/BENCHMARKS.md); "
    "the same numbers.",
)
flags.DEFINE_bool(
    "mixed_precision",
    False,
    "Train with Keras' mixed_float16 policy (for GPUs with float16 units): convolutions and "
    "pools compute in float16, with dynamic loss scaling; variables, BatchNorm, the op and "
    "edge weights, the masks and the logits stay float32. The export is float32.",
)
flags.DEFINE_integer(
    "slurm_port_base",
    8888,
    "With --strategy=multi_worker under Slurm (no TF_CONFIG): the first port of the tasks on a "
    "node.",
    lower_bound=1,
    upper_bound=65535,
)
flags.DEFINE_integer(
    "logical_cpus",
    0,
    "Split the CPU into this many logical devices (to try --strategy=mirrored "
    "without GPUs); 0 leaves devices as they are.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "threads", 0, "TensorFlow intra-op threads (0: half the cores).", lower_bound=0
)
flags.DEFINE_enum(
    "graph_optimization",
    "auto",
    list(GRAPH_OPTIMIZATION),
    "TensorFlow's graph optimiser (Grappler) on the traced steps. auto: off without a GPU "
    "(on a CPU it made the first call of each phase's step about 1.5x longer and the step no "
    "faster), on with one.",
)
# Data.
flags.DEFINE_string("dataset", "digits", "digits, folder (with --data_dir) or a TFDS dataset name.")
flags.DEFINE_string("data_dir", None, "Image folder ROOT with train/<class>/ and test/<class>/.")
flags.DEFINE_string("tfds_data_dir", None, "TensorFlow Datasets data_dir.")
flags.DEFINE_integer("image_size", None, "Resize every image to NxN.", lower_bound=4)
flags.DEFINE_float(
    "arch_fraction",
    0.2,
    "Part of the training split used for α/β.",
    lower_bound=0.01,
    upper_bound=0.99,
)
flags.DEFINE_integer(
    "class_subset", None, "Use only N classes, drawn by --seed (paper §4.3).", lower_bound=2
)
flags.DEFINE_integer("train_subset", None, "Use only N training examples.", lower_bound=2)
flags.DEFINE_integer("test_subset", None, "Use only N test examples.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Batch size (global, over all replicas).", lower_bound=1)
flags.DEFINE_bool("augment", True, "Random crop with padding (and flip, see --flip).")
flags.DEFINE_bool(
    "flip",
    None,
    "Random horizontal flip when augmenting (default: off for digits, mnist, emnist, kmnist "
    "and svhn_cropped, where a mirrored image is another symbol; on otherwise).",
)
flags.DEFINE_integer("crop_padding", 4, "Padding of the random crop, in pixels.", lower_bound=0)
flags.DEFINE_integer(
    "cutout_size", 0, "Cutout square side during fine-tuning, in pixels (0: off).", lower_bound=0
)
# Search space.
flags.DEFINE_integer("num_cells", 3, "Cells in the supernet.", lower_bound=1)
flags.DEFINE_integer("channels", 16, "Initial channels C.", lower_bound=1)
flags.DEFINE_integer("num_nodes", 4, "Intermediate nodes per cell.", lower_bound=1)
flags.DEFINE_list(
    "ops", list(OP_NAMES), f"Candidate operations, a subset of {', '.join(OP_NAMES)}."
)
flags.DEFINE_bool("multi_level", True, "Learn edge weights β (false: single-level, β uniform).")
# Supernet training.
flags.DEFINE_integer("supernet_epochs", 100, "Supernet training epochs.", lower_bound=1)
flags.DEFINE_integer("warmup_epochs", 10, "Epochs with α, β frozen.", lower_bound=0)
flags.DEFINE_float("learning_rate", 0.1, "Initial weight learning rate (cosine).", lower_bound=0)
flags.DEFINE_float("learning_rate_min", 0.001, "Final weight learning rate.", lower_bound=0)
flags.DEFINE_float(
    "momentum", 0.9, "SGD momentum (supernet and fine-tuning).", lower_bound=0, upper_bound=1
)
flags.DEFINE_float("weight_decay", 3e-4, "L2 weight decay of the network weights.", lower_bound=0)
flags.DEFINE_float(
    "grad_clip_norm",
    5.0,
    "Global-norm clip of weight gradients, supernet and fine-tuning (0: off).",
    lower_bound=0,
)
flags.DEFINE_float("arch_learning_rate", 3e-4, "Adam learning rate of α, β.", lower_bound=0)
flags.DEFINE_float("arch_beta_1", 0.5, "Adam β1 of α, β.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("arch_weight_decay", 1e-3, "L2 weight decay of α, β.", lower_bound=0)
flags.DEFINE_bool("second_order", False, "DARTS' second-order (unrolled) arch gradient.")
flags.DEFINE_enum("arch_step_schedule", "constant", SCHEDULES, "σ: probability of an arch step.")
flags.DEFINE_float(
    "arch_step_final_prob",
    0.0,
    "Final σ of the linear/cosine/step schedules.",
    lower_bound=0,
    upper_bound=1,
)
flags.DEFINE_integer(
    "arch_step_decay_epochs",
    0,
    "Epochs over which σ decays, counted from the start of training as in the paper "
    "(0: all epochs).",
    lower_bound=0,
)
# Hierarchical masking.
flags.DEFINE_integer("mask_epochs", 20, "Hierarchical masking epochs.", lower_bound=1)
flags.DEFINE_float(
    "mask_weight_learning_rate", 1e-4, "Adam learning rate of the weight masks.", lower_bound=0
)
flags.DEFINE_float(
    "mask_arch_learning_rate", 1e-5, "Adam learning rate of the α and β masks.", lower_bound=0
)
flags.DEFINE_integer(
    "mask_decay_epochs",
    10,
    "Mask learning rates are decayed after this many epochs.",
    lower_bound=0,
)
flags.DEFINE_float("mask_decay_factor", 0.1, "Factor of that decay.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("mask_initial_value", 1e-2, "Initial value of every real-valued mask.")
flags.DEFINE_float("mask_threshold", 5e-3, "Binariser threshold τ: M = 1 where M^r >= τ.")
flags.DEFINE_enum(
    "mask_lr_schedule",
    "scaled",
    MASK_LR_SCHEDULES,
    "paper: the mask learning rates as given; scaled: times 7,800 / (this run's mask steps), "
    "so that a short run moves its masks as far as the paper's 20 CIFAR-10 epochs.",
)
flags.DEFINE_enum(
    "weight_mask",
    "element",
    WEIGHT_MASKS,
    "element: one mask per kernel entry (the paper's); channel: one mask per channel, which "
    "the searched network and the export drop physically.",
)
flags.DEFINE_enum(
    "mask_target",
    "none",
    MASK_TARGETS,
    "A resource target in the masking objective: none (the paper's objective), params or "
    "flops (multiply-accumulates per image).",
)
flags.DEFINE_float(
    "mask_target_ratio",
    None,
    "The target as a fraction of the supernet's dense count, in (0, 1].",
)
flags.DEFINE_float(
    "mask_target_value",
    None,
    "The target as a count: parameters, or MFLOPs per image.",
)
# Fine-tuning.
flags.DEFINE_integer("finetune_epochs", 200, "Fine-tuning epochs.", lower_bound=1)
flags.DEFINE_float(
    "finetune_learning_rate", 0.025, "Initial fine-tuning learning rate (cosine).", lower_bound=0
)
flags.DEFINE_float(
    "finetune_learning_rate_min", 0.0, "Final fine-tuning learning rate.", lower_bound=0
)
flags.DEFINE_float(
    "finetune_weight_decay", 3e-4, "L2 weight decay during fine-tuning.", lower_bound=0
)
flags.DEFINE_integer(
    "test_every", 1, "Test accuracy every N epochs (0: only at the end).", lower_bound=0
)
flags.DEFINE_integer(
    "checkpoint_every_steps",
    0,
    "Also checkpoint every N steps (0: epoch ends only).",
    lower_bound=0,
)
# Export.
export_options.define_flags()

flags.register_validator(
    "phases",
    lambda value: all(p in PHASES for p in value),
    message=f"--phases takes a comma list of: {', '.join(PHASES)}.",
)
flags.register_validator(
    "ops",
    lambda value: bool(value) and all(op in OP_NAMES for op in value),
    message=f"--ops takes a comma list of: {', '.join(OP_NAMES)}.",
)


class UsageError(ValueError):
    """A mistake in how the command was called."""


def _flag_of(prefix: str, field: str) -> str:
    """The flag of a config section's field: --{prefix}F if it exists, else --F."""
    return prefix + field if prefix + field in FLAGS else field


def _section(cls, prefix: str = ""):
    """The config section `cls` from the flags (see `_flag_of`)."""
    return cls(**{f.name: FLAGS[_flag_of(prefix, f.name)].value for f in dataclasses.fields(cls)})


# Config sections read by `_section`: (RunConfig field, class, flag prefix).
SECTIONS = (
    ("data", DataConfig, ""),
    ("supernet", SupernetConfig, "supernet_"),
    ("mask", MaskConfig, "mask_"),
    ("finetune", FinetuneConfig, "finetune_"),
)
# The other flags of `config_from_flags`: flag -> (RunConfig field, its key or None).
OTHER_FLAG_FIELDS = {
    "num_cells": ("search_space", "num_cells"),
    "channels": ("search_space", "channels"),
    "num_nodes": ("search_space", "num_nodes"),
    "ops": ("search_space", "op_names"),
    "multi_level": ("search_space", "multi_level"),
    **{flag: ("export", key) for flag, key in export_options.FLAG_FIELDS.items()},
    **{
        flag: (flag, None)
        for flag in (
            "phases",
            "derivation",
            "finetune_init",
            "architecture",
            "supernet_checkpoint",
            "seed",
            "strategy",
            "deterministic",
            "jit_compile",
            "mixed_precision",
            "scratch_masks",
            "random_sample",
            "recompute",
        )
    },
}


def flag_fields() -> dict:
    """flag -> [(RunConfig field, key or None)]: where each flag lands in the configuration
    (--momentum, say, sets both the supernet's and the fine-tuning's)."""
    fields = {flag: [place] for flag, place in OTHER_FLAG_FIELDS.items()}
    for section, cls, prefix in SECTIONS:
        for field in dataclasses.fields(cls):
            fields.setdefault(_flag_of(prefix, field.name), []).append((section, field.name))
    return fields


def config_from_flags() -> RunConfig:
    """Turns the flags into the frozen run configuration."""
    return RunConfig(
        **{section: _section(cls, prefix) for section, cls, prefix in SECTIONS},
        search_space=SearchSpace(
            num_cells=FLAGS.num_cells,
            channels=FLAGS.channels,
            num_nodes=FLAGS.num_nodes,
            op_names=tuple(FLAGS.ops),
            multi_level=FLAGS.multi_level,
        ),
        export=export_options.export_config(FLAGS),
        phases=tuple(FLAGS.phases),
        derivation=FLAGS.derivation,
        finetune_init=FLAGS.finetune_init,
        architecture=FLAGS.architecture,
        supernet_checkpoint=FLAGS.supernet_checkpoint,
        seed=FLAGS.seed,
        strategy=FLAGS.strategy,
        deterministic=FLAGS.deterministic,
        jit_compile=FLAGS.jit_compile,
        mixed_precision=FLAGS.mixed_precision,
        scratch_masks=FLAGS.scratch_masks,
        random_sample=FLAGS.random_sample,
        recompute=FLAGS.recompute,
    )


def _check_writable(root: str) -> None:
    """Refuses a --workdir that is a file, or a folder this user cannot write to."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--workdir={root} is a file, not a folder: choose a folder for the run.")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(
            f"Cannot write to --workdir={root}: {error.strerror}. Choose a folder you can write "
            "to, or fix its permissions."
        ) from None


# Flags that --resume honours when given on its command line: they choose what runs
# and how it runs on this machine, not what the run computes.
RESUME_FLAGS = (
    "workdir",
    "resume",
    "phases",
    "threads",
    "logical_cpus",
    "graph_optimization",
    "recompute",
    "tf_logs",
    "slurm_port_base",
)


def prepare_workdir(root: str, resume: bool, chief: bool = True) -> RunConfig:
    """Checks the workdir, writes or reads config.json, returns the run configuration.

    A worker of a multi-worker cluster (`chief=False`) only reads: the chief's
    config.json with --resume, else the flags.
    """
    if chief:
        _check_writable(root)
    workdir = Workdir(root)
    if resume:
        if not os.path.exists(workdir.config):
            raise UsageError(
                f"--resume: {root} holds no {Workdir.CONFIG}, so there is no run to resume. "
                "Start a new run without --resume."
            )
        saved = workdir.read_config()
        ignored = _changed_flags(saved)
        if ignored:
            logging.warning(
                "--resume uses the configuration saved in %s; ignoring these flags of the "
                "command line, which differ from it: %s",
                workdir.config,
                ", ".join(f"--{name}" for name in ignored),
            )
        if FLAGS["phases"].present and tuple(FLAGS.phases) != saved.phases:
            try:
                saved = dataclasses.replace(saved, phases=tuple(FLAGS.phases))
            except ValueError as error:
                raise UsageError(str(error)) from None
            print(f"--resume: running the phases given, {','.join(saved.phases)}.", flush=True)
        if FLAGS["recompute"].present:  # how the steps run, not what they compute
            saved = dataclasses.replace(saved, recompute=FLAGS.recompute)
        return saved
    # A workdir holding only config.json is a run that failed before training
    # (bad data flags, say): starting again there overwrites nothing of value.
    if chief and workdir.has_run():
        raise UsageError(
            f"Workdir {root} is not empty. Pass --resume to continue the run in it, or choose "
            "a new --workdir (nothing was overwritten)."
        )
    try:
        config = config_from_flags()
    except ValueError as error:
        raise UsageError(str(error)) from None
    if chief:
        workdir.write_config(config)
    return config


def _changed_flags(saved: RunConfig) -> list[str]:
    """Flags given on this command line (or in a --flagfile) that the saved configuration
    sets differently, other than RESUME_FLAGS."""
    try:
        current = config_from_flags()
    except ValueError:
        current = None
    given = [
        name
        for name in FLAGS
        if FLAGS[name].present and name not in RESUME_FLAGS and name != "flagfile"
    ]
    if current is None:
        return given
    current_dict, saved_dict = current.to_dict(), saved.to_dict()
    fields = flag_fields()

    def value(config, section, key):
        return config[section] if key is None else config[section][key]

    return [
        name
        for name in given
        if name not in fields
        or any(
            json.dumps(value(current_dict, *place)) != json.dumps(value(saved_dict, *place))
            for place in fields[name]
        )
    ]


def main(argv):
    if len(argv) > 1:
        print(
            f"Error: unexpected arguments: {' '.join(argv[1:])}. Flags take the form "
            "--name=value (python -m hmnas_keras.search --help lists them).",
            file=sys.stderr,
        )
        return 1
    if not FLAGS.workdir:
        print(
            "Error: --workdir is required: the folder for the run's outputs, e.g. "
            "python -m hmnas_keras.search --flagfile=configs/quickstart.cfg "
            "--workdir=runs/quickstart (--help lists every flag).",
            file=sys.stderr,
        )
        return 1
    from hmnas_keras.architecture.architecture_json import ArchitectureError
    from hmnas_keras.checkpoint import CheckpointError
    from hmnas_keras.distributed import Cluster, ClusterError, cluster_failure, make_strategy
    from hmnas_keras.export.formats import ExportError
    from hmnas_keras.pipeline.mask_phase import MaskTargetError
    from hmnas_keras.pipeline.phase import TrainingDiverged
    from hmnas_keras.pipeline.run import run

    logging.set_verbosity(logging.WARNING)  # tf2onnx logs every conversion step at INFO
    cluster = None
    try:
        configure_tensorflow(FLAGS.threads, FLAGS.logical_cpus, FLAGS.graph_optimization)
        # Before TensorFlow runs anything: a multi-worker strategy sets up the process.
        strategy = make_strategy(_strategy_name(), FLAGS.slurm_port_base)
        cluster = Cluster.of(strategy, FLAGS.workdir)
        if cluster.multi_worker:
            config = join_cluster(cluster)
        else:
            config = prepare_workdir(FLAGS.workdir, FLAGS.resume)
        root = cluster.own_root(Workdir.CHIEF_ONLY)
        run(config, Workdir.of_run(root, config), strategy, cluster)
    except (
        UsageError,
        ClusterError,
        DataError,
        CheckpointError,
        TrainingDiverged,
        ArchitectureError,
        ExportError,
        MaskTargetError,
    ) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a folder made read-only mid-run, ...
        where = f" ({error.filename})" if error.filename else ""
        print(
            f"Error: {error.strerror or error}{where}. Nothing was lost: fix it and run "
            "again with --resume.",
            file=sys.stderr,
        )
        return 1
    except Exception as error:
        message = cluster_failure(error, cluster)
        if message is None:
            raise
        print(f"Error: {message}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.cleanup()
    return 0


def _strategy_name() -> str:
    """--strategy, or with --resume the strategy saved in the workdir's config.json."""
    path = Workdir(FLAGS.workdir).config
    if FLAGS.resume and os.path.exists(path):
        try:
            with open(path) as handle:
                return json.load(handle).get("strategy", "default")
        except (OSError, ValueError, AttributeError):
            pass  # prepare_workdir says what is wrong with it
    return FLAGS.strategy


def join_cluster(cluster) -> RunConfig:
    """The configuration every task of a multi-worker cluster agreed on.

    The chief checks the workdir and writes config.json as on one machine; the
    other tasks only read. Then every task hands its configuration (or the
    error that stopped it) to every other, and all refuse to start together if
    one failed or if one's configuration differs from the chief's.
    """
    from hmnas_keras.distributed import (
        ClusterError,
        all_gather_json,
        config_differences,
        config_hash,
    )

    error, config = None, None
    try:
        config = prepare_workdir(FLAGS.workdir, FLAGS.resume, chief=cluster.chief)
    except (UsageError, ValueError) as failure:
        error = str(failure)
    mine = config.to_dict() if config else None
    messages = all_gather_json(
        cluster.strategy,
        {"task": cluster.name, "chief": cluster.chief, "error": error, "config": mine},
    )
    failed = [m for m in messages if m["error"]]
    if failed:
        raise ClusterError(
            " ".join(
                m["error"] if m["task"] == cluster.name else f"({m['task']} stopped: {m['error']})"
                for m in failed
            )
        )
    chief = next(m for m in messages if m["chief"])
    differing = {
        m["task"]: config_differences(m["config"], chief["config"])
        for m in messages
        if config_hash(m["config"]) != config_hash(chief["config"])
    }
    if differing:
        lines = "; ".join(f"{task}: {', '.join(d)}" for task, d in differing.items())
        raise ClusterError(
            f"The tasks were started with different configurations (hash "
            f"{config_hash(chief['config'])} on the chief); differences from the chief's: "
            f"{lines}. Start every task with the same flags."
        )
    if len(messages) == 1:
        print(
            "multi_worker with a single task: training here alone, as with --strategy=default "
            "(TF_CONFIG lists one task; add workers to it to spread the work).",
            flush=True,
        )
    return config


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
