"""NiftyNet INI -> highres3d config: every key mapped or listed with a reason, meanings kept, errors
listed together, and ``highres3d train --config FILE.ini`` end to end."""
from __future__ import annotations

import configparser
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from highres3d.cli.main import main
from highres3d.config import load_config
from highres3d.errors import ConfigError
from highres3d.niftynet.ini import convert_ini

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: helpers beside the tests
from niftynet_tf1 import niftynet_variables, save_tf1_checkpoint


def write_volume(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(path))


@pytest.fixture()
def project(tmp_path):
    """A NiftyNet project: images found by filename matching, a model_dir with split and ref file."""
    rng = np.random.default_rng(0)
    for i in range(6):
        sid = f"IXI{i:03d}-HH"
        label = np.zeros((12, 12, 12))
        label[3:8, 4:9, 2:7] = 4
        label[5:7, 5:7, 5:7] = 1
        write_volume(tmp_path / "data" / "images" / f"{sid}-T1.nii.gz", rng.gamma(2, 20, (12, 12, 12)) + 30 * (label > 0))
        write_volume(tmp_path / "data" / "images" / f"{sid}-T2.nii.gz", rng.gamma(3, 10, (12, 12, 12)) + 20 * (label > 0))
        write_volume(tmp_path / "data" / "labels" / f"{sid}-seg.nii.gz", label)
    model_dir = tmp_path / "models" / "ixi"
    model_dir.mkdir(parents=True)
    (model_dir / "dataset_split.csv").write_text(
        "IXI000HH,training\nIXI001HH,training\nIXI002HH,training\nIXI003HH, training\nIXI004HH,validation\nIXI005HH,inference\n")
    (model_dir / "histogram_ref_file.txt").write_text("label_label-from 0.0 1.0 4.0\nlabel_label-to 0.0 1.0 1.0\n")
    return tmp_path


FULL_INI = """
# The thesis' IXI config, every key exercised
[T1]
path_to_search = ./data/images
filename_contains = -T1
filename_not_contains = T1w
spatial_window_size = (8, 8, 8)
pixdim = (1.0, 1.0, 1.0)
axcodes = (R, A, S)
interp_order = 3
csv_file = t1.csv

[T2]
path_to_search = ./data/images
filename_contains = -T2
spatial_window_size = (8, 8, 8)
pixdim = (1.0, 1.0, 1.0)
axcodes = (R, A, S)
interp_order = 1

[label]
path_to_search = ./data/labels
filename_contains = -seg
filename_removefromid = -seg
spatial_window_size = (8, 8, 8)
pixdim = (1.0, 1.0, 1.0)
axcodes = (R, A, S)
interp_order = 0

[SYSTEM]
cuda_devices = 0
num_threads = 8
num_gpus = 2
model_dir = ./models/ixi
dataset_split_file = ./dataset_split.csv

[NETWORK]
name = highres3dnet
activation_function = leakyrelu
batch_size = 2
decay = 0.0001
reg_type = L2
volume_padding_size = (0, 0, 0)
window_sampling = weighted
queue_length = 36
keep_prob = 1.0
normalisation = True
histogram_ref_file = ./histogram_ref_file.txt
norm_type = quartile
cutoff = (0.02, 0.98)
whitening = True
normalise_foreground_only = True
foreground_type = otsu_plus
multimod_foreground_type = and
weight_initializer = he_normal

[TRAINING]
optimiser = adam
sample_per_volume = 4
rotation_angle = (-10.0, 10.0)
scaling_percentage = (-10.0, 10.0)
random_flipping_axes = 0, 2
do_elastic_deformation = False
lr = 0.001
loss_type = Dice
starting_iter = 0
save_every_n = 150
tensorboard_every_n = 5
max_iter = 8000
max_checkpoints = 40
validation_every_n = 10
validation_max_iter = 3
exclude_fraction_for_validation = 0.1
exclude_fraction_for_inference = 0.2
vars_to_freeze = ^((?!HighRes3DNet\\/(res_2|res_3|conv_1|conv_2)).)*$

[INFERENCE]
spatial_window_size = (16, 16, 16)
border = (2, 2, 2)
inference_iter = 5558
save_seg_dir = ./outputs
output_postfix = _niftynet_out
output_interp_order = 0
dataset_to_infer = all

[EVALUATION]
save_csv_dir = ./eval
evaluations = Dice,Jaccard,hausdorff_distance

[SEGMENTATION]
image = T1, T2
label = label
sampler = label
output_prob = False
num_classes = 2
label_normalisation = True
"""


