"""Losses against NiftyNet's unit-test values (niftynet.md section 10) and Keras behaviour."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from highres3d.errors import ConfigError
from highres3d.losses import (
    CrossEntropyLoss,
    DiceCELoss,
    DiceLoss,
    GeneralisedDiceLoss,
    cross_entropy_loss,
    dice_loss,
    generalised_dice_loss,
    get_loss,
)


def batch(logits, labels):
    """NiftyNet's tests feed (V, C) / (V,) per image; add batch and two singleton spatial axes."""
    logits = np.asarray(logits, dtype="float32")
    labels = np.asarray(labels)
    return labels.reshape(1, -1, 1, 1), logits.reshape(1, -1, 1, 1, logits.shape[-1])


def value(x) -> float:
    return float(np.asarray(keras.ops.convert_to_numpy(x)).mean())


PERFECT = ([[0, 10], [10, 0], [10, 0], [10, 0]], [1, 0, 0, 0])


def test_dice_perfect_prediction_is_zero():
    y, p = batch(*PERFECT)
    assert value(DiceLoss()(y, p)) == pytest.approx(0.0, abs=1e-5)


def test_dice_with_weight_map_is_zero():
    y, p = batch(*PERFECT)
    assert value(dice_loss(y, p, weight_map=np.array([[1, 1, 0, 0]], "float32"))) == pytest.approx(0.0, abs=1e-4)


def test_dice_wrong_prediction_is_one():
    # eps / (1 + eps) per class remains, so the loss is 1 - 1e-5 rather than exactly 1.
    y, p = batch([[0, 100]], [0])
    assert value(DiceLoss()(y, p)) == pytest.approx(1.0, abs=2e-5)


def test_dice_is_averaged_per_image_then_over_the_batch():
    # NiftyNet issue #22 test input; NiftyNet 0.5 (the thesis' version) adds eps to the
    # numerator too, so image 1 scores ~1 (its empty class 1 counts as eps/eps) and image 2 ~0.1633.
    logits = np.array([[[10.0, 0, 0], [0, 0, 10]], [[-10, 0, 0], [0, 0, 0]]], "float32").reshape(2, 2, 1, 1, 3)
    labels = np.array([[0, 2], [0, 1]]).reshape(2, 2, 1, 1, 1)
    got = value(DiceLoss()(labels, logits))
    assert got == pytest.approx(1 - 0.5816, abs=1e-4)

    def reference(image_logits, image_labels):
        p = np.exp(image_logits) / np.exp(image_logits).sum(-1, keepdims=True)
        g = np.eye(3)[image_labels]
        d = (2 * (p * g).sum(0) + 1e-5) / ((p**2).sum(0) + g.sum(0) + 1e-5)
        return 1 - d.mean()

    per_image = [reference(logits[i].reshape(2, 3), labels[i].reshape(2)) for i in range(2)]
    assert got == pytest.approx(np.mean(per_image), abs=1e-6)
    # Pooling the batch before the Dice would give a different number.
    pooled = reference(logits.reshape(4, 3), labels.reshape(4))
    assert abs(pooled - got) > 0.05


def test_dice_missing_class_with_probabilities_is_zero():
    y, p = batch([[1.0, 0.0], [1.0, 0.0]], [0, 0])
    assert value(DiceLoss(from_logits=False)(y, p)) == pytest.approx(0.0, abs=1e-6)
    assert value(DiceLoss(squared=False, from_logits=False)(y, p)) == pytest.approx(0.0, abs=1e-6)


def test_dice_ns_perfect_and_wrong():
    y, p = batch(*PERFECT)
    assert value(get_loss("Dice_NS")(y, p)) == pytest.approx(0.0, abs=1e-4)
    y, p = batch([[0, 100]], [0])
    assert value(get_loss("dice_ns")(y, p)) == pytest.approx(1.0, abs=2e-5)


def test_dice_plus_xent_matches_niftynet_up_to_its_constant():
    # NiftyNet DicePlusXEnt = CE - mean_c Dice_NS; ours is CE + (1 - mean_c Dice_NS).
    logits = [[0, 9999, 9999], [9999, 0, 0], [0, 9999, 9999], [9999, 0, 0]]
    y, p = batch(logits, [2, 0, 1, 0])
    got = value(get_loss("DicePlusXEnt")(y, p)) - 1.0
    assert got == pytest.approx(0.5 * np.log(2) - 2.0 / 3.0, abs=1e-3)
    y, p = batch([[0, 0, 9999], [9999, 0, 0], [0, 9999, 0], [9999, 0, 0]], [2, 0, 1, 0])
    assert value(get_loss("DicePlusXEnt")(y, p)) - 1.0 == pytest.approx(-1.0, abs=1e-3)


