"""What the training models of the phases share: the loss, the weight step and evaluation.

`NetworkTrainer` is a Keras model that trains (some variables of) a network on
(images, labels) batches with `fit()`. The bilevel search, the masking and the
fine-tuning models subclass it and write their own `train_step`; the weight
step (SGD as in DARTS: global-norm clip, coupled L2 decay) and the
inference-mode `test_step` are here, once.
"""

import keras
import tensorflow as tf
from keras import ops

from hmnas_keras.runtime import own_frames_only


def cross_entropy(labels, logits):
    """Mean sparse categorical cross-entropy from logits."""
    return ops.mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


def _global_gradients(grads):
    """Sums per-replica gradients, so that clipping sees the whole batch's gradient."""
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync > 1:
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
    return grads


def replica_scale() -> float:
    """1 / replicas: optimizers sum what each replica passes, so each hands over its share."""
    return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync


def mixed_precision_optimizer(optimizer, mixed_precision: bool):
    """`optimizer`, wrapped in Keras' LossScaleOptimizer (dynamic loss scaling) under mixed
    precision, where float16 gradients would underflow."""
    if not mixed_precision:
        return optimizer
    return keras.optimizers.LossScaleOptimizer(optimizer, name=f"{optimizer.name}_loss_scale")


def loss_scale(optimizer):
    """The loss scale of a LossScaleOptimizer, else None."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    return optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale


def scaled_loss(loss, optimizer):
    """The loss to differentiate for `optimizer`'s variables (scaled under mixed precision)."""
    scale = loss_scale(optimizer)
    return loss if scale is None else loss * ops.cast(scale, loss.dtype)


def unscaled(grads, optimizer) -> list:
    """Gradients of `scaled_loss(loss, optimizer)` as gradients of `loss`."""
    scale = loss_scale(optimizer)
    return list(grads) if scale is None else [g / scale for g in grads]


def _fusable(optimizer) -> bool:
    """Whether `fused_apply` computes exactly what `optimizer.apply` would."""
    if type(optimizer) is keras.optimizers.SGD:
        plain = not optimizer.nesterov
    elif type(optimizer) is keras.optimizers.Adam:
        plain = not optimizer.amsgrad
    else:
        return False
    return (
        plain
        and optimizer.built
        and not optimizer.use_ema
        and optimizer.weight_decay is None
        and optimizer.clipnorm is None
        and optimizer.clipvalue is None
        and optimizer.global_clipnorm is None
        and optimizer.loss_scale_factor is None
        and optimizer.gradient_accumulation_steps is None
        and tf.distribute.get_strategy().num_replicas_in_sync == 1
    )


def fused_apply(optimizer, grads, variables) -> bool:
    """`optimizer.apply(grads, variables)` with one TensorFlow training op per variable.

    Keras' SGD and Adam update each variable with 5–10 separate ops (casts,
    products, reads, assignments); a supernet has hundreds of variables, and
    those ops were a third of the traced step. TensorFlow's fused kernels
    (ResourceApplyKerasMomentum, the same update as Keras' SGD; ResourceApplyAdam,
    Keras' Adam) compute the same update with the optimizer's own slot variables,
    so checkpoints are unchanged. Returns False, applying nothing, for what they do
    not cover (other optimizers, nesterov/amsgrad, clipping or decay options, EMA,
    gradient accumulation, several replicas): then call `optimizer.apply`.
    """
    if not _fusable(optimizer):
        return False
    dtype = "float32"
    if any(v.dtype != dtype for v in variables):
        return False
    learning_rate = tf.cast(optimizer.learning_rate, dtype)
    if type(optimizer) is keras.optimizers.SGD:
        momentum = tf.constant(optimizer.momentum, dtype)
        for grad, variable in zip(grads, variables, strict=True):
            if optimizer.momentum == 0:
                tf.raw_ops.ResourceApplyGradientDescent(
                    var=variable.handle, alpha=learning_rate, delta=grad
                )
                continue
            accumulator = optimizer.momentums[optimizer._get_variable_index(variable)]
            tf.raw_ops.ResourceApplyKerasMomentum(
                var=variable.handle,
                accum=accumulator.handle,
                lr=learning_rate,
                grad=grad,
                momentum=momentum,
            )
    else:
        step = tf.cast(optimizer.iterations + 1, dtype)
        beta_1, beta_2 = tf.constant(optimizer.beta_1, dtype), tf.constant(optimizer.beta_2, dtype)
        beta_1_power, beta_2_power = tf.pow(beta_1, step), tf.pow(beta_2, step)
        epsilon = tf.constant(optimizer.epsilon, dtype)
        for grad, variable in zip(grads, variables, strict=True):
            index = optimizer._get_variable_index(variable)
            tf.raw_ops.ResourceApplyAdam(
                var=variable.handle,
                m=optimizer._momentums[index].handle,
                v=optimizer._velocities[index].handle,
                beta1_power=beta_1_power,
                beta2_power=beta_2_power,
                lr=learning_rate,
                beta1=beta_1,
                beta2=beta_2,
                epsilon=epsilon,
                grad=grad,
            )
    optimizer.iterations.assign_add(1)
    return True


