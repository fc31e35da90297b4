"""2D HighResNet and 2D -> 3D kernel inflation (I3D; Mansimov et al. 2015; Shan et al. 2018)."""
import numpy as np
import pytest

from highres3d import transfer
from highres3d.errors import DataError
from highres3d.models import HighResNet3D, named_weights

# Receptive-field radius of HighResNet along any axis: conv_0 (1) + res_1 (6 x 1) + res_2 (6 x 2) + res_3 (6 x 4).
RADIUS = 43


def randomised(model, seed):
    """Random values for every weight (BN statistics and PReLU slopes included) so no layer is trivial."""
    rng = np.random.default_rng(seed)
    for path, variable in named_weights(model).items():
        shape = tuple(variable.shape)
        if path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, shape)
        elif path.endswith("gamma"):
            value = rng.uniform(0.5, 1.5, shape)
        elif path.endswith("kernel"):
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        else:
            value = rng.normal(0, 0.1, shape)
        variable.assign(value.astype("float32"))
    return model


def pair(slice_axis, activation="prelu", channels=2):
    kwargs = dict(in_channels=channels, num_classes=3, width_multiplier=0.25, activation=activation)
    net2 = randomised(HighResNet3D(dims=2, slice_axis=slice_axis, **kwargs), seed=1)
    net3 = HighResNet3D(**kwargs)
    return net2, net3


def test_2d_network_has_the_same_groups_names_and_2d_kernels():
    net2, net3 = pair(slice_axis=2)
    w2, w3 = named_weights(net2), named_weights(net3)
    assert list(w2) == list(w3)
    assert tuple(w2["res_2_0/conv_1/kernel"].shape) == (3, 3, 8, 8)
    assert tuple(w3["res_2_0/conv_1/kernel"].shape) == (3, 3, 3, 8, 8)
    # it takes and returns volumes, one slice at a time: slices are independent
    x = np.random.default_rng(0).normal(size=(1, 10, 9, 5, 2)).astype("float32")
    y = np.asarray(net2(x, training=False))
    assert y.shape == (1, 10, 9, 5, 3)
    single = np.asarray(net2(x[:, :, :, 3:4], training=False))
    np.testing.assert_allclose(single[:, :, :, 0], y[:, :, :, 3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_center_inflation_reproduces_the_2d_network_slice_by_slice_on_any_volume(slice_axis):
    net2, net3 = pair(slice_axis)
    report = transfer.load_weights(net3, net2, inflate="center", echo=None)
    assert all("inflated (center)" in detail for _, detail in report.adapted) and len(report.adapted) == 21
    assert not report.skipped_shape and not report.reinitialised
    shape = [11, 10, 9]
    x = np.random.default_rng(slice_axis).normal(size=(2, *shape, 2)).astype("float32")
    np.testing.assert_allclose(np.asarray(net3(x, training=False)), np.asarray(net2(x, training=False)),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, alpha", [("average", None), ("scaled", None), ("scaled", (0.2, 0.5, 0.3))])
def test_average_and_scaled_inflation_reproduce_the_2d_network_on_volumes_constant_along_the_axis(mode, alpha):
    slice_axis = 1
    net2, net3 = pair(slice_axis)
    transfer.load_weights(net3, net2, inflate=mode, inflate_alpha=alpha, echo=None)
    plane = np.random.default_rng(3).normal(size=(1, 9, 1, 8, 2)).astype("float32")
    length = 2 * RADIUS + 6
    volume = np.repeat(plane, length, axis=2)  # constant along y
    expected = np.asarray(net2(plane, training=False))[:, :, 0]
    out = np.asarray(net3(volume, training=False))
    inner = out[:, :, RADIUS:length - RADIUS]
    assert inner.shape[2] == 6
    for j in range(inner.shape[2]):
        np.testing.assert_allclose(inner[:, :, j], expected, rtol=1e-4, atol=1e-4, err_msg=f"slice {j}")
    # at the borders the zero padding along y breaks it: the test is not vacuous
    assert not np.allclose(out[:, :, 0], expected, atol=1e-3)


def test_inflation_weights_and_kernels():
    np.testing.assert_allclose(transfer.inflation_weights("center", 3), [0, 1, 0])
    np.testing.assert_allclose(transfer.inflation_weights("average", 3), [1 / 3] * 3)
    np.testing.assert_allclose(transfer.inflation_weights("scaled", 3, alpha=[1, 2, 1]), [0.25, 0.5, 0.25])
    gaussian = transfer.inflation_weights("scaled", 3, sigma=1.0)
    assert gaussian.sum() == pytest.approx(1) and gaussian[1] > gaussian[0] == pytest.approx(gaussian[2])
    assert transfer.inflation_weights("scaled", 1, alpha=[0.2, 0.5, 0.3]).tolist() == [1.0]  # 1x1 kernels
    w = np.random.default_rng(0).normal(size=(3, 3, 2, 4)).astype("float32")
    k = transfer.inflate_kernel(w, "average", axis=0)
    assert k.shape == (3, 3, 3, 2, 4)
    np.testing.assert_allclose(k.sum(axis=0), w, rtol=1e-6)
    centre = transfer.inflate_kernel(w, "center", axis=1)
    np.testing.assert_array_equal(centre[:, 1], w)
    assert not centre[:, 0].any() and not centre[:, 2].any()


def test_a_2d_source_without_inflate_is_an_error_naming_the_key():
    net2, net3 = pair(slice_axis=2)
    with pytest.raises(DataError, match="set transfer.inflate"):
        transfer.load_weights(net3, net2, echo=None)


def test_2d_model_round_trips_through_a_keras_file(tmp_path):
    import keras

    net2, _ = pair(slice_axis=0)
    net2.save(str(tmp_path / "m.keras"))
    again = keras.models.load_model(str(tmp_path / "m.keras"), compile=False)
    assert again.dims == 2 and again.slice_axis == 0
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 7, 2)).astype("float32")
    np.testing.assert_allclose(np.asarray(again(x, training=False)), np.asarray(net2(x, training=False)), rtol=1e-5, atol=1e-6)


def test_train_2d_on_slices_then_a_3d_network_from_it(tmp_path):
    from highres3d.config import load_config
    from highres3d.data.synth import synthesize_brats
    from highres3d.training import train

    synthesize_brats(tmp_path / "data", 4, size="small", seed=3)
    tiny = ["network.width_multiplier=0.25", "training.max_iter=2", "training.checkpoint_every=2",
            "training.validation_every=2", "training.validation_windows=2", "inference.window_size=[32,32,32]",
            "augmentation.device=cpu"]
    cfg2 = load_config("demo/brats.yaml", data_root=tmp_path / "data",
                       overrides=tiny + ["network.dims=2", "network.slice_axis=2", "sampler.window_size=[16,16,1]"])
    result = train(cfg2, tmp_path / "slices", echo=lambda *_: None)
    assert result.iterations == 2 and result.best_score is not None  # whole-volume validation ran slice by slice
    cfg3 = load_config("demo/brats.yaml", data_root=tmp_path / "data",
                       overrides=tiny + ["sampler.window_size=[16,16,16]", f"transfer.source={tmp_path / 'slices'}",
                                         "transfer.inflate=center"])
    lines = []
    train(cfg3, tmp_path / "volumes", echo=lines.append)
    assert any("21 adapted" in line for line in lines)
