"""Config loading: defaults, validation messages, extends, paths, overrides."""
from pathlib import Path

import pytest
import yaml

from highres3d.config import (
    Config,
    config_from_dict,
    dump_config,
    find_config,
    load_config,
    packaged_config_dir,
)
from highres3d.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_immutability():
    cfg = Config()
    assert cfg.network.num_classes == 2
    assert cfg.in_channels == 2
    with pytest.raises(Exception):
        cfg.training.lr = 1.0  # frozen


@pytest.mark.parametrize(
    "text, message",
    [
        ("training: {lr: fast}", "training.lr: expected a positive number, got 'fast'"),
        ("training: {lr: -1}", "training.lr: expected a positive number, got -1"),
        ("dataset: {modalitys: [T1]}", "dataset.modalitys: unknown key, did you mean 'modalities'?"),
        ("trainning: {lr: 1}", "trainning: unknown key, did you mean 'training'?"),
        ("training: {batch_size: 2.5}", "training.batch_size: expected a positive number, got 2.5"),
        ("training: {optimizer: adamm}", "training.optimizer: expected one of 'adam'"),
        ("sampler: {window_size: [96, 96]}", "sampler.window_size: expected a list of 3 values"),
        ("preprocessing: {orientation: RAR}", "preprocessing.orientation: expected a 3-letter orientation code"),
        ("inference: {overlap: 1.5}", "inference.overlap: expected a fraction in [0, 1)"),
        ("network: {num_classes: 2}\npreprocessing: {labels: {4: 3}}", "maps to class 3 but network.num_classes is 2"),
        ("dataset: {modalities: [T1], patterns: {T1: 't1.nii.gz'}}", "dataset.patterns.T1: the pattern must contain '{subject}'"),
        ("transfer: {freeze: 7}", "transfer.freeze: expected a number of layer groups between 0 and 5"),
        ("transfer: {freeze: [conv_0, res1]}", "transfer.freeze: unknown layer group 'res1', did you mean"),
        ("transfer: {freeze: 'res_(1'}", "transfer.freeze: 'res_(1' is neither a layer group nor a valid regular expression"),
        ("training: {loss: dise}", "training.loss: expected one of 'dice'"),
        ("training: {mixed_precision: bf16}", "training.mixed_precision: expected true or false or one of 'float16', 'bfloat16'"),
        ("training: {mixed_precision: 1}", "training.mixed_precision: expected true or false or one of 'float16', 'bfloat16'"),
        ("training: {mixed_precision: float16, lr_decay: 2.6}", "float16 cannot be combined with per-group learning rates"),
        ("dataset: {missing: ignore}", "dataset.missing: expected one of 'error', 'skip'"),
        ("sampler: {label_pad_value: 255}", "sampler.label_pad_value: expected a class index below network.num_classes=2"),
        ("- a\n- b", "expected a mapping of sections"),
        ("training: {lr: [1, 2", "invalid YAML"),
    ],
)
def test_errors_name_key_and_expectation(tmp_path, text, message):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


@pytest.mark.parametrize("value, dtype", [("false", "float32"), ("true", "float16"), ("float16", "float16"),
                                          ("bfloat16", "bfloat16")])
def test_mixed_precision_values(tmp_path, value, dtype):
    # true stays float16 for configs written when the key was a boolean.
    cfg = load_config(write(tmp_path / "c.yaml", f"training: {{mixed_precision: {value}}}"))
    assert cfg.training.compute_dtype == dtype
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_bfloat16_allows_per_group_learning_rates(tmp_path):
    # bfloat16 needs no loss scale, so one optimizer per layer group is fine.
    cfg = load_config(write(tmp_path / "c.yaml", "training: {mixed_precision: bfloat16, lr_decay: 2.6}"))
    assert cfg.training.compute_dtype == "bfloat16"


def test_did_you_mean_for_choices(tmp_path):
    path = write(tmp_path / "c.yaml", "training: {optimizer: adan}")
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        load_config(path)


def test_scientific_notation_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; users write it anyway.
    cfg = load_config(write(tmp_path / "c.yaml", "training: {lr: 1e-4}"))
    assert cfg.training.lr == pytest.approx(1e-4)


def test_extends_merges_and_resolves_paths_per_file(tmp_path):
    write(tmp_path / "base" / "base.yaml",
          "dataset:\n  root: data\n  modalities: [T1]\n  patterns: {T1: '{subject}.nii.gz'}\ntraining: {lr: 0.001, max_iter: 5}\n")
    child = write(tmp_path / "exp" / "child.yaml",
                  "extends: ../base/base.yaml\ntraining: {lr: 0.0001}\ntransfer: {source: models/src}\n")
    cfg = load_config(child)
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.training.max_iter == 5  # inherited
    assert cfg.dataset.root == (tmp_path / "base" / "data").resolve()
    assert cfg.transfer.source == (tmp_path / "exp" / "models" / "src").resolve()
    assert cfg.source_file == child.resolve()


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_shipped_configs_load_by_bare_name():
    cfg = load_config("brats_freeze2.yaml")
    assert cfg.transfer.freeze == 2
    assert cfg.preprocessing.labels == {0: 0, 1: 1, 2: 0, 4: 1}
    assert cfg.training.batch_size == 2 and cfg.training.lr == pytest.approx(1e-4)
    assert cfg.dataset.split.subset_sizes == (26, 52, 78, 105)
    ixi = load_config("ixi_hippocampus")
    assert ixi.preprocessing.labels == {17: 1, 53: 1} and ixi.preprocessing.other_labels == 0
    assert ixi.sampler.window_size == (96, 96, 96) and ixi.inference.window_size == (144, 144, 144)
    # every shipped config is valid
    for path in packaged_config_dir().rglob("*.yaml"):
        load_config(path)


def test_freeze_configs_are_small_overlays():
    text = (packaged_config_dir() / "brats_freeze2.yaml").read_text()
    assert "extends: brats_base.yaml" in text
    assert len([l for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]) <= 6


def test_unknown_bare_name_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'brats_freeze2.yaml'"):
        find_config("brats_freze2.yaml")


def test_overrides_and_data_root(tmp_path, monkeypatch):
    path = write(tmp_path / "c.yaml", "training: {lr: 0.001}\n")
    cfg = load_config(path, overrides=["training.lr=0.5", "sampler.window_size=[8, 8, 8]"], data_root=tmp_path / "d")
    assert cfg.training.lr == 0.5
    assert cfg.sampler.window_size == (8, 8, 8)
    assert cfg.dataset.root == (tmp_path / "d").resolve()
    monkeypatch.setenv("HIGHRES3D_DATA_ROOT", str(tmp_path / "env"))
    assert load_config(path).dataset.root == (tmp_path / "env").resolve()
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, overrides=["training.lr"])


def test_dump_round_trip():
    cfg = load_config("brats_freeze3.yaml")
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_configuration_reference_is_up_to_date():
    from highres3d.config import describe_schema

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert describe_schema() in doc, "regenerate docs/configuration.md from highres3d.config.describe_schema()"