def apply_unscaled(optimizer, grads, variables, synchronized: bool = False) -> None:
    """`optimizer.apply` for gradients of the unscaled loss: each replica's share, or (if
    `synchronized`) the same on every replica. A LossScaleOptimizer gets them scaled back
    and skips the step (lowering its scale) if one is not finite; so that every replica
    judges the same gradients, shares are summed across replicas first."""
    scale = loss_scale(optimizer)
    if scale is not None:
        if not synchronized and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            grads = [g * replica_scale() for g in _global_gradients(grads)]
        grads = [g * scale for g in grads]
    elif fused_apply(optimizer, grads, variables):
        return
    optimizer.apply(grads, variables)


def clip_by_global_norm(grads, clip_norm: float) -> list:
    """`tf.clip_by_global_norm(grads, clip_norm)[0]`, the same values, without its
    Identity per gradient (a supernet has hundreds: graph nodes to trace and instantiate)."""
    norm = tf.linalg.global_norm(grads)
    scale = clip_norm * tf.minimum(1.0 / norm, tf.constant(1.0, norm.dtype) / clip_norm)
    scale = scale + (norm - norm)  # a norm that is not finite makes every gradient NaN
    return [g * tf.cast(scale, g.dtype) for g in grads]


def apply_weight_gradients(optimizer, grads, variables, weight_decay, grad_clip_norm):
    """One SGD-style update as in DARTS: global-norm clip, coupled L2 decay, apply.

    `grads` are those of `scaled_loss(loss, optimizer)`. Under a distribution
    strategy the per-replica gradients are summed first, so that the clip sees
    the global gradient; the optimizer then sums what each replica passes, so
    each hands it 1/replicas of the total.
    """
    scale = replica_scale()
    grads = _global_gradients(unscaled(grads, optimizer))
    if scale != 1.0:
        grads = [g * scale for g in grads]
    if grad_clip_norm > 0:
        grads = clip_by_global_norm(grads, grad_clip_norm)
    decay = {dtype: tf.constant(weight_decay, dtype) for dtype in {v.dtype for v in variables}}
    grads = [g + decay[v.dtype] * v.value for g, v in zip(grads, variables, strict=True)]  # 1 const
    if scale != 1.0:
        grads = [g * scale for g in grads]
    apply_unscaled(optimizer, grads, variables, synchronized=True)


