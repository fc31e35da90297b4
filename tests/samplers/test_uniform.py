"""UniformSampler: every allowed centre equally likely."""
from types import SimpleNamespace

import numpy as np
from scipy import stats

from highres3d.samplers import UniformSampler


def test_centres_are_uniform_over_the_volume_with_padding():
    volume = SimpleNamespace(image=np.zeros((4, 3, 5, 1), np.float32), label=None)
    starts = UniformSampler((2, 2, 2)).locations(volume, 24000, rng=4)
    flat = np.ravel_multi_index((starts + 1).T, (4, 3, 5))
    counts = np.bincount(flat, minlength=60)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_generator_interface_is_endless_without_num_windows():
    volume = SimpleNamespace(subject_id="u", image=np.zeros((6, 6, 6, 1), np.float32), label=None)
    gen = UniformSampler(3)(volume, rng=0)
    windows = [next(gen) for _ in range(150)]
    assert len(windows) == 150 and all(w.image.shape == (3, 3, 3, 1) for w in windows)
