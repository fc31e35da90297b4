"""Transfer: loading by name with shape checks, freezing by k / names / NiftyNet regex, BN policies."""
from __future__ import annotations

import argparse

import keras
import numpy as np
import pytest

from highres3d import transfer
from highres3d.errors import ConfigError, DataError
from highres3d.losses import DiceLoss
from highres3d.models import GROUPS, HighResNet3D, layer_group, named_layers, named_weights, parameter_table

WIDTH = 0.25
NIFTYNET_LEVELS = {
    1: r"^((?!HighRes3DNet\/(res_1|res_2|res_3|conv_1|conv_2)).)*$",
    2: r"^((?!HighRes3DNet\/(res_2|res_3|conv_1|conv_2)).)*$",
    3: r"^((?!HighRes3DNet\/(res_3|conv_1|conv_2)).)*$",
    4: r"^((?!HighRes3DNet\/(conv_1|conv_2)).)*$",
    5: r"^((?!HighRes3DNet\/(conv_2)).)*$",
}


def narrow(in_channels: int = 2, num_classes: int = 2, seed: int = 0, **kwargs) -> HighResNet3D:
    keras.utils.set_random_seed(seed)
    return HighResNet3D(in_channels, num_classes, width_multiplier=kwargs.pop("width", WIDTH), **kwargs)


def values(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in named_weights(model).items()}


@pytest.fixture(scope="module")
def source():
    model = narrow(seed=11)
    rng = np.random.default_rng(0)
    # Distinctive BN statistics and affine parameters, so that copies are visible.
    for path, variable in named_weights(model).items():
        if not path.endswith("kernel"):
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def full_model():
    return HighResNet3D(2, 2)


# --------------------------------------------------------------------------- loading


def test_keras_file_copies_every_weight_and_reproduces_outputs(source, tmp_path):
    source.save(tmp_path / "source.keras")
    target = narrow(seed=99)
    report = transfer.load_weights(target, tmp_path / "source.keras", echo=None)
    assert len(report.copied) == len(named_weights(target)) == 105
    assert not (report.adapted or report.reinitialised or report.skipped_shape or report.missing or report.unused)
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 8, 2)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(target(x, training=False)), keras.ops.convert_to_numpy(source(x, training=False))
    )
    assert "105 of 105 weights copied" in report.summary()


def test_weights_file_is_refused_with_a_fix(source, tmp_path):
    path = tmp_path / "source.weights.h5"
    source.save_weights(path)
    target = narrow(num_classes=3, seed=5)
    with pytest.raises(DataError, match=r"holds no architecture.*model\.save"):
        transfer.load_weights(target, path, echo=None)


def test_run_folder_prefers_best_then_model(source, tmp_path):
    other = narrow(seed=3)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataError, match="best.keras, model.keras"):
        transfer.resolve_source(run)
    other.save(run / "model.keras")
    source.save(run / "best.keras")
    assert transfer.resolve_source(run).name == "best.keras"
    target = narrow(seed=4)
    transfer.load_weights(target, run, echo=None)
    np.testing.assert_array_equal(target.get_layer("res_3_2").conv_1.kernel.numpy(), source.get_layer("res_3_2").conv_1.kernel.numpy())
    (run / "best.keras").unlink()
    assert transfer.resolve_source(run).name == "model.keras"
    with pytest.raises(DataError, match="no such file"):
        transfer.resolve_source(tmp_path / "missing.keras")
    (tmp_path / "legacy.h5").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported model file"):
        transfer.resolve_source(tmp_path / "legacy.h5")


def test_different_class_count_reinitialises_the_classifier(source, capsys):
    target = narrow(num_classes=4, seed=8)
    report = transfer.load_weights(target, source)
    assert "re-initialised conv_2/conv/kernel" in capsys.readouterr().out
    assert sorted(p for p, _ in report.reinitialised) == sorted(p for p in named_weights(target) if p.startswith("conv_2/"))
    assert all(layer_group(p) != "conv_2" for p in report.copied) and len(report.copied) == 100
    bn = target.get_layer("conv_2").bn
    np.testing.assert_array_equal(bn.gamma.numpy(), np.ones(4))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(4))
    np.testing.assert_array_equal(target.get_layer("conv_1").bn.gamma.numpy(), source.get_layer("conv_1").bn.gamma.numpy())