class NetworkTrainer(keras.Model):
    """A Keras model that trains (some variables of) `network` on (images, labels) batches.

    Args:
        network: the network to train.
        weight_decay: L2 decay added to the weight gradients of `weight_step`
            (coupled, as in PyTorch's SGD).
        grad_clip_norm: global-norm clip of those gradients (0 disables).

    Subclasses write `train_step`; calling, the loss/accuracy metrics, the
    weight step and the inference-mode `test_step` are here.
    """

    def __init__(
        self, network: keras.Model, weight_decay: float = 0.0, grad_clip_norm: float = 0.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.network = network
        self.weight_decay = weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.loss_metric = keras.metrics.Mean(name="loss")
        self.accuracy_metric = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        return [self.loss_metric, self.accuracy_metric]

    def call(self, images, training=None):
        return self.network(images, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' TensorFlow trainer, under a strategy, builds the model from a batch it takes
        from the training iterator before the first step: with `steps_per_epoch` that batch
        is lost, and under MultiWorkerMirroredStrategy it reduces the batch across workers.
        Every phase builds its variables before `fit()`, so there is nothing to build."""
        if not self.built:
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def replica_function(self, step, whole_batch_metrics: bool = False, on_batch: bool = False):
        """`step(batch, *args) -> logs` as one traced call on the iterator's next batch
        (`args`: tensors passed on to `step`), or with `on_batch` on a batch it is given
        (one that several steps share).

        What Keras' own train and test functions do for one step, with public
        APIs: run `step` on every replica, then report the first replica's logs
        (Keras' own reduction of the logs fails for scalars under
        MultiWorkerMirroredStrategy). The metrics' variables are per replica:
        `whole_batch_metrics` reports instead each metric of the logs over every
        replica, as `evaluate()` must (fit() reads them so at each epoch's end).
        Its ops record only this package's frames as where they were made
        (`runtime.own_frames_only`: TensorFlow keeps them while the function lives).
        """
        strategy = self.distribute_strategy
        metrics = {m.name: m for m in self.metrics}

        def replica_step(*args):  # a strategy may run replicas in threads of their own
            with own_frames_only():
                return step(*args)

        if self.jit_compile:  # XLA compiles the step, not the iterator around it
            replica_step = tf.function(
                replica_step, jit_compile=True, reduce_retracing=True, autograph=False
            )

        @tf.function(reduce_retracing=True, autograph=False)
        def one_step(source, *args):
            with own_frames_only():
                batch = source if on_batch else next(source)
                logs = strategy.run(replica_step, args=(batch, *args))
                if whole_batch_metrics:
                    return {name: metrics[name].result() for name in logs}
                return {name: strategy.experimental_local_results(v)[0] for name, v in logs.items()}

        return one_step

    def share_first_replica_statistics(self) -> None:
        """Gives every replica the first replica's non-trainable variables (BatchNorm's moving
        statistics).

        Keras updates a replica's moving statistics from its own part of each batch
        and keeps them apart (aggregation "none"), so replicas drift apart; the
        checkpoint holds the first replica's, which every replica then evaluates with,
        as PyTorch's DistributedDataParallel broadcasts rank 0's buffers.
        """
        strategy = self.distribute_strategy
        if strategy.num_replicas_in_sync == 1:
            return
        if getattr(self, "_share_statistics", None) is None:
            variables = [v.value for v in self.network.non_trainable_variables]

            def share():
                context = tf.distribute.get_replica_context()
                first = tf.equal(context.replica_id_in_sync_group, 0)
                values = context.all_reduce(
                    tf.distribute.ReduceOp.SUM, [v * tf.cast(first, v.dtype) for v in variables]
                )
                for variable, value in zip(variables, values, strict=True):
                    variable.assign(value)

            self._share_statistics = tf.function(lambda: strategy.run(share), autograph=False)
        self._share_statistics()

    def evaluate(self, *args, **kwargs):
        """Keras `evaluate()` (also fit()'s validation), every replica with the first replica's
        moving statistics."""
        self.share_first_replica_statistics()
        return super().evaluate(*args, **kwargs)

    def make_train_function(self, force=False):
        if self.train_function is None or force:
            self.train_function = self.replica_function(self.train_step)
        return self.train_function

    def make_test_function(self, force=False):
        if self.test_function is None or force:
            self.test_function = self.replica_function(self.test_step, whole_batch_metrics=True)
        return self.test_function

    def update_metrics(self, loss, labels, logits) -> dict:
        """Adds a batch to the loss and accuracy; returns every metric's result."""
        self.loss_metric.update_state(loss)
        self.accuracy_metric.update_state(labels, logits)
        return {m.name: m.result() for m in self.metrics}

    def weight_step(self, images, labels, variables, optimizer):
        """Trains `variables` one step on the training-mode loss; updates the metrics."""
        with tf.GradientTape() as tape:
            logits = self.network(images, training=True)
            loss = cross_entropy(labels, logits)
            scaled = scaled_loss(loss, optimizer)
        apply_weight_gradients(
            optimizer,
            tape.gradient(scaled, variables),
            variables,
            self.weight_decay,
            self.grad_clip_norm,
        )
        return self.update_metrics(loss, labels, logits)

    def test_step(self, data):
        """Inference-mode loss and accuracy (the only metrics `evaluate()` reports).

        The loss is averaged over images, not batches: a partial last batch counts
        for the images it holds. `data` may carry per-image weights as a third
        element (0 for the padding `distributed.evaluation_data` adds).
        """
        images, labels, *weights = data
        weights = weights[0] if weights else None
        logits = self.network(images, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        self.loss_metric.update_state(losses, sample_weight=weights)
        self.accuracy_metric.update_state(labels, logits, sample_weight=weights)
        return {m.name: m.result() for m in (self.loss_metric, self.accuracy_metric)}
