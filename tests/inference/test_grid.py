"""GridSampler coverage and GridAggregator stitching on NumPy arrays."""
import numpy as np
import pytest
from scipy import ndimage

from highres3d.aggregators import GridAggregator, gaussian_profile, softmax
from highres3d.aggregators.grid import COLUMNS_APART_MAX_RATIO
from highres3d.errors import ConfigError
from highres3d.samplers.grid import GridSampler, axis_starts


def run_grid(image, sampler, blend, output="logits", model=None, batch=3, order=None):
    """Feed every window of ``image`` (through ``model``) into an aggregator."""
    padded = sampler.pad(image)
    locations = sampler.locations if order is None else sampler.locations[order]
    wx, wy, wz = sampler.window
    agg = None
    for i in range(0, len(locations), batch):
        locs = locations[i:i + batch]
        windows = np.stack([padded[x:x + wx, y:y + wy, z:z + wz] for x, y, z in locs])
        if model is not None:
            windows = model(windows)
        if agg is None:
            agg = GridAggregator(sampler, windows.shape[-1], blend=blend, output=output)
        agg.add_batch(windows, locs)
    return agg.result(), agg


def test_axis_starts_snap_last_window_to_edge():
    assert axis_starts(10, 4, 2).tolist() == [0, 2, 4, 6]
    assert axis_starts(10, 4, 4).tolist() == [0, 4, 6]
    assert axis_starts(10, 8, 8).tolist() == [0, 2]  # NiftyNet added a middle window [0, 2, 1]
    assert axis_starts(10, 10, 3).tolist() == [0]
    assert axis_starts(3, 8, 8).tolist() == [0]
    assert axis_starts(155, 96, 72).tolist() == [0, 59]


def test_overlap_as_fraction_voxels_or_border():
    s = GridSampler((240, 240, 155), 96, overlap=0.25)
    assert s.overlap == (24, 24, 24) and s.grid_shape == (3, 3, 2) and len(s) == 18
    assert GridSampler((240, 240, 155), 96, overlap=24).overlap == (24, 24, 24)
    assert GridSampler((240, 240, 155), 96, border=12).overlap == (24, 24, 24)
    assert GridSampler((64, 64, 64), (63, 63, 40), border=(2, 3, 4)).starts[2].tolist() == [0, 24]
    assert GridSampler((50, 50, 50), 10, overlap=(0, 0.5, 4)).overlap == (0, 5, 4)
    with pytest.raises(ConfigError):
        GridSampler((50, 50, 50), 10, overlap=1.5)
    with pytest.raises(ConfigError):
        GridSampler((50, 50, 50), 10, overlap=0.2, border=2)
    with pytest.raises(ConfigError):
        GridSampler((50, 50, 50), (10, 10))


@pytest.mark.parametrize("shape", [(17, 23, 9), (5, 6, 7), (31, 1, 12)])
@pytest.mark.parametrize("window,overlap", [((8, 8, 8), 0), ((8, 7, 5), 3), ((10, 10, 10), 0.5), ((20, 20, 20), 0), ((9, 4, 9), 0.3)])
def test_windows_cover_every_voxel_and_stay_inside(shape, window, overlap):
    s = GridSampler(shape, window, overlap)
    covered = np.zeros(s.padded_shape, dtype=int)
    for x, y, z in s.locations:
        assert x + s.window[0] <= s.padded_shape[0] and y + s.window[1] <= s.padded_shape[1]
        covered[x:x + s.window[0], y:y + s.window[1], z:z + s.window[2]] += 1
    assert covered.min() >= 1
    # padding only where the volume is smaller than the window
    for size, w, before, after in zip(shape, s.window, s.pad_before, s.pad_after):
        assert before + after == max(w - size, 0) and before <= after
    # crop regions tile the padded volume exactly once
    owned = np.zeros(s.padded_shape, dtype=int)
    regions = s.crop_regions()
    for i, j, k in np.ndindex(*s.grid_shape):
        (a, b), (c, d), (e, f) = regions[0][i], regions[1][j], regions[2][k]
        owned[a:b, c:d, e:f] += 1
    assert (owned == 1).all()


