import keras
import numpy as np
import pytest
import tensorflow as tf

from hmnas_keras.config import DataConfig
from hmnas_keras.data import make_search_data
from hmnas_keras.space.search_space import SearchSpace
from hmnas_keras.space.supernet import Supernet
from hmnas_keras.training.arch_step import ArchStepPolicy, ArchStepSchedule
from hmnas_keras.training.bilevel import BilevelSearch

OPS = ("sep_conv_3x3", "avg_pool_3x3", "skip_connect")
SHAPE = (8, 8, 3)


def make_search(
    policy=None, second_order=False, lr=0.05, arch_lr=0.01, clip=5.0, shape=SHAPE, classes=3
):
    keras.utils.set_random_seed(0)
    space = SearchSpace(num_cells=2, channels=4, num_nodes=2, op_names=OPS)
    search = BilevelSearch(
        Supernet(space, classes),
        policy or ArchStepPolicy(),
        second_order=second_order,
        grad_clip_norm=clip,
    )
    search.compile(
        keras.optimizers.SGD(lr, momentum=0.9),
        keras.optimizers.Adam(arch_lr, beta_1=0.5),
    )
    search.build_search(shape)
    return search


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, *SHAPE)).astype("float32")
    y = rng.integers(0, 3, count).astype("int32")
    return x, y


def values(variables):
    return [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "step"])
def test_schedule_starts_at_one_and_never_increases(kind):
    schedule = ArchStepSchedule(kind, final_prob=0.1, decay_steps=10)
    probs = [schedule(t) for t in range(30)]
    assert probs[0] == 1.0
    assert all(b <= a + 1e-12 for a, b in zip(probs, probs[1:]))
    if kind != "constant":
        assert probs[-1] == pytest.approx(0.1)


def test_policy_is_reproducible_and_follows_its_probability():
    policy = ArchStepPolicy(warmup_steps=5, schedule=ArchStepSchedule("step", 0.3, 1), seed=3)
    decisions = [policy.should_step(i) for i in range(4005)]
    assert decisions == [policy.should_step(i) for i in range(4005)]
    assert not any(decisions[:5]) and decisions[5]
    assert np.mean(decisions[6:]) == pytest.approx(0.3, abs=0.03)


def test_sigma_counts_iterations_from_the_start_of_training():
    # The paper's p = σ(iter): iter counts warm-up iterations too. σ = 1 for 8 iterations,
    # then 0: with 5 warm-up iterations only iterations 5, 6, 7 take arch steps.
    policy = ArchStepPolicy(warmup_steps=5, schedule=ArchStepSchedule("step", 0.0, 8))
    assert [policy.should_step(i) for i in range(12)] == [False] * 5 + [True] * 3 + [False] * 4
    linear = ArchStepPolicy(warmup_steps=4, schedule=ArchStepSchedule("linear", 0.0, 8))
    assert [linear.probability(i) for i in (3, 4, 6, 8)] == [0.0, 0.5, 0.25, 0.0]


def test_schedule_validation():
    with pytest.raises(ValueError, match="expected one of constant"):
        ArchStepSchedule("exponential")
    with pytest.raises(ValueError, match="final_prob"):
        ArchStepSchedule("linear", final_prob=1.5)


def test_first_order_step_uses_the_arch_batch_for_alpha_and_the_weight_batch_for_w():
    search = make_search(clip=0.0)
    net = search.supernet
    weight_batch, arch_batch = batches(4, 0), batches(4, 1)
    arch_before, weights_before = values(net.arch_variables), values(net.weight_variables)

    # Expected α update: Adam's first step is lr · g / (|g| + ε / sqrt(1 − β2)), g from the
    # arch batch (Keras folds the bias corrections into the step size).
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(
            arch_batch[1], net(arch_batch[0], training=True), from_logits=True
        )
        loss = tf.reduce_mean(loss)
    arch_grads = [
        g.numpy() + 1e-3 * a for g, a in zip(tape.gradient(loss, net.arch_variables), arch_before)
    ]
    search.fit(tf.data.Dataset.from_tensors((weight_batch, arch_batch)), epochs=1, verbose=0)
    arch_after = values(net.arch_variables)
    for before, after, grad in zip(arch_before, arch_after, arch_grads):
        expected = before - 0.01 * grad / (np.abs(grad) + 1e-7 / np.sqrt(1 - 0.999))
        np.testing.assert_allclose(after, expected, rtol=1e-3, atol=1e-6)

    # Expected w update: SGD's first step, lr · (∇w L(weight batch; α_new) + λ w).
    search_check = make_search(clip=0.0)
    for variable, value in zip(search_check.supernet.arch_variables, arch_after):
        variable.assign(value)
    check = search_check.supernet
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                weight_batch[1], check(weight_batch[0], training=True), from_logits=True
            )
        )
    grads = tape.gradient(loss, check.weight_variables)
    for before, after, grad in zip(weights_before, values(net.weight_variables), grads):
        np.testing.assert_allclose(
            after, before - 0.05 * (grad.numpy() + 3e-4 * before), rtol=1e-3, atol=1e-6
        )


