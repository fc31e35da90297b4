"""Segmentation losses, NiftyNet-compatible, as serialisable Keras 3 losses.

All losses take integer labels ``(B, X, Y, Z)`` or ``(B, X, Y, Z, 1)`` and
logits ``(B, X, Y, Z, C)`` (``from_logits=False`` accepts probabilities). Each
image's loss is computed over its own voxels and the batch loss is the mean of
the image losses, which is what NiftyNet's ``LossFunction`` does with
``tf.map_fn`` (NiftyNet issue #22): a window without foreground does not dilute
the Dice of the other windows of the batch.

======================  =========================================================
``dice``                NiftyNet ``Dice`` (V-Net, squared denominator):
                        ``D_c = (2 sum p g + eps) / (sum p^2 + sum g + eps)``,
                        ``eps = 1e-5``, loss ``1 - mean_c D_c`` over all classes,
                        background included.
``dice_ns``             NiftyNet ``Dice_NS``: the same with ``sum p`` (no square).
``generalised_dice``    Sudre et al. 2017 / NiftyNet ``GDSC``: class weights
                        ``1 / ref_vol^2`` (``Square``), ``1 / ref_vol`` or 1.
``cross_entropy``       softmax cross-entropy, mean over voxels (NiftyNet ``CrossEntropy``).
``dice_ce``             Dice + cross-entropy, with term weights.
======================  =========================================================

Every loss accepts ``class_weights`` (one weight per class): the Dice losses
average the per-class scores with these weights, cross-entropy weights each
voxel by the weight of its true class.

The functional forms (:func:`dice_loss`, ...) also take a voxel ``weight_map``
like NiftyNet's losses. This module imports no TensorFlow.
"""
from __future__ import annotations

import difflib
import typing
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from highres3d.config import LossName
from highres3d.errors import ConfigError

PACKAGE = "highres3d"
NIFTYNET_DICE_EPSILON = 1e-5


# --------------------------------------------------------------------------- helpers


def _flatten(y_true: Any, y_pred: Any) -> tuple[Any, Any, int]:
    """Labels (B, V) int32 and predictions (B, V, C)."""
    y_pred = ops.convert_to_tensor(y_pred)
    num_classes = y_pred.shape[-1]
    if num_classes is None:
        raise ValueError("The class axis of the prediction must have a static size.")
    y_true = ops.convert_to_tensor(y_true)
    if len(y_true.shape) == len(y_pred.shape):
        if y_true.shape[-1] not in (1, None):
            raise ValueError(
                f"Labels must be integer class maps (B, X, Y, Z) or (B, X, Y, Z, 1); got shape {tuple(y_true.shape)}. "
                "One-hot labels are not accepted: pass argmax(labels, -1)."
            )
        y_true = ops.squeeze(y_true, axis=-1)
    batch = ops.shape(y_pred)[0]
    labels = ops.reshape(ops.cast(y_true, "int32"), (batch, -1))
    predictions = ops.reshape(y_pred, (batch, -1, num_classes))
    return labels, predictions, int(num_classes)


def _probabilities(predictions: Any, from_logits: bool) -> Any:
    predictions = ops.cast(predictions, "float32")
    return ops.softmax(predictions, axis=-1) if from_logits else predictions


def _flat_weight_map(weight_map: Any, batch: Any) -> Any:
    weight_map = ops.cast(ops.convert_to_tensor(weight_map), "float32")
    return ops.reshape(weight_map, (batch, -1, 1))


def _class_weight_vector(class_weights: Sequence[float] | None, num_classes: int) -> Any:
    if class_weights is None:
        return None
    if len(class_weights) != num_classes:
        raise ValueError(f"class_weights has {len(class_weights)} entries but the prediction has {num_classes} classes")
    return ops.convert_to_tensor([float(w) for w in class_weights], dtype="float32")


def _weighted_class_mean(scores: Any, class_weights: Any) -> Any:
    """Mean over the last axis, optionally weighted per class."""
    if class_weights is None:
        return ops.mean(scores, axis=-1)
    return ops.sum(scores * class_weights, axis=-1) / ops.sum(class_weights)


# --------------------------------------------------------------------------- functional forms


