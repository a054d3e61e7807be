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