@pytest.mark.parametrize("blend", ["crop", "average", "gaussian"])
@pytest.mark.parametrize(
    "shape,window,overlap",
    [((17, 23, 9), (8, 8, 8), 0), ((17, 23, 9), (8, 7, 5), 3), ((21, 19, 13), (10, 10, 10), 0.5),
     ((5, 6, 7), (8, 8, 8), 0), ((13, 11, 9), (6, 20, 5), 2), ((12, 12, 12), None, 0)],
)
def test_identity_reproduces_the_input(blend, shape, window, overlap):
    image = np.random.default_rng(1).normal(size=shape + (3,)).astype(np.float32)
    s = GridSampler(shape, window, overlap)
    out, _ = run_grid(image, s, blend)
    if blend == "crop":
        np.testing.assert_array_equal(out, image)
    else:
        np.testing.assert_allclose(out, image, rtol=2e-6, atol=2e-6)
    labels, _ = run_grid(image, s, blend, output="labels")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, image.argmax(-1))
    probs, _ = run_grid(image, s, blend, output="probabilities")
    np.testing.assert_allclose(probs, softmax(image), rtol=1e-5, atol=1e-6)


def test_border_voxels_are_from_the_most_central_window():
    # A model that writes each window's distance to its own nearest edge shows
    # which window a voxel was taken from.
    s = GridSampler((40, 1, 1), (16, 1, 1), overlap=8)

    def margin_model(windows):
        d = np.arange(16)
        return np.broadcast_to(np.minimum(d, 15 - d)[None, :, None, None, None], windows.shape).astype(np.float32)

    out, _ = run_grid(np.zeros((40, 1, 1, 1), np.float32), s, "crop", model=margin_model)
    assert s.starts[0].tolist() == [0, 8, 16, 24]
    # interior voxels are at least min_margin from the edge of their window
    interior = out[s.window[0] // 2: 40 - s.window[0] // 2, 0, 0, 0]
    assert interior.min() >= s.min_margin()[0] == 4


@pytest.mark.parametrize("radius", [1, 2])
def test_crop_equals_whole_volume_for_receptive_field_limited_model(radius):
    """With a margin >= the receptive-field radius, crop blending is exact."""
    size = 2 * radius + 1

    def box_filter(windows):  # zero-padded 'same' filter, like a convolution
        return np.stack([ndimage.uniform_filter(w, size=(size, size, size, 1), mode="constant") for w in windows])

    image = np.random.default_rng(2).normal(size=(23, 19, 17, 2)).astype(np.float32)
    whole = box_filter(image[None])[0]
    s = GridSampler(image.shape[:3], 9, overlap=2 * radius)
    assert min(s.min_margin()) >= radius
    out, _ = run_grid(image, s, "crop", model=box_filter)
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6)
    # a too-small overlap is not exact: the test can fail
    s0 = GridSampler(image.shape[:3], 9, overlap=0)
    out0, _ = run_grid(image, s0, "crop", model=box_filter)
    assert np.abs(out0 - whole).max() > 1e-3


def test_labels_use_a_slab_not_a_full_accumulator():
    image = np.random.default_rng(3).normal(size=(40, 12, 10, 4)).astype(np.float32)
    s = GridSampler(image.shape[:3], 8, overlap=0.5)
    out, agg = run_grid(image, s, "gaussian", output="labels")
    assert agg._columns.shape[1] == 8  # window_x planes, not 40
    ring_bytes = 8 * 12 * 10 * 4 * 4  # window_x planes of the padded y-z extent, 4 classes, float32
    assert agg.buffer_bytes == agg._columns.nbytes <= COLUMNS_APART_MAX_RATIO * ring_bytes
    np.testing.assert_array_equal(out, image.argmax(-1))
    _, agg = run_grid(image, s, "crop", output="labels")
    assert agg.buffer_bytes == 0


@pytest.mark.parametrize("overlap,apart", [(0.5, True), (0.75, False)])
def test_windows_get_columns_of_their_own_only_within_the_memory_bound(overlap, apart):
    """Apart, each window's y-z plane is one contiguous block; past the bound all share the ring."""
    s = GridSampler((40, 12, 30), 8, overlap=overlap)
    agg = GridAggregator(s, 2, "average")
    ring_bytes = 8 * s.padded_shape[1] * s.padded_shape[2] * 4
    assert (len(agg._columns) == s.grid_shape[2]) is apart
    assert agg.buffer_bytes <= (COLUMNS_APART_MAX_RATIO if apart else 1) * ring_bytes
    if apart:
        assert agg._columns[0, 0, :8, :8].flags.c_contiguous  # one window's y-z plane


