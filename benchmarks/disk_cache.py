"""Start-up with ``training.cache: disk`` against ``ram`` and MONAI's PersistentDataset; windows from mapped volumes.

N full-size synthetic BraTS subjects (240 x 240 x 155, T1 + T2 + label
``.nii.gz``, ``configs/demo/brats.yaml``'s preprocessing: RAS, 1 mm, z-score)
are made ready for training, in seconds per subject, in ``--rounds``
alternating rounds:

  * ``ram``: preprocessed into RAM, what every run and every ``--resume`` pays
    with ``training.cache: ram``;
  * ``disk``, first run: preprocessed and written into an empty cache;
  * ``disk``, later runs: memory-mapped from the cache (its files in the page
    cache, as on the node that wrote them or on local scratch); and the same
    with every byte read once, as the windows will (mapping alone reads nothing).

The peer, when its interpreter is given (``--peers-python`` or
``$HIGHRES3D_PEERS_PYTHON``, see benchmarks/README.md), is MONAI's
``PersistentDataset`` over the same files with the same preprocessing
(LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd 1 mm,
NormalizeIntensityd nonzero channel-wise): its first pass over an empty cache
folder, and its second pass, which loads what the first saved.

Then class-weighted 96³ windows/s drawn from one subject held in RAM and from
the same subject memory-mapped, round-robin (the copy speed of this machine
drifts), after a warm-up pass that brings the mapped file into the page cache.

Run from the repository root, never beside another benchmark:

    .venv/bin/python benchmarks/disk_cache.py [--subjects 6] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _peers  # noqa: E402  (benchmarks/_peers.py: this script's folder is sys.path[0])
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Row names; benchmarks/run_all.py finds the rows by them.
RAM = "training.cache: ram (preprocessed at every start)"
DISK_FIRST = "training.cache: disk, first run (preprocessed and written)"
DISK_LATER = "training.cache: disk, later runs (memory-mapped)"
DISK_READ = "training.cache: disk, later runs (memory-mapped, then every byte read once)"
MONAI_FIRST = "MONAI PersistentDataset, first pass (preprocessed and saved)"
MONAI_LATER = "MONAI PersistentDataset, later passes (loaded)"
WINDOWS_RAM = "class-weighted 96³ windows/s, volume in RAM"
WINDOWS_MAPPED = "class-weighted 96³ windows/s, volume memory-mapped"


def monai_passes(data: str, cache: str) -> dict:
    """Seconds per subject of PersistentDataset's first and second pass, in the peers' interpreter."""
    import glob

    import torch
    from monai.data import PersistentDataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd

    torch.set_num_threads(2)
    folders = sorted(p.rstrip("/") for p in glob.glob(os.path.join(data, "*/")))
    files = [{"image": [f"{d}/{os.path.basename(d)}_t1.nii.gz", f"{d}/{os.path.basename(d)}_t2.nii.gz"],
              "label": f"{d}/{os.path.basename(d)}_seg.nii.gz"} for d in folders]
    keys = ["image", "label"]
    pre = Compose([LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys), Orientationd(keys=keys, axcodes="RAS"),
                   Spacingd(keys=keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
                   NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    dataset = PersistentDataset(files, pre, cache_dir=cache)
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["image"].shape[0] == 2
        seconds.append((time.perf_counter() - t0) / len(dataset))
    return {"first": seconds[0], "later": seconds[1]}


def ours(cfg, subjects, scratch: Path) -> dict:
    """Seconds per subject of each way to make the training volumes ready."""
    from highres3d.data.cache import VolumeCache
    from highres3d.training.trainer import load_volumes

    quiet = dict(echo=lambda text: None, show_progress=False)
    out = {}
    t0 = time.perf_counter()
    in_ram = load_volumes(subjects, cfg, "training", layout="auto", **quiet)
    out[RAM] = (time.perf_counter() - t0) / len(subjects)
    del in_ram
    folder = scratch / "cache"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    load_volumes(subjects, cfg, "training", cache=VolumeCache(folder, None), **quiet)
    out[DISK_FIRST] = (time.perf_counter() - t0) / len(subjects)
    t0 = time.perf_counter()
    mapped = load_volumes(subjects, cfg, "training", cache=VolumeCache(folder, None), **quiet)
    out[DISK_LATER] = (time.perf_counter() - t0) / len(subjects)
    # Mapping reads nothing yet: the pages come in as windows are cut. Reading them all once is
    # what a cache that loads whole volumes (the peer's) does before the first window.
    t0 = time.perf_counter()
    mapped = load_volumes(subjects, cfg, "training", cache=VolumeCache(folder, None), **quiet)
    for volume in mapped:
        np.max(volume.image), np.max(volume.label)
    out[DISK_READ] = (time.perf_counter() - t0) / len(subjects)
    assert mapped[0].image.shape[-1] == 2
    return out


def windows(cfg, subject, scratch: Path, reps: int, n: int) -> dict:
    """Class-weighted 96³ windows/s from the subject in RAM and memory-mapped, round-robin."""
    from highres3d.data.cache import VolumeCache, on_disk
    from highres3d.samplers import ClassWeightedSampler
    from highres3d.training.trainer import training_volume

    in_ram = training_volume(subject, cfg)
    mapped = VolumeCache(scratch / "cache", None).volume(subject, cfg, lambda: in_ram)
    assert on_disk(mapped.image) and not on_disk(in_ram.image)
    rng = np.random.default_rng(0)
    draws = {}
    for name, volume in ((WINDOWS_RAM, in_ram), (WINDOWS_MAPPED, mapped)):
        draws[name] = ClassWeightedSampler(96, {0: 1, 1: 1})(volume, None, rng)
        for _ in range(n):  # warm-up: the mapped file's pages come into the page cache
            next(draws[name])
    samples = {name: [] for name in draws}
    for _ in range(reps):
        for name, draw in draws.items():
            t0 = time.perf_counter()
            for _ in range(n):
                next(draw)
            samples[name].append(n / (time.perf_counter() - t0))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", choices=("full", "small"), default="full", help="small: about 64³ subjects")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 small subjects, 1 round")
    parser.add_argument("--json", type=Path)
    _peers.add_arguments(parser, "MONAI")
    parser.add_argument("--peer-run", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_run:
        print(json.dumps(monai_passes(*args.peer_run)))
        return
    if args.quick:
        args.subjects, args.size, args.rounds = 3, "small", 1
    peers_python = _peers.resolve(args)

    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.data.synth import synthesize_brats

    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="highres3d-disk-cache-") as scratch:
        scratch = Path(scratch)
        t0 = time.perf_counter()
        synthesize_brats(scratch / "brats", args.subjects, size=args.size, seed=5)
        print(f"{args.subjects} synthetic BraTS subjects ({args.size}) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        cfg = load_config("demo/brats.yaml", data_root=scratch / "brats")
        subjects = Dataset.from_config(cfg.dataset).subjects
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and is not counted
            measured = ours(cfg, subjects, scratch)
            if peers_python:
                shutil.rmtree(scratch / "monai-cache", ignore_errors=True)
                done = subprocess.run([peers_python, __file__, "--peer-run", str(scratch / "brats"),
                                       str(scratch / "monai-cache")], capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(f"MONAI's PersistentDataset failed:\n{done.stderr[-3000:]}")
                peer = json.loads(done.stdout.strip().splitlines()[-1])
                measured.update({MONAI_FIRST: peer["first"], MONAI_LATER: peer["later"]})
            if round_:
                for name, value in measured.items():
                    samples.setdefault(name, []).append(value)
            print(f"round {round_} done", file=sys.stderr, flush=True)
        window_samples = windows(cfg, subjects[0], scratch, reps=2 if args.quick else 7, n=10 if args.quick else 100)
    rows = [{"method": name, "seconds": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()]
    rows += [{"method": name, "windows_s": statistics.median(s), "min": min(s), "max": max(s)}
             for name, s in window_samples.items()]
    print(f"\n{args.subjects} subjects ({args.size} size, T1+T2+label .nii.gz), {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds (median, min-max)")
    print("| method | seconds per subject | windows/s |\n|---|---|---|")
    for row in rows:
        value = f"{row['seconds']:.3f} ({row['min']:.3f}-{row['max']:.3f})" if "seconds" in row else "-"
        speed = f"{row['windows_s']:.0f} ({row['min']:.0f}-{row['max']:.0f})" if "windows_s" in row else "-"
        print(f"| {row['method']} | {value} | {speed} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "size": args.size, "subjects": args.subjects,
                                         "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
