"""Dice metrics for training and validation windows, as stateful Keras 3 metrics.

The metrics take the same inputs as the losses (integer labels ``(B, X, Y, Z)``
or ``(B, X, Y, Z, 1)``; logits or probabilities ``(B, X, Y, Z, C)``), turn the
prediction into a hard segmentation with ``argmax`` and accumulate, per class,
the overlap and the two volumes over every batch seen since the last reset.
The result is therefore the Dice of all windows pooled together (as if they
were one image), not a mean of per-window Dice scores, and it does not depend
on how the windows were batched.

A class that is absent from both the labels and the predictions of everything
seen so far has no Dice (NaN) and is left out of :class:`MeanForegroundDice`,
the rule :mod:`highres3d.evaluation` applies by default (nnU-Net's), so
validation windows and whole volumes are scored alike.

This module imports no TensorFlow.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

PACKAGE = "highres3d"


class _DiceAccumulator(keras.metrics.Metric):
    """Accumulates per-class intersection and volumes of hard segmentations."""

    def __init__(self, num_classes: int, name: str, dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        shape = (self.num_classes,)
        self.intersection = self.add_variable(shape=shape, initializer="zeros", name="intersection", dtype="float32")
        self.predicted = self.add_variable(shape=shape, initializer="zeros", name="predicted", dtype="float32")
        self.reference = self.add_variable(shape=shape, initializer="zeros", name="reference", dtype="float32")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Adds a batch.

        Args:
            y_true: integer labels ``(B, X, Y, Z)`` or ``(B, X, Y, Z, 1)``.
            y_pred: logits or probabilities ``(B, X, Y, Z, C)``.
            sample_weight: optional weights broadcastable to the labels
                ``(B, X, Y, Z)``, e.g. per window ``(B,)`` or a voxel mask.
        """
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, axis=-1)
        labels = ops.cast(y_true, "int32")
        predicted_labels = ops.argmax(y_pred, axis=-1)
        g = ops.one_hot(ops.reshape(labels, (-1,)), self.num_classes, dtype="float32")
        p = ops.one_hot(ops.reshape(predicted_labels, (-1,)), self.num_classes, dtype="float32")
        if sample_weight is not None:
            weight = ops.cast(ops.convert_to_tensor(sample_weight), "float32")
            while len(weight.shape) < len(labels.shape):
                weight = ops.expand_dims(weight, -1)
            weight = ops.reshape(ops.broadcast_to(weight, ops.shape(labels)), (-1, 1))
            g, p_weighted = g * weight, p * weight
        else:
            p_weighted = p
        self.intersection.assign_add(ops.sum(g * p, axis=0))
        self.predicted.assign_add(ops.sum(p_weighted, axis=0))
        self.reference.assign_add(ops.sum(g, axis=0))

    def per_class_dice(self) -> Any:
        """Dice of every class from the accumulated counts, shape ``(C,)``; NaN for a class never seen."""
        total = self.predicted + self.reference
        empty = ops.equal(total, 0.0)
        safe_total = ops.where(empty, ops.ones_like(total), total)
        return ops.where(empty, ops.full_like(total, float("nan")), 2.0 * self.intersection / safe_total)

    def reset_state(self) -> None:
        for variable in (self.intersection, self.predicted, self.reference):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceScore(_DiceAccumulator):
    """Dice of one class, accumulated over batches.

    Args:
        num_classes: number of classes of the prediction.
        class_id: the class whose Dice is reported.
        name: defaults to ``dice_<class_id>``.

    Example:
        >>> model.compile(loss=DiceLoss(), metrics=[MeanForegroundDice(2), DiceScore(2, 1)])
    """

    def __init__(self, num_classes: int, class_id: int, name: str | None = None, dtype: Any = None) -> None:
        super().__init__(num_classes, name=name or f"dice_{int(class_id)}", dtype=dtype)
        if not 0 <= int(class_id) < self.num_classes:
            raise ValueError(f"class_id must be in [0, {self.num_classes}), got {class_id}")
        self.class_id = int(class_id)

    def result(self) -> Any:
        return self.per_class_dice()[self.class_id]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(class_id=self.class_id)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class MeanForegroundDice(_DiceAccumulator):
    """Mean Dice over the foreground classes ``1 .. C-1``, accumulated over batches.

    With two classes this is the Dice of the structure (hippocampus, tumour core).

    Args:
        num_classes: number of classes of the prediction (at least 2).
        name: defaults to ``mean_foreground_dice``.
    """

    def __init__(self, num_classes: int, name: str = "mean_foreground_dice", dtype: Any = None) -> None:
        super().__init__(num_classes, name=name, dtype=dtype)
        if self.num_classes < 2:
            raise ValueError("MeanForegroundDice needs at least 2 classes (background + foreground)")

    def result(self) -> Any:
        """Mean over the foreground classes seen; NaN when none was."""
        dice = self.per_class_dice()[1:]
        seen = ops.logical_not(ops.isnan(dice))
        count = ops.sum(ops.cast(seen, "float32"))
        total = ops.sum(ops.where(seen, dice, ops.zeros_like(dice)))
        return ops.where(count > 0, total / ops.maximum(count, 1.0), float("nan"))


def segmentation_metrics(num_classes: int, class_names: Sequence[str] | None = None) -> list[keras.metrics.Metric]:
    """The standard metric set: mean foreground Dice, then the Dice of each foreground class.

    Args:
        num_classes: number of classes, background included.
        class_names: optional names for classes ``0 .. C-1``; metric names become
            ``dice_<name>`` instead of ``dice_<index>``.
    """
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries for {num_classes} classes")
    metrics: list[keras.metrics.Metric] = [MeanForegroundDice(num_classes)]
    if num_classes > 2:
        for c in range(1, num_classes):
            name = f"dice_{class_names[c]}" if class_names is not None else None
            metrics.append(DiceScore(num_classes, c, name=name))
    return metrics
