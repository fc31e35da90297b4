"""Discriminative learning rates: one optimizer per layer group, each at its own rate (Howard & Ruder 2018)."""
import numpy as np
import pytest

from highres3d import transfer
from highres3d.errors import ConfigError
from highres3d.models import GROUPS, HighResNet3D, is_state_variable, layer_group, named_weights
from highres3d.training.optimizers import GroupOptimizer


def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    model = HighResNet3D(in_channels=1, num_classes=2, width_multiplier=0.25)
    model(np.zeros((1, 8, 8, 8, 1), "float32"))
    return model


def one_step(model, optimizer, gradient_scale=None):
    """One optimizer step on a fixed batch; returns each group's update as one flat vector."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 8, 8, 8, 1)).astype("float32")
    labels = (images[..., 0] > 0).astype("int32")
    before = {p: np.array(v) for p, v in named_weights(model).items() if not is_state_variable(p)}
    trainable = model.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    grads = tape.gradient(loss, trainable)
    if gradient_scale is not None:
        grads = [g * gradient_scale[layer_group(v.path)] for g, v in zip(grads, trainable)]
    optimizer.apply_gradients(zip(grads, trainable))
    after = {p: np.array(v) for p, v in named_weights(model).items() if not is_state_variable(p)}
    return {g: np.concatenate([(after[p] - before[p]).ravel() for p in before if layer_group(p) == g]) for g in GROUPS}


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def test_decay_gives_ulmfit_multipliers():
    rates = transfer.learning_rate_multipliers(decay=2.6)
    assert list(rates) == list(GROUPS)
    np.testing.assert_allclose([rates[g] for g in GROUPS], [2.6 ** -d for d in (5, 4, 3, 2, 1, 0)])
    explicit = transfer.learning_rate_multipliers({"conv_2": 1.0, "res_3": 0.1})
    assert explicit["res_3"] == 0.1 and explicit["conv_0"] == 1.0
    with pytest.raises(ConfigError, match="not both"):
        transfer.learning_rate_multipliers({"conv_2": 1.0}, 2.6)
    with pytest.raises(ConfigError, match="unknown layer group"):
        transfer.learning_rate_multipliers({"res3": 1.0})


def test_adam_update_norms_are_in_the_ratio_of_the_group_rates():
    # Adam's first step moves every parameter by lr * g / (|g| + eps) ~ lr: the RMS update of
    # a group is its rate, so the ratios between groups are the ratios of the rates.
    model = tiny_model()
    optimizer = GroupOptimizer(model, "adam", 1e-3)
    rates = transfer.learning_rate_multipliers(decay=2.6)
    optimizer.set_learning_rates(1e-3, rates)
    updates = one_step(model, optimizer)
    top = rms(updates["conv_2"])
    for group in GROUPS:
        np.testing.assert_allclose(rms(updates[group]) / top, rates[group], rtol=0.02, err_msg=group)


def test_scaling_gradients_does_not_change_adam_updates():
    # Why the rates need one optimizer per group: Adam normalises the gradient away.
    model = tiny_model()
    optimizer = GroupOptimizer(model, "adam", 1e-3, per_group=False)
    optimizer.set_learning_rates(1e-3)
    scaled = one_step(model, optimizer, gradient_scale=transfer.learning_rate_multipliers(decay=2.6))
    for group in GROUPS:
        np.testing.assert_allclose(rms(scaled[group]), 1e-3, rtol=0.02, err_msg=group)


def test_sgd_updates_are_the_plain_updates_times_the_group_rate():
    # Both models start equal (same seed), so their first gradients are equal.
    rates = transfer.learning_rate_multipliers({"conv_0": 0.01, "res_1": 0.1, "res_2": 0.25, "res_3": 0.5})
    per_group, plain = tiny_model(), tiny_model()
    a = GroupOptimizer(per_group, "sgd", 0.1)
    a.set_learning_rates(0.1, rates)
    b = GroupOptimizer(plain, "sgd", 0.1, per_group=False)
    b.set_learning_rates(0.1)
    ua, ub = one_step(per_group, a), one_step(plain, b)
    for group in GROUPS:
        np.testing.assert_allclose(ua[group], ub[group] * rates[group], rtol=1e-3, atol=1e-7, err_msg=group)  # float32 w1 - w0


def test_frozen_groups_keep_their_optimizer_untouched():
    model = tiny_model()
    optimizer = GroupOptimizer(model, "adam", 1e-3)
    transfer.freeze(model, "all_but_last")
    updates = one_step(model, optimizer)
    assert all(not np.any(updates[g]) for g in GROUPS[:-1]) and np.any(updates["conv_2"])
    iterations = {g: int(np.asarray(opt.iterations)) for g, opt in optimizer.optimizers.items()}
    assert iterations == {**{g: 0 for g in GROUPS[:-1]}, "conv_2": 1}
    # the state holds every group's slots, whatever is frozen, so checkpoints fit every stage
    assert len(optimizer.variables) == sum(len(opt.variables) for opt in optimizer.optimizers.values())
