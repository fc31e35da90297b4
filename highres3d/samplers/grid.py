"""Regular grid of windows covering a whole volume, for inference.

Unlike NiftyNet's grid sampler (which asserted when the volume was smaller
than the window and appended an extra "middle" window when an axis needed two),
``GridSampler`` covers any volume:

* per axis, windows start at ``0, step, 2*step, ...`` with
  ``step = window - overlap`` and the last window is snapped flush with the far
  edge, so no window covers padding unless the volume itself is smaller than
  the window;
* an axis shorter than the window is padded (symmetrically) up to the window,
  and the aggregator crops the padding away again.

Windows are enumerated x-outer, z-inner, with each axis' starts ascending.  The
aggregators rely on that order to stream their output slab by slab along x.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from highres3d.errors import ConfigError

__all__ = ["GridSampler", "axis_starts", "resolve_overlap"]


def _triple(value, name: str) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)):
        return (value,) * 3
    value = tuple(value)
    if len(value) != 3:
        raise ConfigError(f"{name}: expected one value or three (x, y, z), got {list(value)}")
    return value


def resolve_overlap(window: Sequence[int], overlap=0, border=None) -> tuple[int, int, int]:
    """Overlap between neighbouring windows, in voxels per axis.

    ``overlap`` is a fraction of the window when it is a float in [0, 1), or
    voxels when it is an int.  ``border`` is NiftyNet's name for the margin
    discarded on each interior side of a window, i.e. half the overlap.
    """
    if border is not None:
        if overlap not in (0, 0.0, None):
            raise ConfigError("inference: give either overlap or border, not both")
        borders = _triple(border, "inference.border")
        if any(int(b) != b or b < 0 for b in borders):
            raise ConfigError(f"inference.border: expected non-negative voxel counts, got {list(borders)}")
        return tuple(min(2 * int(b), max(w - 1, 0)) for b, w in zip(borders, window))
    out = []
    for w, ov in zip(window, _triple(0 if overlap is None else overlap, "inference.overlap")):
        if isinstance(ov, bool) or not isinstance(ov, (int, float, np.integer, np.floating)):
            raise ConfigError(f"inference.overlap: expected a number, got {ov!r}")
        if isinstance(ov, (float, np.floating)) and 0.0 <= ov < 1.0:
            vox = int(round(float(ov) * w))
        elif ov >= 1 and float(ov).is_integer():
            vox = int(ov)
        elif ov == 0:
            vox = 0
        else:
            raise ConfigError(
                f"inference.overlap: expected a fraction in [0, 1) or whole voxels >= 1, got {ov}"
            )
        # A step of at least one voxel keeps the grid finite for any overlap.
        out.append(min(vox, max(w - 1, 0)))
    return tuple(out)


def axis_starts(size: int, window: int, step: int) -> np.ndarray:
    """Window starts along one axis: regular steps, the last one flush with the edge."""
    if window >= size:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((size - window) / step) + 1
    starts = np.minimum(np.arange(n, dtype=np.int64) * step, size - window)
    return np.unique(starts)


@dataclass(frozen=True)
class GridSampler:
    """Window locations covering a volume of ``shape`` (X, Y, Z).

    ``window_size`` is an int or a triple; ``None`` (or a value <= 0) on an
    axis means the whole axis, so ``window_size=None`` is a single
    whole-volume window.  ``overlap`` is in voxels (int) or a fraction of the
    window (float < 1); ``border`` (NiftyNet) is half the overlap.
    """

    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    overlap: tuple[int, int, int]
    pad_before: tuple[int, int, int]
    pad_after: tuple[int, int, int]
    starts: tuple[np.ndarray, np.ndarray, np.ndarray]

    def __init__(self, shape, window_size=None, overlap=0, border=None):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"GridSampler: expected a 3-D spatial shape, got {shape}")
        if window_size is None:
            window_size = (None, None, None)
        window = []
        for w, s in zip(_triple(window_size, "inference.window_size"), shape):
            if w is None or w <= 0:
                window.append(s)
            elif int(w) != w:
                raise ConfigError(f"inference.window_size: expected whole voxels, got {w}")
            else:
                window.append(int(w))
        window = tuple(window)
        ov = resolve_overlap(window, overlap, border)
        pad_total = [max(w - s, 0) for w, s in zip(window, shape)]
        pad_before = tuple(p // 2 for p in pad_total)
        pad_after = tuple(p - b for p, b in zip(pad_total, pad_before))
        padded = tuple(s + p for s, p in zip(shape, pad_total))
        starts = tuple(axis_starts(p, w, max(w - o, 1)) for p, w, o in zip(padded, window, ov))
        for name, value in (
            ("shape", shape), ("window", window), ("overlap", ov), ("pad_before", pad_before),
            ("pad_after", pad_after), ("starts", starts),
        ):
            object.__setattr__(self, name, value)

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        return tuple(s + a + b for s, a, b in zip(self.shape, self.pad_before, self.pad_after))

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(len(s) for s in self.starts)

    def __len__(self) -> int:
        return int(np.prod(self.grid_shape))

    @property
    def locations(self) -> np.ndarray:
        """(N, 3) window starts in padded coordinates, x-outer / z-inner."""
        grids = np.meshgrid(*self.starts, indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.locations)

    def min_margin(self) -> tuple[int, int, int]:
        """Smallest distance (voxels) from an owned voxel to an interior window edge.

        In ``crop`` blending each voxel is taken from the window whose interior
        edge is farthest from it; a network whose receptive field radius is at
        most this margin gives the same result as a whole-volume pass.  An axis
        covered by a single window reports its window size (no interior edge).
        """
        margins = []
        for starts, w in zip(self.starts, self.window):
            if len(starts) == 1:
                margins.append(w)
            else:
                margins.append(int(min((w - d) // 2 for d in np.diff(starts))))
        return tuple(margins)

    def pad(self, image: np.ndarray, mode: str = "constant", constant_values: float = 0.0) -> np.ndarray:
        """Pad an (X, Y, Z, ...) array to ``padded_shape`` (a view-free copy only when needed)."""
        if not any(self.pad_before) and not any(self.pad_after):
            return image
        widths = [(b, a) for b, a in zip(self.pad_before, self.pad_after)] + [(0, 0)] * (image.ndim - 3)
        if mode == "constant":
            return np.pad(image, widths, mode="constant", constant_values=constant_values)
        return np.pad(image, widths, mode=mode)

    def crop_regions(self) -> tuple[list[tuple[int, int]], ...]:
        """Per axis and window index, the [lo, hi) part of the padded axis that the window owns.

        Consecutive windows split their overlap at its midpoint, so the owned
        regions tile the axis exactly once and every owned voxel is as far from
        an interior window edge as the grid allows.
        """
        regions = []
        for starts, w, size in zip(self.starts, self.window, self.padded_shape):
            bounds = [0]
            for a, b in zip(starts[:-1], starts[1:]):
                bounds.append(int((b + a + w) // 2))
            bounds.append(size)
            regions.append([(bounds[i], bounds[i + 1]) for i in range(len(starts))])
        return tuple(regions)