@pytest.mark.parametrize("rule", ["mean", "zeros"])
def test_more_input_channels_copy_matching_ones_and_fill_the_rest(source, rule):
    target = narrow(in_channels=4, seed=9)
    report = transfer.load_weights(target, source, channel_init=rule, echo=None)
    assert [p for p, _ in report.adapted] == ["conv_0/conv/kernel"] and len(report.copied) == 104
    src = source.get_layer("conv_0").conv.kernel.numpy()
    got = target.get_layer("conv_0").conv.kernel.numpy()
    np.testing.assert_array_equal(got[:, :, :, :2], src)
    fill = src.mean(axis=3) if rule == "mean" else np.zeros_like(src[:, :, :, 0])
    for channel in (2, 3):
        np.testing.assert_allclose(got[:, :, :, channel], fill, rtol=1e-6)


def test_fewer_input_channels_and_other_mismatches(source):
    one_channel = narrow(in_channels=1, seed=2)
    report = transfer.load_weights(one_channel, source, echo=None)
    np.testing.assert_array_equal(one_channel.get_layer("conv_0").conv.kernel.numpy()[:, :, :, 0], source.get_layer("conv_0").conv.kernel.numpy()[:, :, :, 0])
    assert "input channels 2 -> 1" in report.adapted[0][1]

    wider = narrow(seed=2, width=0.5, activation="prelu")
    report = transfer.load_weights(wider, source, echo=None)
    assert {p for p, _, _ in report.skipped_shape} >= {"res_1_0/conv_0/kernel", "conv_1/bn/gamma"}
    assert report.missing and all(p.endswith("/alpha") for p in report.missing)
    with pytest.raises(ConfigError, match="channel_init"):
        transfer.load_weights(wider, source, channel_init="random")


# --------------------------------------------------------------------------- selecting what to freeze


def frozen_count(model, spec) -> int:
    return sum(int(np.prod(named_weights(model)[p].shape)) for p in transfer.select_frozen(model, spec))


def test_niftynet_regexes_select_the_thesis_freeze_levels(full_model):
    cumulative = {1: 896, 2: 42_560, 3: 194_976, 4: 803_936, 5: 809_216}
    for level, regex in NIFTYNET_LEVELS.items():
        assert frozen_count(full_model, regex) == cumulative[level]
        assert set(transfer.select_frozen(full_model, regex)) == set(transfer.select_frozen(full_model, level))
    # The parameter-table notebook's conv_0 regex and a TF-style ':0' anchored one.
    assert {layer_group(p) for p in transfer.select_frozen(full_model, r"conv_0_bn_leakyrelu/.*:0$")} == {"conv_0"}


def test_group_names_and_counts(full_model):
    assert frozen_count(full_model, 2) == frozen_count(full_model, ["conv_0", "res_1"]) == frozen_count(full_model, "2")
    assert {layer_group(p) for p in transfer.select_frozen(full_model, "res_2")} == {"res_2"}
    assert transfer.select_frozen(full_model, 0) == transfer.select_frozen(full_model, None) == []


def test_invalid_freeze_specs(full_model):
    with pytest.raises(ConfigError, match=r"0\.\.6"):
        transfer.select_frozen(full_model, 7)
    with pytest.raises(ConfigError, match="did you mean 'res_1'"):
        transfer.select_frozen(full_model, ["res1"])
    with pytest.raises(ConfigError, match="invalid regular expression"):
        transfer.select_frozen(full_model, "res_(1")
    with pytest.raises(ConfigError, match="nothing to optimise"):
        transfer.freeze(full_model, 6)
    with pytest.raises(ConfigError, match="bn_policy"):
        transfer.freeze(full_model, 1, bn_policy="torch")


def test_freeze_does_not_accumulate_and_unfreeze_restores():
    model = narrow()
    transfer.freeze(model, 3, bn_policy="keras")
    report = transfer.freeze(model, 1)
    assert report.frozen_groups == ["conv_0"]
    assert {layer_group(p) for p in transfer.frozen_weight_paths(model)} == {"conv_0"}
    assert all(bn.trainable for bn in named_layers(model).values())
    transfer.unfreeze(model)
    assert transfer.frozen_weight_paths(model) == []
    rows = {r.group: r for r in parameter_table(model)}
    assert rows["total"].frozen == 0 and rows["conv_0"].bn_statistics == "batch"


