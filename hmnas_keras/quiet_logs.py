"""TensorFlow's start-up: its C++ logs silenced unless `--tf_logs` is on the command line,
and Keras loaded without its optional scikit-learn and matplotlib integrations.

TensorFlow prints oneDNN, CPU-feature and device-discovery lines as it loads,
before any flag is parsed and whatever TF_CPP_MIN_LOG_LEVEL says (TensorFlow
2.21 logs them before its log level is read). The command-line entry points
import this module first: unless `--tf_logs` is given, it sets
TF_CPP_MIN_LOG_LEVEL=2 (errors only; a value already set is kept) and imports
TensorFlow with the process's standard error pointed at /dev/null, then
restores it. An import that fails still raises, and its traceback is shown.

Keras imports scikit-learn (for its scikit-learn wrappers) and matplotlib (for
its image-gallery plots) as it loads, if they are installed: 85 MiB of memory
and 0.8 s in every process, for features this package does not use.
`import_tensorflow` loads TensorFlow and Keras with those two imports failing
(Keras then leaves the integrations out), and lets them import normally after:
the digits data still loads scikit-learn, the pictures matplotlib, when needed.
"""

import importlib.abc
import os
import sys

from absl import flags

flags.DEFINE_bool(
    "tf_logs",
    False,
    "Show TensorFlow's start-up logs (oneDNN, CPU features, devices), silenced by default.",
)


# What Keras imports only for integrations this package does not use (see the module doc).
KERAS_EXTRAS = ("sklearn", "matplotlib")


class _Deferred(importlib.abc.MetaPathFinder):
    """Fails the import of `KERAS_EXTRAS` while it is on `sys.meta_path`."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in KERAS_EXTRAS:
            raise ImportError(f"{name} is not imported while Keras loads (hmnas_keras.quiet_logs)")
        return None


def import_tensorflow() -> None:
    """Imports TensorFlow and Keras without Keras' scikit-learn and matplotlib integrations."""
    if "keras" in sys.modules:
        return
    finder = _Deferred()
    sys.meta_path.insert(0, finder)
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        sys.meta_path.remove(finder)


def _import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        import_tensorflow()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


if any(arg in ("--tf_logs", "--tf_logs=true", "--tf_logs=1") for arg in sys.argv):
    import_tensorflow()
else:
    _import_tensorflow_quietly()
