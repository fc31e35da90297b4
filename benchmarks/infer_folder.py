"""Segmenting a folder: load, predict, restore and write overlapped, against one after another.

N full-size synthetic BraTS subjects (240 x 240 x 155, T1 + T2 ``.nii.gz``,
read with ``configs/demo/brats.yaml``'s preprocessing: RAS, 1 mm, z-score) and
a model that stands for a GPU: it sleeps ``--model-seconds`` per subject (a
whole BraTS volume on a GPU, the issue's target: under 1 s), using no CPU, as
a GPU would, then returns logits that threshold the first channel.  Rows, in
subjects/s, measured in ``--rounds`` alternating rounds:

  * one after another: ``predict_subject`` then ``save_like`` per subject, how
    ``highres3d infer`` worked before the overlap;
  * overlapped: ``predict_subjects`` (what ``infer`` runs): a thread loads the
    next subject and another restores and writes the previous one while the
    model works.

Both write the same files (checked).  The model time is the floor of each:
N x ``--model-seconds``.

The peer, when its interpreter is given (``--peers-python`` or
``$HIGHRES3D_PEERS_PYTHON``, see benchmarks/README.md), is MONAI's usual folder
loop, run in that interpreter in the same rounds: a ``Dataset`` with
LoadImaged (both files as channels), EnsureChannelFirstd, Orientationd (RAS),
Spacingd (1 mm), NormalizeIntensityd (nonzero, channel-wise), a ``DataLoader``
with 2 worker processes loading ahead, the same sleeping model, then Invertd
back onto the input's grid and SaveImaged (uint8).  Its time counts from the
loader's creation (its worker processes start there) to the last file.

Run from the repository root, never beside another benchmark:

    .venv/bin/python benchmarks/infer_folder.py [--subjects 6] [--model-seconds 0.5] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _peers  # noqa: E402  (benchmarks/_peers.py: this script's folder is sys.path[0])
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Row names; benchmarks/run_all.py finds the rows by them.
SEQUENTIAL = "one after another (predict_subject, then save_like)"
OVERLAPPED = "overlapped (predict_subjects: load next, write previous)"
MONAI = "MONAI: Dataset + DataLoader(num_workers=2), Invertd, SaveImaged"


class SleepingModel:
    """A model call that takes ``seconds`` without using the CPU, as a GPU's would; logits (0, channel 0)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        x0 = batch[..., :1]
        return np.concatenate([np.zeros_like(x0), x0], axis=-1)


def one_after_another(model, cfg, subjects, out: Path) -> None:
    from highres3d.inference import SEG_SUFFIX, predict_subject
    from highres3d.io.nifti import save_like

    for subject in subjects:
        prediction = predict_subject(model, subject, cfg)
        save_like(prediction.labels, prediction.info, out / f"{subject.id}{SEG_SUFFIX}", dtype=prediction.labels.dtype,
                  overwrite=True)


def overlapped(model, cfg, subjects, out: Path) -> None:
    from highres3d.inference import predict_subjects

    done = predict_subjects(model, cfg, subjects, out, overwrite=True, echo=None, show_progress=False)
    assert done.ok, done.summary()


