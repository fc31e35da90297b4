"""Per-window random rotation, scaling, flips and intensity changes, on the CPU.

The transformed window is *sampled* from the untransformed volume: each output
voxel's position is mapped through the window's affine into the volume and
the image is interpolated there (trilinear; the label nearest-neighbour).  No
volume is ever transformed, so a 96^3 window costs the same whether the volume
is 240x240x155 or 512^3 (NiftyNet 0.5 rotated and zoomed the whole volume per
window, ~12 s per BraTS window).

Geometry
--------
Output voxel ``k`` (0-based, per axis) has offset ``u = k - (size - 1) / 2``
from the window's geometric centre and reads the volume at
``centre + M @ u``.  ``M = R @ diag(1 / zoom) @ diag(flip)`` where

* ``R = Rz @ Ry @ Rx`` rotates about the array axes 0 (``Rx``, in the (1, 2)
  plane), 1 and 2 by angles drawn uniformly in ``±rotation_degrees``;
* ``zoom`` is the magnification of the content, drawn uniformly in
  ``1 ± scale_range`` per axis (one value for all axes when
  ``isotropic_scaling``), NiftyNet's ``scaling_percentage`` semantics;
* ``flip`` is ``-1`` on each axis of ``flip_axes`` with probability
  ``flip_probability``.

Rotation is about the window centre in voxel space (like NiftyNet); with
anisotropic voxels resample to isotropic spacing first.  Outside the volume
the image reads ``pad_value`` and the label ``label_pad_value``,
blended trilinearly at the border like a zero-padded ``grid_sample``.

Intensity: each channel becomes ``x * a + b`` with ``a`` uniform in
``1 ± intensity_scale`` and ``b`` uniform in ``± intensity_shift`` (in units of
the whitened intensities, i.e. standard deviations).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from highres3d.errors import ConfigError
from highres3d.samplers.base import crop, is_channel_major, window_triple

__all__ = [
    "AffineAugmentation",
    "AffineDraw",
    "affine_margin",
    "resample_window",
    "rotation_matrix",
]

# Output voxels per slab: keeps a slab's temporaries (~20 arrays) inside L2 cache.
_SLAB_VOXELS = 1 << 16


def rotation_matrix(angles: Sequence[float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (radians) about array axes 0, 1, 2."""
    ax, ay, az = (float(a) for a in angles)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _per_axis(value, name: str, upper: float) -> tuple[float, float, float]:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3 or any(not (0.0 <= v < upper) for v in value):
        raise ConfigError(f"augmentation {name}: expected one value or three in [0, {upper}), got {list(value)}")
    return value


def affine_margin(
    window_size: int | Sequence[int],
    rotation_degrees: float | Sequence[float] = 10.0,
    scale_range: float | Sequence[float] = 0.1,
) -> tuple[int, int, int]:
    """Voxels to add on each side of a window so that any draw stays inside the crop.

    A crop of ``window + 2 * margin`` centred on the window contains every
    position a trilinear read of the rotated and scaled window touches, for
    any rotation up to ``rotation_degrees`` per axis and any magnification
    down to ``1 - scale_range`` (flips never widen the footprint).  E.g. 96^3
    windows with 10 degrees and 10 % need 23-25 voxels per side (142x146x142 crops).
    """
    size = np.asarray(window_triple(window_size), dtype=np.float64)
    theta = np.radians(_per_axis(rotation_degrees, "rotation_degrees", 90.0))
    zoom_min = 1.0 - np.asarray(_per_axis(scale_range, "scale_range", 1.0))
    half = (size - 1) / 2
    # The footprint grows monotonically with |angle| near the identity, so the
    # corners of the angle box matter most; a grid through them also covers
    # the interior.
    grids = [np.linspace(-t, t, 9) if t > 0 else np.zeros(1) for t in theta]
    extent = np.zeros(3)
    for a in grids[0]:
        for b in grids[1]:
            for c in grids[2]:
                r = np.abs(rotation_matrix((a, b, c)))
                extent = np.maximum(extent, r @ (half / zoom_min))
    return tuple(int(v) for v in np.ceil(extent - half - 1e-9).astype(int) + 1)


