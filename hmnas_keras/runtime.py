"""TensorFlow runtime settings shared by the entry points."""

import concurrent.futures
import os

GRAPH_OPTIMIZATION = ("auto", "on", "off")


def graph_optimization_enabled(setting: str = "auto") -> bool:
    """Whether TensorFlow's graph optimiser (Grappler) runs on traced functions.

    "auto" turns it off on a machine without a GPU. On a CPU it was a third of a
    traced step's first call and bought no step time (one idle run on 2 cores,
    docs/BENCHMARKS.md: the C=16, 5-cell weight step's first call 27.7 -> 17.7 s,
    the step 648 -> 631 ms; with the architecture step 52.6 -> 34.3 s,
    1,077 -> 1,024 ms; peak memory 4-6% higher). On a GPU its layout and fusion
    passes matter, so "auto" leaves it on there.
    """
    if setting not in GRAPH_OPTIMIZATION:
        raise ValueError(
            f"Received an invalid graph optimization setting, expected one of "
            f"{', '.join(GRAPH_OPTIMIZATION)}. Received: {setting!r}"
        )
    if setting == "auto":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return setting == "on"


def set_graph_optimization(setting: str = "auto") -> bool:
    """Turns Grappler on or off for the functions first called from now on
    (`graph_optimization_enabled`); returns whether it is on."""
    import tensorflow as tf

    enabled = graph_optimization_enabled(setting)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": not enabled})
    return enabled


def configure_tensorflow(
    threads: int = 0, logical_cpus: int = 0, graph_optimization: str = "auto"
) -> tuple[int, int]:
    """Sets the thread pools (and optionally logical CPUs) and whether Grappler runs
    (`graph_optimization_enabled`); call before TensorFlow runs anything.

    The supernet is thousands of small, independent ops: on a CPU, running
    several at once (inter-op) beats splitting each one across cores
    (intra-op). On 2 cores, 4 inter-op threads of 1 intra-op thread each made
    a C=8 supernet step about 15% faster than TensorFlow's default.
    `threads` sets the intra-op threads instead (0: half the cores).
    Returns (intra_op, inter_op).
    """
    import tensorflow as tf

    cores = os.cpu_count() or 1
    intra_op = threads or max(1, cores // 2)
    inter_op = max(2, 2 * cores // intra_op)
    tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    set_graph_optimization(graph_optimization)
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
        )
    return intra_op, inter_op


def own_frames_only():
    """A context in which the ops traced record, as the place that made them, only frames of
    this package and of the user's code: none of TensorFlow's, Keras' or another installed
    library's, nor the standard library's.

    TensorFlow keeps each traced op's Python stack for its runtime error messages,
    and copies every frame (file, line, function) into each graph it instantiates
    from the function, for as long as the function lives: about 43 frames per op,
    most of them TensorFlow's tracing machinery and Keras' layer calls. That was
    74 MiB of a C=8 supernet weight step's 1,458 MiB peak (95 of 1,671 with the
    architecture step). An error in a step still names the op and the frames here
    that made it. TensorFlow has no public switch: this is its own filter
    (`tf_stack.StackTraceFilter`), over the files of the modules loaded on entry.
    """
    from tensorflow.python.framework import ops
    from tensorflow.python.util import tf_stack

    class OwnFramesOnly(tf_stack.StackTraceFilter):
        def get_filtered_filenames(self):
            # TensorFlow drops the 3 innermost frames the filter leaves, meaning its own
            # op-making functions (in ops.py): left unfiltered, they are those dropped.
            return _library_files() - {ops.__file__}

    return OwnFramesOnly()


def release_eager_kernels() -> None:
    """Drops the kernels TensorFlow keeps for the ops it ran eagerly so far (and for functions
    called eagerly, which instantiate again on their next call).

    Building a network runs its layers once eagerly, and TensorFlow caches a kernel
    (oneDNN primitives included) per op it ran, for the process's life: 61 MiB of a
    C=8 supernet weight step's peak (1,353 against 1,292 MiB). Call it after building
    and before the training steps' first calls. TensorFlow's own cache clear
    (private: `context().clear_kernel_cache()`).
    """
    from tensorflow.python.eager import context

    context.context().clear_kernel_cache()


def _library_files() -> frozenset:
    """The source files of the loaded modules that are installed (site-packages) or part of
    Python itself, this package's excepted."""
    import sys
    import sysconfig

    paths = [sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    roots = tuple({os.path.join(p, "") for path in paths for p in (path, os.path.realpath(path))})
    return frozenset(
        module.__file__
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] != __package__
        and isinstance(getattr(module, "__file__", None), str)
        and module.__file__.startswith(roots)
    )


def graph_nodes(graph_def) -> int:
    """Nodes of `graph_def` with every function call counted as the nodes of its body.

    TensorFlow inlines the calls before running a step: this is about the size of
    the graph its first call instantiates (a shared edge function counts once per
    edge)."""
    library = {function.signature.name: function for function in graph_def.library.function}

    def count(nodes) -> int:
        total = 0
        for node in nodes:
            total += 1
            name = node.op if node.op in library else None
            if node.op in ("PartitionedCall", "StatefulPartitionedCall"):
                name = node.attr["f"].func.name
            if name in library:
                total += count(library[name].node_def)
        return total

    return count(graph_def.node)


def call_while_tracing(function, args: tuple, then, then_args: tuple) -> None:
    """`function(*args)`, with the tf.function `then` traced for `then_args` meanwhile.

    A step's first call is seconds of tracing (Python, holding the GIL) and then
    seconds of TensorFlow instantiating the graph at its first run (C++, without
    the GIL). When `then` runs right after `function` and is not traced yet, this
    thread traces `function`, starts its first run in a second thread and traces
    `then` while it runs: on 2 cores the bilevel search's first iteration with an
    architecture step took 14.5 instead of 15.2 s (C=16, 5 cells; docs/BENCHMARKS.md).
    `function` has finished when this returns, and its error, if any, is raised
    here. With `then` already traced, or called while tracing, it is a plain call.
    Not for functions that run under a distribution strategy (their first run in
    another thread is untested).
    """
    import tensorflow as tf

    if then.experimental_get_tracing_count() or not tf.executing_eagerly():
        function(*args)  # traced already, or within a graph being traced: nothing to overlap
        return
    first_run = function.get_concrete_function(*args)  # traced here, not in the thread
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="first-run") as pool:
        running = pool.submit(first_run, *args)
        try:
            then.get_concrete_function(*then_args)
        finally:
            concurrent.futures.wait([running])  # a tracing error is raised after the run
        running.result()