def test_cross_entropy_values():
    y, p = batch([[0, 1], [2, 0]], [1, 0])
    expected = -0.5 * (np.log(np.e / (1 + np.e)) + np.log(np.e**2 / (1 + np.e**2)))
    assert value(CrossEntropyLoss()(y, p)) == pytest.approx(expected, rel=1e-6)
    weighted = value(cross_entropy_loss(y, p, weight_map=np.array([[1.0, 2.0]], "float32")))
    expected_weighted = -0.5 * (2 / 3 * np.log(np.e / (1 + np.e)) + 4 / 3 * np.log(np.e**2 / (1 + np.e**2)))
    assert weighted == pytest.approx(expected_weighted, rel=1e-6)
    # Class weights giving the same voxel weights: voxel 0 has class 1 (weight 1), voxel 1 class 0 (weight 2).
    by_class = value(CrossEntropyLoss(class_weights=[2.0, 1.0])(y, p))
    assert by_class == pytest.approx(weighted, rel=1e-6)


def test_generalised_dice_regressions():
    y, p = batch(*PERFECT)
    assert value(GeneralisedDiceLoss()(y, p)) == pytest.approx(0.0, abs=1e-4)
    # NiftyNet's 'Uniform' test with weight_map = labels.
    got = generalised_dice_loss(y, p, type_weight="uniform", weight_map=np.array([[1, 0, 0, 0]], "float32"))
    assert value(got) == pytest.approx(0.3333, abs=1e-4)
    with pytest.raises(ValueError, match="type_weight"):
        GeneralisedDiceLoss(type_weight="unknown")


def test_generalised_dice_gives_an_absent_class_the_largest_weight_and_stays_finite():
    logits = np.array([[5, 0, 0], [0, 5, 0], [0, 5, 0]], "float32")
    y, p = batch(logits, [0, 1, 1])  # class 2 is absent from the labels
    got = value(GeneralisedDiceLoss()(y, p))
    # NiftyNet's GDSC: w = 1/ref_vol^2, infinite weights -> largest finite weight,
    # denominator sum_c w_c max(S_c + R_c, 1).
    prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = np.eye(3)[[0, 1, 1]]
    ref, seg, inter = g.sum(0), prob.sum(0), (g * prob).sum(0)
    with np.errstate(divide="ignore"):
        w = 1.0 / ref**2
    w[np.isinf(w)] = w[np.isfinite(w)].max()
    expected = 1 - 2 * (w * inter).sum() / (w * np.maximum(seg + ref, 1)).sum()
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-5)


def test_labels_with_trailing_channel_axis_and_class_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4, 4))
    for loss in (DiceLoss(), GeneralisedDiceLoss(), CrossEntropyLoss(), DiceCELoss()):
        assert value(loss(labels, logits)) == pytest.approx(value(loss(labels[..., None], logits)), rel=1e-6)
    # Weight only class 1: the loss is 1 - Dice of class 1.
    per_class = DiceLoss(class_weights=[0.0, 1.0, 0.0])(labels, logits)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    g = labels == 1
    d1 = [(2 * (p[i, ..., 1] * g[i]).sum() + 1e-5) / ((p[i, ..., 1] ** 2).sum() + g[i].sum() + 1e-5) for i in range(2)]
    assert value(per_class) == pytest.approx(1 - np.mean(d1), rel=1e-5)
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        DiceLoss(class_weights=[1, 1])(labels, logits)


def test_one_hot_labels_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="integer class maps"):
        DiceLoss()(np.zeros((1, 2, 2, 2, 3)), np.zeros((1, 2, 2, 2, 3), "float32"))


def test_dice_ce_is_the_weighted_sum_of_its_terms():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 4, 4, 2)).astype("float32")
    labels = rng.integers(0, 2, size=(2, 4, 4, 4))
    combined = value(DiceCELoss(dice_weight=0.3, ce_weight=2.0)(labels, logits))
    assert combined == pytest.approx(0.3 * value(DiceLoss()(labels, logits)) + 2.0 * value(CrossEntropyLoss()(labels, logits)), rel=1e-5)


@pytest.mark.parametrize(
    "loss",
    [DiceLoss(squared=False, epsilon=1e-3), GeneralisedDiceLoss(type_weight="simple"), CrossEntropyLoss(class_weights=[1, 3]), DiceCELoss(ce_weight=0.5)],
)
def test_losses_serialise(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(1, 4, 4, 4, 2)).astype("float32")
    labels = rng.integers(0, 2, size=(1, 4, 4, 4))
    assert value(restored(labels, logits)) == pytest.approx(value(loss(labels, logits)))


def test_get_loss_names_and_errors():
    assert isinstance(get_loss("Dice"), DiceLoss) and get_loss("dice").squared
    assert isinstance(get_loss("GDSC", type_weight="uniform"), GeneralisedDiceLoss)
    assert isinstance(get_loss("cross-entropy"), CrossEntropyLoss)
    assert get_loss("dice_ce", ce_weight=0.5).ce_weight == 0.5
    with pytest.raises(ConfigError, match=r"Unknown loss 'dcie'.*Did you mean: dice"):
        get_loss("dcie")
    with pytest.raises(ConfigError, match="Known losses: dice, dice_ns"):
        get_loss("hausdorff")
    with pytest.raises(ConfigError, match="does not accept"):
        get_loss("dice", gamma=2)


def test_dice_loss_trains_a_tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=DiceLoss())
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 6, 1)).astype("float32")
    y = (x[..., 0] > 0.3).astype("int32")
    history = model.fit(x, y, epochs=15, batch_size=2, verbose=0)
    assert history.history["loss"][-1] < 0.5 * history.history["loss"][0]
