"""``highres3d train``: run folder, checkpoints, best model, resume, transfer with freezing."""
import csv
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats
from highres3d.errors import Highres3dError
from highres3d.training import train
from highres3d.training.run import RunExistsError, RunFolder, RunState

TINY = [
    "sampler.window_size=[16,16,16]",
    "network.width_multiplier=0.25",
    "training.max_iter=6",
    "training.batch_size=2",
    "training.validation_every=2",
    "training.checkpoint_every=2",
    "training.max_checkpoints=2",
    "training.validation_windows=2",
    "inference.window_size=[32,32,32]",
    "augmentation.device=cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 5, size="small", seed=3)
    return root


def tiny_config(data, *extra):
    return load_config("demo/brats.yaml", overrides=TINY + list(extra), data_root=data)


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_run_folder_is_complete_and_self_contained(data, tmp_path):
    run_dir = tmp_path / "run"
    result = train(tiny_config(data), run_dir, echo=lambda *_: None)
    assert result.iterations == 6
    for name in ("config.yaml", "state.json", "metrics.csv", "best.keras", "model.keras", "split.csv", "sessions.json"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "tensorboard").iterdir())
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.keras"))
    assert checkpoints == ["iter_000004.keras", "iter_000006.keras"]  # max_checkpoints = 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.npz")) == [
        "iter_000004.state.npz", "iter_000006.state.npz"]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 6 and state["best_iteration"] in (2, 4, 6)
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["val_window_dice"] and rows[1]["val_volume_dice"] and not rows[0]["val_loss"]
    assert not list(run_dir.rglob("*.part*"))
    # the saved config reloads to the same settings
    again = load_config(run_dir / "config.yaml")
    assert again.sampler.window_size == (16, 16, 16) and again.training.max_iter == 6
    with pytest.raises(RunExistsError, match="--resume"):
        train(tiny_config(data), run_dir, echo=lambda *_: None)


@pytest.mark.parametrize("device, stop", [("cpu", 3), ("accelerator", 4)])
def test_resume_gives_the_same_loss_curve(data, tmp_path, device, stop, monkeypatch):
    extra = ["augmentation.rotation_degrees=10", "augmentation.scaling_percent=10", f"augmentation.device={device}",
             "training.cache=lazy"]
    cfg = tiny_config(data, *extra)
    full = tmp_path / "full"
    train(cfg, full, echo=lambda *_: None)
    split = tmp_path / "split"
    # Stopped at 3 (between scheduled checkpoints) or 4 (on one), then resumed.
    first = train(cfg, split, stop_after=stop, echo=lambda *_: None)
    assert first.iterations == stop
    assert json.loads((split / "state.json").read_text())["checkpoints"][-1] == f"iter_{stop:06d}.keras"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # resumed by another job
    train(cfg, split, resume=True, echo=lambda *_: None)
    np.testing.assert_allclose(losses(split), losses(full), rtol=1e-4, atol=1e-6)
    assert len(losses(split)) == 6
    # Each start and resume is on record: from which iteration, in which job, with which software.
    sessions = RunFolder(split).sessions()
    assert [s["from_iteration"] for s in sessions] == [0, stop]
    assert "SLURM_JOB_ID" not in sessions[0]["scheduler"] and sessions[1]["scheduler"]["SLURM_JOB_ID"] == "4242"
    assert sessions[1]["packages"]["numpy"] == np.__version__ and sessions[1]["host"] == socket.gethostname()
    assert sessions[1]["cpus_usable"] >= 1 and sessions[1]["gpus"] == [] and sessions[1]["python"]


