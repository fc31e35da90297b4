"""HighRes3DNet (Li et al., IPMI 2017) as NiftyNet 0.5 implements it, in Keras 3.

The network is written with ``keras.layers`` and ``keras.ops`` only, so it runs
on every Keras backend (TensorFlow, JAX, PyTorch); nothing here imports
TensorFlow.

Architecture (2 input channels, 2 classes, ``width_multiplier=1``)::

    group   layers                                   channels   dilation
    conv_0  3^3 conv -> BN -> act                     C_in->16   1
    res_1   3 x [BN -> act -> 3^3 conv] x 2 + skip    16->16     1
    res_2   3 x [BN -> act -> 3^3 conv] x 2 + skip    16->32     2
    res_3   3 x [BN -> act -> 3^3 conv] x 2 + skip    32->64     4
    conv_1  1^3 conv -> BN -> act                     64->80     1
    conv_2  1^3 conv -> BN                            80->C      1   (logits)

Where a residual block widens the channels, NiftyNet pads the skip path with
zeros symmetrically on the channel axis (no projection), so the identity of a
16->32 block lands in output channels 8..23. Convolutions have no bias; batch
normalisation uses momentum 0.9 and epsilon 1e-5; NiftyNet's leaky ReLU has a
negative slope of 0.02.

Dilated convolutions are computed as NiftyNet computed them, by space to
batch (:func:`space_to_batch_conv`): the volume's d³ interleaved sub-grids are
stacked on the batch axis and convolved without dilation, which is
numerically the same convolution. XLA differentiates a convolution with
``dilation_rate`` 8 to 116 times slower than this on a GPU (measured on an
H200, docs/performance.md), and no slower on the CPU. Unlike NiftyNet, which
required every spatial dimension to be divisible by 8, any spatial size is
accepted (the sub-grids are padded); the output always has the input's
spatial shape.

Weight names follow NiftyNet's scopes: the top-level layers are ``conv_0``,
``res_1_0`` ... ``res_3_2``, ``conv_1`` and ``conv_2``, so weight paths read
``res_2_0/conv_1/kernel``, and :func:`niftynet_variable_name` maps each of them to
the NiftyNet variable (``HighRes3DNet/res_2_0/conv_1/w``) that a
``vars_to_freeze`` regex was written against.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from highres3d.config import LAYER_GROUPS

PACKAGE = "highres3d"

#: The six layer groups of HighRes3DNet, in network order.
GROUPS: tuple[str, ...] = LAYER_GROUPS

#: Channel widths of (conv_0 and res_1, res_2, res_3, conv_1) at width 1.
BASE_FILTERS: tuple[int, int, int, int] = (16, 32, 64, 80)

#: Residual stages: (group, index into the filters, dilation rate).
_RES_STAGES: tuple[tuple[str, int, int], ...] = (("res_1", 0, 1), ("res_2", 1, 2), ("res_3", 2, 4))
_BLOCKS_PER_STAGE = 3

#: NiftyNet's leaky ReLU, 0.5(1 + 0.02)x + 0.5(1 - 0.02)|x|, has slope 0.02.
NIFTYNET_LEAKY_SLOPE = 0.02
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# Accepted spellings (NiftyNet's included) -> canonical name.
_ACTIVATIONS = {
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "leakyrelu": "leaky_relu",
    "prelu": "prelu",
    "elu": "elu",
}
# Canonical name -> the token NiftyNet puts into scope names ("conv_0_bn_leakyrelu").
_NIFTYNET_ACTIVATION_TOKEN = {"relu": "relu", "leaky_relu": "leakyrelu", "prelu": "prelu", "elu": "elu"}

# Keras variable name -> NiftyNet variable name.
_NIFTYNET_VARIABLE = {
    "kernel": "w",
    "gamma": "gamma",
    "beta": "beta",
    "moving_mean": "moving_mean",
    "moving_variance": "moving_variance",
    "alpha": "alpha",
}
_STATE_VARIABLES = frozenset({"moving_mean", "moving_variance"})


def canonical_activation(name: str) -> str:
    """Returns the canonical activation name, accepting NiftyNet's spellings.

    Raises:
        ValueError: for an activation HighRes3DNet does not support.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; choose one of relu, leaky_relu, prelu, elu "
            "(NiftyNet's 'leakyrelu' is accepted too)."
        )
    return _ACTIVATIONS[key]