def ini_keys(path):
    parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
    parser.read(path)
    return {(s, k) for s in parser.sections() for k in parser[s]}


def test_every_key_is_mapped_or_listed(project, monkeypatch):
    monkeypatch.chdir(project)
    ini = project / "ixi.ini"
    ini.write_text(FULL_INI)
    conv = convert_ini(ini)
    named = {tuple(key.split("] ", 1)) for key, _ in conv.mapped} | {
        tuple(key.split(" = ")[0].split("] ", 1)) for key, _ in conv.unmapped}
    named = {(s.lstrip("["), k) for s, k in named}
    assert ini_keys(ini) <= named, ini_keys(ini) - named
    reasons = dict(conv.unmapped)
    assert "no window queue" in reasons["[NETWORK] queue_length = 36"]
    assert "CUDA_VISIBLE_DEVICES" in reasons["[SYSTEM] cuda_devices = 0"]
    assert "--probabilities" in reasons["[SEGMENTATION] output_prob = False"]
    assert "import niftynet --config" in reasons["[INFERENCE] inference_iter = 5558"]
    assert "matches the folders directly" in reasons["[T1] csv_file = t1.csv"]

    raw = conv.raw
    ds = raw["dataset"]
    assert ds["layout"] == "niftynet_search" and ds["modalities"] == ["T1", "T2"]
    assert ds["search"]["T1"] == {"path_to_search": ["images"], "filename_contains": ["-T1"], "filename_not_contains": ["T1w"]}
    assert ds["search"]["label"]["filename_removefromid"] == ["-seg"]
    assert ds["split"] == {"file": str(project / "models" / "ixi" / "dataset_split.csv"),
                           "validation_fraction": 0.1, "inference_fraction": 0.2}
    pp = raw["preprocessing"]
    assert pp["spacing"] == [1.0, 1.0, 1.0] and pp["orientation"] == "RAS"
    assert pp["modality_interpolation"] == {"T1": 3, "T2": 1} and pp["label_interpolation"] == 0
    assert pp["normalisation"] == "zscore" and pp["normalise_foreground_only"] is True and pp["foreground"] == "otsu"
    assert pp["histogram"] == {"enabled": True, "ref_file": str(project / "models" / "ixi" / "histogram_ref_file.txt"),
                               "norm_type": "quartile", "cutoff": [0.02, 0.98]}
    assert pp["labels"] == {0: 0, 1: 1, 4: 1} and pp["other_labels"] == 0  # label_normalisation, NiftyNet's rule
    assert raw["network"] == {"num_classes": 2, "name": "highresnet3d", "activation": "leaky_relu", "l2_decay": 0.0001}
    assert raw["sampler"] == {"window_size": [8, 8, 8], "type": "label", "edge_policy": "valid", "windows_per_volume": 4}
    assert raw["augmentation"] == {"rotation_degrees": 10.0, "scaling_percent": 10.0, "flip_axes": [0, 2]}
    t = raw["training"]
    assert (t["strategy"], t["batch_size"], t["optimizer"], t["lr"], t["loss"]) == ("mirrored", 2, "adam", 0.001, "dice")
    assert (t["checkpoint_every"], t["max_iter"], t["max_checkpoints"], t["validation_every"]) == (150, 8000, 40, 10)
    assert t["validation_windows"] == 6  # 3 batches of 2
    assert t["output_dir"] == str(project / "models" / "ixi")
    assert raw["transfer"]["freeze"] == r"^((?!HighRes3DNet\/(res_2|res_3|conv_1|conv_2)).)*$"
    # border 2 of a 16-voxel window: windows overlap by 4 voxels = 0.25, the border cropped off.
    assert raw["inference"] == {"batch_size": 2, "window_size": [16, 16, 16], "overlap": 0.25, "blend": "crop"}


