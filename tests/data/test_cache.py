"""training.cache: disk: volumes preprocessed once, memory-mapped, exact, shared across runs, never stale."""
import csv
import functools
import os

import numpy as np
import pytest

import highres3d.training.trainer as trainer_module
from highres3d.config import load_config
from highres3d.data.cache import VolumeCache, entry_key, on_disk
from highres3d.data.dataset import Dataset
from highres3d.data.pipeline import memory_estimate
from highres3d.data.synth import synthesize_brats
from highres3d.samplers.base import is_channel_major
from highres3d.training import train
from highres3d.training.trainer import load_volumes, training_volume

TINY = [
    "sampler.window_size=[16,16,16]", "network.width_multiplier=0.25", "training.max_iter=2", "training.batch_size=2",
    "training.validation_every=100", "training.checkpoint_every=100", "training.validation_windows=2",
    "inference.window_size=[32,32,32]", "augmentation.device=cpu", "augmentation.rotation_degrees=10",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 4, size="small", seed=11)
    return root


def config(data, *extra):
    return load_config("demo/brats.yaml", overrides=TINY + list(extra), data_root=data)


def validation(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = [{k: float(v) for k, v in row.items() if k.startswith("val_") and v} for row in csv.DictReader(handle)]
    assert any(rows), f"{run_dir}: no validation was logged"
    return [row[k] for row in rows for k in sorted(row)]


def losses(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_an_entry_gives_back_the_volume_it_was_made_from_memory_mapped_read_only(data, tmp_path):
    cfg = config(data)
    subject = Dataset.from_config(cfg.dataset).split("training")[0]
    made = training_volume(subject, cfg)
    cache = VolumeCache(tmp_path / "cache", echo=None)
    first = cache.volume(subject, cfg, lambda: made)
    again = cache.volume(subject, cfg, lambda: pytest.fail("a cached subject is not preprocessed again"))
    assert (cache.hits, cache.misses) == (1, 1)
    for volume in (first, again):
        np.testing.assert_array_equal(volume.image, made.image)
        np.testing.assert_array_equal(volume.label, made.label)
        assert volume.image.shape == made.image.shape and is_channel_major(volume.image, contiguous=True)
        assert on_disk(volume.image) and on_disk(volume.label) and not on_disk(made.image)
        with pytest.raises(ValueError, match="read-only"):
            volume.image[0, 0, 0, 0] = 1.0
        info = volume.info
        np.testing.assert_array_equal(info.working_affine, made.info.working_affine)
        np.testing.assert_array_equal(info.original_affine, made.info.original_affine)
        np.testing.assert_array_equal(info.transform, made.info.transform)
        assert (info.path, info.orientation, info.original_shape, info.working_shape, info.zoom) == (
            made.info.path, made.info.orientation, made.info.original_shape, made.info.working_shape, made.info.zoom)
        assert info.header.binaryblock == made.info.header.binaryblock
    # The pipeline's memory estimate counts what is in RAM: the page cache of a mapped volume is the system's.
    assert memory_estimate([first], 0, 1, 0) == 0 and memory_estimate([made], 0, 1, 0) == made.nbytes
    # Another job that wrote the same entry first: its entry is kept, nothing half-written is left.
    cache._write(cache.folder / entry_key(subject, cfg), made)
    assert sorted(p.name for p in cache.folder.iterdir()) == [entry_key(subject, cfg)]
    # Anything the preprocessing reads names another entry.
    assert entry_key(subject, config(data, "preprocessing.normalisation=none")) != entry_key(subject, cfg)
    assert entry_key(subject, config(data, "dataset.modalities=[T2,T1]")) != entry_key(subject, cfg)
    # Histogram landmarks count by what they are, not by which run folder keeps them.
    landmarks = [tmp_path / "run_a" / "landmarks.txt", tmp_path / "run_b" / "landmarks.txt"]
    for path, text in zip(landmarks + [tmp_path / "other.txt"], ["T1 0 1 2\n", "T1 0 1 2\n", "T1 0 1 3\n"]):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    keys = [entry_key(subject, config(data, "preprocessing.histogram.enabled=true",
                                      f"preprocessing.histogram.ref_file={path}"))
            for path in landmarks + [tmp_path / "other.txt"]]
    assert keys[0] == keys[1] != keys[2] and keys[0] != entry_key(subject, cfg)


def test_a_disk_cached_run_trains_like_ram_resumes_one_and_later_runs_preprocess_only_what_changed(data, tmp_path, monkeypatch):
    in_ram = train(config(data), tmp_path / "ram", echo=lambda *_: None)
    cache = tmp_path / "cache"
    said, made = [], []
    real = trainer_module.training_volume

    def counted(subject, cfg, *layout):
        made.append(subject.id)
        return real(subject, cfg, *layout)

    monkeypatch.setattr(trainer_module, "training_volume", counted)
    disk = config(data, "training.cache=disk", f"training.cache_dir={cache}")
    # A run started with the volumes in RAM, resumed from the disk cache (say, on a node with less memory).
    train(config(data), tmp_path / "disk", stop_after=1, echo=lambda *_: None)
    made.clear()
    train(disk, tmp_path / "disk", resume=True, echo=said.append)
    # The same arrays, so the same windows, the same loss curve and the same validation.
    np.testing.assert_allclose(losses(tmp_path / "disk"), losses(in_ram.run_dir), rtol=1e-5)
    np.testing.assert_allclose(validation(tmp_path / "disk"), validation(in_ram.run_dir), rtol=1e-5)
    subjects = Dataset.from_config(disk.dataset).split("training")
    checked = Dataset.from_config(disk.dataset).split("validation")
    trained = len(subjects)
    assert trained >= 2 and checked and len(made) == trained + len(checked)
    # Both splits memory-mapped: nothing but the pipeline's buffers in RAM.
    assert any(f"training: {trained} subjects" in line and f"0 from the cache, {trained} preprocessed into it ({cache})"
               in line for line in said)
    assert any(line.startswith(f"validation: {len(checked)} subject") and "memory-mapped (0 from the cache" in line
               for line in said)

    # The next run (another config of a grid, a resumed job) preprocesses nothing.
    made.clear()
    load_volumes(subjects, disk, "training", said.append, cache=VolumeCache(cache, said.append))
    assert made == [] and f"{trained} from the cache, 0 preprocessed" in said[-1]

    # A changed file is preprocessed again; an unreadable entry is made again.
    touched = subjects[0].images["T1"]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    broken = cache / entry_key(subjects[1], disk) / "image.npy"
    broken.write_bytes(broken.read_bytes()[:100])
    said.clear()
    again = load_volumes(subjects, disk, "training", said.append, cache=VolumeCache(cache, said.append))
    assert sorted(made) == sorted(s.id for s in subjects[:2]) and all(on_disk(v.image) for v in again)
    assert f"unreadable cache entry of {subjects[1].id}" in said[0]
    assert not list(cache.glob(".*.part"))
    assert config(data).training.preprocessed_dir.name == "preprocessed_volumes"


def test_data_cache_shows_what_is_cached_and_prunes_only_what_no_run_has_read(data, tmp_path, capsys):
    import time

    from highres3d.cli.main import main

    folder = tmp_path / "cache"
    flags = ["demo/brats.yaml", "--data-root", str(data), "--set", "training.cache=disk",
             "--set", f"training.cache_dir={folder}"]
    cfg = config(data, "training.cache=disk", f"training.cache_dir={folder}")
    subjects = Dataset.from_config(cfg.dataset).split("training")
    wanted = subjects + Dataset.from_config(cfg.dataset).split("validation")
    cache = VolumeCache(folder, echo=None)
    old, new = (cache.volume(s, cfg, functools.partial(training_volume, s, cfg)) for s in subjects[:2])
    entry = {s.id: folder / entry_key(s, cfg) for s in subjects[:2]}
    days_ago = time.time() - 40 * 86400
    for path in entry.values():
        os.utime(path, (days_ago, days_ago))
    # A run reading an entry makes it recent; the other stays 40 days unread.
    cache.volume(subjects[1], cfg, lambda: pytest.fail("cached"))
    # Temporary folders: of a job killed while writing, of one writing now, of a removal cut short.
    killed, writing, removing = (folder / f".{digit * 32}.1234abcd.{end}"
                                 for digit, end in (("1", "part"), ("2", "part"), ("3", "removing")))
    for path in (killed, writing, removing, folder / "notes"):
        path.mkdir()
    os.utime(killed, (days_ago, days_ago))

    assert main(["data", "cache"] + flags) == 0
    shown = capsys.readouterr().out
    assert f"{folder}: 2 entries" in shown
    assert "last read by a run: 1 within a day, 1 over 30 days ago (least recently 40 days ago)" in shown
    missing = sorted(s.id for s in wanted[2:])
    assert f"this config's subjects: 2 of {len(wanted)} cached" in shown and ", ".join(missing[:5]) in shown
    assert "3 temporary folders" in shown

    assert main(["data", "cache", "--prune-unused", "30", "--dry-run"] + flags) == 0
    shown = capsys.readouterr().out
    assert "would remove 1 entry" in shown and "nothing was removed" in shown
    assert f"{entry[subjects[0].id].name}  subject {subjects[0].id}, " in shown and "temporary folder" in shown
    assert all(path.is_dir() for path in (*entry.values(), killed, writing, removing))

    assert main(["data", "cache", "--prune-unused", "30"] + flags) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    left = sorted(p.name for p in folder.iterdir())
    # The recent entry, a job's fresh temporary folder and what is not the cache's stay.
    assert left == sorted([entry[subjects[1].id].name, writing.name, "notes"])
    np.testing.assert_array_equal(cache.volume(subjects[1], cfg, lambda: pytest.fail("kept")).image, new.image)
    remade = cache.volume(subjects[0], cfg, functools.partial(training_volume, subjects[0], cfg))
    np.testing.assert_array_equal(remade.image, old.image)

    assert main(["data", "cache", "--prune-unused", "-1"] + flags) == 2
    assert "--prune-unused: expected a number of days >= 0, got -1" in capsys.readouterr().err
    assert main(["data", "cache", "--dry-run"] + flags) == 2
    assert "--dry-run goes with --prune-unused" in capsys.readouterr().err
