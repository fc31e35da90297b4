"""Multi-domain pretraining (Med3D): config, normalisation, spacing, routing of the loss, resume, transfer."""
import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest

from highres3d.config import PreprocessingConfig, config_from_dict, load_config
from highres3d.data.dataset import Subject
from highres3d.data.preprocess import clip_percentiles, load_volume, whiten
from highres3d.data.synth import synthesize_ixi
from highres3d.errors import ConfigError
from highres3d.io.nifti import median_spacing, working_spacing
from highres3d.training import train
from highres3d.training.multidomain import dataset_schedule, domain_configs

TINY = [
    "sampler.window_size=[16,16,16]",
    "network.width_multiplier=0.25",
    "training.max_iter=4",
    "training.validation_every=4",
    "training.checkpoint_every=4",
    "training.validation_windows=2",
    "augmentation.device=cpu",
]
PATTERNS = {"T1": "{subject}-T1.nii.gz", "T2": "{subject}-T2.nii.gz", "label": "{subject}-aseg.nii.gz"}


def _entry(name, **extra):
    return {"name": name, "patterns": PATTERNS, "labels": {17: 1, 53: 1}, "other_labels": 0, **extra}


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, message", [
    (lambda d: d[1].update(num_classes=0), r"datasets\[1\]\.num_classes: expected a positive number"),
    (lambda d: d[1].update(labels={4: 2}), r"datasets\[1\]\.labels: maps to class 2 but datasets\[1\]\.num_classes is 2"),
    (lambda d: d[1].update(name="a"), r"datasets\[1\]\.name: 'a' is used by more than one dataset"),
    (lambda d: d[0].update(name="bad name"), r"datasets\[0\]\.name: 'bad name' names a head layer"),
    (lambda d: d[0].update(weight=0), r"datasets\[0\]\.weight: expected a positive number"),
    (lambda d: d[1].update(modalities=["T1"], patterns={"T1": "{subject}-T1.nii.gz"}),
     r"datasets\[1\]\.modalities: 1 modalities \['T1'\], but datasets\[0\] has 2"),
    (lambda d: d[1].update(patterns={"T1": "x.nii.gz"}), r"datasets\[1\]\.patterns"),
    (lambda d: d.pop(), r"at least two datasets"),
])
def test_datasets_errors_name_the_key(change, message):
    entries = [_entry("a"), _entry("b")]
    change(entries)
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"datasets": entries})


def test_keys_a_multi_domain_config_cannot_use():
    entries = [_entry("a"), _entry("b")]
    with pytest.raises(ConfigError, match="dataset: not used when 'datasets' is given"):
        config_from_dict({"datasets": entries, "dataset": {"patterns": PATTERNS}})
    with pytest.raises(ConfigError, match="sampler.class_probabilities: cannot be used with 'datasets'"):
        config_from_dict({"datasets": entries, "sampler": {"class_probabilities": [0.5, 0.5]}})
    with pytest.raises(ConfigError, match="preprocessing.spacing: with 'datasets' each entry has its own"):
        config_from_dict({"datasets": entries, "preprocessing": {"spacing": [1, 1, 1]}})


def test_shipped_configs_load_and_single_dataset_configs_are_unchanged(tmp_path):
    demo = load_config("demo/multi_domain.yaml")
    assert [d.name for d in demo.datasets] == ["hippocampus", "ventricles_wm"]
    assert [d.num_classes for d in demo.datasets] == [2, 3]
    # Roots are resolved like any path ({cwd} here), and each domain config has its own labels and classes.
    assert demo.datasets[1].root.name == "ixi_b"
    first, second = domain_configs(demo)
    assert second.network.num_classes == 3 and second.preprocessing.labels == {4: 1, 43: 1, 14: 1, 2: 2, 41: 2}
    assert first.dataset.name == "hippocampus" and first.datasets == ()
    assert load_config("multi_domain.yaml").network.width_multiplier == 1.0
    assert load_config("demo/brats.yaml").datasets == ()
    # A relative root resolves against the config file's folder, as dataset.root does.
    (tmp_path / "md.yaml").write_text("datasets:\n" + "".join(
        f"  - {{name: {n}, root: data/{n}, patterns: {{T1: '{{subject}}_1.nii', T2: '{{subject}}_2.nii'}}}}\n"
        for n in ("a", "b")))
    assert load_config(tmp_path / "md.yaml").datasets[1].root == (tmp_path / "data" / "b").resolve()


