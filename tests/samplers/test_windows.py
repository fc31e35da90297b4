"""Window geometry shared by all samplers: edge policies, padding, reported locations."""
from types import SimpleNamespace

import numpy as np
import pytest

from highres3d.errors import ConfigError, DataError
from highres3d.samplers import ClassWeightedSampler, UniformSampler, WeightedSampler, crop


def make_volume(shape=(20, 17, 12), channels=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal(shape + (channels,)).astype(np.float32)
    label = (rng.random(shape) < 0.1).astype(np.uint8) + (rng.random(shape) < 0.05).astype(np.uint8)
    return SimpleNamespace(subject_id="s", image=image, label=label, weight=rng.random(shape).astype(np.float32))


def padded(array, pad, value):
    widths = [(pad, pad)] * 3 + [(0, 0)] * (array.ndim - 3)
    return np.pad(array, widths, constant_values=value)


SAMPLERS = [
    lambda **kw: UniformSampler(**kw),
    lambda **kw: ClassWeightedSampler(**kw),
    lambda **kw: WeightedSampler(weights="weight", **kw),
]


@pytest.mark.parametrize("make", SAMPLERS)
@pytest.mark.parametrize("edge", ["pad", "valid", "clamp"])
def test_every_window_is_the_slice_of_the_padded_volume_at_its_start(make, edge):
    volume = make_volume()
    size = (8, 6, 9)
    sampler = make(window_size=size, edge_policy=edge, pad_value=-7.0, label_pad_value=255)
    pad = 10
    big_image = padded(volume.image, pad, -7.0)
    big_label = padded(volume.label, pad, 255)
    big_weight = padded(volume.weight, pad, 0)
    for window in sampler(volume, num_windows=200, rng=3):
        sl = tuple(slice(s + pad, s + pad + w) for s, w in zip(window.start, size))
        np.testing.assert_array_equal(window.image, big_image[sl])
        np.testing.assert_array_equal(window.label, big_label[sl])
        if window.weight is not None:
            np.testing.assert_array_equal(window.weight, big_weight[sl])
        assert window.image.dtype == np.float32 and window.image.flags.c_contiguous
        if edge != "pad":
            assert all(s >= 0 and s + w <= n for s, w, n in zip(window.start, size, volume.image.shape))


def test_pad_policy_reaches_every_voxel_as_centre_including_edges():
    volume = make_volume(shape=(5, 4, 3))
    sampler = UniformSampler(4)
    starts = sampler.locations(volume, 4000, rng=0)
    centres = starts + 4 // 2
    seen = {tuple(c) for c in centres}
    assert seen == {(x, y, z) for x in range(5) for y in range(4) for z in range(3)}


def test_valid_policy_centres_stay_half_a_window_from_the_edge():
    volume = make_volume(shape=(12, 12, 12))
    sampler = UniformSampler(5, edge_policy="valid")
    starts = sampler.locations(volume, 8000, rng=1)
    assert starts.min() == 0 and starts.max() == 12 - 5
    assert len({tuple(s) for s in starts}) == 8**3


def test_clamp_policy_shifts_edge_centres_inside():
    volume = make_volume(shape=(12, 12, 12))
    sampler = UniformSampler(6, edge_policy="clamp")
    starts = sampler.locations(volume, 2000, rng=2)
    assert starts.min() == 0 and starts.max() == 6
    # Centres 0..3 all clamp to start 0, so start 0 is four times as frequent as start 3.
    counts = np.bincount(starts[:, 0], minlength=7)
    assert counts[0] > 2.5 * counts[3]


@pytest.mark.parametrize("edge", ["pad", "clamp"])
def test_volume_smaller_than_window_is_padded_not_skipped(edge):
    volume = make_volume(shape=(4, 10, 3))
    sampler = ClassWeightedSampler(8, edge_policy=edge, label_pad_value=9)
    windows = list(sampler(volume, num_windows=20, rng=0))
    assert len(windows) == 20
    for w in windows:
        assert w.image.shape == (8, 8, 8, 2) and w.label.shape == (8, 8, 8)
        assert (w.label == 9).any()
        inside = np.count_nonzero(w.label != 9)
        assert 0 < inside <= 4 * 8 * 3
    if edge == "clamp":
        # Centred on short axes: 2 voxels of padding before the 4-voxel axis, 2 after.
        assert {w.start[0] for w in windows} == {-2}


def test_valid_policy_with_a_volume_smaller_than_the_window_is_a_clear_error():
    volume = make_volume(shape=(4, 10, 10))
    with pytest.raises(DataError, match="smaller than the window.*'valid'"):
        UniformSampler(8, edge_policy="valid").prepare(volume)


def test_crop_writes_into_a_given_buffer_and_pads_lazily():
    a = np.arange(5 * 5 * 5, dtype=np.float32).reshape(5, 5, 5)
    out = np.full((3, 3, 3), np.nan, np.float32)  # a voxel neither padded nor copied stays NaN
    got = crop(a, (-1, 3, 1), (3, 3, 3), -1.0, out=out)
    assert got is out
    expected = np.pad(a, 2, constant_values=-1)[1:4, 5:8, 3:6]
    np.testing.assert_array_equal(out, expected)
    # Crossing the border on both sides of every axis: the pad fills each slab outside the inside box.
    big = np.full((9, 9, 9), np.nan, np.float32)
    crop(a, (-2, -2, -2), (9, 9, 9), -1.0, out=big)
    np.testing.assert_array_equal(big, np.pad(a, 2, constant_values=-1))
    far = crop(a, (10, 10, 10), (2, 2, 2), 4.0)
    assert np.all(far == 4.0)


class _Always(dict):
    """A ``_staged_wins`` table that has decided every geometry the same way."""

    def __init__(self, staged):
        super().__init__()
        self.staged = staged

    def get(self, key, default=None):
        return self.staged

    def __contains__(self, key):
        return True


@pytest.mark.parametrize(
    "path, stage_bytes",
    [("staged", 1 << 20), ("staged", 700), ("direct", 1 << 20), ("timed", 1 << 20), ("ineligible", 1)],
    ids=["staged-one-block", "staged-blocks-of-2-planes", "direct", "timing-both", "block-too-small"],
)
@pytest.mark.parametrize("dtype, channels", [(np.float32, (2,)), (np.uint8, ())], ids=["image", "label"])
def test_crop_matches_the_padded_reference_on_every_copy_path(monkeypatch, path, stage_bytes, dtype, channels):
    from highres3d.samplers import base

    monkeypatch.setattr(base, "_STAGE_BYTES", stage_bytes)
    monkeypatch.setattr(base, "_copy_times", {})
    monkeypatch.setattr(base, "_staged_wins", {} if path in ("timed", "ineligible") else _Always(path == "staged"))
    staged = []
    real_scratch = base._scratch_bytes
    monkeypatch.setattr(base, "_scratch_bytes", lambda n: staged.append(n) or real_scratch(n))
    rng = np.random.default_rng(3)
    array = (100 * rng.random((12, 9, 10) + channels)).astype(dtype)
    size = (5, 4, 6)  # 6 of 10 voxels on the last axis: eligible for the staged path if it fits the block
    reference = padded(array, 8, 7)
    starts = [(0, 0, 0), (7, 5, 4), (3, 2, 1), (-2, 1, 3), (9, 7, 6), (-3, -2, -4), (14, 0, 0)]
    for start in starts + [(x, 1, 2) for x in range(7)] * 2:
        got = crop(array, start, size, 7)
        lo = [s + 8 for s in start]
        np.testing.assert_array_equal(got, reference[lo[0] : lo[0] + 5, lo[1] : lo[1] + 4, lo[2] : lo[2] + 6])
        assert got.dtype == dtype
    assert bool(staged) == (path in ("staged", "timed"))
    if path == "timed":
        # Each path timed on the first windows of the geometry, then the faster one kept.
        key = (array.dtype.str, array.shape[1:], 6)
        assert [len(t) for t in base._copy_times[key]] == [base._STAGE_TRIALS] * 2
        assert base._staged_wins[key] == (min(base._copy_times[key][1]) < min(base._copy_times[key][0]))
    # A view that is not C-contiguous takes the direct copy and gives the same windows.
    view = array[:, :, ::-1]
    np.testing.assert_array_equal(crop(view, (2, 2, 2), size), view[2:7, 2:6, 2:8])


def test_window_reports_size_stop_and_centre():
    volume = make_volume()
    w = UniformSampler((4, 5, 6)).crop(volume, (-1, 2, 3))
    assert w.size == (4, 5, 6) and w.stop == (3, 7, 9) and w.centre == (1, 4, 6)
    assert w.subject_id == "s"


@pytest.mark.parametrize("bad", [0, (4, 4), (4, -1, 4), 2.5])
def test_bad_window_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        UniformSampler(bad)


def test_bad_edge_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="edge"):
        UniformSampler(4, edge_policy="mirror")


