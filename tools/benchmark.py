"""Speed and memory of one supernet iteration, on synthetic CIFAR-sized data.

    python tools/benchmark.py --channels=8 --num_cells=3 --batch_size=32
    python tools/benchmark.py --channels=36 --num_cells=3 --batch_size=32 --steps=10

Prints, for the weight step alone, the weight step plus a first-order
architecture step, and the weight step plus a second-order architecture step:
the first call's time (tracing and compiling), then the median ms per
iteration and images/s over --steps timed iterations, and the peak resident
memory of the process after each kind. The architecture step's own cost is the
difference between the second or third row and the first.
"""

import os
import resource
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_integer("channels", 8, "Initial channels C.", lower_bound=1)
flags.DEFINE_integer("num_cells", 3, "Cells.", lower_bound=1)
flags.DEFINE_integer("num_nodes", 4, "Intermediate nodes per cell.", lower_bound=1)
flags.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1)
flags.DEFINE_integer("image_size", 32, "Image height and width.", lower_bound=4)
flags.DEFINE_integer("num_classes", 10, "Classes.", lower_bound=2)
flags.DEFINE_integer("steps", 10, "Timed iterations per kind (after one untimed).", lower_bound=1)
flags.DEFINE_integer(
    "threads", 0, "TensorFlow intra-op threads (0: half the cores).", lower_bound=0
)
KINDS = {
    "weight": "weight step",
    "first_order": "weight + arch (1st)",
    "second_order": "weight + arch (2nd)",
}
flags.DEFINE_multi_enum("kinds", list(KINDS), list(KINDS), "Which iterations to time.")
FLAGS = flags.FLAGS


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_kind(kind: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from hmnas_keras.space.search_space import SearchSpace
    from hmnas_keras.space.supernet import Supernet
    from hmnas_keras.training.arch_step import ArchStepPolicy
    from hmnas_keras.training.bilevel import BilevelSearch

    keras.utils.set_random_seed(0)
    space = SearchSpace(
        num_cells=FLAGS.num_cells, channels=FLAGS.channels, num_nodes=FLAGS.num_nodes
    )
    # The weight-only kind never leaves warm-up; the others step α/β every iteration.
    policy = ArchStepPolicy(warmup_steps=10**9 if kind == "weight" else 0)
    search = BilevelSearch(
        Supernet(space, FLAGS.num_classes), policy, second_order=kind == "second_order"
    )
    search.compile(
        keras.optimizers.SGD(0.025, momentum=0.9), keras.optimizers.Adam(3e-4, beta_1=0.5)
    )
    shape = (FLAGS.image_size, FLAGS.image_size, 3)
    search.build_search(shape)
    rng = np.random.default_rng(0)
    batch = FLAGS.batch_size

    def sample():
        return (
            rng.normal(size=(batch, *shape)).astype("float32"),
            rng.integers(0, FLAGS.num_classes, batch).astype("int32"),
        )

    data = tf.data.Dataset.from_tensors((sample(), sample())).repeat()
    iterator = iter(data)
    train_function = search.make_train_function()

    def one_iteration() -> float:
        started = time.perf_counter()
        logs = train_function(iterator)
        float(logs["loss"])  # waits for the step to finish
        return time.perf_counter() - started

    first = one_iteration()
    times = [one_iteration() for _ in range(FLAGS.steps)]
    median = statistics.median(times)
    return {
        "first_s": first,
        "median_ms": 1000 * median,
        "images_per_s": batch / median,
        "peak_rss_mib": peak_rss_mib(),
        "weights": sum(int(np.prod(v.shape)) for v in search.supernet.weight_variables),
    }


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from hmnas_keras.runtime import configure_tensorflow

    intra_op, inter_op = configure_tensorflow(FLAGS.threads)
    print(
        f"C={FLAGS.channels} cells={FLAGS.num_cells} nodes={FLAGS.num_nodes} "
        f"B={FLAGS.batch_size} {FLAGS.image_size}x{FLAGS.image_size}, {FLAGS.steps} timed steps, "
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, {intra_op} intra-op / {inter_op} "
        "inter-op threads"
    )
    header = ("iteration", "first call s", "median ms", "images/s", "peak RSS MiB")
    print(f"{header[0]:<22}{header[1]:>13}{header[2]:>11}{header[3]:>10}{header[4]:>14}")
    for kind in FLAGS.kinds:
        result = time_kind(kind)
        print(
            f"{KINDS[kind]:<22}{result['first_s']:>13.1f}{result['median_ms']:>11.0f}"
            f"{result['images_per_s']:>10.1f}{result['peak_rss_mib']:>14.0f}"
        )
        sys.stdout.flush()
    print(f"network weights: {result['weights']:,}")


if __name__ == "__main__":
    app.run(main)