def test_warmup_freezes_alpha_beta_while_weights_train():
    search = make_search(ArchStepPolicy(warmup_steps=3))
    arch_before, weights_before = (
        values(search.supernet.arch_variables),
        values(search.supernet.weight_variables),
    )
    data = tf.data.Dataset.from_tensors((batches(4, 0), batches(4, 1))).repeat(3)
    history = search.fit(data, epochs=1, verbose=0)
    assert history.history["arch_step_fraction"] == [0.0]
    for before, after in zip(arch_before, values(search.supernet.arch_variables)):
        np.testing.assert_array_equal(before, after)
    assert any(
        not np.array_equal(b, a)
        for b, a in zip(weights_before, values(search.supernet.weight_variables))
    )
    # Iterations 3.. are past warm-up: the next epoch steps α/β every time.
    history = search.fit(data, epochs=1, verbose=0)
    assert history.history["arch_step_fraction"] == [1.0]
    assert all(
        not np.array_equal(b, a)
        for b, a in zip(arch_before, values(search.supernet.arch_variables))
    )


def test_sigma_zero_never_and_sigma_one_always_steps_alpha():
    # σ = 1 for the first iteration, then 0: exactly one arch step in 4 iterations.
    search = make_search(ArchStepPolicy(schedule=ArchStepSchedule("step", 0.0, 1)))
    data = tf.data.Dataset.from_tensors((batches(4, 0), batches(4, 1))).repeat(4)
    history = search.fit(data, epochs=1, verbose=0)
    assert history.history["arch_step_fraction"] == [0.25]
    assert int(search.arch_optimizer.iterations.numpy()) == 1
    assert int(search.weight_optimizer.iterations.numpy()) == 4


def test_an_iteration_is_two_traced_steps_that_compute_what_one_function_would():
    """fit() runs an iteration as the architecture step's traced function, then the weight
    step's (traced once for both kinds of iteration; the first architecture step's first
    run overlaps the weight step's tracing): the same state as one traced function of
    the whole iteration per kind."""
    # σ = 1, then 0: iteration 0 takes the architecture step, iterations 1-3 do not.
    policy = ArchStepPolicy(schedule=ArchStepSchedule("step", 0.0, 1))
    data = tf.data.Dataset.from_tensors((batches(4, 0), batches(4, 1))).repeat(4)
    search = make_search(policy)
    history = search.fit(data, epochs=1, verbose=0)
    assert history.history["arch_step_fraction"] == [0.25]
    assert int(search.arch_optimizer.iterations.numpy()) == 1
    assert int(search.weight_optimizer.iterations.numpy()) == 4
    assert [f.experimental_get_tracing_count() for f in search.traced_steps] == [1, 1]

    reference = make_search(policy)
    reference.make_train_function()  # the metrics' state, as fit() leaves it
    iteration = {
        take: tf.function(lambda data, take=take: reference._bilevel_step(data, take))
        for take in (True, False)
    }
    for take in (True, False, False, False):
        iteration[take]((batches(4, 0), batches(4, 1)))
    for got, expected in zip(
        values(search.state_variables), values(reference.state_variables), strict=True
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # The steps' ops keep only this package's frames (`runtime.own_frames_only`), a few.
    weight_step = search.traced_steps[1]
    graph = weight_step.get_concrete_function((batches(4, 0),), tf.constant(1.0)).graph
    assert weight_step.experimental_get_tracing_count() == 1  # it gets the weight batch alone
    # (Not the arguments, the outputs' identities and the final no-op, made around the step.)
    made = [
        op for op in graph.get_operations() if op.type not in ("Placeholder", "Identity", "NoOp")
    ]
    frames = [len(op.traceback) for op in made]
    assert max(frames) < 25 and sum(frames) / len(frames) < 20


def test_after_warm_up_the_architecture_step_is_traced_alone():
    search = make_search(ArchStepPolicy(warmup_steps=1))
    data = tf.data.Dataset.from_tensors((batches(4, 0), batches(4, 1))).repeat(3)
    history = search.fit(data, epochs=1, verbose=0)
    assert history.history["arch_step_fraction"] == [pytest.approx(2 / 3)]
    assert [f.experimental_get_tracing_count() for f in search.traced_steps] == [1, 1]


def test_no_architecture_batch_is_made_where_sigma_draws_no_architecture_step():
    """With `arch_steps=policy` the pipeline leaves the architecture batch empty where σ
    draws no architecture step, and the search ends in the state it reaches when
    every architecture batch is made; a dataset that disagrees with the policy is an
    error that says so."""
    config = DataConfig(dataset="digits", batch_size=4, train_subset=40)
    data = make_search_data(config, seed=0)
    policy = ArchStepPolicy(schedule=ArchStepSchedule("step", 0.3, 2), seed=1)
    decisions = policy.decisions(0, data.steps_per_epoch)
    assert decisions.tolist() == [policy.should_step(i) for i in range(data.steps_per_epoch)]
    assert decisions[:2].all() and not decisions.all()
    skipping = data.bilevel_dataset(1, arch_steps=policy)
    sizes = [int(arch_images.shape[0]) for _, (arch_images, _) in skipping]
    assert sizes == [4 if take else 0 for take in decisions]

    states = []
    for dataset in (data.bilevel_dataset(1), skipping):
        search = make_search(policy, shape=data.image_shape, classes=data.num_classes)
        history = search.fit(dataset, epochs=1, verbose=0)
        assert history.history["arch_step_fraction"] == [pytest.approx(decisions.mean())]
        assert [f.experimental_get_tracing_count() for f in search.traced_steps] == [1, 1]
        states.append(values(search.state_variables))
    for got, expected in zip(*states, strict=True):
        np.testing.assert_array_equal(got, expected)

    always = make_search(shape=data.image_shape, classes=data.num_classes)
    with pytest.raises(ValueError, match="empty architecture batch.*arch_steps=search.policy"):
        always.fit(skipping, epochs=1, verbose=0)


def _ce(labels, logits):
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    )