def monai_folder(data: str, out: str, seconds: float) -> float:
    """MONAI's usual folder loop (module docstring) in the peers' interpreter; subjects/s."""
    import glob

    import torch
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImaged,
        Spacingd,
    )

    torch.set_num_threads(2)
    folders = sorted(p.rstrip("/") for p in glob.glob(os.path.join(data, "*/")))
    files = [{"image": [f"{d}/{os.path.basename(d)}_t1.nii.gz", f"{d}/{os.path.basename(d)}_t2.nii.gz"]} for d in folders]
    pre = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"),
                   Orientationd(keys="image", axcodes="RAS", labels=None),
                   Spacingd(keys="image", pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
                   NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    post = Compose([Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=True),
                    SaveImaged(keys="pred", output_dir=out, output_postfix="seg", separate_folder=False,
                               output_dtype=np.uint8, resample=False, print_log=False)])
    model = SleepingModel(seconds)
    t0 = time.perf_counter()
    for batch in DataLoader(Dataset(files, pre), batch_size=1, num_workers=2):
        logits = torch.from_numpy(model(batch["image"].as_tensor().movedim(1, -1).numpy())).movedim(-1, 1)
        batch["pred"] = torch.argmax(logits, 1, keepdim=True).to(torch.uint8)
        for item in decollate_batch(batch):
            post(item)
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--model-seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", choices=("full", "small"), default="full", help="small: about 64³ subjects")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 small subjects, 0.1 s model, 1 round")
    parser.add_argument("--json", type=Path)
    _peers.add_arguments(parser, "MONAI")
    parser.add_argument("--peer-run", nargs=3, metavar=("DATA", "OUT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_run:
        data, out, seconds = args.peer_run
        print(json.dumps({"subjects_s": monai_folder(data, out, float(seconds))}))
        return
    if args.quick:
        args.subjects, args.size, args.model_seconds, args.rounds = 3, "small", 0.1, 1
    peers_python = _peers.resolve(args)
    import subprocess

    import nibabel as nib

    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.data.synth import synthesize_brats

    with tempfile.TemporaryDirectory(prefix="highres3d-infer-folder-") as scratch:
        scratch = Path(scratch)
        t0 = time.perf_counter()
        synthesize_brats(scratch / "brats", args.subjects, size=args.size, seed=5)
        print(f"{args.subjects} synthetic BraTS subjects ({args.size}) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        cfg = load_config("demo/brats.yaml", overrides=["inference.mode=whole_volume"], data_root=scratch / "brats")
        subjects = Dataset.from_config(cfg.dataset, require_labels=False).subjects
        model = SleepingModel(args.model_seconds)
        methods = {SEQUENTIAL: one_after_another, OVERLAPPED: overlapped}
        samples: dict[str, list[float]] = {name: [] for name in methods}
        peer_name = MONAI
        if peers_python:
            samples[peer_name] = []
        for round_ in range(args.rounds + 1):  # round 0 warms the caches and is not counted
            for name, method in methods.items():
                out = scratch / f"out-{len(name)}"
                out.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                method(model, cfg, subjects, out)
                if round_:
                    samples[name].append(len(subjects) / (time.perf_counter() - t0))
            if peers_python:
                done = subprocess.run([peers_python, __file__, "--peer-run", str(scratch / "brats"),
                                       str(scratch / "peer-out"), str(args.model_seconds)],
                                      capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(f"MONAI's folder loop failed:\n{done.stderr[-3000:]}")
                if round_:
                    samples[peer_name].append(json.loads(done.stdout.strip().splitlines()[-1])["subjects_s"])
                print(f"round {round_} done", file=sys.stderr, flush=True)
        peer_files = sorted((scratch / "peer-out").glob("*_seg.nii.gz")) if peers_python else []
        assert len(peer_files) == (len(subjects) if peers_python else 0), peer_files
        outs = sorted(scratch.glob("out-*"))  # ours; MONAI's resampling differs, so only its file count is checked
        for path in sorted(outs[0].iterdir()):
            first = np.asarray(nib.load(str(path)).dataobj)
            assert all(np.array_equal(first, np.asarray(nib.load(str(o / path.name)).dataobj)) for o in outs[1:]), path
    floor = 1 / args.model_seconds if args.model_seconds else float("inf")
    rows = [{"method": name, "subjects_s": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()]
    base = rows[0]["subjects_s"]
    print(f"\n{args.subjects} subjects ({args.size} size, T1+T2 .nii.gz), model {args.model_seconds} s per subject "
          f"(floor {floor:.2f} subjects/s), {os.cpu_count()} CPUs, {args.rounds} rounds")
    print("| method | subjects/s (median, min-max) | vs one after another |\n|---|---|---|")
    # rows[0] is the baseline; the peer's row, when there, is last
    for row in rows:
        print(f"| {row['method']} | {row['subjects_s']:.3f} ({row['min']:.3f}-{row['max']:.3f}) | "
              f"{row['subjects_s'] / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "model_seconds": args.model_seconds, "size": args.size,
                                         "subjects": args.subjects, "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
