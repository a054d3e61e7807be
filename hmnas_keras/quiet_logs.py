"""TensorFlow's C++ start-up logs, silenced unless `--tf_logs` is on the command line.

TensorFlow prints oneDNN, CPU-feature and device-discovery lines as it loads,
before any flag is parsed and whatever TF_CPP_MIN_LOG_LEVEL says (TensorFlow
2.21 logs them before its log level is read). The command-line entry points
import this module first: unless `--tf_logs` is given, it sets
TF_CPP_MIN_LOG_LEVEL=2 (errors only; a value already set is kept) and imports
TensorFlow with the process's standard error pointed at /dev/null, then
restores it. An import that fails still raises, and its traceback is shown.
"""

import os
import sys

from absl import flags

flags.DEFINE_bool(
    "tf_logs",
    False,
    "Show TensorFlow's start-up logs (oneDNN, CPU features, devices), silenced by default.",
)


def _import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


if not any(arg in ("--tf_logs", "--tf_logs=true", "--tf_logs=1") for arg in sys.argv):
    _import_tensorflow_quietly()
