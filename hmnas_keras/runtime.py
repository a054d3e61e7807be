"""TensorFlow runtime settings shared by the entry points."""

import os


def configure_tensorflow(threads: int = 0, logical_cpus: int = 0) -> tuple[int, int]:
    """Sets the thread pools (and optionally logical CPUs); call before TensorFlow runs anything.

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
    if logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
        )
    return intra_op, inter_op
