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
