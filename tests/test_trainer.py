"""The fused optimizer updates (`trainer.fused_apply`) against Keras' own."""

import keras
import numpy as np
import pytest

from hmnas_keras.training.trainer import fused_apply

SHAPES = ((3, 3, 4, 1), (1, 1, 4, 6), (5,))


def _variables(seed):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in SHAPES]


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.1, decay_steps=4), momentum=0.9
        ),
        lambda: keras.optimizers.SGD(0.05),
        lambda: keras.optimizers.Adam(3e-3, beta_1=0.5, beta_2=0.999),
    ],
    ids=["sgd_momentum_schedule", "sgd", "adam"],
)
def test_fused_apply_updates_as_keras_apply(make):
    fused, reference = _variables(0), _variables(0)
    fused_optimizer, reference_optimizer = make(), make()
    fused_optimizer.build(fused)
    reference_optimizer.build(reference)
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = [rng.normal(size=shape).astype("float32") for shape in SHAPES]
        assert fused_apply(fused_optimizer, grads, fused)
        reference_optimizer.apply(grads, reference)
    assert int(fused_optimizer.iterations) == int(reference_optimizer.iterations) == 4
    for got, expected in zip(fused, reference, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
    for got, expected in zip(fused_optimizer.variables, reference_optimizer.variables, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.SGD(0.1, clipnorm=1.0),
        lambda: keras.optimizers.Adam(1e-3, amsgrad=True),
        lambda: keras.optimizers.Adam(1e-3, weight_decay=1e-4),
        lambda: keras.optimizers.RMSprop(1e-3),
        lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)),
    ],
    ids=["nesterov", "clipnorm", "amsgrad", "decoupled_decay", "rmsprop", "loss_scale"],
)
def test_fused_apply_leaves_what_it_does_not_cover_to_keras(make):
    variables = _variables(0)
    optimizer = make()
    optimizer.build(variables)
    grads = [np.ones(shape, "float32") for shape in SHAPES]
    assert not fused_apply(optimizer, grads, variables)
    assert int(optimizer.iterations) == 0
    for got, expected in zip(variables, _variables(0), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("clip", [0.5, 100.0])  # clipped, and left as they are
def test_clip_by_global_norm_is_tensorflows_without_its_identities(clip):
    import tensorflow as tf

    from hmnas_keras.training.trainer import clip_by_global_norm

    rng = np.random.default_rng(11)
    grads = [tf.constant(rng.normal(size=shape).astype("float32")) for shape in [(3, 4), (5,)]]
    expected, _ = tf.clip_by_global_norm(grads, clip)
    for got, want in zip(clip_by_global_norm(grads, clip), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    # Identities: one per output of the traced function, and TensorFlow's one per gradient
    # (its function also returns the norm: 3 outputs).
    for function, identities in ((clip_by_global_norm, 2), (tf.clip_by_global_norm, 3 + 2)):
        concrete = tf.function(lambda g, f=function: f(g, clip)).get_concrete_function(grads)
        kinds = [op.type for op in concrete.graph.get_operations()]
        assert kinds.count("Identity") == identities
    infinite = [grads[0], tf.constant([np.inf, 1.0], tf.float32)]
    assert all(np.isnan(g).all() for g in clip_by_global_norm(infinite, clip))
