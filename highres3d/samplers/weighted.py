"""Window centres with probability proportional to a non-negative map.

This is NiftyNet's ``weighted`` sampler (the one the thesis used with
``sampler = label``) without the two NiftyNet 0.5 bugs of issue #432:

* every draw is an independent uniform variate on the whole cumulative mass
  (NiftyNet 0.5 mapped a single draw into the upper half of the sorted mass,
  so half of the foreground could never be a centre);
* the map is used as given (NiftyNet 0.5 subtracted its minimum, so the
  smallest weight got probability 0).  Negative or non-finite weights are a
  :class:`~highres3d.errors.DataError`.

The cumulative mass is built once per volume over the voxels with weight > 0
(float64, so that millions of small weights still sum exactly enough) and
each draw is a binary search.  A map with no positive weight inside the centre
domain gives uniform centres over the domain (NiftyNet's and MONAI's rule).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from highres3d.errors import ConfigError, DataError
from highres3d.samplers.base import EdgePolicy, WindowSampler, _sid, check_volume, crop

__all__ = ["WeightedSampler", "WeightedState"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class WeightedState:
    """Per-volume cumulative mass: ``cdf[i]`` is the mass of ``indices[:i + 1]``."""

    shape: tuple[int, int, int]
    lo: np.ndarray
    hi: np.ndarray
    indices: np.ndarray  # flat whole-volume indices of the voxels with weight > 0
    cdf: np.ndarray  # float64, same length; empty = uniform fallback


class WeightedSampler(WindowSampler):
    """Centre voxel ``v`` drawn with probability ``w(v) / sum(w)`` over the centre domain.

    Args:
        window_size: Window size in voxels.
        weights: Where the map comes from: ``"label"`` (default; the label's class
            indices are the weights, the thesis's ``sampler = label``), the name
            of another attribute of the volume (e.g. ``"weight"``), or a callable
            ``volume -> array (X, Y, Z)``.  Windows carry the cropped map as
            ``Window.weight`` unless it is the label.
        edge_policy: ``"pad"`` (default), ``"valid"`` or ``"clamp"``.  With ``valid``, weights
            outside the valid region are ignored (NiftyNet and MONAI behaviour).
    """

    def __init__(
        self,
        window_size: int | Sequence[int],
        weights: str | Callable[[Any], np.ndarray] = "label",
        *,
        edge_policy: EdgePolicy = "pad",
        pad_value: float = 0.0,
        label_pad_value: int = 0,
    ) -> None:
        super().__init__(window_size, edge_policy=edge_policy, pad_value=pad_value, label_pad_value=label_pad_value)
        if not (callable(weights) or isinstance(weights, str)):
            raise ConfigError(f"sampler weights: expected an attribute name or a callable, got {weights!r}")
        self.weights = weights
        self.uses_label = weights == "label"

    def weight_map(self, volume: Any) -> np.ndarray:
        """The volume's sampling map ``(X, Y, Z)``, validated."""
        if callable(self.weights):
            w = self.weights(volume)
        else:
            w = getattr(volume, self.weights, None)
            if w is None:
                raise DataError(f"subject {_sid(volume)}: the weighted sampler needs volume.{self.weights}, which is missing")
        w = np.asarray(w)
        if w.ndim == 4 and w.shape[3] == 1:
            w = w[..., 0]
        if w.shape != volume.image.shape[:3]:
            raise DataError(
                f"subject {_sid(volume)}: sampling map shape {w.shape} != image shape {volume.image.shape[:3]}"
            )
        return w

    def prepare(self, volume: Any) -> WeightedState:
        check_volume(volume, need_label=self.uses_label)
        lo, hi = self.centre_domain(volume.image.shape, _sid(volume))
        w = self.weight_map(volume)
        region = w[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        if w.dtype.kind == "f":
            if not np.all(np.isfinite(region)):
                raise DataError(f"subject {_sid(volume)}: sampling map has NaN or infinite values")
        if w.dtype.kind in "fi" and region.size and region.min() < 0:
            raise DataError(
                f"subject {_sid(volume)}: sampling map has negative values (min {region.min()}); "
                "weights must be >= 0"
            )
        local = np.flatnonzero(region > 0)
        if local.size == 0:
            log.info("subject %s: sampling map is zero in the centre domain; uniform centres", _sid(volume))
            empty = np.zeros(0, np.int64)
            return WeightedState(w.shape, lo, hi, empty, empty.astype(np.float64))
        cdf = np.cumsum(region.reshape(-1)[local], dtype=np.float64)
        # Flat indices of the region -> whole-volume flat indices, so draws need one unravel.
        rshape = region.shape
        x, rem = np.divmod(local, rshape[1] * rshape[2])
        y, z = np.divmod(rem, rshape[2])
        flat = ((x + lo[0]) * w.shape[1] + (y + lo[1])) * w.shape[2] + (z + lo[2])
        return WeightedState(w.shape, lo, hi, flat, cdf)

    def draw_centres(self, state: WeightedState, n: int, rng: np.random.Generator) -> np.ndarray:
        if state.cdf.size == 0:
            return rng.integers(state.lo, state.hi + 1, size=(n, 3), dtype=np.int64)
        # side="right" with u < total never lands past the end, and never on a zero step.
        k = np.searchsorted(state.cdf, rng.random(n) * state.cdf[-1], side="right")
        flat = state.indices[np.minimum(k, state.cdf.size - 1)]
        x, rem = np.divmod(flat, state.shape[1] * state.shape[2])
        y, z = np.divmod(rem, state.shape[2])
        return np.stack([x, y, z], axis=1).astype(np.int64, copy=False)

    def _crop_weight(self, volume: Any, start) -> Optional[np.ndarray]:
        if self.uses_label:
            return None
        return crop(self.weight_map(volume), start, self.window_size, 0)