def test_same_seed_same_windows_different_seed_different_windows():
    volume = make_volume()
    for sampler in (UniformSampler(6), ClassWeightedSampler(6), WeightedSampler(6, "weight")):
        a = sampler.locations(volume, 50, rng=11)
        b = sampler.locations(volume, 50, rng=11)
        c = sampler.locations(volume, 50, rng=12)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_missing_label_is_a_data_error_for_label_samplers():
    volume = make_volume()
    volume.label = None
    with pytest.raises(DataError, match="label"):
        ClassWeightedSampler(4).prepare(volume)
    assert UniformSampler(4).crop(volume, (0, 0, 0)).label is None


@pytest.mark.parametrize("slow", ["channel_major", "interleaved"])
def test_fastest_layout_picks_the_layout_windows_copy_out_of_faster_and_keeps_its_answer(monkeypatch, slow):
    import time

    from highres3d.errors import ConfigError
    from highres3d.samplers import LAYOUTS, base, fastest_layout, in_layout, is_channel_major

    monkeypatch.setattr(base, "_fastest", {})
    real_crop, calls = base.crop, []

    def crop_slowly(array, *args, **kwargs):
        calls.append(1)
        if is_channel_major(array) == (slow == "channel_major"):
            time.sleep(0.002)  # this layout copies slower "on this machine"
        return real_crop(array, *args, **kwargs)

    monkeypatch.setattr(base, "crop", crop_slowly)
    image = np.random.default_rng(0).random((20, 18, 16, 2), dtype=np.float32)
    layout, rates = fastest_layout(image, 8)
    assert layout != slow and set(rates) == set(LAYOUTS) and rates[layout] > rates[slow]
    timed = len(calls)
    # Once per process and geometry: a volume of another shape (same channels and window) gets the same answer.
    assert fastest_layout(np.moveaxis(np.ascontiguousarray(np.moveaxis(image, 3, 0))[:, :12], 0, 3), 8)[0] == layout
    assert len(calls) == timed
    # One channel has one layout; nothing to time.
    assert fastest_layout(image[..., :1], 8) == ("interleaved", {})
    for name in LAYOUTS:
        stored = in_layout(image, name)
        np.testing.assert_array_equal(stored, image)
        assert is_channel_major(stored, contiguous=True) == (name == "channel_major")
    with pytest.raises(ConfigError, match="memory layout"):
        in_layout(image, "planar")
