"""Presets: named pretrained models, shipped or registered, checked by hash, usable wherever a model is."""
import json

import numpy as np
import pytest

from highres3d import presets
from highres3d.cli.main import main
from highres3d.config import config_from_dict, load_config
from highres3d.errors import ConfigError, DataError
from highres3d.models import HighResNet3D, build_model


@pytest.fixture()
def lab_presets(tmp_path, monkeypatch):
    """A lab's preset folder registered through HIGHRES3D_PRESETS, holding one tiny preset."""
    cfg = load_config("demo/ixi.yaml", overrides=["network.width_multiplier=0.125", "inference.mode=whole_volume"])
    model = build_model(cfg)
    model.save(tmp_path / "m.keras")
    folder = tmp_path / "lab"
    presets.write_preset(folder, "lab_tiny", tmp_path / "m.keras", cfg,
                         {"task": "test model", "inputs": ["T1", "T2"], "num_classes": 2, "parameters": model.count_params()})
    monkeypatch.setenv(presets.ENV_VAR, str(folder))
    return folder / "lab_tiny", model


def test_every_shipped_preset_matches_its_hash_and_its_recorded_score(tmp_path):
    shipped = [p for p in presets.list_presets() if p.folder.parent == presets.packaged_folder()]
    assert shipped, "highres3d ships at least one preset"
    for preset in shipped:
        preset.verify()
        info = preset.info
        assert info["made"]["command"].startswith("highres3d models make-preset") and info["made"]["wall_time_s"] > 0
        assert 0.0 <= info["scores"]["test"]["dice_mean"] <= 1.0
        assert (preset.folder / "metrics.csv").is_file()
        assert "/" not in (preset.config_path.read_text().split("root:")[1].splitlines()[0])  # no machine paths
        # Re-scored on its check subject, synthesised afresh: same Dice within the stated tolerance.
        # A multi-domain trunk records one check per head.
        for key, check in info["scores"].get("checks", {"check": info["scores"]["check"]}).items():
            score = presets.check_subject_score(preset, tmp_path / preset.name / key, check)
            assert abs(score - check["dice"]) <= check["tolerance"], (preset.name, key, score, check["dice"])


def test_registered_preset_is_usable_everywhere(lab_presets, tmp_path, capsys):
    folder, model = lab_presets
    assert "lab_tiny" in [p.name for p in presets.list_presets()]
    assert main(["models", "list"]) == 0
    assert "lab_tiny" in capsys.readouterr().out
    loaded = HighResNet3D.from_preset("lab_tiny")
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6)
    # transfer.source: preset:NAME, kept as a name by the config loader, resolved to the checked file by transfer.
    from highres3d.transfer import load_weights, resolve_source

    cfg = config_from_dict({"transfer": {"source": "preset:lab_tiny"}}, base_dir=tmp_path)
    assert str(cfg.transfer.source) == "preset:lab_tiny"
    assert resolve_source(cfg.transfer.source) == folder / "model.keras"
    target = HighResNet3D(2, 2, width_multiplier=0.125)
    assert len(load_weights(target, "preset:lab_tiny", echo=None).copied) == 105
    # infer --model preset:NAME: the preset's own config decides the preprocessing.
    from highres3d.data.synth import synthesize_ixi

    synthesize_ixi(tmp_path / "ixi", 1, size="small", seed=5)
    out = tmp_path / "seg"
    assert main(["infer", "--model", "preset:lab_tiny", "-i", str(tmp_path / "ixi"), "-o", str(out), "--no-progress"]) == 0
    assert len(list(out.glob("*_seg.nii.gz"))) == 1


def test_corrupt_or_unknown_presets_say_so(lab_presets):
    folder, _ = lab_presets
    with pytest.raises(ConfigError, match="did you mean 'lab_tiny'"):
        presets.get_preset("lab_tiyn")
    data = bytearray((folder / "model.keras").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.keras").write_bytes(bytes(data))
    with pytest.raises(DataError, match="lab_tiny.*corrupt"):
        HighResNet3D.from_preset("lab_tiny")
    with pytest.raises(DataError, match="already exists"):
        presets.write_preset(folder.parent, "lab_tiny", folder / "model.keras", load_config("demo/ixi.yaml"), {})
    assert json.loads((folder / "preset.json").read_text())["name"] == "lab_tiny"


def test_a_multi_domain_trunk_preset_is_made_scored_per_head_and_transfers(tmp_path):
    """make_preset on a datasets: config: a dataset per entry, every head scored and checked, the trunk a source."""
    tiny = ["sampler.window_size=[16,16,16]", "network.width_multiplier=0.125", "training.max_iter=4",
            "training.validation_every=2", "training.checkpoint_every=2", "training.validation_windows=2",
            "training.patience=0", "augmentation.device=cpu"]
    made = presets.make_preset("md_tiny", "presets/multi_domain_demo.yaml", tmp_path / "out", task="test trunk",
                               subjects=5, seed=3, overrides=tiny, workdir=tmp_path / "work", echo=lambda _: None,
                               show_progress=False)
    info = made.info
    assert info["heads"] == ["hippocampus", "ventricles_wm"]
    assert info["num_classes"] == {"hippocampus": 2, "ventricles_wm": 3}
    # One synthetic set per dataset, seeds seed + i, found through data_root/<name>.
    for i, head in enumerate(info["heads"]):
        manifest = json.loads((tmp_path / "work" / "data" / head / "synth_manifest.json").read_text())
        assert manifest["seed"] == 3 + i
        assert info["scores"]["datasets"][head]["n"] == 1
        assert 0.0 <= info["scores"]["checks"][head]["dice"] <= 1.0
    assert info["scores"]["test"]["dataset"] == "hippocampus"
    assert info["made"]["iterations"] == 4 and "--set training.max_iter=4" in info["made"]["command"]
    assert "/" not in "".join(line for line in made.config_path.read_text().splitlines() if "root:" in line)
    # Each head's check subject re-scores to its recorded Dice (same machine: exactly, up to round-off).
    for head, check in info["scores"]["checks"].items():
        score = presets.check_subject_score(made, tmp_path / "rescore" / head, check)
        assert abs(score - check["dice"]) <= 1e-6
    # Listed with both heads; usable as a transfer source: the trunk is copied, conv_2 stays fresh.
    row = made.summary_row()
    assert "hippocampus 2 / ventricles_wm 3" in row and "ventricles_wm" in row[5]
    from highres3d.transfer import load_weights

    target = HighResNet3D(2, 2, width_multiplier=0.125)
    report = load_weights(target, made.model_path, echo=None)
    from highres3d.models import named_weights

    assert set(report.copied) == {n for n in named_weights(target) if not n.startswith("conv_2/")}
