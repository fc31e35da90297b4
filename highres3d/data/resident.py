"""Training volumes held on the accelerator (``training.cache: device``).

With volumes in RAM the input pipeline copies every window (or its margin
crop, for ``augmentation.device: accelerator``) on the CPU: 7-25 MB per 96^3
window, a few CPU-milliseconds each, which caps what a few cores can feed a
fast accelerator.  Here every training volume is copied to the accelerator
once, the pipeline sends only window positions (six integers a window), and
the training step cuts the windows from the resident volumes (a slice and the
pad around it), then resamples them (:class:`~highres3d.augment.RandomAffine3D`) as before.

Contract: :meth:`ResidentVolumes.cut` of a batch of the pipeline's position
rows ``[volume, x, y, z, visit, j]`` returns exactly what the in-RAM pipeline
would have delivered for them: ``image`` ``(B, *crop_size, C)`` float32 and
``label`` ``(B, *crop_size)``, the crop starting ``margin`` voxels before the
window start, with the sampler's pad values outside the volume.  Volumes may
differ in shape: they are stored flattened one after another (each from a
64-byte boundary), with their offsets and shapes, so no padding is
materialised; a window is one slice of its volume plus the pad around it.

Cost: device memory holds every training volume (image float32 and label)
once per machine, on its first device; :func:`resident_bytes` gives the
figure to check first.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from highres3d.errors import ConfigError

__all__ = ["ResidentVolumes", "resident_bytes"]

_ALIGN = 64


def resident_bytes(volumes: Sequence[Any], label_dtype=np.uint8) -> int:
    """Device bytes :class:`ResidentVolumes` needs for ``volumes`` (one copy per machine)."""
    itemsize = np.dtype(label_dtype).itemsize
    return sum(int(v.image.size) * 4 + int(v.label.size) * itemsize for v in volumes)


class ResidentVolumes(tf.Module):
    """Volumes stored once on the accelerator; windows cut by position inside a compiled step.

    Args:
        volumes: objects with ``image`` ``(X, Y, Z, C)`` and ``label`` ``(X, Y, Z)``
            (the preprocessed training volumes, in RAM).
        crop_size: spatial size of what :meth:`cut` returns (window + 2 * margin).
        margin: voxels cut before the window start on each axis (the
            augmentation's margin; 0 without on-device augmentation).
        pad_value: image value outside a volume.
        label_pad_value: label value outside a volume.
        label_dtype: dtype of the labels returned (the pipeline's ``label_dtype``).

    Create it outside ``strategy.scope()``: one copy per machine, on its
    default device (the first GPU), not one per replica, and nothing to
    broadcast between the workers of a multi-worker run (whose collectives
    would have to send every volume, and cannot send uint8).  Every replica's
    windows are cut on that device and only the windows move to the replica.
    """

    def __init__(self, volumes: Sequence[Any], crop_size: Sequence[int], margin: Sequence[int] = (0, 0, 0),
                 pad_value: float = 0.0, label_pad_value: int = 0, label_dtype=np.uint8) -> None:
        super().__init__(name="resident_volumes")
        if len(volumes) == 0:
            raise ConfigError("training.cache 'device': the list of training volumes is empty")
        channels = {int(v.image.shape[3]) for v in volumes}
        if len(channels) != 1:
            raise ConfigError(f"training.cache 'device': volumes with different channel counts {sorted(channels)}")
        self.channels = channels.pop()
        self.crop_size = tuple(int(c) for c in crop_size)
        self.margin = tuple(int(m) for m in margin)
        self.pad_value = float(pad_value)
        self.label_pad_value = int(label_pad_value)
        self.label_dtype = tf.as_dtype(np.dtype(label_dtype))
        shapes = np.array([v.image.shape[:3] for v in volumes], dtype=np.int64)
        sizes = shapes.prod(axis=1)
        # Each volume starts on a multiple of _ALIGN voxels (64 bytes and more for either store), so
        # slicing one out is a view; the gaps are a few bytes a volume.
        spans = -(-sizes // _ALIGN) * _ALIGN
        offsets = np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
        total = int(spans.sum())
        image = np.zeros(total * self.channels, dtype=np.float32)
        label = np.zeros(total, dtype=np.dtype(label_dtype))
        for v, offset, size in zip(volumes, offsets, sizes):
            # Assigned through a shaped view: no flattened temporary whatever the volume's memory order.
            image[offset * self.channels:(offset + size) * self.channels].reshape(v.image.shape)[...] = v.image
            label[offset:offset + size] = np.asarray(v.label).reshape(-1)
        self.shapes = tf.constant(shapes)
        self.offsets = tf.constant(offsets)
        self.image = tf.Variable(image, trainable=False, name="image")
        self.label = tf.Variable(label, trainable=False, name="label")

    @property
    def nbytes(self) -> int:
        return int(self.image.shape[0]) * 4 + int(self.label.shape[0]) * self.label_dtype.size

    def cut(self, positions: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """``(image, label)`` crops for position rows ``(B, >= 4)``: volume index, then the window start."""
        positions = tf.cast(positions, tf.int64)
        with tf.device(self.image.device):
            image, label = tf.map_fn(
                self._cut_one, positions,
                fn_output_signature=(tf.TensorSpec(self.crop_size + (self.channels,), tf.float32),
                                     tf.TensorSpec(self.crop_size, self.label_dtype)),
            )
        return image, label

    def _cut_one(self, row: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        crop = tf.constant(self.crop_size, tf.int64)
        start = row[1:4] - tf.constant(self.margin, tf.int64)
        shape = tf.gather(self.shapes, row[0])
        offset = tf.gather(self.offsets, row[0])
        voxels = tf.reduce_prod(shape)
        # The part of the crop inside the volume, then the pad values around it.
        lo = tf.clip_by_value(start, 0, shape)
        hi = tf.clip_by_value(start + crop, 0, shape)
        hi = tf.maximum(hi, lo)
        padding = tf.stack([lo - start, start + crop - hi], axis=1)
        # A 64-byte aligned 1-D slice is a view of the stored volume, not a copy (offsets are aligned).
        volume = tf.reshape(tf.slice(self.image, [offset * self.channels], [voxels * self.channels]),
                            tf.concat([shape, [self.channels]], 0))
        part = tf.slice(volume, tf.concat([lo, [0]], 0), tf.concat([hi - lo, [self.channels]], 0))
        image = tf.pad(part, tf.concat([padding, [[0, 0]]], 0), constant_values=self.pad_value)
        labels = tf.reshape(tf.slice(self.label, [offset], [voxels]), shape)
        label = tf.pad(tf.slice(labels, lo, hi - lo), padding,
                       constant_values=tf.cast(self.label_pad_value, self.label_dtype))
        return tf.ensure_shape(image, self.crop_size + (self.channels,)), tf.ensure_shape(label, self.crop_size)