# --------------------------------------------------------------------------- preprocessing


def test_percentile_clip_then_zscore_by_hand(tmp_path):
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000], dtype=np.float32)
    image = values.reshape(11, 1, 1, 1)
    everything = [np.ones((11, 1, 1), bool)]
    # Percentiles 10 and 90 of 11 values fall on the 2nd and 10th: 2 and 10.
    clipped = clip_percentiles(image, everything, 10, 90)
    assert clipped.ravel().tolist() == [2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]
    # Mean 66/11 = 6; squared deviations sum to 92, so sd = sqrt(92/11).
    expected = (np.array([2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]) - 6) / np.sqrt(92 / 11)
    np.testing.assert_allclose(whiten(clipped, everything).ravel(), expected, rtol=1e-6)
    # The same through preprocessing (normalisation: percentile_zscore), from a file.
    nib.save(nib.Nifti1Image(values.reshape(11, 1, 1), np.eye(4)), tmp_path / "s_T1.nii.gz")
    pp = PreprocessingConfig(normalisation="percentile_zscore", clip_percentiles=(10, 90))
    volume = load_volume(Subject("s", {"T1": tmp_path / "s_T1.nii.gz"}), pp)
    np.testing.assert_allclose(volume.image.ravel(), expected, rtol=1e-5)
    # Plain z-score would let the outlier set the scale.
    plain = load_volume(Subject("s", {"T1": tmp_path / "s_T1.nii.gz"}), PreprocessingConfig())
    assert plain.image.ravel()[0] == pytest.approx(plain.image.ravel()[1], abs=0.01)


def test_median_spacing_in_working_axes_and_resampling(tmp_path):
    paths = []
    for i, zooms in enumerate([(1.0, 1.0, 2.0), (1.0, 1.5, 3.0), (2.0, 1.0, 4.0)]):
        paths.append(tmp_path / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([*zooms, 1.0])), paths[-1])
    assert median_spacing(paths) == (1.0, 1.0, 3.0)
    # A PIR-stored file: its third array axis (2 mm) is x (R) in RAS working space.
    pir = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])
    assert working_spacing(pir, "RAS") == (2.0, 1.0, 3.0)
    # Loading at the median spacing resamples the field of view: x 8 x 2 mm -> 16 x 1 mm, z 8 x 4 mm -> 11 x 3 mm.
    volume = load_volume(Subject("s", {"T1": paths[2]}), PreprocessingConfig(spacing=median_spacing(paths)))
    assert volume.shape == (16, 8, 11)


def test_dataset_schedule_is_weighted_reproducible_and_prefix_stable():
    long = dataset_schedule([3.0, 1.0], seed=5, iterations=4000)
    assert np.mean(long == 0) == pytest.approx(0.75, abs=0.03)
    assert np.array_equal(dataset_schedule([3.0, 1.0], 5, 100), long[:100])  # resume and longer runs agree
    assert not np.array_equal(dataset_schedule([3.0, 1.0], 6, 100), long[:100])
    with pytest.raises(ValueError, match="positive"):
        dataset_schedule([1.0, 0.0], 0, 3)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    roots = []
    for seed in (21, 22):
        root = tmp_path_factory.mktemp(f"ixi{seed}")
        synthesize_ixi(root, 4, size="small", seed=seed)
        roots.append(root)
    return roots


def _seed_with_prefix(prefix, then):
    """A seed whose schedule starts with ``prefix`` and then contains ``then``: the test knows which heads ran."""
    for seed in range(200):
        s = dataset_schedule([1.0, 1.0], seed, 4)
        if list(s[:len(prefix)]) == prefix and then in s[len(prefix):]:
            return seed
    raise AssertionError("no such seed")


