"""WeightedSampler: NiftyNet's weighted sampler without the bugs of NiftyNet issue #432."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from highres3d.errors import DataError
from highres3d.samplers import WeightedSampler


def line_volume(weights):
    weights = np.asarray(weights)
    shape = (weights.size, 1, 1)
    return SimpleNamespace(
        subject_id="w",
        image=np.zeros(shape + (1,), np.float32),
        label=weights.reshape(shape).astype(np.uint8),
        weight=weights.reshape(shape).astype(np.float32),
    )


@pytest.mark.parametrize("n_per_call", [1, 1000])
def test_issue_432_map_gives_frequencies_proportional_to_weights(n_per_call):
    volume = line_volume([1, 1, 2, 2, 1, 1])
    sampler = WeightedSampler(1, "weight")
    state = sampler.prepare(volume)
    rng = np.random.default_rng(0)
    n = 16000
    centres = np.concatenate([sampler.draw_centres(state, n_per_call, rng) for _ in range(n // n_per_call)])
    counts = np.bincount(centres[:, 0], minlength=6)
    expected = n * np.array([1, 1, 2, 2, 1, 1]) / 8
    # NiftyNet 0.5 drew only the upper half of the mass with one sample per call,
    # and gave the minimum weight probability 0: both would fail here.
    assert counts.min() > 0
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_label_map_as_weights_prefers_higher_label_values():
    volume = line_volume([0, 1, 2, 4, 0])
    sampler = WeightedSampler(1)  # weights="label", the thesis's sampler = label
    counts = np.bincount(sampler.locations(volume, 14000, rng=1)[:, 0], minlength=5)
    assert counts[0] == 0 and counts[4] == 0
    assert stats.chisquare(counts[1:4], 14000 * np.array([1, 2, 4]) / 7).pvalue > 1e-3


def test_window_carries_the_cropped_weight_map():
    volume = line_volume([1, 2, 3, 4, 5, 6])
    window = WeightedSampler((3, 1, 1), "weight").crop(volume, (-1, 0, 0))
    np.testing.assert_array_equal(window.weight.ravel(), [0, 1, 2])


def test_valid_policy_ignores_weights_near_the_border():
    volume = line_volume([9, 1, 1, 1, 9])
    sampler = WeightedSampler((3, 1, 1), "weight", edge_policy="valid")
    starts = sampler.locations(volume, 500, rng=0)
    assert set(starts[:, 0] + 1) == {1, 2, 3}


def test_negative_or_nan_weights_are_data_errors():
    with pytest.raises(DataError, match="negative"):
        WeightedSampler(1, "weight").prepare(line_volume([1, -1, 2]))
    volume = line_volume([1, 1, 2])
    volume.weight[1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        WeightedSampler(1, "weight").prepare(volume)


def test_all_zero_map_falls_back_to_uniform_centres():
    volume = line_volume([0, 0, 0, 0])
    counts = np.bincount(WeightedSampler(1, "weight").locations(volume, 4000, rng=0)[:, 0], minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_missing_or_misshapen_map_is_a_data_error():
    volume = line_volume([1, 2])
    with pytest.raises(DataError, match="volume.prior"):
        WeightedSampler(1, "prior").prepare(volume)
    with pytest.raises(DataError, match="shape"):
        WeightedSampler(1, lambda v: np.ones((3, 1, 1))).prepare(volume)