def dice_score_per_class(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = True,
    squared: bool = True,
    epsilon: float = NIFTYNET_DICE_EPSILON,
    weight_map: Any = None,
) -> Any:
    """Soft Dice score per image and class, shape ``(B, C)``.

    ``(2 sum(p g w) + eps) / (sum(p^2 w) + sum(g w) + eps)`` with ``p^2`` replaced by
    ``p`` when ``squared=False``. A class absent from both the label and the
    prediction scores ``eps / eps = 1``, as in NiftyNet.
    """
    labels, predictions, num_classes = _flatten(y_true, y_pred)
    p = _probabilities(predictions, from_logits)
    g = ops.one_hot(labels, num_classes, dtype="float32")
    if weight_map is not None:
        w = _flat_weight_map(weight_map, ops.shape(p)[0])
        pw, gw = p * w, g * w
    else:
        pw, gw = p, g
    numerator = 2.0 * ops.sum(pw * g, axis=1) + epsilon
    prediction_volume = ops.sum(pw * p, axis=1) if squared else ops.sum(pw, axis=1)
    denominator = prediction_volume + ops.sum(gw, axis=1) + epsilon
    return numerator / denominator


def dice_loss(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = True,
    squared: bool = True,
    epsilon: float = NIFTYNET_DICE_EPSILON,
    class_weights: Sequence[float] | None = None,
    weight_map: Any = None,
) -> Any:
    """NiftyNet's ``Dice`` loss per image, shape ``(B,)``: ``1 - mean_c D_c``."""
    scores = dice_score_per_class(
        y_true, y_pred, from_logits=from_logits, squared=squared, epsilon=epsilon, weight_map=weight_map
    )
    return 1.0 - _weighted_class_mean(scores, _class_weight_vector(class_weights, scores.shape[-1]))


def generalised_dice_loss(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = True,
    type_weight: str = "square",
    class_weights: Sequence[float] | None = None,
    weight_map: Any = None,
) -> Any:
    """Generalised Dice loss (Sudre et al., DLMIA 2017) per image, shape ``(B,)``.

    Follows NiftyNet's ``GDSC``: class weights ``1/ref_vol^2`` (``square``),
    ``1/ref_vol`` (``simple``) or 1 (``uniform``), optionally multiplied by
    ``class_weights``; classes absent from the label get the largest finite
    weight of the image; the denominator is ``sum_c w_c max(S_c + R_c, 1)``.
    """
    kind = type_weight.lower()
    if kind not in ("square", "simple", "uniform"):
        raise ValueError(f"type_weight must be 'square', 'simple' or 'uniform', got {type_weight!r}")
    labels, predictions, num_classes = _flatten(y_true, y_pred)
    p = _probabilities(predictions, from_logits)
    g = ops.one_hot(labels, num_classes, dtype="float32")
    if weight_map is not None:
        w = _flat_weight_map(weight_map, ops.shape(p)[0])
        p_w, g_w = p * w, g * w
    else:
        p_w, g_w = p, g
    ref_vol = ops.sum(g_w, axis=1)
    intersect = ops.sum(g_w * p, axis=1)
    seg_vol = ops.sum(p_w, axis=1)
    present = ref_vol > 0
    safe_ref = ops.where(present, ref_vol, ops.ones_like(ref_vol))
    if kind == "square":
        weights = 1.0 / ops.square(safe_ref)
    elif kind == "simple":
        weights = 1.0 / safe_ref
    else:
        weights = ops.ones_like(ref_vol)
    finite_max = ops.max(ops.where(present, weights, ops.zeros_like(weights)), axis=-1, keepdims=True)
    weights = ops.where(present, weights, ops.broadcast_to(finite_max, ops.shape(weights)))
    extra = _class_weight_vector(class_weights, num_classes)
    if extra is not None:
        weights = weights * extra
    numerator = 2.0 * ops.sum(weights * intersect, axis=-1)
    denominator = ops.sum(weights * ops.maximum(seg_vol + ref_vol, 1.0), axis=-1)
    score = numerator / denominator
    # All weights zero (nothing present anywhere) gives 0/0: score it as agreement.
    score = ops.where(ops.isnan(score), ops.ones_like(score), score)
    return 1.0 - score