# --------------------------------------------------------------------------- training with frozen groups


@pytest.mark.parametrize("bn_policy", ["niftynet", "keras"])
def test_training_leaves_frozen_groups_untouched(bn_policy):
    model = narrow(seed=21)
    report = transfer.freeze(model, 2, bn_policy=bn_policy)
    assert report.frozen_groups == ["conv_0", "res_1"]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=DiceLoss())
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(4, 16, 16, 16, 2)).astype("float32")  # far from the initial statistics
    y = (x[..., 0] > 1.5).astype("int32")
    before = values(model)
    conv_0 = model.get_layer("conv_0")
    in_training = keras.ops.convert_to_numpy(conv_0(x[:1], training=True))
    frozen_bn_mode = np.array_equal(in_training, keras.ops.convert_to_numpy(conv_0(x[:1], training=False)))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # two optimiser steps
    after = values(model)

    frozen_groups = {"conv_0", "res_1"}
    for path in before:
        group, changed = layer_group(path), not np.array_equal(before[path], after[path])
        is_stat = path.endswith(("moving_mean", "moving_variance"))
        if group in frozen_groups and not is_stat:
            assert not changed, f"frozen {path} changed"
        elif group in frozen_groups:
            # niftynet: BN keeps updating its moving statistics; keras: they are fixed.
            assert changed == (bn_policy == "niftynet"), path
        elif path.endswith(("kernel", "moving_mean", "moving_variance")):
            assert changed, f"trainable {path} did not change"
    # keras policy: a frozen BN normalises with its moving statistics even in training mode.
    assert frozen_bn_mode == (bn_policy == "keras")

    optimizer_names = [v.path for v in model.optimizer.variables]
    assert len(optimizer_names) == 2 + 2 * len(model.trainable_variables)  # iterations, lr, m and v per variable
    for path in transfer.frozen_weight_paths(model):
        assert not any(path.replace("/", "_") in name for name in optimizer_names), path
    assert len(transfer.frozen_weight_paths(model)) == len(report.frozen) == 21
    rows = {r.group: r for r in parameter_table(model)}
    assert rows["conv_0"].trainable == 0 and rows["res_1"].frozen == rows["res_1"].trainable + rows["res_1"].frozen
    assert rows["res_1"].bn_statistics == ("batch" if bn_policy == "niftynet" else "fixed")


# --------------------------------------------------------------------------- CLI


def run_cli(argv: list[str]) -> int:
    from highres3d.cli import inspect as inspect_cli

    parser = argparse.ArgumentParser(prog="highres3d")
    inspect_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_inspect_model_file_with_freeze(source, tmp_path, capsys):
    source.save(tmp_path / "m.keras")
    assert run_cli(["inspect", "model", "--model", str(tmp_path / "m.keras"), "--freeze", NIFTYNET_LEVELS[3], "--bn-policy", "keras"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in GROUPS}
    assert lines["res_2"][1] == "0" and lines["res_2"][-2] == "fixed" and lines["res_3"][-2] == "batch"
    assert "frozen groups: conv_0, res_1, res_2" in out


def test_cli_inspect_config_prints_thesis_numbers(capsys):
    pytest.importorskip("highres3d.config")
    assert run_cli(["inspect", "model", "--config", "brats_freeze2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "frozen groups: conv_0, res_1" in out  # the config's transfer.freeze: 2
    total = next(line.split() for line in out.splitlines() if line.startswith("total"))
    assert total[1:5] == ["766,820", "42,560", "1,444", "812,312"]


def test_cli_inspect_config_of_a_multi_domain_trunk_shows_its_heads(capsys):
    assert run_cli(["inspect", "model", "--config", "demo/multi_domain.yaml"]) == 0
    out = capsys.readouterr().out
    assert "MultiDomainHighRes3DNet" in out and "'ventricles_wm': 3" in out
    # conv_2 of the table is empty: each dataset has its own 1x1x1 head (40 features x classes, plus its BN).
    assert "heads (one conv_2 per dataset, parameters, not in the table): hippocampus 88, ventricles_wm 132" in out


def test_cli_inspect_errors(tmp_path):
    with pytest.raises(DataError, match="run folder without a model"):
        run_cli(["inspect", "model", "--model", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_cli(["inspect", "model"])
