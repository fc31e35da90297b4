"""tf.data pipelines: shapes, determinism, lazy loading, augmentation modes, sharding."""
from types import SimpleNamespace

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from highres3d.augment import AffineAugmentation, affine_margin  # noqa: E402
from highres3d.data.pipeline import make_training_dataset, make_validation_dataset  # noqa: E402
from highres3d.errors import ConfigError, DataError  # noqa: E402
from highres3d.samplers import ClassWeightedSampler, UniformSampler, crop  # noqa: E402

SIZE = (12, 10, 8)


def volumes(n=3, shape=(30, 26, 20)):
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        image = rng.standard_normal(shape + (2,)).astype(np.float32)
        image[..., 1] = 100 * (i + 1)  # tells which volume a window came from (padding is 0)
        label = (image[..., 0] > 1.2).astype(np.uint8)
        out.append(SimpleNamespace(subject_id=f"s{i}", image=image, label=label))
    return out


def source(window):
    return int(round(window[..., 1].max() / 100)) - 1


def take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


def test_batches_have_documented_shapes_and_dtypes():
    ds = make_training_dataset(volumes(), ClassWeightedSampler(SIZE), batch_size=3, echo=None)
    assert ds.element_spec[0].shape.as_list() == [None, *SIZE, 2]
    (x, y), = take(ds, 1)
    assert x.shape == (3, *SIZE, 2) and x.dtype == np.float32
    assert y.shape == (3, *SIZE) and y.dtype == np.uint8
    ds = make_training_dataset(volumes(), ClassWeightedSampler(SIZE), batch_size=2, label_dtype="int32", echo=None)
    assert take(ds, 1)[0][1].dtype == np.int32


def test_windows_are_crops_of_the_volumes_and_mix_volumes():
    vols = volumes()
    ds = make_training_dataset(vols, UniformSampler(SIZE), batch_size=4, windows_per_volume=2, echo=None)
    seen = set()
    for x, y in take(ds, 6):
        for b in range(4):
            i = source(x[b])
            seen.add(i)
            # Locate the window by brute force: it must be an exact (padded) crop of volume i.
            v = vols[i]
            found = any(
                np.array_equal(crop(v.image, (sx, sy, sz), SIZE), x[b]) and np.array_equal(crop(v.label, (sx, sy, sz), SIZE), y[b])
                for sx in range(-6, 25)
                for sy in range(-5, 22)
                for sz in range(-4, 17)
                if crop(v.image[..., 0], (sx, sy, sz), (1, 1, 1))[0, 0, 0] == x[b, 0, 0, 0, 0]
            )
            assert found
    assert seen == {0, 1, 2}


def test_same_seed_same_batches_other_seed_other_batches():
    def run(seed, **kw):
        return take(make_training_dataset(volumes(), ClassWeightedSampler(SIZE), batch_size=2, seed=seed, echo=None, **kw), 5)

    for kw in ({}, {"augmentation": AffineAugmentation(flip_axes=(0,))}):
        a, b, c = run(1, **kw), run(1, **kw), run(2, **kw)
        assert all(np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1]) for p, q in zip(a, b))
        assert not all(np.array_equal(p[0], q[0]) for p, q in zip(a, c))


def test_lazy_loaders_give_the_same_batches_as_volumes_in_ram():
    vols = volumes()
    calls = []

    def loader(i):
        def load():
            calls.append(i)
            return vols[i]

        return load

    kw = dict(batch_size=2, windows_per_volume=2, shuffle_buffer=4, seed=3, echo=None)
    lazy = take(make_training_dataset([loader(i) for i in range(3)], ClassWeightedSampler(SIZE), in_channels=2, **kw), 4)
    assert calls  # loaded on demand
    for x, y in lazy:
        assert x.shape == (2, *SIZE, 2) and y.shape == (2, *SIZE)


def test_device_augmentation_yields_crops_with_the_margin():
    aug = AffineAugmentation(rotation_degrees=10, scale_range=0.1)
    margin = affine_margin(SIZE, 10, 0.1)
    ds = make_training_dataset(volumes(), UniformSampler(SIZE), batch_size=2, augmentation=aug, augment_on="device", echo=None)
    (x, y), = take(ds, 1)
    assert x.shape == (2, *(w + 2 * m for w, m in zip(SIZE, margin)), 2)
    assert y.shape == x.shape[:4]