def cross_entropy_loss(
    y_true: Any,
    y_pred: Any,
    *,
    from_logits: bool = True,
    class_weights: Sequence[float] | None = None,
    weight_map: Any = None,
) -> Any:
    """Softmax cross-entropy per image, shape ``(B,)``: the (weighted) mean over voxels.

    With weights ``w_v`` (``class_weights[label_v]`` times ``weight_map``) the
    image loss is ``sum_v w_v CE_v / max(sum_v w_v, 1e-6)``, NiftyNet's weighted form.
    """
    labels, predictions, num_classes = _flatten(y_true, y_pred)
    predictions = ops.cast(predictions, "float32")
    voxel_loss = ops.sparse_categorical_crossentropy(labels, predictions, from_logits=from_logits)
    weights = None
    extra = _class_weight_vector(class_weights, num_classes)
    if extra is not None:
        weights = ops.take(extra, labels)
    if weight_map is not None:
        voxel_weights = ops.reshape(ops.cast(ops.convert_to_tensor(weight_map), "float32"), ops.shape(labels))
        weights = voxel_weights if weights is None else weights * voxel_weights
    if weights is None:
        return ops.mean(voxel_loss, axis=-1)
    return ops.sum(voxel_loss * weights, axis=-1) / ops.maximum(ops.sum(weights, axis=-1), 1e-6)


# --------------------------------------------------------------------------- Keras losses


