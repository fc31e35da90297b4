"""``highres3d infer`` end to end with a threshold model on LPS, oblique and anisotropic files."""
import argparse
import os

import nibabel as nib
import numpy as np
import pytest
import yaml

keras = pytest.importorskip("keras")

from highres3d.cli import evaluate as evaluate_cli  # noqa: E402
from highres3d.cli import infer as infer_cli  # noqa: E402
from highres3d.errors import ConfigError  # noqa: E402
from highres3d.inference import load_run  # noqa: E402

THRESHOLD = 0.0


@keras.saving.register_keras_serializable(package="highres3d_tests")
class ThresholdChannel0(keras.layers.Layer):
    """Logits (0, x0 - t): class 1 exactly where channel 0 exceeds t."""

    def __init__(self, threshold=0.0, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)

    def call(self, x):
        d = x[..., :1] - self.threshold
        return keras.ops.concatenate([keras.ops.zeros_like(d), d], axis=-1)

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


def rotation_z(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


AFFINES = {
    "lps": np.array([[-1.0, 0, 0, 20], [0, -1.0, 0, 18], [0, 0, 1.0, -9], [0, 0, 0, 1]]),
    "oblique": np.vstack([np.hstack([rotation_z(0.3) @ np.diag([1.1, 0.8, 2.5]), [[5], [-3], [12]]]), [0, 0, 0, 1]]),
    "anisotropic": np.array([[0, 0, 1.2, -9], [-0.9, 0, 0, 10], [0, -0.95, 0, 8], [0, 0, 0, 1]]),
}
SHAPES = {"lps": (22, 19, 17), "oblique": (20, 26, 11), "anisotropic": (21, 23, 19)}


def ball(shape, affine, radius=7.0):
    """Signed distance (mm) inside a ball at the volume's world centre: smooth, thresholded at 0."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    return (radius - np.linalg.norm(world - centre, axis=1)).reshape(shape).astype(np.float32)


def write(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    img.header["descrip"] = b"highres3d test input"
    nib.save(img, str(path))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    inputs = keras.Input((None, None, None, 2))
    model = keras.Model(inputs, ThresholdChannel0(THRESHOLD)(inputs))
    model.save(root / "best.keras")
    cfg = {
        "dataset": {"modalities": ["T1", "T2"],
                    "patterns": {"T1": "{subject}_t1.nii.gz", "T2": "{subject}_t2.nii.gz", "label": "{subject}_label.nii.gz"}},
        "preprocessing": {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "normalisation": "none"},
        "network": {"num_classes": 2},
        "inference": {"window_size": [16, 16, 16], "overlap": 0.25, "blend": "gaussian", "batch_size": 2},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return root


@pytest.fixture()
def input_dir(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, affine in AFFINES.items():
        shape = SHAPES[name]
        write(folder / f"{name}_t1.nii.gz", ball(shape, affine), affine)
        write(folder / f"{name}_t2.nii.gz", rng.normal(size=shape).astype(np.float32), affine)
    return folder


def cli(*argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    infer_cli.register(sub)
    evaluate_cli.register(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def check_segmentation(path, source, exact):
    out = nib.load(str(path))
    src = nib.load(str(source))
    assert out.get_data_dtype() == np.uint8
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
    assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
    assert out.header["descrip"].tobytes().rstrip(b"\0") == b"highres3d test input"
    seg = np.asarray(out.dataobj)
    image = src.get_fdata(dtype=np.float32)
    expected = (image > THRESHOLD).astype(np.uint8)
    assert expected.sum() > 50
    wrong = seg != expected
    if exact:
        assert not wrong.any()
    else:
        # Resampling to 1 mm and back (nearest neighbour) moves the boundary by
        # under half a voxel: only voxels within 0.75 mm of the sphere may differ.
        band = np.abs(image - THRESHOLD) < 0.75
        assert wrong.any() and not (wrong & ~band).any()
        assert wrong.sum() < 0.5 * band.sum()
    return seg


def test_threshold_model_on_lps_oblique_anisotropic(run_dir, input_dir, tmp_path):
    out_dir = tmp_path / "out"
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out_dir) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{n}_seg.nii.gz" for n in sorted(AFFINES)]
    for name in AFFINES:
        check_segmentation(out_dir / f"{name}_seg.nii.gz", input_dir / f"{name}_t1.nii.gz", exact=name == "lps")


def test_modes_probabilities_and_tta_agree(run_dir, input_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("infer", "--model", run_dir / "best.keras", "-i", input_dir, "-o", a, "--blend", "crop",
               "--window", 12, 12, 12, "--overlap", 0.5, "--probabilities") == 0
    assert cli("infer", "--model", run_dir, "--config", run_dir / "config.yaml", "-i", input_dir, "-o", b,
               "--whole-volume", "--tta-mirror") == 0
    for name in AFFINES:
        seg_a = np.asarray(nib.load(str(a / f"{name}_seg.nii.gz")).dataobj)
        seg_b = np.asarray(nib.load(str(b / f"{name}_seg.nii.gz")).dataobj)
        np.testing.assert_array_equal(seg_a, seg_b)
        prob = nib.load(str(a / f"{name}_prob.nii.gz"))
        assert prob.get_data_dtype() == np.float32 and prob.shape == seg_a.shape + (2,)
        p = prob.get_fdata(dtype=np.float32)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
        if name == "lps":  # same grid: the probabilities' argmax is the segmentation
            np.testing.assert_array_equal(p.argmax(-1), seg_a)


def test_skip_overwrite_shards_and_failures(run_dir, input_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out, "--shard", "0/2") == 0
    first = {p.name for p in out.iterdir()}
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out, "--shard", "1/2") == 0
    second = {p.name for p in out.iterdir()} - first
    assert first and second and len(first | second) == 3
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    os.utime(out / "lps_seg.nii.gz", ns=(1, 1))
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out) == 0  # all skipped
    assert (out / "lps_seg.nii.gz").stat().st_mtime_ns == 1
    capsys.readouterr()
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out, "--overwrite", "--precision", "float32") == 0
    assert (out / "lps_seg.nii.gz").stat().st_mtime_ns > 1
    # The precision used is said, and why where auto chose it.
    assert "precision: float32\n" in capsys.readouterr().out
    from highres3d.inference import native_bfloat16, resolve_precision

    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out) == 0
    assert f"precision: {resolve_precision('auto')} [auto: {native_bfloat16()[1]}]" in capsys.readouterr().out
    assert set(stamp) == {p.name for p in out.iterdir()}

    # a corrupt subject fails alone; the others are written; exit status 1
    (input_dir / "oblique_t2.nii.gz").write_bytes(b"not a nifti file")
    bad_out = tmp_path / "bad"
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", bad_out) == 1
    assert sorted(p.name for p in bad_out.iterdir()) == ["anisotropic_seg.nii.gz", "lps_seg.nii.gz"]
    assert "oblique" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="shard"):
        cli("infer", "--model", run_dir, "-i", input_dir, "-o", bad_out, "--shard", "2/2")


def test_interrupted_write_leaves_no_partial_file(run_dir, input_dir, tmp_path, monkeypatch):
    real_save = nib.save

    def save_then_interrupt(img, filename):
        real_save(img, filename)
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", save_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        cli("infer", "--model", run_dir, "-i", input_dir, "-o", out)
    assert list(out.iterdir()) == []


def test_pattern_override_and_run_errors(run_dir, input_dir, tmp_path):
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in input_dir.iterdir():
        sid, mod = p.name.split("_")[0], p.name.split("_")[1].split(".")[0]
        (renamed / f"{mod.upper()}-{sid}.nii.gz").write_bytes(p.read_bytes())
    out = tmp_path / "out"
    assert cli("infer", "--model", run_dir, "-i", renamed, "-o", out,
               "--pattern", "T1=T1-{subject}.nii.gz", "--pattern", "T2=T2-{subject}.nii.gz") == 0
    assert len(list(out.iterdir())) == 3
    with pytest.raises(ConfigError, match="modalities"):
        cli("infer", "--model", run_dir, "-i", renamed, "-o", out, "--pattern", "T1-{subject}.nii.gz")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((run_dir / "best.keras").read_bytes())
    with pytest.raises(ConfigError, match="--config"):
        load_run(lone / "model.keras")


def test_evaluate_cli_on_infer_output(run_dir, input_dir, tmp_path, capsys):
    out = tmp_path / "out"
    truth = tmp_path / "truth"
    truth.mkdir()
    assert cli("infer", "--model", run_dir, "-i", input_dir, "-o", out) == 0
    for name in AFFINES:
        src = nib.load(str(input_dir / f"{name}_t1.nii.gz"))
        # BraTS-like raw values: 4 inside the ball, 2 in a shell outside it, 0 elsewhere
        image = src.get_fdata()
        raw = np.where(image > 0, 4, np.where(image > -2, 2, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(raw, src.affine), str(truth / f"{name}_label.nii.gz"))
    assert cli("evaluate", "--pred", out, "--truth", truth, "--config", run_dir,
               "--truth-map", "0:0,4:1,2:0", "-o", tmp_path / "eval") == 0
    printed = capsys.readouterr().out
    assert "dice" in printed
    import json
    summary = json.loads((tmp_path / "eval" / "evaluation_summary.json").read_text())
    assert summary["subjects"] == 3 and list(summary["classes"]) == ["1"]
    assert summary["classes"]["1"]["dice"]["mean"] > 0.85
    lps = [line for line in (tmp_path / "eval" / "evaluation.csv").read_text().splitlines() if line.startswith("lps,")]
    assert lps[0].split(",")[2] == "1.0"  # same grid: perfect


def test_nnunet_inputs_are_matched_to_channels_by_name(tmp_path):
    # dataset.json says file _0000 is T1 and _0001 is T2; the config lists T2 first, so channel 0 must read _0001.
    import json

    from highres3d.config import config_from_dict
    from highres3d.inference import input_patterns, predict_folder

    root = tmp_path / "Dataset001_Test"
    images = root / "imagesTs"
    images.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}))
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), -1.0, np.float32), affine), images / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), 1.0, np.float32), affine), images / "case_0001.nii.gz")
    cfg = config_from_dict({
        "dataset": {"layout": "nnunet", "root": str(root), "modalities": ["T2", "T1"]},
        "preprocessing": {"normalisation": "none"},
        "inference": {"mode": "whole_volume"},
    })
    assert input_patterns(cfg, images) == {"T2": "{subject}_0001.nii.gz", "T1": "{subject}_0000.nii.gz"}

    def channel_0_positive(batch):  # class 1 wherever the first channel (T2 here) is positive
        return np.stack([-batch[..., 0], batch[..., 0]], axis=-1)

    result = predict_folder(channel_0_positive, cfg, images, tmp_path / "out", echo=None)
    assert result.written == ["case"]
    seg = np.asarray(nib.load(result.segmentation("case")).dataobj)
    assert (seg == 1).all()


def test_workers_segment_the_folder_like_one_process(input_dir, tmp_path, capsys):
    # Worker processes load the model themselves, so it is made of stock Keras layers: logits (0, x0).
    run = tmp_path / "run"
    run.mkdir()
    inputs = keras.Input((None, None, None, 2))
    conv = keras.layers.Conv3D(2, 1)
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((1, 1, 1, 2, 2), np.float32)
    kernel[..., 0, 1] = 1.0
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    model.save(run / "best.keras")
    cfg = {
        "dataset": {"modalities": ["T1", "T2"], "patterns": {"T1": "{subject}_t1.nii.gz", "T2": "{subject}_t2.nii.gz"}},
        "preprocessing": {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "normalisation": "none"},
        "network": {"num_classes": 2},
        "inference": {"window_size": [16, 16, 16], "overlap": 0.25, "blend": "gaussian", "batch_size": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (input_dir / "incomplete_t1.nii.gz").write_bytes((input_dir / "lps_t1.nii.gz").read_bytes())  # no T2

    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("infer", "--model", run, "-i", input_dir, "-o", one, "--no-progress") == 0
    capsys.readouterr()
    assert cli("infer", "--model", run, "-i", input_dir, "-o", two, "--no-progress", "--workers", "2") == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) == [f"{n}_seg.nii.gz" for n in sorted(AFFINES)]
    for name in names:
        np.testing.assert_array_equal(np.asarray(nib.load(str(two / name)).dataobj),
                                      np.asarray(nib.load(str(one / name)).dataobj))
    # Shards 0/2 and 1/2, each worker's lines prefixed; one merged summary, the incomplete subject said once.
    assert "[worker 0/2] 2 subject(s) (shard 0/2)" in out and "[worker 1/2] 1 subject(s) (shard 1/2)" in out
    assert "done in" in out and "3 written, 0 already there" in out and "1 skipped" in out
    assert out.count("\n  incomplete") == 1

    # A rerun keeps what is there; a bad model path or clashing options fail once, before any worker starts.
    assert cli("infer", "--model", run, "-i", input_dir, "-o", two, "--workers", "2", "--no-progress") == 0
    assert "0 written, 3 already there" in capsys.readouterr().out
    with pytest.raises(Exception, match="missing"):
        cli("infer", "--model", tmp_path / "missing", "-i", input_dir, "-o", two, "--workers", "2")
    with pytest.raises(ConfigError, match="--workers 2 with --shard 0/2"):
        cli("infer", "--model", run, "-i", input_dir, "-o", two, "--workers", "2", "--shard", "0/2")
    with pytest.raises(ConfigError, match="--workers 0"):
        cli("infer", "--model", run, "-i", input_dir, "-o", two, "--workers", "0")


def test_the_next_subject_loads_while_the_model_works_and_results_are_unchanged(run_dir, input_dir, tmp_path,
                                                                             monkeypatch):
    import threading

    import highres3d.inference as inference
    from highres3d.inference import predict_folder

    keras_model, cfg, _ = load_run(run_dir)
    plain = predict_folder(keras_model, cfg, input_dir, tmp_path / "plain", echo=None, show_progress=False)
    loads, real_load = [], inference._load_for_prediction
    second_loading = threading.Event()

    def load(subject, config):
        loads.append(threading.current_thread().name)
        if len(loads) == 2:
            second_loading.set()
        return real_load(subject, config)

    waited = []

    def model(batch):
        # Without the overlap this wait would time out: the second subject loads only after the first is done.
        waited.append(second_loading.wait(timeout=20))
        return keras_model.predict_on_batch(batch)

    monkeypatch.setattr(inference, "_load_for_prediction", load)
    done = predict_folder(model, cfg, input_dir, tmp_path / "piped", echo=None, show_progress=False)
    assert waited[0] is True and len(loads) == 3 and all(name.startswith("highres3d-load") for name in loads)
    assert done.written == plain.written == sorted(AFFINES)
    for name in plain.written:
        np.testing.assert_array_equal(np.asarray(nib.load(str(done.segmentation(name))).dataobj),
                                      np.asarray(nib.load(str(plain.segmentation(name))).dataobj))
    with pytest.raises(TypeError, match="tta_mirro"):
        predict_folder(keras_model, cfg, input_dir, tmp_path / "typo", echo=None, tta_mirro=True)


def test_out_of_memory_names_what_to_lower_once_and_the_fix_works(run_dir, input_dir, tmp_path):
    import tensorflow as tf

    from highres3d.inference import predict_folder

    keras_model, cfg, _ = load_run(run_dir)
    limit = 16 ** 3  # voxels per call this "GPU" holds: one 16³ window, not the config's batch of 2

    def model(batch):
        if np.prod(batch.shape[:4]) > limit:
            raise tf.errors.ResourceExhaustedError(None, None, (
                f"OOM when allocating tensor with shape[{','.join(map(str, batch.shape))}] and type float on "
                "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc\n [[{{node conv}}]]"))
        return keras_model.predict_on_batch(batch)

    said = []
    failed = predict_folder(model, cfg, input_dir, tmp_path / "oom", echo=said.append, show_progress=False,
                            precision="float32")
    assert not failed.written and [sid for sid, _ in failed.failed] == sorted(AFFINES)
    assert not list((tmp_path / "oom").iterdir())
    for _, message in failed.failed:
        assert message.startswith("out of memory on GPU:0 in 16x16x16 windows of a ")
        assert message.endswith(", batch 2, float32 (OOM when allocating tensor with shape[2,16,16,16,2] and type "
                                "float on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc).")
    # What to lower is said with the first failure only, each setting with its value.
    advice = [line for line in said if "--batch-size / inference.batch_size (2;" in line]
    assert len(advice) == 1 and advice[0].startswith(f"{failed.failed[0][0]}: FAILED: out of memory")
    assert "--window / inference.window_size (16x16x16;" in advice[0] and "--precision bfloat16" in advice[0]
    said.clear()
    whole = predict_folder(model, cfg, input_dir, tmp_path / "whole", echo=said.append, show_progress=False,
                           whole_volume=True)
    assert all(" in the whole-volume pass over " in message for _, message in whole.failed)
    assert sum("--whole-volume (inference.mode: whole_volume) computes each subject in one pass" in line
               for line in said) == 1
    # The fix it names: one window per call fits.
    fixed = predict_folder(model, cfg, input_dir, tmp_path / "fixed", echo=None, show_progress=False, batch_size=1)
    assert fixed.ok and fixed.written == sorted(AFFINES)