def test_second_order_arch_gradient_matches_a_numerical_check():
    """The finite-difference unrolled gradient against the exact one.

    The reference differentiates the unrolled objective
    L_val(w − ξ(∇w L_train(w, α) + λw), α) exactly, with nested tapes. The
    finite-difference Hessian-vector product is exact only in the limit; on a
    tiny network dense with ReLU and max kinks DARTS' radius of 0.01 crosses
    kinks, so the check uses a small radius.
    """
    search = make_search(second_order=True, lr=0.5)
    search.hvp_radius = 1e-4
    net = search.supernet
    weight_batch, arch_batch = batches(4, 0), batches(4, 1)
    xi, decay = 0.5, 3e-4
    analytic, _, _ = search.arch_gradients(weight_batch, arch_batch)

    arch = net.arch_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            train_loss = _ce(weight_batch[1], net(weight_batch[0], training=True))
        grads = inner.gradient(train_loss, net.weight_variables)
        unrolled = {
            id(v): v.value - xi * (g + decay * v.value) for v, g in zip(net.weight_variables, grads)
        }
        trainable = [unrolled.get(id(v), v.value) for v in net.trainable_variables]
        logits, _ = net.stateless_call(
            trainable, [v.value for v in net.non_trainable_variables], arch_batch[0], training=True
        )
        val_loss = _ce(arch_batch[1], logits)
    exact = outer.gradient(val_loss, arch)
    for a, e in zip(analytic, exact):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=0.0, atol=0.05 * np.abs(e).max())

    first_order, _, _ = make_search(lr=0.5).arch_gradients(weight_batch, arch_batch)
    assert not all(np.allclose(f, a, rtol=0.05) for f, a in zip(first_order, analytic))


def test_fit_requires_build_search():
    space = SearchSpace(num_cells=1, channels=4, num_nodes=1, op_names=("skip_connect",))
    search = BilevelSearch(Supernet(space, 3))
    search.compile(keras.optimizers.SGD(0.1), keras.optimizers.Adam(0.1))
    with pytest.raises(ValueError, match="build_search"):
        search.make_train_function()


def test_building_the_search_releases_the_eager_builds_kernels(monkeypatch):
    """The supernet's eager build call leaves a cached kernel per op it ran (61 MiB of a C=8
    weight step's peak): build_search drops them once everything is built, and the
    search still trains."""
    from hmnas_keras import runtime
    from hmnas_keras.training import bilevel

    released = []

    def release():
        released.append(True)
        runtime.release_eager_kernels()

    monkeypatch.setattr(bilevel, "release_eager_kernels", release)
    search = make_search()
    assert len(released) == 1
    assert search.supernet.built and search.weight_optimizer.built
    data = tf.data.Dataset.from_tensors((batches(4, 0), batches(4, 1))).repeat(2)
    history = search.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