def test_out_of_order_windows_are_rejected_and_counted():
    image = np.zeros((20, 8, 8, 2), np.float32)
    s = GridSampler(image.shape[:3], 8, overlap=0)
    reverse = np.arange(len(s))[::-1]
    with pytest.raises(ValueError, match="order"):
        run_grid(image, s, "average", order=reverse)
    out, _ = run_grid(image, s, "crop", order=reverse)  # crop takes any order
    assert out.shape == (20, 8, 8, 2)
    agg = GridAggregator(s, 2, "average")
    with pytest.raises(ValueError, match="received 0 windows"):
        agg.result()
    with pytest.raises(ValueError, match="same"):
        agg.add_batch(np.zeros((1, 6, 8, 8, 2)), s.locations[:1])
    with pytest.raises(ValueError, match="not on this aggregator's grid"):
        agg.add_batch(np.zeros((1, 8, 8, 8, 2)), [[3, 0, 0]])


def test_gaussian_profile():
    p = gaussian_profile(96)
    assert p.min() >= 1e-3 and p.max() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(p, p[::-1])
    # sigma = window / 8: the weight one sigma from the centre is exp(-1/2)
    centre = 47.5
    x = centre + 12.0
    assert np.interp(x, np.arange(96), p) == pytest.approx(np.exp(-0.5), rel=2e-3)


@pytest.mark.parametrize("channels", [1, 2, 3, 7])
def test_argmax_channels_matches_numpy_including_ties(channels):
    from highres3d.aggregators import argmax_channels

    x = np.random.default_rng(channels).integers(0, 3, size=(9, 8, 7, channels)).astype(np.float32)
    out = argmax_channels(x)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, x.argmax(-1))


def reference_blend(image, sampler, blend, model):
    """Float64 weighted mean of every window's output, with a full-volume weight map."""
    padded = sampler.pad(image).astype(np.float64)
    total = np.zeros(sampler.padded_shape + (image.shape[-1],))
    weight = np.zeros(sampler.padded_shape + (1,))
    if blend == "gaussian":
        p = [gaussian_profile(w).astype(np.float64) for w in sampler.window]
        w3 = p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :]
    else:
        w3 = np.ones(sampler.window)
    wx, wy, wz = sampler.window
    for x, y, z in sampler.locations:
        out = model(padded[None, x:x + wx, y:y + wy, z:z + wz])[0]
        total[x:x + wx, y:y + wy, z:z + wz] += out * w3[..., None]
        weight[x:x + wx, y:y + wy, z:z + wz] += w3[..., None]
    b = sampler.pad_before
    return (total / weight)[b[0]:b[0] + image.shape[0], b[1]:b[1] + image.shape[1], b[2]:b[2] + image.shape[2]]


@pytest.fixture(params=["default", "one plane"])
def block_size(request, monkeypatch):
    """Blending in its default blocks (a whole small window) and one plane per block (many blocks, ring wraps)."""
    import highres3d.aggregators.grid as grid

    if request.param == "one plane":
        monkeypatch.setattr(grid, "_BLOCK_BYTES", 1)
        assert grid._block_planes(4096) == 1
    return request.param


@pytest.fixture(params=["columns apart", "one ring"])
def column_layout(request, monkeypatch):
    """Each window in a column of its own (the default where memory allows) and all sharing one ring."""
    import highres3d.aggregators.grid as grid

    if request.param == "one ring":
        monkeypatch.setattr(grid, "COLUMNS_APART_MAX_RATIO", 0.0)
    return request.param


@pytest.mark.parametrize("blend", ["average", "gaussian"])
@pytest.mark.parametrize("classes", [2, 3])
def test_blending_matches_a_float64_reference(blend, classes, block_size, column_layout):
    """A window-position-dependent model, so overlapping windows disagree and the weights matter."""
    image = np.random.default_rng(4).normal(size=(23, 17, 12, classes)).astype(np.float32)
    s = GridSampler(image.shape[:3], (9, 8, 7), overlap=0.4)
    ramp = np.linspace(-1.0, 1.0, 9)[None, :, None, None, None]

    def model(windows):
        return (windows + ramp * np.arange(classes)).astype(windows.dtype)

    reference = reference_blend(image, s, blend, model)
    logits, _ = run_grid(image, s, blend, output="logits", model=model)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    labels, agg = run_grid(image, s, blend, output="labels", model=model)
    decided = np.sort(reference, axis=-1)
    clear = decided[..., -1] - decided[..., -2] > 1e-4  # leave out float32 near-ties
    np.testing.assert_array_equal(labels[clear], reference.argmax(-1)[clear])
    # two classes accumulate one channel (the logit difference) in a slab of window_x planes
    assert agg._columns.shape[1:3] == (9, 17) and agg._columns.ndim == (4 if classes == 2 else 5)
    assert len(agg._columns) == (s.grid_shape[2] if column_layout == "columns apart" else 1)


