"""Mean-Var re-initialisation and Transfusion (Raghu et al. 2019)."""
import numpy as np
import pytest

from highres3d import transfer
from highres3d.config import load_config
from highres3d.errors import ConfigError
from highres3d.models import GROUPS, HighResNet3D, layer_group, named_weights


def model(seed=0, classes=2):
    import keras

    keras.utils.set_random_seed(seed)
    net = HighResNet3D(in_channels=1, num_classes=classes, width_multiplier=0.25, activation="prelu")
    net(np.zeros((1, 8, 8, 8, 1), "float32"))
    return net


@pytest.fixture()
def source():
    """A 'pretrained' model whose every tensor has its own, distinct mean and spread."""
    net = model(seed=1)
    rng = np.random.default_rng(0)
    for i, (path, variable) in enumerate(named_weights(net).items()):
        value = rng.normal(0.1 * (i % 7) - 0.3, 0.02 * (1 + i % 5), size=tuple(variable.shape))
        if path.endswith("moving_variance"):
            value = np.abs(value) + 0.5
        variable.assign(value.astype("float32"))
    return net


def test_transfusion_copies_the_lower_groups_and_redraws_the_rest(source):
    target = model(seed=2)
    transfer.load_weights(target, source, echo=None)
    groups = transfer.transfusion_groups(3)
    assert groups == ["res_3", "conv_1", "conv_2"]
    report = transfer.mean_var_reinit(target, groups, source=source, seed=5, echo=None)
    before = {p: np.asarray(v) for p, v in named_weights(source).items()}
    after = {p: np.asarray(v) for p, v in named_weights(target).items()}

    # nothing outside the chosen groups changed
    for path in before:
        if layer_group(path) not in groups:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)

    # BatchNorm of the chosen groups is the identity
    identity = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
    bn = [p for p in before if layer_group(p) in groups and "/bn" in p]
    assert sorted(report.reset) == sorted(bn) and bn
    for path in bn:
        assert np.all(after[path] == identity[path.rsplit("/", 1)[-1]]), path

    # every other tensor of the chosen groups (kernels, PReLU slopes) is redrawn from its own statistics:
    # standardised by the pretrained mean and std, the pooled draws are N(0, 1) and uncorrelated with the source
    redrawn = [p for p in before if layer_group(p) in groups and p not in bn]
    assert sorted(p for p, _, _ in report.redrawn) == sorted(redrawn)
    assert any(p.endswith("kernel") for p in redrawn) and any(p.endswith("alpha") for p in redrawn)
    z, source_z = [], []
    for path in redrawn:
        mean, std = before[path].astype(np.float64).mean(), before[path].astype(np.float64).std()
        assert not np.array_equal(after[path], before[path]), path
        z.append(((after[path] - mean) / std).ravel())
        source_z.append(((before[path] - mean) / std).ravel())
        if before[path].size >= 1000:  # per tensor where the sample is large enough
            assert abs(after[path].mean() - mean) < 5 * std / np.sqrt(before[path].size), path
            assert after[path].std() == pytest.approx(std, rel=0.08), path
    z, source_z = np.concatenate(z), np.concatenate(source_z)
    assert z.size > 5000
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and z.std() == pytest.approx(1.0, abs=0.03)
    assert abs(np.corrcoef(z, source_z)[0, 1]) < 0.05


def test_mean_var_uses_the_source_statistics_when_the_classifier_shape_differs(source):
    target = model(seed=2, classes=4)
    transfer.load_weights(target, source, echo=None)
    transfer.mean_var_reinit(target, ["conv_2"], source=source, seed=0, echo=None)
    kernel = "conv_2/conv/kernel"
    pretrained = np.asarray(named_weights(source)[kernel])
    drawn = np.asarray(named_weights(target)[kernel])
    assert drawn.shape[-1] == 4 and pretrained.shape[-1] == 2
    assert abs(drawn.mean() - pretrained.mean()) < 5 * pretrained.std() / np.sqrt(drawn.size)


def test_mean_var_is_reproducible_and_checks_groups(source):
    a, b = model(seed=2), model(seed=3)
    transfer.mean_var_reinit(a, GROUPS, source=source, seed=7, echo=None)
    transfer.mean_var_reinit(b, GROUPS, source=source, seed=7, echo=None)
    for (path, va), vb in zip(named_weights(a).items(), named_weights(b).values()):
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=path)
    with pytest.raises(ConfigError, match="unknown layer group"):
        transfer.mean_var_reinit(a, ["res3"], source=source, echo=None)
    with pytest.raises(ConfigError, match="between 0 and 5"):
        transfer.transfusion_groups(6)


@pytest.mark.parametrize("overrides, message", [
    (["transfer.transfusion=2"], "set transfer.source"),
    (["transfer.source=x.keras", "transfer.transfusion=6"], "between 0 and 5"),
    (["transfer.source=x.keras", "transfer.transfusion=2", "transfer.mean_var=[conv_2]"], "not both"),
    (["transfer.source=x.keras", "transfer.mean_var=[conv2]"], "did you mean 'conv_2'"),
])
def test_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo/brats.yaml", overrides=overrides)


def test_train_applies_transfusion_after_loading(tmp_path):
    from highres3d.data.synth import synthesize_brats
    from highres3d.models import build_model
    from highres3d.training import train

    synthesize_brats(tmp_path / "data", 4, size="small", seed=3)
    tiny = ["sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=1",
            "training.checkpoint_every=1", "inference.window_size=[32,32,32]", "augmentation.device=cpu"]
    cfg = load_config("demo/brats.yaml", overrides=tiny, data_root=tmp_path / "data")
    build_model(cfg).save(str(tmp_path / "source.keras"))
    cfg = load_config("demo/brats.yaml", data_root=tmp_path / "data",
                      overrides=tiny + [f"transfer.source={tmp_path / 'source.keras'}", "transfer.transfusion=3"])
    lines = []
    train(cfg, tmp_path / "run", echo=lines.append)
    assert any(line.startswith("Mean-Var re-initialised res_3, conv_1, conv_2") for line in lines)