class _SegmentationLoss(keras.losses.Loss):
    """Base: per-image loss values ``(B,)``; Keras reduces them to the batch mean."""

    def __init__(
        self,
        from_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(from_logits=self.from_logits, class_weights=self.class_weights)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceLoss(_SegmentationLoss):
    """NiftyNet's Dice loss (``loss_type = Dice``, the thesis' loss).

    Per image ``1 - mean_c (2 sum p g + eps) / (sum p^2 + sum g + eps)`` over all
    classes including the background, then the batch mean.

    Args:
        squared: square the predictions in the denominator (NiftyNet ``Dice``);
            ``False`` gives ``Dice_NS``.
        epsilon: smoothing added to numerator and denominator (NiftyNet: 1e-5).
        from_logits: apply a softmax to the predictions first.
        class_weights: per-class weights of the class mean (e.g. ``[0, 1]`` to
            ignore the background).
    """

    def __init__(
        self,
        squared: bool = True,
        epsilon: float = NIFTYNET_DICE_EPSILON,
        from_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "dice_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, class_weights, reduction, name, dtype)
        self.squared = bool(squared)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return dice_loss(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            squared=self.squared,
            epsilon=self.epsilon,
            class_weights=self.class_weights,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(squared=self.squared, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class GeneralisedDiceLoss(_SegmentationLoss):
    """Generalised Dice loss (Sudre et al. 2017), NiftyNet's ``GDSC``.

    Args:
        type_weight: ``"square"`` (1/volume^2, default), ``"simple"`` (1/volume)
            or ``"uniform"``.
        from_logits: apply a softmax to the predictions first.
        class_weights: extra per-class factors on the volume weights.
    """

    def __init__(
        self,
        type_weight: str = "square",
        from_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "generalised_dice_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, class_weights, reduction, name, dtype)
        if type_weight.lower() not in ("square", "simple", "uniform"):
            raise ValueError(f"type_weight must be 'square', 'simple' or 'uniform', got {type_weight!r}")
        self.type_weight = type_weight.lower()

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return generalised_dice_loss(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            type_weight=self.type_weight,
            class_weights=self.class_weights,
        )

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(type_weight=self.type_weight)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class CrossEntropyLoss(_SegmentationLoss):
    """Softmax cross-entropy over voxels for integer labels (NiftyNet ``CrossEntropy``).

    Args:
        from_logits: the predictions are logits (default) rather than probabilities.
        class_weights: weight of each voxel by its true class; the image loss is
            the weighted mean.
    """

    def __init__(
        self,
        from_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "cross_entropy_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, class_weights, reduction, name, dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return cross_entropy_loss(y_true, y_pred, from_logits=self.from_logits, class_weights=self.class_weights)


@keras.saving.register_keras_serializable(package=PACKAGE)
class DiceCELoss(_SegmentationLoss):
    """``dice_weight * Dice + ce_weight * cross-entropy``, both per image.

    With ``squared=False`` this equals NiftyNet's ``DicePlusXEnt`` plus 1
    (NiftyNet adds ``-Dice`` rather than ``1 - Dice``), so the gradients are the same.

    Args:
        dice_weight: factor on the Dice term.
        ce_weight: factor on the cross-entropy term.
        squared: squared Dice denominator (NiftyNet ``Dice``) or not (``Dice_NS``).
        epsilon: Dice smoothing.
        from_logits: the predictions are logits.
        class_weights: passed to both terms.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        squared: bool = True,
        epsilon: float = NIFTYNET_DICE_EPSILON,
        from_logits: bool = True,
        class_weights: Sequence[float] | None = None,
        reduction: str = "sum_over_batch_size",
        name: str = "dice_ce_loss",
        dtype: Any = None,
    ) -> None:
        super().__init__(from_logits, class_weights, reduction, name, dtype)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.squared = bool(squared)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        dice = dice_loss(
            y_true,
            y_pred,
            from_logits=self.from_logits,
            squared=self.squared,
            epsilon=self.epsilon,
            class_weights=self.class_weights,
        )
        ce = cross_entropy_loss(y_true, y_pred, from_logits=self.from_logits, class_weights=self.class_weights)
        return self.dice_weight * dice + self.ce_weight * ce

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(dice_weight=self.dice_weight, ce_weight=self.ce_weight, squared=self.squared, epsilon=self.epsilon)
        return config


# --------------------------------------------------------------------------- factory

# Normalised name (lower case, no '_' or '-') -> (class, fixed keyword arguments).
_REGISTRY: dict[str, tuple[type[_SegmentationLoss], dict[str, Any]]] = {
    "dice": (DiceLoss, {}),
    "dicens": (DiceLoss, {"squared": False}),
    "generaliseddice": (GeneralisedDiceLoss, {}),
    "generalizeddice": (GeneralisedDiceLoss, {}),
    "gdsc": (GeneralisedDiceLoss, {}),
    "gdl": (GeneralisedDiceLoss, {}),
    "crossentropy": (CrossEntropyLoss, {}),
    "ce": (CrossEntropyLoss, {}),
    "xent": (CrossEntropyLoss, {}),
    "dicece": (DiceCELoss, {}),
    "dicecrossentropy": (DiceCELoss, {}),
    "diceplusxent": (DiceCELoss, {"squared": False}),
}

#: The names :func:`get_loss` documents (aliases and NiftyNet spellings work too).
LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)


def _normalise(name: str) -> str:
    return str(name).strip().lower().replace("_", "").replace("-", "").replace(" ", "")


def get_loss(name: str, **kwargs: Any) -> keras.losses.Loss:
    """Builds a loss by name; NiftyNet's ``loss_type`` spellings are accepted.

    ``get_loss("dice")``, ``get_loss("Dice")`` (NiftyNet), ``get_loss("dice_ce",
    ce_weight=0.5)``, ``get_loss("GDSC", type_weight="simple")``,
    ``get_loss("cross_entropy", class_weights=[0.1, 0.9])``.

    Raises:
        ConfigError: for an unknown name (with the closest known names) or an
            argument the loss does not take.
    """
    key = _normalise(name)
    if key not in _REGISTRY:
        known = sorted(set(LOSS_NAMES) | {"Dice", "Dice_NS", "GDSC", "CrossEntropy", "DicePlusXEnt"})
        by_key = {_normalise(k): k for k in known} | {k: k for k in _REGISTRY}
        close = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.5)
        suggestion = ", ".join(dict.fromkeys(by_key[c] for c in close))
        hint = f" Did you mean: {suggestion}?" if suggestion else ""
        raise ConfigError(f"Unknown loss {name!r}.{hint} Known losses: {', '.join(LOSS_NAMES)}.")
    cls, fixed = _REGISTRY[key]
    try:
        return cls(**{**fixed, **kwargs})
    except TypeError as err:
        raise ConfigError(f"Loss {name!r} does not accept these arguments {sorted(kwargs)}: {err}") from err
