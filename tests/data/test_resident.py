"""Volumes held on the accelerator (training.cache: device): positions in, the in-RAM pipeline's windows out."""
from types import SimpleNamespace

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from highres3d.augment import AffineAugmentation  # noqa: E402
from highres3d.data.pipeline import crop_geometry, make_training_dataset  # noqa: E402
from highres3d.data.resident import ResidentVolumes, resident_bytes  # noqa: E402
from highres3d.errors import ConfigError  # noqa: E402
from highres3d.samplers import ClassWeightedSampler, UniformSampler  # noqa: E402

SIZE = (12, 10, 8)


def volumes(shapes=((30, 26, 20), (17, 21, 11), (25, 9, 14))):
    """Volumes of different shapes, some smaller than a crop, with a sparse label."""
    rng = np.random.default_rng(3)
    out = []
    for i, shape in enumerate(shapes):
        image = rng.standard_normal(tuple(shape) + (2,)).astype(np.float32)
        image[..., 1] += 10 * i
        label = (image[..., 0] > 1.0).astype(np.uint8) * (1 + i % 2)
        out.append(SimpleNamespace(subject_id=f"s{i}", image=image, label=label))
    return out


@pytest.mark.parametrize("augmentation", [None, AffineAugmentation(rotation_degrees=15, scale_range=0.1)])
@pytest.mark.parametrize("label_dtype", ["uint8", "int32"])
def test_cut_positions_equal_the_in_ram_windows(augmentation, label_dtype):
    vols = volumes()
    sampler = ClassWeightedSampler(SIZE, pad_value=-3.0, label_pad_value=0)
    common = dict(batch_size=3, windows_per_volume=2, augmentation=augmentation, augment_on="device", seed=5,
                  label_dtype=label_dtype, echo=None)
    windows = make_training_dataset(vols, sampler, **common)
    positions = make_training_dataset(vols, sampler, positions_only=True, **common)
    assert positions.element_spec.shape.as_list() == [3, 6] and positions.element_spec.dtype == tf.int64
    crop_size, margin = crop_geometry(sampler, augmentation, "device")
    assert (margin != (0, 0, 0)) == (augmentation is not None)
    resident = ResidentVolumes(vols, crop_size, margin, sampler.pad_value, sampler.label_pad_value, label_dtype)
    cut = tf.function(resident.cut)
    outside = 0
    for (image, label), rows in zip(windows.take(8), positions.take(8)):
        got_image, got_label = cut(rows)
        assert got_image.dtype == tf.float32 and got_label.dtype == tf.as_dtype(label_dtype)
        np.testing.assert_array_equal(got_image.numpy(), image.numpy())
        np.testing.assert_array_equal(got_label.numpy(), label.numpy())
        outside += int(np.sum(image.numpy()[..., 0] == -3.0))
    assert outside > 0  # some crops reach past a volume's edge: the pad values are exercised


def test_border_crops_and_volume_offsets_by_hand():
    vols = volumes()
    resident = ResidentVolumes(vols, (5, 4, 3), pad_value=7.0, label_pad_value=9)
    rows = np.array([[1, -2, 19, 9, 0, 0], [2, 0, 0, 0, 0, 1], [0, 28, 25, 19, 0, 2]], dtype=np.int64)
    image, label = (t.numpy() for t in resident.cut(rows))
    for b, (v, x, y, z) in enumerate(rows[:, :4]):
        src = vols[v]
        for i in range(5):
            for j in range(4):
                for k in range(3):
                    p = (x + i, y + j, z + k)
                    inside = all(0 <= c < n for c, n in zip(p, src.label.shape))
                    assert label[b, i, j, k] == (src.label[p] if inside else 9)
                    np.testing.assert_array_equal(image[b, i, j, k], src.image[p] if inside else [7.0, 7.0])
    assert resident_bytes(vols) == sum(v.image.size * 4 + v.label.size for v in vols)
    # each volume starts on a 64-voxel boundary (a slice of it is then a view): at most 63 voxels of gap each
    assert 0 <= resident.nbytes - resident_bytes(vols) < len(vols) * 64 * (2 * 4 + 1)


def test_positions_need_volumes_in_ram_and_no_cpu_augmentation():
    vols = volumes()
    with pytest.raises(ConfigError, match="lazy"):
        make_training_dataset([lambda v=v: v for v in vols], UniformSampler(SIZE), positions_only=True, echo=None)
    with pytest.raises(ConfigError, match="augmentation.device"):
        make_training_dataset(vols, UniformSampler(SIZE), positions_only=True, echo=None,
                              augmentation=AffineAugmentation(rotation_degrees=5), augment_on="cpu")
    with pytest.raises(ConfigError, match="channel"):
        ResidentVolumes([vols[0], SimpleNamespace(image=np.zeros((4, 4, 4, 3), np.float32),
                                                  label=np.zeros((4, 4, 4), np.uint8))], SIZE)
