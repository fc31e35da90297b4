"""CPU window augmentation: geometry, alignment of image and label, margins."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from highres3d.augment import AffineAugmentation, affine_margin, resample_window, rotation_matrix
from highres3d.errors import ConfigError
from highres3d.samplers import crop


def smooth_volume(shape=(40, 44, 36), seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape + (2,)).astype(np.float32)
    image = ndimage.gaussian_filter(noise, sigma=(3, 3, 3, 0)).astype(np.float32)
    image /= image.std()
    label = (image[..., 0] > 0.3).astype(np.uint8)
    return SimpleNamespace(subject_id="a", image=np.ascontiguousarray(image), label=label)


def boundary(label):
    """Voxels within one voxel of a label boundary."""
    edge = ndimage.binary_dilation(label > 0) & ~ndimage.binary_erosion(label > 0)
    return ndimage.binary_dilation(edge, iterations=1)


@pytest.mark.parametrize("start", [(10, 12, 8), (-5, 30, 25)])
def test_identity_draw_returns_exactly_the_samplers_crop(start):
    volume = smooth_volume()
    size = (16, 14, 12)
    centre = np.asarray(start) + (np.asarray(size) - 1) / 2
    image, label = resample_window(volume.image, volume.label, centre, size, np.eye(3), pad_value=-3, label_pad_value=7)
    np.testing.assert_array_equal(image, crop(volume.image, start, size, -3))
    np.testing.assert_array_equal(label, crop(volume.label, start, size, 7))


def test_trilinear_is_exact_on_a_linear_image_under_rotation_and_scaling():
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (30, 30, 30)], indexing="ij")
    image = np.stack([x + 2 * y - z, 0.5 * z], -1).astype(np.float32)
    matrix = rotation_matrix(np.radians([7, -9, 4])) @ np.diag([1 / 1.08, 1 / 0.93, 1.0])
    centre = np.array([14.5, 15.0, 14.2])
    out, _ = resample_window(image, None, centre, (10, 10, 10), matrix)
    u = np.stack(np.meshgrid(*[np.arange(10) - 4.5] * 3, indexing="ij"), -1)
    pos = centre + u @ matrix.T
    np.testing.assert_allclose(out[..., 0], pos[..., 0] + 2 * pos[..., 1] - pos[..., 2], atol=2e-3)
    np.testing.assert_allclose(out[..., 1], 0.5 * pos[..., 2], atol=2e-3)


@pytest.mark.parametrize("seed", range(4))
def test_augmented_label_equals_threshold_of_augmented_image_away_from_boundaries(seed):
    volume = smooth_volume(seed=seed)
    aug = AffineAugmentation(rotation_degrees=15, scale_range=0.15, flip_axes=(0, 1, 2))
    rng = np.random.default_rng(seed)
    image, label = aug.window(volume, (8, 10, 6), (16, 16, 16), rng)
    thresholded = (image[..., 0] > 0.3).astype(np.uint8)
    mismatch = (thresholded != label) & ~boundary(label)
    assert label.any() and not label.all()
    assert not mismatch.any()


def test_flip_alone_mirrors_the_window():
    volume = smooth_volume()
    aug = AffineAugmentation(rotation_degrees=0, scale_range=0, flip_axes=(1,), flip_probability=1.0)
    image, label = aug.window(volume, (5, 6, 7), 12, np.random.default_rng(0))
    plain = crop(volume.image, (5, 6, 7), (12, 12, 12))
    np.testing.assert_allclose(image, plain[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(label, crop(volume.label, (5, 6, 7), (12, 12, 12))[:, ::-1])


def test_intensity_change_is_per_channel_scale_and_shift():
    volume = smooth_volume()
    aug = AffineAugmentation(rotation_degrees=0, scale_range=0, intensity_scale=0.2, intensity_shift=0.5)
    draw = aug.draw(np.random.default_rng(3), 2)
    image, _ = aug.window(volume, (5, 6, 7), 10, np.random.default_rng(3))
    plain = crop(volume.image, (5, 6, 7), (10, 10, 10))
    np.testing.assert_allclose(image, plain * draw.intensity_scale + draw.intensity_shift, atol=1e-5)
    assert not np.allclose(draw.intensity_scale, 1.0)


@pytest.mark.parametrize("start", [(12, 14, 10), (-4, 30, 26), (1, 1, 1)], ids=["inside", "border", "near-edge"])
def test_channel_major_volumes_give_the_same_windows_bit_for_bit(start):
    """Read in place or from a padded footprint, channel by channel or voxel by voxel: one result."""
    from highres3d.samplers import channel_major

    volume = smooth_volume()
    major = SimpleNamespace(subject_id="a", image=channel_major(volume.image), label=volume.label)
    aug = AffineAugmentation(rotation_degrees=20, scale_range=0.15, intensity_scale=0.1, intensity_shift=0.2)
    for seed in range(3):
        a = aug.window(volume, start, (12, 10, 14), np.random.default_rng(seed))
        b = aug.window(major, start, (12, 10, 14), np.random.default_rng(seed))
        # Written into a channel-first buffer, as the trainer's pipeline does.
        out = np.zeros((2, 12, 10, 14), np.float32)
        c = aug.window(major, start, (12, 10, 14), np.random.default_rng(seed), out_image=np.moveaxis(out, 0, 3))
        for other in (b, c):
            np.testing.assert_array_equal(other[0], a[0])
            np.testing.assert_array_equal(other[1], a[1])
        np.testing.assert_array_equal(np.moveaxis(out, 0, 3), a[0])


def test_same_rng_same_window():
    volume = smooth_volume()
    aug = AffineAugmentation()
    a = aug.window(volume, (3, 4, 5), 12, np.random.default_rng(9))
    b = aug.window(volume, (3, 4, 5), 12, np.random.default_rng(9))
    c = aug.window(volume, (3, 4, 5), 12, np.random.default_rng(10))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("size,deg,scale", [((96, 96, 96), 10, 0.1), ((16, 24, 8), 20, 0.2), ((12, 12, 12), 0, 0)])
def test_margin_contains_every_trilinear_read(size, deg, scale):
    margin = np.asarray(affine_margin(size, deg, scale))
    aug = AffineAugmentation(rotation_degrees=deg, scale_range=scale, flip_axes=(0, 1, 2))
    rng = np.random.default_rng(0)
    half = (np.asarray(size) - 1) / 2
    corners = np.stack(np.meshgrid(*[[-h, h] for h in half], indexing="ij"), -1).reshape(-1, 3)
    extreme = [aug.draw(rng).matrix for _ in range(500)]
    extreme.append(rotation_matrix(np.radians([deg] * 3)) / (1 - scale))
    extreme.append(rotation_matrix(np.radians([-deg, deg, -deg])) / (1 - scale))
    for m in extreme:
        reach = np.abs(corners @ m.T).max(axis=0)
        # Crop coordinates: centre at margin + half; reads floor(p) and floor(p) + 1.
        assert np.all(np.floor(margin + half + reach) + 1 <= 2 * margin + 2 * half)
        assert np.all(margin + half - reach >= 0)
    if deg == 0 and scale == 0:
        assert tuple(margin) == (1, 1, 1)


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="scale_range"):
        AffineAugmentation(scale_range=1.0)
    with pytest.raises(ConfigError, match="rotation_degrees"):
        AffineAugmentation(rotation_degrees=(10, 10))
    with pytest.raises(ConfigError, match="flip_axes"):
        AffineAugmentation(flip_axes=(3,))