def md_config(roots, seed):
    cfg = load_config("demo/multi_domain.yaml", overrides=TINY + [f"training.seed={seed}"])
    split = {"validation_fraction": 0.25, "inference_fraction": 0.0}
    entries = [dataclasses.replace(d, root=root, split=dataclasses.replace(d.split, **split))
               for d, root in zip(cfg.datasets, roots)]
    return dataclasses.replace(cfg, datasets=tuple(entries))


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_loss_trains_only_its_head_resume_and_transfer(two_domains, tmp_path):
    import keras

    from highres3d import transfer
    from highres3d.models import HighResNet3D, build_multi_domain_model, named_weights

    seed = _seed_with_prefix([0, 0], then=1)
    cfg = md_config(two_domains, seed)
    keras.utils.set_random_seed(seed)
    initial = {k: v.numpy().copy() for k, v in named_weights(build_multi_domain_model(cfg)).items()}

    run_dir = tmp_path / "md"
    result = train(cfg, run_dir, stop_after=2, echo=lambda *_: None)
    assert result.iterations == 2
    after = transfer.read_source_weights(run_dir / "checkpoints" / "iter_000002.keras")
    head_a, head_b = "conv_2_hippocampus/", "conv_2_ventricles_wm/"
    # Two steps on dataset 0: its head and the trunk moved, the other head (weights and BN statistics) did not.
    assert not np.allclose(after[head_a + "conv/kernel"], initial[head_a + "conv/kernel"])
    assert not np.allclose(after[head_a + "bn/moving_mean"], initial[head_a + "bn/moving_mean"])
    assert not np.allclose(after["res_2_1/conv_0/kernel"], initial["res_2_1/conv_0/kernel"])
    for path in initial:
        if path.startswith(head_b):
            np.testing.assert_array_equal(after[path], initial[path], err_msg=path)

    # Resume to the end; an uninterrupted run draws the same datasets and windows and gives the same losses.
    train(cfg, run_dir, resume=True, echo=lambda *_: None)
    straight = tmp_path / "straight"
    # Validation never touches the training state, so the reference run skips it (it is slow on a CPU);
    # it preprocesses each training volume at every visit (training.cache: lazy), which draws the same windows.
    quiet = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, validation_every=100,
                                                                  checkpoint_every=100, cache="lazy"))
    said = []
    train(quiet, straight, echo=said.append)
    assert sum("loaded lazily" in line for line in said) == 2
    resumed, uninterrupted = _rows(run_dir), _rows(straight)
    assert [r["dataset"] for r in resumed] == [r["dataset"] for r in uninterrupted] == [
        str(d + 1) for d in dataset_schedule([1.0, 1.0], seed, 4)]
    np.testing.assert_allclose([float(r["loss"]) for r in resumed], [float(r["loss"]) for r in uninterrupted],
                               rtol=1e-5)
    last = resumed[-1]
    for name in ("hippocampus", "ventricles_wm"):
        assert 0 <= float(last[f"val_volume_dice_{name}"]) <= 1 and f"val_window_dice_{name}" in last
    assert float(last["val_volume_dice"]) == pytest.approx(
        (float(last["val_volume_dice_hippocampus"]) + float(last["val_volume_dice_ventricles_wm"])) / 2)
    for name in ("best.keras", "model.keras", "split_hippocampus.csv", "split_ventricles_wm.csv"):
        assert (run_dir / name).exists(), name
    saved = load_config(run_dir / "config.yaml")  # the resolved median spacing is recorded
    assert [d.spacing for d in saved.datasets] == [(3.2, 3.2, 3.2)] * 2

    # The run folder as transfer.source of an ordinary model: trunk copied, a fresh conv_2 of its own.
    source = transfer.read_source_weights(run_dir)
    target = HighResNet3D(2, 2, width_multiplier=0.25)
    fresh = target.get_layer("conv_2").conv.kernel.numpy().copy()
    report = transfer.load_weights(target, run_dir, echo=None)
    weights = named_weights(target)
    for path, value in source.items():
        if not path.startswith("conv_2_"):
            np.testing.assert_array_equal(weights[path].numpy(), value, err_msg=path)
    np.testing.assert_array_equal(weights["conv_2/conv/kernel"].numpy(), fresh)
    assert {p.split("/")[0] for p in report.missing} == {"conv_2"}
    assert {p.split("/")[0] for p in report.unused} == {"conv_2_hippocampus", "conv_2_ventricles_wm"}

    # It is not a segmentation model: infer says what to do with it.
    from highres3d.inference import load_run

    with pytest.raises(ConfigError, match="multi-domain pretrained trunk"):
        load_run(run_dir)


def test_a_data_root_is_a_folder_of_datasets_by_name(tmp_path):
    from highres3d.config import dump_config

    path = tmp_path / "md.yaml"
    path.write_text(dump_config(config_from_dict({"datasets": [_entry("a", root="x"), _entry("b", root="y")]})))
    cfg = load_config(path, data_root=tmp_path / "data")
    assert [d.root for d in cfg.datasets] == [(tmp_path / "data" / "a").resolve(), (tmp_path / "data" / "b").resolve()]
    assert cfg.dataset.root is None
