"""ClassWeightedSampler: class frequencies, tables, missing classes."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from highres3d.errors import ConfigError, DataError
from highres3d.samplers import ClassCoordinates, ClassWeightedSampler


def three_class_volume(shape=(40, 36, 30)):
    label = np.zeros(shape, np.uint8)
    label[5:15, 5:15, 5:15] = 1  # 1000 voxels
    label[20:23, 20:23, 20:23] = 2  # 27 voxels
    label[0, 0, :2] = 2  # on the border: reachable with edge 'pad'
    image = np.zeros(shape + (1,), np.float32)
    return SimpleNamespace(subject_id="t", image=image, label=label)


def centre_classes(sampler, volume, n, seed):
    centres = sampler.locations(volume, n, rng=seed) + np.asarray(sampler.window_size) // 2
    return volume.label[centres[:, 0], centres[:, 1], centres[:, 2]]


@pytest.mark.parametrize("probabilities", [None, {0: 0.2, 1: 0.3, 2: 0.5}, [1, 0, 3]])
def test_centre_class_frequencies_match_requested_probabilities(probabilities):
    volume = three_class_volume()
    sampler = ClassWeightedSampler(8, probabilities)
    n = 20000
    counts = np.bincount(centre_classes(sampler, volume, n, seed=5), minlength=3)
    if probabilities is None:
        p = np.full(3, 1 / 3)
    elif isinstance(probabilities, dict):
        p = np.array([probabilities[c] for c in range(3)])
    else:
        p = np.asarray(probabilities, float) / sum(probabilities)
    keep = p > 0
    assert np.all(counts[~keep] == 0)
    assert stats.chisquare(counts[keep], n * p[keep]).pvalue > 1e-3


def test_voxels_within_a_class_are_equally_likely():
    volume = three_class_volume()
    sampler = ClassWeightedSampler(8, {2: 1})
    centres = sampler.locations(volume, 29000, rng=1) + 4
    flat = np.ravel_multi_index(centres.T, volume.label.shape)
    _, counts = np.unique(flat, return_counts=True)
    assert counts.size == 29  # 27 inside + 2 on the border
    assert stats.chisquare(counts).pvalue > 1e-3


def test_rejection_drawn_background_is_uniform_and_class_pure():
    volume = three_class_volume(shape=(6, 5, 4))
    volume.label[:] = 0
    volume.label[0, 0, 0] = 1
    sampler = ClassWeightedSampler(3, {0: 1})
    state = sampler.prepare(volume)
    assert 0 not in state.coordinates.tables  # background dense: drawn by rejection
    centres = sampler.draw_centres(state, 11900, np.random.default_rng(0))
    flat = np.ravel_multi_index(centres.T, volume.label.shape)
    counts = np.bincount(flat, minlength=volume.label.size)
    assert counts[0] == 0
    assert stats.chisquare(counts[1:]).pvalue > 1e-3


def test_missing_class_probability_is_redistributed_over_present_classes():
    volume = three_class_volume()
    volume.label[volume.label == 2] = 0
    sampler = ClassWeightedSampler(8, {0: 1, 1: 1, 2: 2})
    state = sampler.prepare(volume)
    np.testing.assert_allclose(state.probabilities, [0.5, 0.5])
    counts = np.bincount(centre_classes(sampler, volume, 10000, seed=2), minlength=3)
    assert counts[2] == 0
    assert stats.chisquare(counts[:2]).pvalue > 1e-3


def test_no_requested_class_present_falls_back_to_uniform_centres():
    volume = three_class_volume(shape=(10, 10, 10))
    volume.label[:] = 0
    sampler = ClassWeightedSampler(4, {1: 1})
    state = sampler.prepare(volume)
    assert state.classes.size == 0
    centres = sampler.draw_centres(state, 5000, np.random.default_rng(0))
    assert centres.min() == 0 and centres.max() == 9


def test_valid_policy_counts_only_classes_inside_the_centre_domain():
    volume = three_class_volume()
    sampler = ClassWeightedSampler(8, {2: 1}, edge_policy="valid")
    coords = sampler.prepare(volume).coordinates
    assert coords.counts[2] == 27  # the two border voxels are outside the valid domain
    centres = sampler.locations(volume, 500, rng=0) + 4
    assert volume.label[tuple(centres.T)].min() == 2


def test_large_classes_are_subsampled_to_max_per_class():
    volume = three_class_volume()
    sampler = ClassWeightedSampler(8, max_per_class=100)
    tables = sampler.prepare(volume).coordinates.tables
    assert tables[1].size == 100 and len(np.unique(tables[1])) == 100
    assert np.all(volume.label.reshape(-1)[tables[1]] == 1)
    assert tables[2].size == 29


def test_rare_background_gets_a_table():
    volume = three_class_volume(shape=(10, 10, 10))
    volume.label[:] = 1
    volume.label[2, 3, 4] = 0
    sampler = ClassWeightedSampler(4, {0: 1})
    state = sampler.prepare(volume)
    np.testing.assert_array_equal(state.coordinates.tables[0], [np.ravel_multi_index((2, 3, 4), (10, 10, 10))])
    assert {tuple(c) for c in sampler.draw_centres(state, 20, np.random.default_rng(0))} == {(2, 3, 4)}


def test_class_coordinates_round_trip_and_are_reused_from_the_volume(tmp_path):
    volume = three_class_volume()
    sampler = ClassWeightedSampler(8)
    coords = sampler.class_coordinates(volume)
    coords.save(tmp_path / "c.npz")
    loaded = ClassCoordinates.load(tmp_path / "c.npz")
    assert loaded.shape == coords.shape and loaded.lo == coords.lo and loaded.hi == coords.hi
    np.testing.assert_array_equal(loaded.counts, coords.counts)
    for c in coords.tables:
        np.testing.assert_array_equal(loaded.tables[c], coords.tables[c])
    volume.class_coordinates = loaded
    assert sampler.prepare(volume).coordinates is loaded
    # A table for another domain (edge 'valid') is not mistaken for this one.
    assert ClassWeightedSampler(8, edge_policy="valid").prepare(volume).coordinates is not loaded


def test_table_memory_is_small_for_a_rare_class():
    label = np.zeros((120, 120, 80), np.uint8)
    label[50:60, 50:60, 30:40] = 1
    coords = ClassCoordinates.build(label)
    assert coords.nbytes < 5_000  # 1000 int32 indices, no background table


@pytest.mark.parametrize("bad", [{0: -1}, {0: 0.0}, [float("nan")], {-1: 1}])
def test_bad_probabilities_are_config_errors(bad):
    with pytest.raises(ConfigError, match="probabilities"):
        ClassWeightedSampler(4, bad)


def test_float_labels_are_rejected():
    volume = three_class_volume()
    volume.label = volume.label.astype(np.float32)
    with pytest.raises(DataError, match="integer"):
        ClassWeightedSampler(4).prepare(volume)