@pytest.mark.parametrize("blend", ["average", "gaussian"])
@pytest.mark.parametrize("classes", [2, 3])
def test_windows_in_any_order_within_an_x_group_blend_the_same(blend, classes, column_layout):
    """Only x-outer is required: with y descending and z shuffled within each x group, the first window
    to reach a plane is not at y = 0, and what an earlier plane left in the ring must not leak in."""
    image = np.random.default_rng(6).normal(size=(30, 17, 12, classes)).astype(np.float32)
    s = GridSampler(image.shape[:3], (9, 8, 7), overlap=0.4)
    assert len(s.starts[0]) > 2 and len(s.starts[1]) > 2  # the ring is reused; several y starts
    ramp = np.linspace(-1.0, 1.0, 9)[None, :, None, None, None]

    def model(windows):
        return (windows + ramp * np.arange(classes)).astype(windows.dtype)

    rng = np.random.default_rng(7)
    order = []
    per_x = len(s) // s.grid_shape[0]
    for g in range(s.grid_shape[0]):
        group = np.arange(g * per_x, (g + 1) * per_x).reshape(s.grid_shape[1], s.grid_shape[2])[::-1]
        order += [int(i) for i in rng.permuted(group, axis=1).ravel()]
    reference = reference_blend(image, s, blend, model)
    logits, _ = run_grid(image, s, blend, output="logits", model=model, order=np.array(order))
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
    labels, _ = run_grid(image, s, blend, output="labels", model=model, order=np.array(order))
    in_order, _ = run_grid(image, s, blend, output="labels", model=model)
    np.testing.assert_array_equal(labels, in_order)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape,window,overlap", [((19, 13, 11), (8, 8, 8), 0.25), ((25, 9, 14), (10, 9, 6), 0.5)])
def test_two_class_gaussian_labels_weight_the_difference_like_the_reference(threads, shape, window, overlap,
                                                                           block_size, column_layout):
    """Two-class labels blend one channel weighted from the 1-D profiles; the 3-D reference decides the sign."""
    image = np.random.default_rng(5).normal(size=shape + (2,)).astype(np.float32)
    s = GridSampler(shape, window, overlap=overlap)
    assert any(len(st) > 1 and st[-1] - st[-2] < s.window[a] - s.overlap[a] for a, st in enumerate(s.starts))
    ramp = np.linspace(-2.0, 2.0, window[0])[None, :, None, None, None]

    def model(windows):  # overlapping windows disagree, so the weights decide the label
        return (windows + ramp * np.array([0.0, 1.0])).astype(np.float32)

    reference = reference_blend(image, s, "gaussian", model)
    padded = s.pad(image)
    agg = GridAggregator(s, 2, blend="gaussian", output="labels", threads=threads)
    wx, wy, wz = s.window
    for x, y, z in s.locations:
        agg.add_batch(model(padded[None, x:x + wx, y:y + wy, z:z + wz]), [[x, y, z]])
    labels = agg.result()
    difference = reference[..., 1] - reference[..., 0]
    clear = np.abs(difference) > 1e-4
    assert clear.mean() > 0.99 and 0.1 < labels.mean() < 0.9
    np.testing.assert_array_equal(labels[clear], (difference > 0)[clear])


def test_cached_gaussian_weights_are_read_only():
    from highres3d.aggregators.grid import _gaussian_weights

    weights = _gaussian_weights((6, 5, 4), 0.125, 3)
    assert weights.shape == (6, 5, 4, 3) and not weights.flags.writeable
    assert _gaussian_weights((6, 5, 4), 0.125, 3) is weights
    p = [gaussian_profile(w) for w in (6, 5, 4)]
    np.testing.assert_allclose(weights[..., 1], p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :], rtol=1e-6)


@pytest.mark.parametrize("cpus,expected", [(1, 1), (2, 1), (3, 3), (16, 4)])
def test_blending_threads_default_to_one_on_two_cpus(cpus, expected, monkeypatch):
    """Inline after each model call, one thread out-blends two on 2 CPUs; more CPUs get up to 4."""
    import highres3d.aggregators.grid as grid

    monkeypatch.setattr(grid, "available_cpus", lambda: cpus)
    assert grid.default_blend_threads() == expected
    agg = GridAggregator(GridSampler((20, 8, 8), 8, overlap=0.5), 2, "average")
    assert agg._threads == expected and (agg._pool is None) == (expected == 1)
    assert GridAggregator(GridSampler((20, 8, 8), 8, overlap=0.5), 2, "average", threads=3)._threads == 3
