"""Dice metrics: pooled over batches, per class and mean foreground, empty-class convention."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from highres3d.losses import DiceLoss
from highres3d.metrics import DiceScore, MeanForegroundDice, segmentation_metrics


def logits_for(segmentation: np.ndarray, num_classes: int) -> np.ndarray:
    """Logits whose argmax is ``segmentation``."""
    return (np.eye(num_classes)[segmentation] * 4.0 - 2.0).astype("float32")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def result(metric) -> float:
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_dice_accumulates_over_batches_as_one_pooled_volume():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, size=(4, 6, 6, 6))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 3, size=truth.shape))
    # Window 0: one voxel of class 1, missed. It weighs 1/4 in a mean of window scores
    # but one voxel in the pooled Dice.
    truth[0] = 0
    truth[0, 0, 0, 0] = 1
    pred[0] = 0
    per_class = [DiceScore(3, c) for c in range(3)]
    mean_fg = MeanForegroundDice(3)
    for start in (0, 1, 3):  # uneven batches: 1, 2, 1 windows
        stop = {0: 1, 1: 3, 3: 4}[start]
        for metric in (*per_class, mean_fg):
            metric.update_state(truth[start:stop, ..., None], logits_for(pred[start:stop], 3))
    expected = [dice(truth == c, pred == c) for c in range(3)]
    np.testing.assert_allclose([result(m) for m in per_class], expected, rtol=1e-6)
    assert result(mean_fg) == pytest.approx(np.mean(expected[1:]), rel=1e-6)
    # Not the mean of per-window scores.
    per_window = np.mean([dice(truth[i] == 1, pred[i] == 1) for i in range(4)])
    assert abs(per_window - expected[1]) > 0.1


def test_empty_class_has_no_score_and_reset_clears_the_state():
    # The evaluation's rule: a class absent from both masks has no score (NaN) and leaves the foreground mean.
    metric = DiceScore(3, 2)
    truth = np.zeros((1, 4, 4, 4), "int32")
    metric.update_state(truth, logits_for(truth, 3))
    assert np.isnan(result(metric))
    pred = truth.copy()
    pred[0, 0, 0, 0] = 2  # a false positive of class 2
    metric.update_state(truth, logits_for(pred, 3))
    assert result(metric) == 0.0
    metric.reset_state()
    assert np.isnan(result(metric))
    mean_fg = MeanForegroundDice(3)
    truth[0, 1:3] = 1
    mean_fg.update_state(truth, logits_for(truth, 3))  # class 1 perfect, class 2 absent
    assert result(mean_fg) == pytest.approx(1.0)


def test_sample_weight_masks_windows():
    truth = np.ones((2, 3, 3, 3), "int32")
    pred = np.stack([np.ones((3, 3, 3), "int32"), np.zeros((3, 3, 3), "int32")])
    metric = MeanForegroundDice(2)
    metric.update_state(truth, logits_for(pred, 2), sample_weight=np.array([1.0, 0.0]))
    assert result(metric) == pytest.approx(1.0)
    metric.reset_state()
    metric.update_state(truth, logits_for(pred, 2))
    assert result(metric) == pytest.approx(dice(truth == 1, pred == 1))


def test_metric_validation_and_names():
    with pytest.raises(ValueError, match="class_id"):
        DiceScore(2, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MeanForegroundDice(1)
    assert [m.name for m in segmentation_metrics(2)] == ["mean_foreground_dice"]
    names = [m.name for m in segmentation_metrics(3, class_names=["bg", "core", "edema"])]
    assert names == ["mean_foreground_dice", "dice_core", "dice_edema"]
    restored = DiceScore.from_config(DiceScore(4, 3).get_config())
    assert restored.class_id == 3 and restored.num_classes == 4


def test_metrics_in_compile_and_evaluate():
    inputs = keras.Input((None, None, None, 2))
    model = keras.Model(inputs, inputs)  # the "logits" are the input: a known prediction
    truth = np.random.default_rng(1).integers(0, 2, size=(3, 4, 4, 4))
    pred = truth.copy()
    pred[0] = 1 - pred[0]
    x = logits_for(pred, 2)
    model.compile(loss=DiceLoss(), metrics=[MeanForegroundDice(2), DiceScore(2, 0)])
    logs = model.evaluate(x, truth, batch_size=2, verbose=0, return_dict=True)
    assert logs["mean_foreground_dice"] == pytest.approx(dice(truth == 1, pred == 1), rel=1e-5)
    assert logs["dice_0"] == pytest.approx(dice(truth == 0, pred == 0), rel=1e-5)