def test_cpu_augmentation_changes_windows_but_keeps_shapes():
    aug = AffineAugmentation(rotation_degrees=20, scale_range=0.2)
    plain = take(make_training_dataset(volumes(), UniformSampler(SIZE), batch_size=2, seed=5, echo=None), 2)
    augmented = take(make_training_dataset(volumes(), UniformSampler(SIZE), batch_size=2, seed=5, augmentation=aug, echo=None), 2)
    assert augmented[0][0].shape == plain[0][0].shape
    assert not np.allclose(augmented[0][0], plain[0][0])


@pytest.mark.parametrize("mode", ["plain", "cpu", "device", "lazy"])
def test_channels_first_batches_are_the_channels_last_batches_transposed(mode):
    """Same windows in either data_format, from plain or channel-major volumes; to_channels_last undoes it."""
    from highres3d.data.pipeline import to_channels_last
    from highres3d.samplers import channel_major, is_channel_major

    aug = AffineAugmentation(rotation_degrees=15, scale_range=0.1)
    kw = dict(batch_size=3, windows_per_volume=2, seed=4, echo=None, in_channels=2,
              augmentation=None if mode in ("plain", "lazy") else aug, augment_on="device" if mode == "device" else "cpu")

    def stream(data_format, major):
        vols = volumes()
        for v in vols:
            v.image = channel_major(v.image) if major else v.image
            assert is_channel_major(v.image) == major
        items = [lambda v=v: v for v in vols] if mode == "lazy" else vols
        return take(make_training_dataset(items, ClassWeightedSampler(SIZE, label_pad_value=0), data_format=data_format,
                                          **kw), 3)

    reference = stream("channels_last", False)
    for major in (False, True):
        for (x, y), (xr, yr) in zip(stream("channels_first", major), reference):
            assert x.shape == (3, 2) + xr.shape[1:4]
            np.testing.assert_array_equal(to_channels_last(x).numpy(), xr)
            np.testing.assert_array_equal(y, yr)
    with pytest.raises(ConfigError, match="data_format"):
        make_training_dataset(volumes(), UniformSampler(SIZE), data_format="NCDHW", echo=None)


def test_shards_are_disjoint_volume_subsets():
    vols = volumes(4)
    seen = []
    for index in range(2):
        ds = make_training_dataset(vols, UniformSampler(SIZE), batch_size=2, num_shards=2, shard_index=index, echo=None)
        seen.append({source(x[b]) for x, _ in take(ds, 6) for b in range(2)})
    assert seen[0] == {0, 2} and seen[1] == {1, 3}


def test_validation_windows_are_fixed_and_finite():
    vols = volumes()
    sampler = ClassWeightedSampler(SIZE)
    ds = make_validation_dataset(vols, sampler, batch_size=4, windows_per_volume=3, seed=1)
    first, second = take(ds, 100), take(ds, 100)
    assert [x.shape[0] for x, _ in first] == [4, 4, 1]
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(first, second))


def test_user_errors_are_clear():
    with pytest.raises(ConfigError, match="empty"):
        make_training_dataset([], UniformSampler(SIZE))
    with pytest.raises(ConfigError, match="batch_size"):
        make_training_dataset(volumes(), UniformSampler(SIZE), batch_size=0)
    with pytest.raises(ConfigError, match="label_dtype"):
        make_training_dataset(volumes(), UniformSampler(SIZE, label_pad_value=-1), echo=None)
    unlabeled = volumes(1)
    unlabeled[0].label = None
    with pytest.raises(DataError, match="label"):
        make_training_dataset(unlabeled, UniformSampler(SIZE), echo=None)


def test_input_context_sets_shard_and_per_replica_batch():
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    ds = make_training_dataset(volumes(4), UniformSampler(SIZE), batch_size=4, input_context=context, echo=None)
    batches = take(ds, 4)
    assert all(x.shape[0] == 2 for x, _ in batches)
    assert {source(x[b]) for x, _ in batches for b in range(2)} == {1, 3}


def test_pipelines_run_without_the_autotuning_thread():
    # Deleting an iterator waits for tf.data's autotuning thread to wake: 30-40 s after a demo training.
    vols = volumes()
    training = make_training_dataset(vols, ClassWeightedSampler(SIZE), batch_size=2, echo=None)
    validation = make_validation_dataset(vols, UniformSampler(SIZE), batch_size=2, windows_per_volume=1, seed=1)
    for ds in (training, validation):
        assert ds.options().autotune.enabled is False and ds.options().deterministic is True
        iterator = iter(ds)
        x, _ = next(iterator)
        assert np.isfinite(x.numpy()).all()
        del iterator