def test_yaml_output_validates_and_loads_like_the_ini(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    ini = project / "ixi.ini"
    ini.write_text(FULL_INI)
    out = project / "converted" / "ixi.yaml"
    assert main(["config", "from-niftynet", str(ini), "-o", str(out)]) == 0
    text = out.read_text()
    assert "# not mapped (" in text and "queue_length = 36: no window queue" in text
    assert "[NETWORK] decay -> network.l2_decay" in text
    cfg = load_config(out)
    assert cfg.dataset.root == (project / "data").resolve()
    assert cfg.dataset.split.file == (project / "models" / "ixi" / "dataset_split.csv").resolve()
    assert cfg.network.l2_decay == 0.0001 and cfg.inference.overlap == 0.25
    # Relative paths: the YAML names its data relative to itself.
    assert yaml.safe_load(text)["dataset"]["root"] == "../data"
    assert main(["config", "from-niftynet", str(ini), "-o", str(out)]) == 2  # never silently replaced
    assert "already exists" in capsys.readouterr().err
    # Every other command reads the INI directly.
    assert main(["config", "check", str(ini)]) == 0
    assert main(["data", "check", str(ini)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("sampling, expected", [("uniform", "uniform"), ("balanced", "class_weighted"), ("weighted", "label")])
def test_window_sampling(project, sampling, expected, monkeypatch):
    monkeypatch.chdir(project)
    ini = project / "a.ini"
    ini.write_text(MINIMAL.format(extra=f"window_sampling = {sampling}"))
    assert convert_ini(ini).raw["sampler"]["type"] == expected


MINIMAL = """
[T1]
path_to_search = data/images
filename_contains = -T1
spatial_window_size = 8, 8, 8
[T2]
path_to_search = data/images
filename_contains = -T2
spatial_window_size = 8, 8, 8
[label]
path_to_search = data/labels
filename_contains = -seg
[NETWORK]
{extra}
[SEGMENTATION]
image = T1, T2
label = label
num_classes = 2
"""


def test_unsupported_values_are_listed_together(project, monkeypatch):
    monkeypatch.chdir(project)
    ini = project / "bad.ini"
    text = MINIMAL.format(extra="name = unet\nactivation_function = tanh\nwindow_sampling = resize")
    text = text.replace("spatial_window_size = 8, 8, 8\n[T2]", "spatial_window_size = 8, 8, 1\n[T2]")
    text += "[TRAINING]\nloss_type = Wasserstein\n"
    ini.write_text(text)
    with pytest.raises(ConfigError) as err:
        convert_ini(ini)
    message = str(err.value)
    for expected in ("[NETWORK] name: 'unet'", "activation_function: 'tanh'", "window_sampling: 'resize'",
                     "[TRAINING] loss_type: 'Wasserstein'", "spatial_window_size: differs between image sections"):
        assert expected in message, message


def test_train_from_ini_with_starting_iter_and_histogram(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    model_dir = project / "models" / "ixi"
    # A NiftyNet model at iteration 30 of the width the run will use (width_multiplier 0.125).
    save_tf1_checkpoint(model_dir, niftynet_variables(num_classes=2, widths=(2, 4, 8, 10)), 30)
    ini = project / "ft.ini"
    minimal = MINIMAL.replace("num_classes = 2", "num_classes = 2\nlabel_normalisation = True")
    ini.write_text(minimal.format(extra="normalisation = True\nwhitening = True\nbatch_size = 2") + """
[SYSTEM]
model_dir = ./models/ixi
[TRAINING]
starting_iter = -1
max_iter = 33
save_every_n = 3
validation_every_n = 3
vars_to_freeze = ^((?!HighRes3DNet\\/(conv_1|conv_2)).)*$
""")
    (model_dir / "histogram_ref_file.txt").write_text("label_label-from 0.0 1.0 4.0\nlabel_label-to 0.0 1.0 1.0\n")
    run = project / "run"
    code = main(["train", "--config", str(ini), "--run-dir", str(run), "--no-progress",
                 "--set", "network.width_multiplier=0.125", "--set", "augmentation.device=cpu"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "imported NiftyNet checkpoint 30" in out
    assert (model_dir / "highres3d_import_ckpt-30" / "model.keras").is_file()
    state = json.loads((run / "state.json").read_text())
    assert state["iteration"] == 3  # NiftyNet's max_iter 33 from checkpoint 30
    saved = load_config(run / "config.yaml")
    assert saved.transfer.source == (model_dir / "highres3d_import_ckpt-30").resolve()
    assert saved.preprocessing.histogram.ref_file == (run / "histogram_ref_file.txt").resolve()
    landmarks = (run / "histogram_ref_file.txt").read_text()
    assert landmarks.startswith("label_label-from") and "\nT1 0.0 " in landmarks and "\nT2 0.0 " in landmarks
    assert (run / "niftynet_config.yaml").is_file()
    assert "Transfer from" in out and "copied" in out
    # The run folder names its own files relatively, so it still works after being moved.
    assert "ref_file: histogram_ref_file.txt" in (run / "config.yaml").read_text()
    moved = project / "moved_run"
    run.rename(moved)
    assert load_config(moved / "config.yaml").preprocessing.histogram.ref_file == (moved / "histogram_ref_file.txt").resolve()


def test_import_with_ini_then_infer(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    model_dir = project / "models" / "ixi"
    save_tf1_checkpoint(model_dir, niftynet_variables(num_classes=2, seed=1), 20)
    save_tf1_checkpoint(model_dir, niftynet_variables(num_classes=2, seed=2), 40)
    ini = project / "infer.ini"
    minimal = MINIMAL.replace("num_classes = 2", "num_classes = 2\nlabel_normalisation = True")
    ini.write_text(minimal.format(extra="queue_length = 20\nnormalisation = True")
                   + "[SYSTEM]\nmodel_dir = models/ixi\n[INFERENCE]\ninference_iter = 20\n")
    landmarks = " ".join(str(v) for v in np.linspace(0, 100, 13))
    (model_dir / "histogram_ref_file.txt").write_text(
        f"T1 {landmarks}\nT2 {landmarks}\nlabel_label-from 0.0 1.0 4.0\nlabel_label-to 0.0 1.0 1.0\n")
    first = project / "first_place"
    assert main(["import", "niftynet", str(model_dir), "--config", str(ini), "-o", str(first)]) == 0
    run = project / "imported"
    first.rename(run)  # the run folder finds its landmarks wherever it is moved
    out = capsys.readouterr().out
    assert "INI key(s) not carried over" in out
    report = json.loads((run / "niftynet_import.json").read_text())
    assert report["iteration"] == 20  # [INFERENCE] inference_iter, not the newest (40)
    assert any(note.startswith("[NETWORK] queue_length = 20") for note in report["notes"])
    cfg = load_config(run / "config.yaml")
    assert cfg.dataset.layout == "niftynet_search" and cfg.preprocessing.labels == {0: 0, 1: 1, 4: 1}
    assert cfg.sampler.window_size == (8, 8, 8)
    assert cfg.preprocessing.histogram.enabled and cfg.preprocessing.histogram.ref_file == run / "histogram_ref_file.txt"
    # infer segments a folder with the imported run like with any trained run.
    code = main(["infer", "--model", str(run), "-i", str(project / "data" / "images"), "-o", str(project / "seg"),
                 "--pattern", "T1={subject}-T1.nii.gz", "--pattern", "T2={subject}-T2.nii.gz", "--whole-volume"])
    assert code == 0, capsys.readouterr().err
    segs = sorted(p.name for p in (project / "seg").iterdir())
    assert segs == [f"IXI{i:03d}-HH_seg.nii.gz" for i in range(6)]
    assert nib.load(str(project / "seg" / segs[0])).shape == (12, 12, 12)
    # Without --pattern, the INI's filename rules find the subjects (ids as NiftyNet made them).
    assert main(["infer", "--model", str(run), "-i", str(project / "data" / "images"), "-o", str(project / "seg2"),
                 "--whole-volume"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (project / "seg2").iterdir()) == [f"IXI{i:03d}HH_seg.nii.gz" for i in range(6)]


def test_restore_regex_freezes_and_starting_iter_counts(project, monkeypatch):
    from highres3d.models import named_weights
    from highres3d.niftynet.ini import import_pending
    from highres3d.transfer import load_model

    monkeypatch.chdir(project)
    model_dir = project / "models" / "ixi"
    variables = niftynet_variables(num_classes=2)
    save_tf1_checkpoint(model_dir, variables, 100)
    save_tf1_checkpoint(model_dir, niftynet_variables(num_classes=2, seed=4), 200)
    ini = project / "ft.ini"
    regex = r"^((?!HighRes3DNet\/conv_2).)*$"
    ini.write_text(MINIMAL.format(extra="") + "[SYSTEM]\nmodel_dir = models/ixi\n[TRAINING]\nstarting_iter = 100\n"
                   f"max_iter = 350\nvars_to_restore = {regex}\n")
    conv = convert_ini(ini)
    # NiftyNet froze what it restored when vars_to_freeze was unset.
    assert conv.raw["transfer"]["freeze"] == regex
    assert ("[TRAINING] vars_to_restore", "the imported starting model keeps initial values for the variables it does not match") in conv.mapped
    assert conv.raw["training"]["max_iter"] == 250  # 350 counted from checkpoint 100
    model_dir_, iteration, target, restore = conv.pending_import
    assert (model_dir_, iteration, restore) == (model_dir, 100, regex)
    assert target.parent == model_dir and target.name.startswith("highres3d_import_ckpt-100-restore-")
    assert conv.raw["transfer"]["source"] == str(target)
    import_pending(conv, echo=lambda *_: None)
    weights = {k: v.numpy() for k, v in named_weights(load_model(target)).items()}
    # Restored: everything but conv_2, which keeps its initial values (BN statistics 0 and 1).
    np.testing.assert_array_equal(weights["res_3_1/conv_0/kernel"], variables["HighRes3DNet/res_3_1/conv_0/w"])
    np.testing.assert_array_equal(weights["conv_1/bn/gamma"], variables["HighRes3DNet/conv_1_bn_leakyrelu/bn_/gamma"])
    assert not np.allclose(weights["conv_2/conv/kernel"], variables["HighRes3DNet/conv_2_bn/conv_/w"])
    np.testing.assert_array_equal(weights["conv_2/bn/moving_variance"], np.ones(2))
    notes = json.loads((target / "niftynet_import.json").read_text())["notes"]
    assert "5 variable(s) keep initial values" in notes[0]  # conv_2: w, gamma, beta, moving mean and variance
    ini.write_text(MINIMAL.format(extra="") + "[SYSTEM]\nmodel_dir = models/ixi\n[TRAINING]\nstarting_iter = 7\n")
    with pytest.raises(ConfigError, match=r"starting_iter: 7: .*available: 100, 200"):
        convert_ini(ini)


def test_missing_data_folders_are_warnings(project, monkeypatch):
    monkeypatch.chdir(project)
    ini = project / "elsewhere.ini"
    ini.write_text(MINIMAL.replace("data/images", "/nonexistent/images").format(extra=""))
    conv = convert_ini(ini)
    assert any("folder '/nonexistent/images' not found" in w for w in conv.warnings)
    assert "# warning: [T1] path_to_search" in conv.yaml_text()


def test_a_shelf_of_configs_converts_into_a_folder(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    good = project / "good.ini"
    good.write_text(MINIMAL.format(extra="window_sampling = uniform"))
    bad = project / "bad.ini"
    bad.write_text(MINIMAL.format(extra="name = unet"))
    out = project / "yaml"
    assert main(["config", "from-niftynet", str(good), str(bad), "-o", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.yaml"]
    assert "bad.ini" in capsys.readouterr().err
    assert load_config(out / "good.yaml").sampler.type == "uniform"


EDGE_INI = """
[T1]
csv_file = lists/t1.csv
spatial_window_size = 8, 8, 8
[FLAIR]
csv_file = lists/flair.csv
spatial_window_size = 8, 8, 8
loader = nibabel
[seg]
csv_file = lists/seg.csv
spatial_window_size = 4, 4, 4
[weights]
csv_file = lists/seg.csv
[SYSTEM]
num_gpus = 1
dataset_split_file = nowhere.csv
[NETWORK]
whitening = False
foreground_type = otsu_plus
volume_padding_size = 4
keep_prob = 0.5
weight_initializer = glorot_uniform
histogram_ref_file = ./mapping.txt
[TRAINING]
optimiser = momentum
rotation_angle = (-5, 15)
rotation_angle_x = (-3, 3)
do_elastic_deformation = True
deformation_sigma = 15
save_every_n = -1
validation_every_n = -1
loss_type = GDSC
[INFERENCE]
border = 1, 1, 1
output_interp_order = 3
[SEGMENTATION]
image = T1, FLAIR
label = seg
sampler = weights
weight = weights
min_sampling_ratio = 0.1
num_classes = 3
"""


def test_csv_layout_and_keys_without_equivalent(project, monkeypatch):
    monkeypatch.chdir(project)
    lists = project / "lists"
    lists.mkdir()
    for name in ("t1", "flair", "seg"):
        (lists / f"{name}.csv").write_text("s1,/x.nii.gz\n")
    ini = project / "edge.ini"
    ini.write_text(EDGE_INI)
    conv = convert_ini(ini)
    raw = conv.raw
    assert raw["dataset"]["layout"] == "niftynet_csv"
    assert raw["dataset"]["csv_files"] == {n: str(lists / f"{f}.csv") for n, f in (("T1", "t1"), ("FLAIR", "flair"), ("seg", "seg"))}
    assert raw["preprocessing"]["normalisation"] == "none"
    assert raw["sampler"]["edge_policy"] == "pad"
    assert raw["training"]["optimizer"] == "sgd" and raw["training"]["loss"] == "generalised_dice"
    assert "strategy" not in raw["training"] and "checkpoint_every" not in raw["training"]
    assert raw["augmentation"]["rotation_degrees"] == 15.0
    assert raw["inference"]["overlap"] == 0.25 and raw["inference"]["blend"] == "crop"  # 2 x 1 / 8
    reasons = {key.split(" = ")[0]: reason for key, reason in conv.unmapped}
    expected = {
        "[SYSTEM] dataset_split_file": "does not exist",
        "[NETWORK] foreground_type": "normalise_foreground_only",
        "[NETWORK] keep_prob": "no dropout",
        "[NETWORK] weight_initializer": "he_normal",
        "[NETWORK] histogram_ref_file": "normalisation is off",
        "[TRAINING] optimiser": "Nesterov",
        "[TRAINING] rotation_angle": "asymmetric",
        "[TRAINING] rotation_angle_x": "one rotation range",
        "[TRAINING] do_elastic_deformation": "not implemented",
        "[TRAINING] deformation_sigma": "not implemented",
        "[TRAINING] save_every_n": "always saves",
        "[TRAINING] validation_every_n": "validation_fraction: 0",
        "[INFERENCE] output_interp_order": "nearest neighbour",
        "[SEGMENTATION] sampler": "label map",
        "[SEGMENTATION] weight": "per-voxel loss weights",
        "[SEGMENTATION] min_sampling_ratio": "class_weighted",
        "[FLAIR] loader": "nibabel",
        "[weights] csv_file": "not used by [SEGMENTATION]",
        "[seg] spatial_window_size": "always the image windows' size",
    }
    for key, fragment in expected.items():
        assert fragment in reasons.get(key, ""), (key, reasons.get(key))
    ini.write_text(EDGE_INI.replace("csv_file = lists/seg.csv\nspatial", "path_to_search = data/labels\nspatial")
                   .replace("[NETWORK]", "[NETWORK]\nreg_type = L1\ndecay = 0.1"))
    with pytest.raises(ConfigError) as err:
        convert_ini(ini)
    assert "use path_to_search but" in str(err.value) and "L1 regularisation is not supported" in str(err.value)