def test_a_damaged_session_record_is_kept_aside_and_a_new_one_started(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    (run.path / "sessions.json").write_text("{half written")
    run.record_session(RunState(iteration=7))
    assert [s["from_iteration"] for s in run.sessions()] == [7]
    kept = list(run.path.glob("sessions.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == "{half written"
    assert f"kept as {kept[0].name}" in capsys.readouterr().err


def test_volumes_on_the_device_train_exactly_like_volumes_in_ram(data, tmp_path):
    """training.cache 'device': positions through tf.data, windows cut in the step; same windows, same losses."""
    extra = ["augmentation.rotation_degrees=10", "augmentation.scaling_percent=10", "augmentation.device=accelerator",
             "training.max_iter=4"]
    ram = tmp_path / "ram"
    train(tiny_config(data, *extra, "training.cache=ram"), ram, echo=lambda *_: None)
    said = []
    device = tmp_path / "device"
    cfg = tiny_config(data, *extra, "training.cache=device")
    train(cfg, device, stop_after=2, echo=said.append)
    assert any("held on the device" in line and "window positions only" in line for line in said)
    train(cfg, device, resume=True, echo=lambda *_: None)  # resumed: the position stream continues too
    np.testing.assert_allclose(losses(device), losses(ram), rtol=1e-5, atol=1e-6)
    assert len(losses(device)) == 4


@pytest.mark.parametrize("layout", ["channel_major", "interleaved"])
def test_training_volumes_take_either_layout_and_the_step_gets_channels_last(data, tmp_path, layout):
    """The fast copy path is wired in: channel-first batches from channel-major volumes, channel-last from
    interleaved ones, the model's layout in the step either way."""
    import tensorflow as tf

    from highres3d.data.dataset import Dataset
    from highres3d.data.pipeline import to_channels_last
    from highres3d.samplers import is_channel_major
    from highres3d.training.trainer import Trainer, batch_data_format, build_sampler, labelled_volume, training_volume

    cfg = tiny_config(data, "augmentation.rotation_degrees=0", "augmentation.scaling_percent=0")
    subject = Dataset.from_config(cfg.dataset).split("training")[0]
    volume = training_volume(subject, cfg, layout)
    plain = labelled_volume(subject, cfg)
    assert is_channel_major(volume.image, contiguous=True) == (layout == "channel_major")
    assert layout == "channel_major" or volume.image.flags.c_contiguous
    np.testing.assert_array_equal(volume.image, plain.image)
    trainer = Trainer(cfg, tmp_path / "run", echo=lambda *_: None)
    trainer.train_volumes = [volume]
    batches = trainer._training_batches(tf.distribute.get_strategy(), build_sampler(cfg), 0, 0)
    images, labels = next(iter(batches))
    channels = len(cfg.dataset.modalities)
    channels_first = batch_data_format([volume]) == "channels_first"
    assert channels_first == (layout == "channel_major")
    expected = (channels, 16, 16, 16) if channels_first else (16, 16, 16, channels)
    assert images.shape == (cfg.training.batch_size,) + expected
    model_images = to_channels_last(images) if channels_first else images
    assert model_images.shape == (cfg.training.batch_size, 16, 16, 16, channels)
    # Lazily loaded volumes (loaders) are channel-major: their batches channel-first.
    assert batch_data_format([lambda: volume]) == "channels_first"


def test_training_in_ram_takes_the_layout_that_copies_fastest_and_trains_the_same_in_either(data, tmp_path, monkeypatch):
    """training.cache 'ram' stores its volumes in the layout windows copy out of fastest here; the losses do not change."""
    import highres3d.samplers as samplers
    from highres3d.data.dataset import Dataset
    from highres3d.samplers import is_channel_major
    from highres3d.training.trainer import load_split

    layouts = []
    runs = {}
    for fastest in ("channel_major", "interleaved"):
        other = "interleaved" if fastest == "channel_major" else "channel_major"
        monkeypatch.setattr(samplers, "fastest_layout", lambda image, window, f=fastest, o=other: (f, {f: 2000.0, o: 1500.0}))
        said = []
        cfg = tiny_config(data, "training.max_iter=3", "training.cache=ram")
        volumes = load_split(Dataset.from_config(cfg.dataset).split("training"), cfg, "training", "training",
                             said.append, False)
        layouts.append({is_channel_major(v.image, contiguous=True) for v in volumes})
        assert any(f"{fastest.replace('_', '-')} memory, which windows copy out of fastest here" in line
                   and "2,000/s" in line and "1,500/s" in line for line in said)
        runs[fastest] = tmp_path / fastest
        train(cfg, runs[fastest], echo=lambda *_: None)
    assert layouts == [{True}, {False}]  # every volume of a run in the layout its first one chose
    np.testing.assert_allclose(losses(runs["interleaved"]), losses(runs["channel_major"]), rtol=1e-5, atol=1e-6)
    assert len(losses(runs["interleaved"])) == 3


def test_volumes_on_the_device_need_augmentation_on_the_device(data):
    from highres3d.errors import ConfigError

    with pytest.raises(ConfigError, match="augmentation.device to 'accelerator'"):
        tiny_config(data, "training.cache=device", "augmentation.rotation_degrees=10")
    fine = tiny_config(data, "training.cache=device", "augmentation.rotation_degrees=10", "augmentation.device=accelerator")
    assert fine.training.cache == "device"


def test_resume_refuses_another_config(data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(data, "training.max_iter=3"), run, stop_after=2, echo=lambda *_: None)
    with pytest.raises(Exception, match=r"different config \(changed: training.lr\)"):
        train(tiny_config(data, "training.max_iter=3", "training.lr=0.5"), run, resume=True, echo=lambda *_: None)
    # A longer max_iter is fine, and so is what is evaluated after training, and the windows of the
    # whole-subject validation (the fix an out-of-memory error there names; training.cache: tests/data/test_cache.py).
    result = train(tiny_config(data, "training.max_iter=4", "evaluation.splits=[inference]",
                               "inference.window_size=[24,24,24]"), run, resume=True, echo=lambda *_: None)
    assert result.iterations == 4


def test_transfer_with_frozen_groups(data, tmp_path):
    import keras

    source = tmp_path / "source"
    train(tiny_config(data), source, echo=lambda *_: None)
    target = tmp_path / "target"
    cfg = tiny_config(data, f"transfer.source={source}", "transfer.freeze=2", "training.lr=0.01")
    train(cfg, target, echo=lambda *_: None)
    before = keras.models.load_model(str(source / "best.keras"), compile=False)
    after = keras.models.load_model(str(target / "model.keras"), compile=False)
    for group in ("conv_0", "res_1_0", "res_1_2"):
        for w0, w1 in zip(before.get_layer(group).trainable_weights, after.get_layer(group).trainable_weights):
            if "moving" in w0.path:
                continue
            np.testing.assert_array_equal(np.asarray(w0), np.asarray(w1), err_msg=w0.path)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(before.get_layer("res_3_0").trainable_weights, after.get_layer("res_3_0").trainable_weights)]
    assert any(changed)


MIRRORED = """
import sys, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from highres3d.config import load_config
from highres3d.errors import Highres3dError
from highres3d.training import train
cfg = load_config("demo/brats.yaml", overrides=sys.argv[3:], data_root=sys.argv[1])
result = train(cfg, sys.argv[2], echo=print)
print("REPLICAS", tf.distribute.MirroredStrategy().num_replicas_in_sync, "ITER", result.iterations)
"""




@pytest.mark.parametrize("cache", ["ram", "device"])
def test_mirrored_strategy_on_two_logical_cpus(data, tmp_path, cache):
    overrides = TINY + ["training.strategy=mirrored", "training.max_iter=2", f"training.cache={cache}"] + (
        ["augmentation.device=accelerator"] if cache == "device" else [])
    out = subprocess.run([sys.executable, "-c", MIRRORED, str(data), str(tmp_path / "run")] + overrides,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICAS 2 ITER 2" in out.stdout
    # training.cache device: every replica's windows are cut from the machine's one copy of the volumes
    assert ("held on the device" in out.stdout) == (cache == "device")
    if cache == "device":
        return  # the comparison with one device below is the same for both caches
    # The logged loss is the whole batch's (not divided by the replicas): close to a
    # single-device run, up to BatchNorm using per-replica statistics.
    single = train(tiny_config(data, "training.max_iter=2"), tmp_path / "single", echo=lambda *_: None)
    assert single.iterations == 2
    mirrored, plain = losses(tmp_path / "run")[0], losses(tmp_path / "single")[0]
    assert abs(mirrored - plain) / plain < 0.25, (mirrored, plain)


def test_bad_data_is_listed_before_anything_is_created(data, tmp_path, capsys):
    # Two bad subjects: a truncated image and a missing label. Both are listed at once, the exit code is
    # non-zero, and no run folder is left behind to block the next attempt.
    import shutil

    from highres3d.cli.main import main

    broken = tmp_path / "brats"
    shutil.copytree(data, broken)
    subjects = sorted(p.name for p in broken.iterdir() if p.is_dir())
    t1 = next((broken / subjects[0]).glob("*_t1.nii.gz"))
    t1.write_bytes(t1.read_bytes()[:100])
    next((broken / subjects[1]).glob("*_seg.nii.gz")).unlink()
    run_dir = tmp_path / "run"
    args = ["train", "--config", "demo/brats.yaml", "--data-root", str(broken), "--run-dir", str(run_dir),
            "--no-progress", "--set", "dataset.split.validation_fraction=0", "--set", "dataset.split.inference_fraction=0"]
    args += [x for o in TINY for x in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and f"{t1.name}: cannot read" in err and f"{subjects[1]}: no label file" in err
    assert not run_dir.exists()
    # dataset.missing: skip leaves the subject without a label out and trains; the corrupt file is still an error.
    assert main(args + ["--set", "dataset.missing=skip"]) == 2
    assert "1 problem(s)" in capsys.readouterr().err and not run_dir.exists()


def test_plain_progress_lines_when_output_is_not_a_terminal(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HIGHRES3D_PROGRESS_INTERVAL", "0")
    train(tiny_config(data), tmp_path / "run", echo=lambda *_: None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert len(lines) >= 6 and "\r" not in "".join(lines)
    assert lines[-1].startswith("train: 6/6 (100%) loss") and "windows/s" in lines[-1] and "ETA" in lines[-1]


def test_progress_lines_continue_while_validation_blocks(data, tmp_path, capsys, monkeypatch):
    from highres3d.training.trainer import Trainer

    monkeypatch.setenv("HIGHRES3D_PROGRESS_INTERVAL", "0.25")
    validate = Trainer._validate_volumes
    calls = []

    def slow_validation(self, model):
        # A whole-volume validation that takes a while, as on real volumes: no update comes meanwhile.
        calls.append(self)
        time.sleep(0.8)
        return validate(self, model)

    monkeypatch.setattr(Trainer, "_validate_volumes", slow_validation)
    train(tiny_config(data, "training.max_iter=2"), tmp_path / "run", echo=lambda *_: None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    during = [line for line in lines if "· validating 1 subject |" in line]
    assert len(calls) == 1 and len(during) >= 2, lines
    assert during[0].startswith("train: 2/2 (100%) loss ") and "windows/s" in during[0]
    # The phase ends with the validation; the final line has none.
    assert lines[-1].startswith("train: 2/2 (100%) loss") and "validating" not in lines[-1]



def test_a_job_with_gpus_tensorflow_cannot_use_stops_before_anything_is_done(data, tmp_path, monkeypatch):
    """Silently on the CPU is the failure a GPU job must not have: the scheduler gave GPU 0, TensorFlow sees none."""
    import tensorflow as tf

    from highres3d.environment import require_usable_gpus
    from highres3d.inference import predict_subjects

    assert not tf.config.list_physical_devices("GPU")  # this test needs a machine without a usable GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(Highres3dError) as caught:
        train(tiny_config(data), tmp_path / "run", echo=lambda *_: None)
    message = str(caught.value)
    assert message.startswith(f"train {tmp_path / 'run'}: this job has 1 GPU(s) (CUDA_VISIBLE_DEVICES=0) but "
                              "TensorFlow sees none, so it would run on the CPU")
    assert "CUDA_VISIBLE_DEVICES=-1" in message and not (tmp_path / "run").exists()
    with pytest.raises(Highres3dError, match="infer into .*: this job has 1 GPU"):
        predict_subjects(None, tiny_config(data), [], tmp_path / "out", echo=None)
    assert not (tmp_path / "out").exists()
    # GPUs hidden on purpose, or none given: the CPU it is.
    for hidden in ("-1", ""):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        require_usable_gpus("train")
