import pytest
import tensorflow as tf

from hmnas_keras.runtime import graph_optimization_enabled, set_graph_optimization


def test_graph_optimization_is_off_without_a_gpu_unless_asked_for():
    gpus = bool(tf.config.list_physical_devices("GPU"))
    assert graph_optimization_enabled("auto") is gpus
    assert graph_optimization_enabled("on") is True
    assert graph_optimization_enabled("off") is False
    with pytest.raises(ValueError, match="expected one of auto, on, off. Received: 'fast'"):
        graph_optimization_enabled("fast")


def test_set_graph_optimization_switches_the_meta_optimizer():
    try:
        assert set_graph_optimization("on") is True
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is False
        assert set_graph_optimization("off") is False
        assert tf.config.optimizer.get_experimental_options()["disable_meta_optimizer"] is True
    finally:
        set_graph_optimization("auto")


def test_the_entry_points_load_keras_without_scikit_learn_and_matplotlib():
    """quiet_logs (imported first by every entry point) loads TensorFlow and Keras without
    Keras' optional integrations; both import normally afterwards, when the digits data
    or the pictures need them."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from hmnas_keras import quiet_logs\n"
        "import keras, tensorflow\n"
        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))\n"
        "dense = keras.layers.Dense(1, kernel_initializer='ones')\n"
        "print(float(dense(tensorflow.ones([1, 2]))[0, 0]))\n"
        "from hmnas_keras.data import load_digits_arrays\n"
        "print(load_digits_arrays().train_images.shape[1:])\n"
        "import matplotlib.pyplot\n"
        "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["[]", "2.0", "(8, 8, 1)", "['matplotlib', 'sklearn']"]
    assert "oneDNN" not in result.stderr  # and the start-up logs stay silenced


def test_graph_nodes_counts_a_function_body_once_per_call():
    from hmnas_keras.runtime import graph_nodes

    @tf.function(autograph=False)
    def inner(x):
        return tf.nn.relu(x * 2.0 + 1.0)

    @tf.function(autograph=False)
    def outer(x):
        return inner(x) + inner(x * 3.0)

    x = tf.ones([2])
    graph_def = outer.get_concrete_function(x).graph.as_graph_def()
    functions = graph_def.library.function
    body = [f for f in functions if f.signature.name.startswith("__inference_inner")]
    assert len(body) == 1 and len(body[0].node_def) >= 4  # const, mul, const, add, relu, ...
    expected = len(graph_def.node) + 2 * len(body[0].node_def)
    assert graph_nodes(graph_def) == expected


def test_call_while_tracing_runs_the_first_call_in_a_thread_while_tracing_the_next_step():
    import threading

    import numpy as np

    from hmnas_keras.runtime import call_while_tracing

    traced = threading.Event()
    seen = {"timeout": 60.0}
    counter = tf.Variable(0.0)

    def record(x):
        # Runs inside the first step: it sees the second step traced meanwhile.
        seen["overlapped"] = traced.wait(timeout=seen["timeout"])
        return x

    @tf.function(autograph=False)
    def first(x):
        counter.assign_add(tf.py_function(record, [x], tf.float32))
        return counter.read_value()

    @tf.function(autograph=False)
    def second(x):
        traced.set()
        return x * 2.0

    call_while_tracing(first, (tf.constant(3.0),), second, (tf.constant(1.0),))
    assert float(counter.numpy()) == 3.0  # finished when the call returns
    assert seen["overlapped"]
    assert second.experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(second(tf.constant(1.0)), 2.0)
    assert second.experimental_get_tracing_count() == 1  # the call used that trace

    # `second` traced already: a plain call, nothing traced.
    traced.clear()
    seen["timeout"] = 0.2
    call_while_tracing(first, (tf.constant(1.0),), second, (tf.constant(1.0),))
    assert float(counter.numpy()) == 4.0 and not seen["overlapped"]
    assert second.experimental_get_tracing_count() == 1


def test_call_while_tracing_raises_the_first_calls_error_after_tracing():
    from hmnas_keras.runtime import call_while_tracing

    @tf.function(autograph=False)
    def failing(x):
        tf.debugging.assert_positive(x, message="x must be positive")
        return x

    @tf.function(autograph=False)
    def second(x):
        return x + 1.0

    with pytest.raises(tf.errors.InvalidArgumentError, match="x must be positive"):
        call_while_tracing(failing, (tf.constant(-1.0),), second, (tf.constant(1.0),))
    assert second.experimental_get_tracing_count() == 1


def _library_frames(traceback):
    import sysconfig

    roots = tuple(sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib"))
    return [frame.filename for frame in traceback if frame.filename.startswith(roots)]


def test_own_frames_only_records_no_library_frames_for_the_ops_traced():
    """Ops traced inside `own_frames_only` keep, as where they were made, the frames of this
    package and of the caller's code (this test file), not TensorFlow's or Keras'."""
    import keras

    from hmnas_keras.runtime import own_frames_only
    from hmnas_keras.space.maskable import graph_constant

    layer = keras.layers.Dense(3)
    layer.build((2, 4))

    def step(x):
        return layer(x) * graph_constant(2.0, "float32")  # a Keras call, and this package

    def traced(filtered):
        def body(x):
            if not filtered:
                return step(x)
            with own_frames_only():
                return step(x)

        function = tf.function(body, autograph=False)
        return function.get_concrete_function(tf.TensorSpec((2, 4))).graph.get_operations()

    plain, own = traced(False), traced(True)
    # The ops `step` made (not the arguments, captures and outputs' identities around it).
    made = {op.name for op in plain if "step" in [frame.name for frame in op.traceback]}
    own = [op for op in own if op.name in made]
    assert len(own) == len(made) > 5
    assert all(_library_frames(op.traceback) for op in plain)  # ~40 frames of libraries
    for op in own:
        frames = [frame.filename for frame in op.traceback]
        # At most a few of TensorFlow's ops.py, which it needs to find the caller's frames.
        library = _library_frames(op.traceback)
        assert len(library) <= 3 and {f.split("/")[-1] for f in library} <= {"ops.py"}, frames
        assert __file__ in frames
    # The constant keeps the frame of this package that made it.
    assert any("maskable.py" in [f.filename.split("/")[-1] for f in op.traceback] for op in own)
    assert max(len(op.traceback) for op in own) < min(len(op.traceback) for op in plain)