def _make_activation(activation: str, name: str, dims: int = 3) -> keras.layers.Layer:
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=NIFTYNET_LEAKY_SLOPE, name=name)
    if activation == "prelu":
        # One slope per channel, initialised to 0 as NiftyNet does.
        return keras.layers.PReLU(alpha_initializer="zeros", shared_axes=list(range(1, dims + 1)), name=name)
    return keras.layers.Activation(activation, name=name)


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(axis=-1, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def _conv(
    filters: int,
    kernel_size: int,
    dilation: int,
    l2_decay: float,
    kernel_initializer: Any,
    name: str,
    dims: int = 3,
) -> keras.layers.Layer:
    # NiftyNet's `decay` adds decay * tf.nn.l2_loss(w) = decay * sum(w^2) / 2, whereas
    # keras.regularizers.L2(f) adds f * sum(w^2): halve it so `l2_decay` means the same.
    regularizer = keras.regularizers.L2(l2_decay / 2.0) if l2_decay > 0 else None
    conv = SpaceToBatchConv3D if dims == 3 else SpaceToBatchConv2D
    return conv(
        filters,
        kernel_size,
        padding="same",
        dilation_rate=dilation,
        use_bias=False,
        kernel_initializer=keras.initializers.get(kernel_initializer),
        kernel_regularizer=regularizer,
        name=name,
    )


def space_to_batch_conv(inputs: Any, kernel: Any, dilation: Sequence[int], conv: Any) -> Any:
    """A "same"-padded, stride-1 dilated convolution of channels-last ``inputs``, computed by space to batch.

    Along each spatial axis with dilation ``d``, voxel ``i`` only meets voxels
    ``i ± d``: the ``d`` sub-grids ``i mod d`` are independent images. They are
    stacked on the batch axis, convolved by ``conv(x, kernel)`` without
    dilation, and interleaved back. Zero padding of each sub-grid is the zero
    padding of the whole, so the result equals the dilated convolution. A size
    that ``d`` does not divide is padded with zeros at the end and cropped.

    Args:
        inputs: ``(B, *spatial, C)``; the spatial sizes may be dynamic (TensorFlow graphs).
        kernel: the convolution's kernel, as ``conv`` takes it.
        dilation: the dilation of each spatial axis.
        conv: ``(x, kernel) -> y``, a "same"-padded undilated convolution.
    """
    shape = ops.shape(inputs)
    spatial = list(shape[1:-1])
    n = len(spatial)
    dilation = [int(d) for d in dilation]
    pads = [(-size) % d for size, d in zip(spatial, dilation)]
    padded = not all(isinstance(p, int) and p == 0 for p in pads)
    if padded:
        inputs = ops.pad(inputs, [[0, 0]] + [[0, p] for p in pads] + [[0, 0]])
    sub = [(size + p) // d for size, p, d in zip(spatial, pads, dilation)]
    # (B, s1, d1, s2, d2, ..., C) -> (B, d1, d2, ..., s1, s2, ..., C) -> (B d1 d2 ..., s1, s2, ..., C)
    x = ops.reshape(inputs, [-1] + [v for s, d in zip(sub, dilation) for v in (s, d)] + [shape[-1]])
    x = ops.transpose(x, [0] + [2 + 2 * i for i in range(n)] + [1 + 2 * i for i in range(n)] + [2 * n + 1])
    y = conv(ops.reshape(x, [-1] + sub + [shape[-1]]), kernel)
    out_channels = ops.shape(y)[-1]
    y = ops.reshape(y, [-1] + dilation + sub + [out_channels])
    y = ops.transpose(y, [0] + [v for i in range(n) for v in (1 + n + i, 1 + i)] + [2 * n + 1])
    y = ops.reshape(y, [-1] + [s * d for s, d in zip(sub, dilation)] + [out_channels])
    if padded:
        y = y[(slice(None),) + tuple(slice(0, size) for size in spatial)]
    return y


class _SpaceToBatchDilation:
    """Computes a dilated, "same"-padded, stride-1 channels-last convolution by :func:`space_to_batch_conv`."""

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        # An even kernel's "same" padding is lopsided by (k - 1) * d // 2 voxels, which sub-grids cannot split.
        if (all(d == 1 for d in self.dilation_rate) or self.padding != "same" or self.data_format != "channels_last"
                or any(s != 1 for s in self.strides) or any(k % 2 == 0 for k in self.kernel_size)):
            return super().convolution_op(inputs, kernel)

        def undilated(x: Any, k: Any) -> Any:
            return ops.conv(x, k, strides=1, padding="same", dilation_rate=1, data_format=self.data_format)

        return space_to_batch_conv(inputs, kernel, self.dilation_rate, undilated)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpaceToBatchConv3D(_SpaceToBatchDilation, keras.layers.Conv3D):
    """``keras.layers.Conv3D`` whose dilation is computed by space to batch (the same numbers, a fast gradient)."""


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpaceToBatchConv2D(_SpaceToBatchDilation, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose dilation is computed by space to batch (the same numbers, a fast gradient)."""


def pad_channels(x: Any, channels: int) -> Any:
    """Zero-pads the last axis of ``x`` symmetrically up to ``channels``.

    The extra channels are split as NiftyNet's ``ElementwiseLayer('SUM')`` does:
    ``(channels - c) // 2`` before and the rest after.
    """
    current = x.shape[-1]
    if current == channels:
        return x
    before = (channels - current) // 2
    after = channels - current - before
    rank = len(x.shape)
    return ops.pad(x, [[0, 0]] * (rank - 1) + [[before, after]])


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvBNActivation(keras.layers.Layer):
    """``conv -> BN [-> activation]``: NiftyNet's post-activation ``ConvolutionalLayer``.

    Used for the ``conv_0``, ``conv_1`` and ``conv_2`` groups. Its sub-layers
    are named ``conv``, ``bn`` and ``act``.

    Args:
        filters: output channels.
        kernel_size: cubic kernel size (3 for ``conv_0``, 1 for the heads).
        activation: canonical activation name, or ``None`` for the logits layer.
        l2_decay: NiftyNet ``decay`` on the kernel (``l2_decay * sum(w**2) / 2``).
        kernel_initializer: Keras initializer (name, config or instance).
        dims: 3 (volumes) or 2 (slices: the same layer with 2D kernels).
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        activation: str | None = "leaky_relu",
        l2_decay: float = 0.0,
        kernel_initializer: Any = "he_normal",
        dims: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.activation = None if activation is None else canonical_activation(activation)
        self.l2_decay = float(l2_decay)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dims = _check_dims(dims)
        self.conv = _conv(self.filters, self.kernel_size, 1, self.l2_decay, self.kernel_initializer, "conv", self.dims)
        self.bn = _batch_norm("bn")
        self.act = None if self.activation is None else _make_activation(self.activation, "act", self.dims)

    def build(self, input_shape: Sequence[int | None]) -> None:
        self.conv.build(input_shape)
        output_shape = tuple(input_shape[:-1]) + (self.filters,)
        self.bn.build(output_shape)
        if self.act is not None:
            self.act.build(output_shape)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = self.conv(inputs)
        x = self.bn(x, training=training)
        if self.act is not None:
            x = self.act(x)
        return x

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            activation=self.activation,
            l2_decay=self.l2_decay,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            dims=self.dims,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class HighResBlock(keras.layers.Layer):
    """Pre-activation residual block: ``x + conv_1(act_1(bn_1(conv_0(act_0(bn_0(x))))))``.

    Both convolutions are 3^3 with the block's dilation. When ``filters``
    exceeds the input channels the skip path is zero-padded symmetrically on the
    channel axis (NiftyNet adds no projection); fewer output than input
    channels is not part of HighRes3DNet and is rejected.

    Args:
        filters: output channels of both convolutions.
        dilation: dilation rate of both convolutions.
        activation: canonical activation name.
        l2_decay: NiftyNet ``decay`` on the kernels.
        kernel_initializer: Keras initializer.
        dims: 3 (volumes) or 2 (slices).
    """

    def __init__(
        self,
        filters: int,
        dilation: int = 1,
        activation: str = "leaky_relu",
        l2_decay: float = 0.0,
        kernel_initializer: Any = "he_normal",
        dims: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.dilation = int(dilation)
        self.activation = canonical_activation(activation)
        self.l2_decay = float(l2_decay)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dims = _check_dims(dims)
        # Attribute names equal the layer names so that weight paths read
        # `res_1_0/conv_0/kernel`, mirroring NiftyNet's `res_1_0/conv_0/w`.
        self.bn_0 = _batch_norm("bn_0")
        self.act_0 = _make_activation(self.activation, "act_0", self.dims)
        self.conv_0 = _conv(self.filters, 3, self.dilation, self.l2_decay, self.kernel_initializer, "conv_0", self.dims)
        self.bn_1 = _batch_norm("bn_1")
        self.act_1 = _make_activation(self.activation, "act_1", self.dims)
        self.conv_1 = _conv(self.filters, 3, self.dilation, self.l2_decay, self.kernel_initializer, "conv_1", self.dims)

    def build(self, input_shape: Sequence[int | None]) -> None:
        in_channels = input_shape[-1]
        if in_channels is None or in_channels > self.filters:
            raise ValueError(
                f"{self.name}: input channels ({in_channels}) must be known and at most "
                f"the block's {self.filters} filters (the skip path is zero-padded, never projected)."
            )
        output_shape = tuple(input_shape[:-1]) + (self.filters,)
        self.bn_0.build(input_shape)
        self.act_0.build(input_shape)
        self.conv_0.build(input_shape)
        self.bn_1.build(output_shape)
        self.act_1.build(output_shape)
        self.conv_1.build(output_shape)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = self.bn_0(inputs, training=training)
        x = self.act_0(x)
        x = self.conv_0(x)
        x = self.bn_1(x, training=training)
        x = self.act_1(x)
        x = self.conv_1(x)
        return x + pad_channels(inputs, self.filters)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        return tuple(input_shape[:-1]) + (self.filters,)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            dilation=self.dilation,
            activation=self.activation,
            l2_decay=self.l2_decay,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            dims=self.dims,
        )
        return config


def _check_dims(dims: int) -> int:
    if int(dims) not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return int(dims)


def _slice_permutation(axis: int) -> list[int]:
    """Axes of a ``(B, X, Y, Z, C)`` tensor with spatial axis ``axis`` moved next to the batch."""
    return [0, 1 + axis] + [1 + a for a in range(3) if a != axis] + [4]


@keras.saving.register_keras_serializable(package=PACKAGE)
class ToSlices(keras.layers.Layer):
    """``(B, X, Y, Z, C)`` -> ``(B * S, A, B', C)``: the slices along spatial axis ``axis`` as a batch of images.

    The two in-plane axes keep their order, so a 2D kernel's axes are the
    volume's remaining spatial axes in ascending order.

    Args:
        axis: the slice axis, 0, 1 or 2 (x, y, z).
    """

    def __init__(self, axis: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, inputs: Any) -> Any:
        x = ops.transpose(inputs, _slice_permutation(self.axis))
        shape = ops.shape(x)
        return ops.reshape(x, (-1, shape[2], shape[3], shape[4]))

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        shape = [input_shape[i] for i in _slice_permutation(self.axis)]
        return (None, shape[2], shape[3], shape[4])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package=PACKAGE)
class FromSlices(keras.layers.Layer):
    """The inverse of :class:`ToSlices`: ``[(B * S, A, B', K), volume]`` -> ``(B, X, Y, Z, K)``."""

    def __init__(self, axis: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = int(axis)

    def call(self, inputs: Any) -> Any:
        slices, volume = inputs
        permutation = _slice_permutation(self.axis)
        shape = ops.shape(volume)
        x = ops.reshape(slices, (-1, shape[permutation[1]], shape[permutation[2]], shape[permutation[3]],
                                 ops.shape(slices)[-1]))
        inverse = [permutation.index(i) for i in range(5)]
        return ops.transpose(x, inverse)

    def compute_output_shape(self, input_shapes: Sequence[Sequence[int | None]]) -> tuple[int | None, ...]:
        slices, volume = input_shapes
        return tuple(volume[:-1]) + (slices[-1],)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "axis": self.axis}


def scaled_filters(width_multiplier: float) -> tuple[int, int, int, int]:
    """Channel widths for a width multiplier (at least one channel each)."""
    if not width_multiplier > 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
    return tuple(max(1, int(round(f * width_multiplier))) for f in BASE_FILTERS)  # type: ignore[return-value]


def trunk(x: Any, widths: Sequence[int], activation: str, **common: Any) -> Any:
    """HighRes3DNet's layers ``conv_0`` ... ``conv_1`` applied to the tensor ``x``: everything but the classifier.

    The one definition of the trunk, so that :class:`HighResNet3D` and the
    multi-domain model (:mod:`highres3d.models.multidomain`) have the same
    layer names and weight paths.

    Args:
        x: the input tensor (symbolic, in a functional model).
        widths: channel widths (conv_0/res_1, res_2, res_3, conv_1).
        activation: canonical activation name.
        **common: ``l2_decay``, ``kernel_initializer`` and ``dims`` of every layer.
    """
    x = ConvBNActivation(widths[0], 3, activation, name="conv_0", **common)(x)
    for group, width_index, dilation in _RES_STAGES:
        for j in range(_BLOCKS_PER_STAGE):
            x = HighResBlock(widths[width_index], dilation, activation, name=f"{group}_{j}", **common)(x)
    return ConvBNActivation(widths[3], 1, activation, name="conv_1", **common)(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class HighResNet3D(keras.Model):
    """HighRes3DNet for 3D segmentation, channels-last ``(B, X, Y, Z, C)``.

    A functional model: its top-level layers are the NiftyNet groups
    ``conv_0``, ``res_1_0`` ... ``res_3_2``, ``conv_1``, ``conv_2`` (and
    ``softmax`` when requested), so ``model.get_layer("res_2_0")`` and
    ``model.summary()`` read like NiftyNet's graph.

    Args:
        in_channels: number of image modalities (e.g. 2 for T1 + T2).
        num_classes: number of output classes, background included.
        activation: ``"leaky_relu"`` (NiftyNet's slope 0.02; the thesis'
            choice), ``"relu"``, ``"prelu"`` or ``"elu"``. NiftyNet spellings
            such as ``"leakyrelu"`` are accepted.
        width_multiplier: scales every channel count (16, 32, 64, 80); 0.25
            gives a fast variant for tests and demos.
        l2_decay: NiftyNet's ``decay``: adds ``l2_decay * sum(w**2) / 2`` per convolution
            kernel to the loss (TensorFlow's ``l2_loss`` convention). 0 disables.
        softmax: append a float32 softmax so the model outputs probabilities
            instead of logits (the losses here expect logits).
        filters: explicit widths ``(conv_0/res_1, res_2, res_3, conv_1)``;
            overrides ``width_multiplier``.
        kernel_initializer: initializer of every kernel; ``"he_normal"`` is
            NiftyNet's (a truncated normal with fan-in scaling).
        name: model name; NiftyNet's top scope is ``HighRes3DNet``.
        dims: 3, or 2 for the 2D HighResNet: the same groups, layer names
            and weight paths with 2D kernels ``(k, k, c_in, c_out)``, applied
            slice by slice along ``slice_axis`` (it still takes and returns
            ``(B, X, Y, Z, C)`` volumes, so samplers, validation and inference
            are unchanged; a window of size 1 along the axis is one slice).
        slice_axis: the spatial axis (0, 1, 2 = x, y, z) a 2D network slices along.

    Example:
        >>> model = HighResNet3D(in_channels=2, num_classes=2)
        >>> model.count_params()  # 809,380 trainable + 1,444 BN statistics
        810824
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        activation: str = "leaky_relu",
        width_multiplier: float = 1.0,
        l2_decay: float = 0.0,
        softmax: bool = False,
        filters: Sequence[int] | None = None,
        kernel_initializer: Any = "he_normal",
        name: str = "HighRes3DNet",
        dims: int = 3,
        slice_axis: int = 2,
        **kwargs: Any,
    ) -> None:
        dims = _check_dims(dims)
        if int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        in_channels = int(in_channels)
        num_classes = int(num_classes)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        activation = canonical_activation(activation)
        if filters is None:
            widths = scaled_filters(width_multiplier)
        else:
            widths = tuple(int(f) for f in filters)
            if len(widths) != 4 or min(widths) < 1:
                raise ValueError(f"filters must be 4 positive integers, got {filters!r}")
            if not widths[0] <= widths[1] <= widths[2]:
                raise ValueError(f"filters of res_1..res_3 must not decrease, got {filters!r}")
        initializer = keras.initializers.get(kernel_initializer)
        common = dict(l2_decay=float(l2_decay), kernel_initializer=initializer, dims=dims)

        inputs = keras.Input(shape=(None, None, None, in_channels), name="images")
        x = inputs if dims == 3 else ToSlices(int(slice_axis), name="to_slices")(inputs)
        x = trunk(x, widths, activation, **common)
        outputs = ConvBNActivation(num_classes, 1, None, name="conv_2", **common)(x)
        if dims == 2:
            outputs = FromSlices(int(slice_axis), name="from_slices")([outputs, inputs])
        if softmax:
            outputs = keras.layers.Softmax(axis=-1, dtype="float32", name="softmax")(outputs)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        self.in_channels = in_channels
        self.num_classes = num_classes
        self.activation = activation
        self.width_multiplier = float(width_multiplier)
        self.l2_decay = float(l2_decay)
        self.softmax = bool(softmax)
        self.filters = widths if filters is not None else None
        self.kernel_initializer = initializer
        self.dims = dims
        self.slice_axis = int(slice_axis)

    @classmethod
    def from_preset(cls, name: str) -> HighResNet3D:
        """A pretrained model by preset name (``highres3d models list``), its SHA-256 checked.

        Args:
            name: the preset's name, with or without ``preset:``.
        """
        from highres3d.presets import get_preset

        model = keras.saving.load_model(get_preset(name).verify(), compile=False)
        if not isinstance(model, cls):
            raise TypeError(f"preset {name} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """The channel widths in use: (conv_0/res_1, res_2, res_3, conv_1)."""
        return self.filters or scaled_filters(self.width_multiplier)

    def get_config(self) -> dict[str, Any]:
        # Only the constructor arguments: the graph is rebuilt by __init__.
        return {
            "name": self.name,
            "trainable": self.trainable,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "activation": self.activation,
            "width_multiplier": self.width_multiplier,
            "l2_decay": self.l2_decay,
            "softmax": self.softmax,
            "filters": None if self.filters is None else list(self.filters),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "dims": self.dims,
            "slice_axis": self.slice_axis,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HighResNet3D:
        config = dict(config)
        config["kernel_initializer"] = keras.initializers.deserialize(config.get("kernel_initializer", "he_normal"))
        return cls(**config)


# --------------------------------------------------------------------------- naming


def layer_group(layer_name: str) -> str | None:
    """The NiftyNet group (``conv_0`` ... ``conv_2``) of a top-level layer or weight path.

    ``"res_2_1"`` and ``"res_2_1/conv_0/kernel"`` both give ``"res_2"``;
    anything outside the six groups (the input, ``softmax``) gives ``None``.
    """
    head = layer_name.split("/", 1)[0]
    match = re.fullmatch(r"(res_[123])_\d+", head)
    if match:
        return match.group(1)
    return head if head in GROUPS else None


def named_weights(model: keras.Model) -> dict[str, Any]:
    """Every weight of ``model`` by its path ``"<layer path>/<variable name>"``.

    The path is Keras' ``Variable.path`` (``"res_2_0/conv_1/kernel"``,
    ``"conv_0/bn/moving_mean"``): it follows the layer names, not how many
    models were created before, so it is the key for transfer between models.
    """
    return {variable.path: variable for variable in model.weights}


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer of ``model``: its top-level layers and, below them, the sub-layers our blocks hold as attributes."""
    found: list[keras.layers.Layer] = []
    pending = list(model.layers)
    while pending:
        layer = pending.pop(0)
        if any(layer is seen for seen in found):
            continue
        found.append(layer)
        pending.extend(v for v in vars(layer).values() if isinstance(v, keras.layers.Layer))
    return found


def named_layers(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The layers that own weights, by path, e.g. ``"res_1_0/bn_0"`` or ``"conv_0/conv"``.

    Sub-layers are attributes of their block named like the layer
    (``block.bn_0``), so the path resolves through public attributes only.
    """
    named: dict[str, keras.layers.Layer] = {}
    for path in named_weights(model):
        layer_path = path.rsplit("/", 1)[0]
        if layer_path not in named:
            top, _, leaf = layer_path.partition("/")
            layer = model.get_layer(top)
            named[layer_path] = getattr(layer, leaf) if leaf else layer
    return named


def is_state_variable(weight_path: str) -> bool:
    """True for batch-norm moving statistics (state, never optimised)."""
    return weight_path.rsplit("/", 1)[-1] in _STATE_VARIABLES


def niftynet_variable_name(weight_path: str, activation: str = "leaky_relu", scope: str = "HighRes3DNet") -> str:
    """The NiftyNet variable name of a weight path of :class:`HighResNet3D`.

    ``"res_1_0/conv_0/kernel"`` -> ``"HighRes3DNet/res_1_0/conv_0/w"``;
    ``"conv_0/bn/gamma"`` -> ``"HighRes3DNet/conv_0_bn_leakyrelu/bn_/gamma"``;
    ``"conv_2/conv/kernel"`` -> ``"HighRes3DNet/conv_2_bn/conv_/w"``.
    A NiftyNet ``vars_to_freeze`` regex used verbatim against these names selects
    the same weights it selected in NiftyNet. PReLU slopes are
    ``.../prelu_acti_<i>/alpha`` (NiftyNet's ``ActiLayer`` opens a ``prelu``
    scope inside ``acti_<i>``; :mod:`highres3d.niftynet.checkpoint` reads the same names).
    """
    parts = weight_path.split("/")
    if len(parts) != 3:
        raise ValueError(f"Not a HighResNet3D weight path: {weight_path!r}")
    top, leaf, variable = parts
    nn_variable = _NIFTYNET_VARIABLE.get(variable, variable)
    group = layer_group(top)
    if group in ("conv_0", "conv_1", "conv_2"):
        token = _NIFTYNET_ACTIVATION_TOKEN[canonical_activation(activation)]
        block = f"{top}_bn" if group == "conv_2" else f"{top}_bn_{token}"
        sub = {"conv": "conv_", "bn": "bn_", "act": "acti_"}.get(leaf, leaf)
    elif group in ("res_1", "res_2", "res_3"):
        block = top
        sub = re.sub(r"^act_(\d)$", r"acti_\1", leaf)
    else:
        raise ValueError(f"Weight {weight_path!r} is outside the HighRes3DNet groups")
    if variable == "alpha":
        sub = f"prelu_{sub}"
    return f"{scope}/{block}/{sub}/{nn_variable}"


# --------------------------------------------------------------------------- parameter table


@dataclasses.dataclass(frozen=True)
class GroupParameters:
    """Parameter counts of one layer group.

    Attributes:
        group: ``conv_0`` ... ``conv_2``, or ``total``.
        trainable: parameters the optimiser updates (kernels, BN gamma/beta,
            PReLU slopes) that are not frozen.
        frozen: parameters of that kind that are currently frozen.
        non_trainable: batch-norm moving mean and variance.
        niftynet_checkpoint: what NiftyNet's checkpoint holds for the group,
            Adam slots excluded: the above, plus TF1's zero-debias ``biased``
            copy of each moving statistic and two ``local_step`` scalars per BN
            layer, plus Adam's ``beta1_power``/``beta2_power`` counted under
            conv_0 (the thesis' Table 6.1 counts exactly these).
        bn_statistics: ``"batch"`` when the group's BN layers normalise with
            batch statistics in training and update their moving averages,
            ``"fixed"`` when they run in inference mode, ``"mixed"`` otherwise.
    """

    group: str
    trainable: int
    frozen: int
    non_trainable: int
    niftynet_checkpoint: int
    bn_statistics: str = "batch"


def _size(variable: Any) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def parameter_table(model: keras.Model) -> list[GroupParameters]:
    """Per-group counts (Table 6.1 of the thesis) for a :class:`HighResNet3D`.

    Returns one row per group in network order, then a ``total`` row. For the
    full-width network with 2 input channels and 2 classes, ``trainable`` is
    896 / 41,664 / 152,416 / 608,960 / 5,280 / 164 (809,380) and
    ``niftynet_checkpoint`` is 964 / 42,060 / 153,132 / 610,380 / 5,602 / 174
    (812,312).
    """
    trainable_ids = {id(v) for v in model.trainable_weights}
    counts: dict[str, dict[str, int]] = {g: dict(trainable=0, frozen=0, state=0, bn=0, bn_channels=0) for g in GROUPS}
    bn_modes: dict[str, set[bool]] = {g: set() for g in GROUPS}
    for path, layer in named_layers(model).items():
        group = layer_group(path)
        if group is None:
            continue
        row = counts[group]
        if isinstance(layer, keras.layers.BatchNormalization):
            row["bn"] += 1
            row["bn_channels"] += _size(layer.moving_mean)
            bn_modes[group].add(bool(layer.trainable) and _ancestors_trainable(model, path))
        for variable in layer.weights:
            n = _size(variable)
            if variable.name in _STATE_VARIABLES:
                row["state"] += n
            elif id(variable) in trainable_ids:
                row["trainable"] += n
            else:
                row["frozen"] += n

    rows = []
    for group in GROUPS:
        row = counts[group]
        # TF1 zero-debiased EMAs: a `biased` copy per statistic and a `local_step` per statistic.
        checkpoint = row["trainable"] + row["frozen"] + row["state"] + 2 * row["bn_channels"] + 2 * row["bn"]
        if group == "conv_0":
            checkpoint += 2  # ApplyGradients/beta1_power and beta2_power
        modes = bn_modes[group]
        bn = "batch" if modes == {True} else "fixed" if modes == {False} else "mixed" if modes else "-"
        rows.append(GroupParameters(group, row["trainable"], row["frozen"], row["state"], checkpoint, bn))
    rows.append(
        GroupParameters(
            "total",
            sum(r.trainable for r in rows),
            sum(r.frozen for r in rows),
            sum(r.non_trainable for r in rows),
            sum(r.niftynet_checkpoint for r in rows),
            "",
        )
    )
    return rows


def _ancestors_trainable(model: keras.Model, path: str) -> bool:
    if not model.trainable:
        return False
    top = model.get_layer(path.split("/", 1)[0])
    return bool(top.trainable)