@dataclass(frozen=True)
class AffineDraw:
    """One random draw: the sampling matrix and per-channel intensity change."""

    matrix: np.ndarray  # (3, 3) output offset -> volume offset
    intensity_scale: np.ndarray  # (C,)
    intensity_shift: np.ndarray  # (C,)


@dataclass(frozen=True)
class AffineAugmentation:
    """Random affine + intensity augmentation of windows (see the module docstring).

    >>> aug = AffineAugmentation(rotation_degrees=10, scale_range=0.1)
    >>> image, label = aug.window(volume, start=(10, 20, 5), window_size=96, rng=rng)
    """

    rotation_degrees: float | Sequence[float] = 10.0
    scale_range: float | Sequence[float] = 0.1
    isotropic_scaling: bool = False
    flip_axes: tuple[int, ...] = ()
    flip_probability: float = 0.5
    intensity_scale: float = 0.0
    intensity_shift: float = 0.0

    def __post_init__(self) -> None:
        _per_axis(self.rotation_degrees, "rotation_degrees", 90.0)
        _per_axis(self.scale_range, "scale_range", 1.0)
        if any(a not in (0, 1, 2) for a in self.flip_axes) or len(set(self.flip_axes)) != len(self.flip_axes):
            raise ConfigError(f"augmentation flip_axes: expected distinct axes among 0, 1, 2, got {list(self.flip_axes)}")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ConfigError(f"augmentation flip_probability: expected a value in [0, 1], got {self.flip_probability}")
        if not 0.0 <= self.intensity_scale < 1.0 or self.intensity_shift < 0:
            raise ConfigError(
                "augmentation intensity_scale must be in [0, 1) and intensity_shift >= 0, got "
                f"{self.intensity_scale}, {self.intensity_shift}"
            )

    @classmethod
    def from_config(cls, section) -> AffineAugmentation:
        """The augmentation of a config's ``augmentation`` section (``scaling_percent`` is a percentage)."""
        return cls(rotation_degrees=section.rotation_degrees, scale_range=section.scaling_percent / 100.0,
                   flip_axes=tuple(section.flip_axes), intensity_scale=section.intensity_scale,
                   intensity_shift=section.intensity_shift)

    @property
    def is_identity(self) -> bool:
        return (
            not any(_per_axis(self.rotation_degrees, "", 90.0))
            and not any(_per_axis(self.scale_range, "", 1.0))
            and not (self.flip_axes and self.flip_probability > 0)
            and self.intensity_scale == 0
            and self.intensity_shift == 0
        )

    def margin(self, window_size: int | Sequence[int]) -> tuple[int, int, int]:
        """:func:`affine_margin` for this augmentation."""
        return affine_margin(window_size, self.rotation_degrees, self.scale_range)

    def draw(self, rng: np.random.Generator, in_channels: int = 1) -> AffineDraw:
        """One random transform; consumes a fixed number of variates from ``rng``."""
        theta = np.radians(_per_axis(self.rotation_degrees, "rotation_degrees", 90.0))
        srange = np.asarray(_per_axis(self.scale_range, "scale_range", 1.0))
        u = rng.random(10)
        angles = (2 * u[:3] - 1) * theta
        zoom = 1 + (2 * (u[3:4] if self.isotropic_scaling else u[3:6]) - 1) * srange
        flips = np.ones(3)
        for axis in self.flip_axes:
            if u[6 + axis] < self.flip_probability:
                flips[axis] = -1.0
        matrix = rotation_matrix(angles) @ np.diag(flips / zoom)
        v = rng.random((2, in_channels))
        scale = 1 + (2 * v[0] - 1) * self.intensity_scale
        shift = (2 * v[1] - 1) * self.intensity_shift
        return AffineDraw(matrix, scale.astype(np.float32), shift.astype(np.float32))

    def window(
        self,
        volume,
        start: Sequence[int],
        window_size: int | Sequence[int],
        rng: np.random.Generator,
        *,
        pad_value: float = 0.0,
        label_pad_value: int = 0,
        out_image: Optional[np.ndarray] = None,
        out_label: Optional[np.ndarray] = None,
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Augmented window of ``volume`` whose un-augmented version starts at ``start``.

        The transform pivots on the window's geometric centre
        ``start + (size - 1) / 2``, so the identity draw returns exactly the
        sampler's crop.
        """
        size = window_triple(window_size)
        draw = self.draw(rng, volume.image.shape[3])
        centre = np.asarray(start, dtype=np.float64) + (np.asarray(size) - 1) / 2
        return resample_window(
            volume.image,
            volume.label,
            centre,
            size,
            draw.matrix,
            pad_value=pad_value,
            label_pad_value=label_pad_value,
            intensity_scale=draw.intensity_scale,
            intensity_shift=draw.intensity_shift,
            out_image=out_image,
            out_label=out_label,
        )


def _trilinear(flat: np.ndarray, idx: np.ndarray, wx: np.ndarray, wy: np.ndarray, wz: np.ndarray,
               sy: int, sz: int) -> np.ndarray:
    """Trilinear values (float32) at the cells whose lower corner is ``idx`` in the flat source."""

    def corner(offset: int) -> np.ndarray:
        # Slicing the flat source shifts every index by ``offset`` for free.
        return np.take(flat[offset:], idx).view(np.float32)

    def along_z(offset: int) -> np.ndarray:
        a, b = corner(offset), corner(offset + 1)
        b -= a
        b *= wz
        a += b
        return a

    def along_y(offset: int) -> np.ndarray:
        a, b = along_z(offset), along_z(offset + sz)
        b -= a
        b *= wy
        a += b
        return a

    a, b = along_y(0), along_y(sy * sz)
    b -= a
    b *= wx
    a += b
    return a


def _bytes_view(flat: np.ndarray, itemsize: int) -> np.ndarray:
    """View a contiguous 1-D array as one element per voxel (all channels together)."""
    kinds = {1: np.uint8, 4: np.uint32, 8: np.uint64, 16: np.complex128}
    return flat.view(kinds.get(itemsize, np.dtype((np.void, itemsize))))


def resample_window(
    image: np.ndarray,
    label: Optional[np.ndarray],
    centre: Sequence[float],
    size: Sequence[int],
    matrix: np.ndarray,
    *,
    pad_value: float = 0.0,
    label_pad_value: int = 0,
    intensity_scale: Optional[np.ndarray] = None,
    intensity_shift: Optional[np.ndarray] = None,
    out_image: Optional[np.ndarray] = None,
    out_label: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Sample a ``size`` window whose voxel ``k`` reads ``centre + matrix @ (k - (size - 1) / 2)``.

    ``image`` ``(X, Y, Z, C)`` float32 is read trilinearly, ``label``
    ``(X, Y, Z)`` (or ``None``) nearest-neighbour; both from the same
    positions.  Only the window's footprint is touched: in place when it lies
    inside the volume, else from a padded copy of the footprint.
    """
    size = tuple(int(s) for s in size)
    matrix = np.asarray(matrix, dtype=np.float64)
    centre = np.asarray(centre, dtype=np.float64)
    n_ch = image.shape[3]
    half = (np.asarray(size) - 1) / 2
    corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(3, -1)
    reach = matrix @ corners
    # One voxel of slack each side: float32 positions may round across the footprint's edge.
    lo = np.floor(centre + reach.min(axis=1)).astype(np.int64) - 1
    hi = np.floor(centre + reach.max(axis=1)).astype(np.int64) + 2
    shape = np.asarray(image.shape[:3])
    # Channel-major memory (the trainer's training volumes) is read one channel at a time;
    # interleaved memory one voxel (all channels) at a time.  Same arithmetic, same windows.
    planar = is_channel_major(image, contiguous=True)
    if np.all(lo >= 0) and np.all(hi <= shape - 1) and (image.flags.c_contiguous or planar):
        src_img, src_lab, origin = image, label, np.zeros(3, np.intp)
    else:
        # The footprint crosses the border (or the memory is neither): copy just the footprint, padded,
        # in the volume's memory order.
        box = tuple(int(v) for v in hi - lo + 1)
        src_img = crop(image, lo, box, pad_value,
                       out=None if planar else np.empty(box + (n_ch,), np.float32))
        src_lab = None if label is None else crop(label, lo, box, label_pad_value)
        origin = lo.astype(np.intp)
    if src_lab is not None and not src_lab.flags.c_contiguous:
        src_lab = np.ascontiguousarray(src_lab)
    sy, sz = src_img.shape[1], src_img.shape[2]
    if planar:
        sources = [np.moveaxis(src_img, 3, 0)[c].reshape(-1) for c in range(n_ch)]
    else:
        sources = [_bytes_view(src_img.reshape(-1), n_ch * src_img.itemsize)]
    per_voxel = 1 if planar else n_ch  # values a gathered element holds
    lab_flat = None if src_lab is None else _bytes_view(src_lab.reshape(-1), src_lab.itemsize)

    if out_image is None:
        out_image = np.empty(size + (n_ch,), dtype=np.float32)
    if label is not None and out_label is None:
        out_label = np.empty(size, dtype=label.dtype)

    # Affine positions separate into an x term and a (y, z) plane term.
    ux, uy, uz = (np.arange(s, dtype=np.float64) - h for s, h in zip(size, half))
    # Positions in volume coordinates whichever the source: a copied footprint only shifts the
    # integer indices, so a window is the same bit for bit in place or from the footprint.
    base = centre
    x_term = (base[:, None] + matrix[:, 0:1] * ux[None, :]).astype(np.float32)  # (3, X)
    plane = ((matrix[:, 1, None, None] * uy[None, :, None]) + (matrix[:, 2, None, None] * uz[None, None, :]))
    plane = plane.reshape(3, -1).astype(np.float32)  # (3, Y*Z)
    step = max(1, _SLAB_VOXELS // plane.shape[1])
    scale = None if intensity_scale is None else np.asarray(intensity_scale, np.float32)
    shift = None if intensity_shift is None else np.asarray(intensity_shift, np.float32)

    for x0 in range(0, size[0], step):
        x1 = min(x0 + step, size[0])
        pos = [x_term[d, x0:x1, None] + plane[d][None, :] for d in range(3)]
        fl = [np.floor(p) for p in pos]
        frac = [np.subtract(p, f, out=p).reshape(-1) for p, f in zip(pos, fl)]
        ix, iy, iz = (f.astype(np.intp).reshape(-1) - o for f, o in zip(fl, origin))
        idx = ix * sy
        idx += iy
        idx *= sz
        idx += iz

        if per_voxel > 1:
            wx, wy, wz = (np.repeat(f, per_voxel) for f in frac)
        else:
            wx, wy, wz = frac

        for c, flat in enumerate(sources):
            a = _trilinear(flat, idx, wx, wy, wz, sy, sz)
            if planar:
                if scale is not None:
                    a *= scale[c]
                if shift is not None:
                    a += shift[c]
                out_image[x0:x1, ..., c] = a.reshape((x1 - x0,) + size[1:])
                continue
            if scale is not None or shift is not None:
                per_ch = a.reshape(-1, n_ch)
                for ch in range(n_ch):
                    if scale is not None:
                        per_ch[:, ch] *= scale[ch]
                    if shift is not None:
                        per_ch[:, ch] += shift[ch]
            # Assigned, not reshaped: ``out_image`` may be a channel-first batch seen as (X, Y, Z, C).
            out_image[x0:x1] = a.reshape((x1 - x0,) + size[1:] + (n_ch,))

        if lab_flat is not None:
            near = (ix + (frac[0] >= 0.5)) * sy
            near += iy + (frac[1] >= 0.5)
            near *= sz
            near += iz + (frac[2] >= 0.5)
            out_label[x0:x1] = np.take(lab_flat, near).view(src_lab.dtype).reshape((x1 - x0,) + size[1:])
    return out_image, out_label
