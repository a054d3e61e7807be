"""Runs the paper's ablations over several seeds (Tables 3, 5, 6) and tabulates them.

    python -m hmnas_keras.experiments --flagfile=configs/ablation_cifar10_small.cfg \\
        --workdir=runs/ablation --data_dir=$HOME/.cache/hmnas/cifar10 \\
        --seeds=0,1,2 --variants=hmnas,darts_heuristic,single_level,random_arch,random_init

Every search flag given (epochs, data, sizes; `python -m hmnas_keras.search
--help`) applies to every run. The plan (`hmnas_keras.experiments.plan`) is
written to WORKDIR/plan.json; the same command again resumes it, skipping
finished runs. Results: WORKDIR/results.json, results.md, results.png.
--dry_run prints the plan and starts nothing.
"""

import os
import signal
import sys

from absl import app, flags

from hmnas_keras import search  # defines the search flags
from hmnas_keras.experiments import plan as plans
from hmnas_keras.experiments import results

FLAGS = flags.FLAGS
# The search flags (defined by the package's modules), less --workdir, which is the runner's.
SEARCH_FLAGS = {
    flag.name
    for module, defined in FLAGS.flags_by_module_dict().items()
    if module.startswith("hmnas_keras.")
    for flag in defined
} - {"workdir"}

flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: each gets its own supernets and runs.")
flags.DEFINE_list(
    "variants",
    list(plans.PAPER_VARIANTS),
    f"Variants to run, a comma list of: {', '.join(plans.VARIANTS)}.",
)
flags.DEFINE_integer("random_archs", 3, "random_arch: architectures drawn per seed.", lower_bound=0)
flags.DEFINE_integer(
    "parallel",
    1,
    "Runs at once. With GPUs each run gets one (CUDA_VISIBLE_DEVICES, round robin); on CPU "
    "each gets cores / N threads unless --threads is given.",
    lower_bound=1,
)
flags.DEFINE_bool("with_export", False, "Also export every fine-tuned run (--phases=...,export).")
flags.DEFINE_bool("dry_run", False, "Print the plan, start nothing.")


def given_search_flags() -> dict:
    """{name: serialized flag} of the search flags given (command line or --flagfile)."""
    return {name: FLAGS[name].serialize() for name in sorted(SEARCH_FLAGS) if FLAGS[name].present}


def _check_workdir(files: plans.ExperimentFiles, record: dict) -> None:
    """Refuses a workdir made for another plan, or one that is not an experiment's."""
    root = files.root
    if os.path.exists(files.plan):
        try:
            saved = results.read_json_if_exists(files.plan)
        except (OSError, ValueError) as error:
            raise plans.PlanError(
                f"Cannot read {files.plan} ({error}): the experiment's plan is damaged. Restore "
                "it, or choose a new --workdir (nothing was changed)."
            ) from None
        differences = plans.plan_differences(saved, record)
        if differences:
            raise plans.PlanError(
                f"{root} holds an experiment with a different plan; nothing was changed. "
                "Run it with its own flags, or choose a new --workdir. Differences:\n  "
                + "\n  ".join(differences)
            )
    elif os.path.isdir(root) and os.listdir(root):
        raise plans.PlanError(
            f"{root} is not empty and holds no plan.json: it is not an experiment's workdir. "
            "Choose a new --workdir (nothing was changed)."
        )


def print_plan(plan, record) -> None:
    from hmnas_keras.experiments.runner import command

    print(
        f"Plan: {len(plan)} runs ({', '.join(record['variants'])}; seeds "
        f"{', '.join(map(str, record['seeds']))})"
    )
    for index, run in enumerate(plan, 1):
        state = "finished" if results.is_finished(run) else "to run"
        needs = f", after {', '.join(run.needs)}" if run.needs else ""
        print(f"[{index}/{len(plan)}] {run.name} ({state}{needs})")
        print("    " + " ".join(command(run, plan)[1:]))


def main(argv):
    if len(argv) > 1:
        print(f"Error: unexpected arguments: {' '.join(argv[1:])}.", file=sys.stderr)
        return 1
    if not FLAGS.workdir:
        print(
            "Error: --workdir is required: the experiment's folder, e.g. "
            "python -m hmnas_keras.experiments --flagfile=configs/ablation_cifar10_small.cfg "
            "--workdir=runs/ablation",
            file=sys.stderr,
        )
        return 1
    root = os.path.abspath(FLAGS.workdir)
    try:
        seeds = plans.parse_seeds(FLAGS.seeds)
        variants = plans.parse_variants(FLAGS.variants)
        search_flags = given_search_flags()
        plan = plans.build_plan(
            root, variants, seeds, FLAGS.random_archs, search_flags, FLAGS.with_export
        )
        record = plans.plan_record(
            variants, seeds, FLAGS.random_archs, search_flags, FLAGS.with_export
        )
        files = plans.ExperimentFiles(root)
        _check_workdir(files, record)
        if not FLAGS.dry_run:
            search._check_writable(root)
    except (plans.PlanError, search.UsageError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    if FLAGS.dry_run:
        try:
            print_plan(plan, record)
        except BrokenPipeError:  # piped into head, say: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from hmnas_keras.checkpoint import write_json
    from hmnas_keras.experiments.runner import Runner

    write_json(files.plan, record)
    runner = Runner(files, plan, record, FLAGS.parallel, threads_given="threads" in search_flags)

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        ok = runner.run()
    except KeyboardInterrupt:
        runner.stop()
        runner.write()
        print(
            "Interrupted. Finished runs are kept; run the same command again to continue.",
            file=sys.stderr,
        )
        return 130
    entries = runner.entries()
    if results.draw_results(files.picture, entries):
        print(f"Picture: {files.picture}")
    runner.write()
    print(results.results_markdown(record, entries))
    print(f"Results: {files.results}, {files.markdown}")
    if not ok:
        failed = [e["name"] for e in entries if e["status"] != "finished"]
        print(f"Error: {len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
