"""Running the configured phases of one run in its workdir, then the pictures and the report.

    supernet -> mask -> (derive) -> finetune -> export -> pictures, report

`run` is what `python -m hmnas_keras.search` calls once the configuration is
resolved; docs/ARCHITECTURE.md shows what each phase reads and writes.
"""

import os
import time

from hmnas_keras.config import RunConfig
from hmnas_keras.pipeline.workdir import Workdir


def _supernet(config, data, workdir, strategy) -> None:
    from hmnas_keras.pipeline.supernet_phase import run_supernet_phase

    summary = run_supernet_phase(config, data, workdir, strategy).summary
    print(
        f"Supernet: test accuracy {summary['test_accuracy']:.4f}, "
        f"{summary['weight_parameters']:,} weights, {summary['wall_seconds']:.0f} s. "
        f"Outputs in {workdir.supernet.directory}"
    )


def _mask(config, data, workdir, strategy) -> None:
    from hmnas_keras.pipeline.mask_phase import alive_line, run_mask_phase

    summary = run_mask_phase(config, data, workdir, strategy)
    print(
        f"Masking: masked supernet test accuracy {summary['test_accuracy']:.4f}; kept "
        f"{alive_line(summary['alive'])}; {summary['wall_seconds']:.0f} s. "
        f"Architecture in {workdir.architecture}"
    )


def _finetune(config, data, workdir, strategy) -> None:
    from hmnas_keras.pipeline.derive_phase import prepare_architecture
    from hmnas_keras.pipeline.finetune_phase import run_finetune_phase

    prepare_architecture(config, data, workdir)
    summary = run_finetune_phase(config, data, workdir, strategy)
    print(
        f"Fine-tuning: test accuracy {summary['test_accuracy']:.4f}, "
        f"{summary['parameters']['nonzero']:,} non-zero parameters, "
        f"{summary['wall_seconds']:.0f} s. Outputs in {workdir.finetune.directory}"
    )


def _export(config, data, workdir, strategy) -> None:
    from hmnas_keras.pipeline.export_phase import format_summary, run_export_phase

    print(format_summary(run_export_phase(config, data, workdir)))
    print(f"Exported models in {workdir.export.directory}")


PHASE_RUNNERS = {"supernet": _supernet, "mask": _mask, "finetune": _finetune, "export": _export}


def draw_pictures(workdir: Workdir) -> None:
    """Draws the cells and search statistics into WORKDIR/pictures/ (given an architecture)."""
    from hmnas_keras.pipeline.pictures import draw_workdir

    if os.path.exists(workdir.architecture):
        written = draw_workdir(workdir)
        print(f"Pictures: {len(written)} files in {workdir.pictures}")


def run(config: RunConfig, workdir: Workdir, strategy=None, cluster=None) -> dict | None:
    """Runs the configured phases in `workdir`; returns the report.

    `strategy`: made from `config.strategy` if not given. `cluster`
    (hmnas_keras.distributed.Cluster): in a multi-worker cluster every task
    trains, but only the chief exports, draws and reports (the others return
    None once the chief is done).
    """
    import keras
    import tensorflow as tf

    from hmnas_keras.data import describe, make_search_data
    from hmnas_keras.distributed import Cluster, barrier, check_settings, make_strategy
    from hmnas_keras.pipeline.report import write_report

    started = time.monotonic()
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = strategy or make_strategy(config.strategy)
    cluster = cluster or Cluster.of(strategy, workdir.root)
    check_settings(strategy, config)
    data = make_search_data(config.data, config.seed)
    print(f"Data: {describe(data)} ({time.monotonic() - started:.1f} s to load)")
    where = f", {cluster.name}" if cluster.multi_worker else ""
    print(f"Strategy: {config.strategy}, {strategy.num_replicas_in_sync} replica(s){where}")
    if cluster.multi_worker and not cluster.chief:
        print(
            f"This task writes only to {workdir.root} (removed at the end); the chief writes "
            "the workdir."
        )
    if "mask" in config.phases:
        from hmnas_keras.pipeline.mask_phase import check_mask_settings

        check_mask_settings(config, data, workdir)
    if "export" in config.phases:
        from hmnas_keras.pipeline.export_phase import check_export_settings

        check_export_settings(config.export, len(data.weight_images) + len(data.arch_images))
    for name, runner in PHASE_RUNNERS.items():
        if name in config.phases and (cluster.chief or name != "export"):
            # Mixed precision trains; the export, its checks and timings are float32.
            mixed = config.mixed_precision and name != "export"
            keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
            runner(config, data, workdir, strategy)
    keras.mixed_precision.set_global_policy("float32")
    if not cluster.chief:
        print(f"{cluster.name}: training done; waiting for the chief's export and report.")
        barrier(strategy)
        return None
    draw_pictures(workdir)
    report, text = write_report(config, workdir)
    print(text)
    print(f"Report: {workdir.report}")
    if cluster.multi_worker:
        barrier(strategy)  # the other tasks wait for this, so that none exits early
    return report
