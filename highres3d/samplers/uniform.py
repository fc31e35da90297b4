"""Uniform window centres: every allowed centre voxel equally likely."""
from __future__ import annotations

import numpy as np

from highres3d.samplers.base import WindowSampler

__all__ = ["UniformSampler"]


class UniformSampler(WindowSampler):
    """Centre voxels drawn uniformly from the domain of the edge policy.

    With ``edge_policy="pad"`` every voxel of the volume is equally likely to be a
    centre; with ``edge_policy="valid"`` every window that fits inside the volume is
    equally likely (NiftyNet's ``uniform`` and TorchIO's ``UniformSampler``).

    >>> sampler = UniformSampler(96)
    >>> for window in sampler(volume, num_windows=4, rng=0):
    ...     window.image.shape, window.start
    """

    def draw_centres(self, state, n: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = state
        return rng.integers(lo, hi + 1, size=(n, 3), dtype=np.int64)
