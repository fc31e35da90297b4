"""On-device augmentation layer: same geometry as the CPU path, from margin crops."""
import numpy as np
import pytest
from scipy import ndimage

keras = pytest.importorskip("keras")

from highres3d.augment import AffineAugmentation, RandomAffine3D, resample_window  # noqa: E402
from highres3d.augment.layer import resample_crops  # noqa: E402


def crops(layer, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch,) + layer.crop_size + (2,)
    image = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, 2, 2, 2, 0)).astype(np.float32)
    image /= image.std()
    label = (image[..., 0] > 0.3).astype(np.uint8)
    return image, label


def test_layer_resampling_matches_the_cpu_path():
    layer = RandomAffine3D((10, 12, 8), rotation_degrees=12, scale_range=0.1)
    image, label = crops(layer)
    rng = np.random.default_rng(1)
    aug = AffineAugmentation(12, 0.1, flip_axes=(0, 2), flip_probability=0.5)
    draws = [aug.draw(rng, 2) for _ in range(3)]
    mats = np.stack([d.matrix for d in draws]).astype(np.float32)
    scale = np.stack([d.intensity_scale for d in draws])
    out, lab = resample_crops(image, label, mats, (10, 12, 8), scale, None)
    centre = (np.asarray(layer.crop_size) - 1) / 2
    for b in range(3):
        ref, ref_lab = resample_window(image[b], label[b], centre, (10, 12, 8), mats[b], intensity_scale=scale[b])
        np.testing.assert_allclose(np.asarray(out[b]), ref, atol=1e-4)
        assert np.mean(np.asarray(lab[b]) != ref_lab) < 1e-3  # float32 ties at exactly .5 may round apart


def test_training_call_keeps_label_aligned_with_image():
    layer = RandomAffine3D(12, rotation_degrees=15, scale_range=0.15, flip_axes=(0, 1, 2), seed=4)
    image, label = crops(layer, seed=2)
    out, lab = layer((image, label), training=True)
    out, lab = np.asarray(out), np.asarray(lab)
    assert out.shape == (3, 12, 12, 12, 2) and lab.shape == (3, 12, 12, 12) and lab.dtype == np.uint8
    for b in range(3):
        edge = ndimage.binary_dilation(lab[b] > 0) & ~ndimage.binary_erosion(lab[b] > 0)
        near = ndimage.binary_dilation(edge)
        assert not np.any(((out[b, ..., 0] > 0.3) != (lab[b] > 0)) & ~near)
    plain = image[:, layer.margin[0] : layer.margin[0] + 12, layer.margin[1] : layer.margin[1] + 12]
    assert not np.allclose(out, plain[:, :, :, layer.margin[2] : layer.margin[2] + 12])


def test_inference_call_returns_the_central_window():
    layer = RandomAffine3D((8, 10, 6), seed=0)
    image, label = crops(layer, batch=2)
    out = np.asarray(layer(image, training=False))
    m = layer.margin
    np.testing.assert_array_equal(out, image[:, m[0] : m[0] + 8, m[1] : m[1] + 10, m[2] : m[2] + 6])


def test_wrong_crop_size_is_explained():
    layer = RandomAffine3D(8)
    with pytest.raises(ValueError, match="augmentation='device'"):
        layer(np.zeros((1, 8, 8, 8, 1), np.float32), training=True)


def test_config_round_trip():
    layer = RandomAffine3D((8, 8, 6), rotation_degrees=5, scale_range=0.05, flip_axes=(1,), seed=3)
    clone = RandomAffine3D.from_config(layer.get_config())
    assert clone.crop_size == layer.crop_size and clone.augmentation == layer.augmentation


def test_layer_from_augmentation_expects_the_pipelines_crop_size():
    aug = AffineAugmentation(rotation_degrees=7, scale_range=0.05, flip_axes=(2,))
    layer = RandomAffine3D.from_augmentation(aug, (16, 12, 8), seed=1)
    assert layer.augmentation == aug
    assert layer.crop_size == tuple(w + 2 * m for w, m in zip((16, 12, 8), aug.margin((16, 12, 8))))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_layer_resamples_in_float32_under_mixed_precision(policy):
    # training.mixed_precision sets a global policy; the geometry must not follow it.
    image, label = crops(RandomAffine3D(10, rotation_degrees=12, scale_range=0.1), seed=3)
    reference = RandomAffine3D(10, rotation_degrees=12, scale_range=0.1, seed=5)((image, label), training=True)
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(policy)
        layer = RandomAffine3D(10, rotation_degrees=12, scale_range=0.1, seed=5)
        out, lab = layer((image, label), training=True)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert layer.compute_dtype == "float32" and keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference[0]))
    np.testing.assert_array_equal(np.asarray(lab), np.asarray(reference[1]))


def test_compiled_resampling_is_the_same_augmentation():
    # XLA compiles only the resampling: same draws from the seed, same windows up to float rounding.
    kwargs = dict(rotation_degrees=12, scale_range=0.1, flip_axes=(0, 2), intensity_scale=0.1, seed=7)
    plain, compiled = RandomAffine3D(14, jit_resample=False, **kwargs), RandomAffine3D(14, **kwargs)
    assert compiled.jit_resample and RandomAffine3D.from_config(plain.get_config()).jit_resample is False
    image, label = crops(plain, seed=4)
    for _ in range(2):  # the seed generator advances alike
        a, la = plain((image, label), training=True)
        b, lb = compiled((image, label), training=True)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
        assert np.mean(np.asarray(la) != np.asarray(lb)) < 1e-3  # float32 ties at exactly .5 may round apart
