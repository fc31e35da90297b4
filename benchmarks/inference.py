"""Whole-volume inference: tiling + stitching cost of highres3d vs MONAI and TorchIO.

A 2x240x240x155 volume (BraTS size) goes through a trivial 1x1x1 convolution
(2 -> 2 channels) with 96^3 windows at overlap 0 / 0.25 / 0.5 in every blending
mode.  Each method's model calls are timed separately, so the table shows the
whole call and the stitching part (whole call minus model time): extracting
windows, blending, normalising and producing the output.  highres3d stitches in
a thread while the model computes the next window, so its model time is taken
from a model-only pass over the same windows run right before each call (the
peers stitch between model calls, so their model calls are timed inside the
run).  Whole calls are the best of every repetition; stitching is the median of
the per-repetition differences (this machine's noise is larger than some of
the differences, and a median of paired samples survives it where a difference
of two minima does not).  highres3d is asked
for labels (argmax, uint8), its default product; MONAI and TorchIO return the
blended logits, and their argmax is not included in their times.  highres3d
gets the Keras model, as users call it: for two-class labels its compiled call
returns the margin l1 - l0 (one channel, ``two_class_margin_fn``), and the
model-only pass and "blending alone" use that same call's outputs.

Two more figures time highres3d's aggregator without the model beside it:
"blending alone" replays stored outputs back to back (its memory stays in the
CPU caches), and "in place" feeds each window right after its model call, as
predict_volume does, which is what blending costs in use; "in place, one ring"
is the same with every window sharing one ring over the padded width (the
layout before the accumulator was split into columns), an A/B in the same run.

The peers (torch) live in another virtual environment, whose interpreter
comes from ``--peers-python`` or ``$HIGHRES3D_PEERS_PYTHON`` (see
benchmarks/README.md): the script re-runs itself there with ``--peers-json``
and merges the result into one table.

``--real-net`` adds the real HighRes3DNet over the whole volume (windows 144^3,
overlap 0.25, gaussian, batch 1, and highres3d's whole-volume pass) against
MONAI's HighResNet with the same settings.  It takes minutes per method on a
CPU.

Run from the repository root, never beside another benchmark:

    .venv/bin/python benchmarks/inference.py [--reps 5] [--real-net]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _peers  # benchmarks/_peers.py: this script's folder is sys.path[0]
import numpy as np

SHAPE = (240, 240, 155)
CHANNELS = 2
ROI = 96
OVERLAPS = (0.0, 0.25, 0.5)
BLENDS = ("crop", "average", "gaussian")
#: highres3d's aggregator timed without the model beside it: on stored outputs, and fed right after each model call
#: (with its columns, and with one ring for the A/B).
BLENDING_ONLY = ("alone", "in_place", "in_place_ring")


def make_volume() -> np.ndarray:
    """(X, Y, Z, C) float32; values do not matter for timing, the size does."""
    return np.random.default_rng(0).standard_normal(SHAPE + (CHANNELS,), dtype=np.float32)


def timed(fn, reps: int):
    """Run fn once to warm up, then ``reps`` times; fn returns its model seconds.

    Returns the lists of whole-call and stitching (whole call minus model) times.
    """
    fn()
    totals, stitches = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        model_s = fn()
        totals.append(time.perf_counter() - t0)
        stitches.append(totals[-1] - model_s)
    return totals, stitches


def summarise(rounds: list[list[dict]]) -> list[dict]:
    """Per row (method, overlap, mode), every round's samples pooled.

    ``total`` is the smallest whole call (other jobs on a shared machine only
    ever add time); ``stitch`` is the median of the per-repetition stitching
    times, each taken from one call and the model time measured right beside it,
    so a busy spell shifts both halves of a difference and the median drops the
    spells that hit only one.
    """
    pooled: dict = {}
    for rows in rounds:
        for r in rows:
            key = (r["method"], r["overlap"], r["mode"])
            if key not in pooled:
                pooled[key] = dict(r, totals=[], stitches=[])
                for name in BLENDING_ONLY:
                    pooled[key].pop(name, None)
            pooled[key]["totals"] += r["totals"]
            pooled[key]["stitches"] += r["stitches"]
            for name in BLENDING_ONLY:
                if name in r:
                    pooled[key].setdefault(name + "_samples", []).extend(r[name])
    for r in pooled.values():
        r["total"] = min(r["totals"])
        r["stitch"] = float(np.median(r["stitches"]))
        # The spread of the paired samples, so a reader can tell a miss from noise.
        r["stitch_quartiles"] = [float(q) for q in np.percentile(r["stitches"], [25, 75])]
        r["samples"] = len(r["stitches"])
        for name in BLENDING_ONLY:
            if name + "_samples" in r:
                r[name] = float(np.median(r.pop(name + "_samples")))
    return list(pooled.values())


class ModelClock:
    """Wraps a model call and adds up the time spent inside it."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, batch):
        t0 = time.perf_counter()
        out = self.fn(batch)
        self.seconds += time.perf_counter() - t0
        return out


def n_windows(overlap: float) -> int:
    from highres3d.samplers.grid import GridSampler

    return len(GridSampler(SHAPE, ROI, overlap=overlap))


# --------------------------------------------------------------------------- highres3d


def model_pass(predict, volume, overlap: float, batch_size: int) -> float:
    """Seconds of the model alone over every window of the grid, fed as predict_volume feeds it."""
    from highres3d.samplers.grid import GridSampler

    sampler = GridSampler(SHAPE, ROI, overlap=overlap)
    locations = sampler.locations
    t0 = time.perf_counter()
    for first in range(0, len(locations), batch_size):
        locs = locations[first:first + batch_size]
        if len(locs) == 1:
            x, y, z = locs[0]
            predict(volume[None, x:x + ROI, y:y + ROI, z:z + ROI])
        else:
            predict(np.stack([volume[x:x + ROI, y:y + ROI, z:z + ROI] for x, y, z in locs]))
    return time.perf_counter() - t0


def blending_alone(predict, volume, overlap: float, blend: str, reps: int) -> list[float]:
    """Seconds of the aggregator alone (no model running beside it) on the grid's real model outputs.

    predict_volume hides stitching behind the model's next call; this is the
    work it hides, done between nothing else as the peers stitch between model
    calls: a comparison that gives us no credit for the overlap.
    """
    from highres3d.aggregators.grid import GridAggregator
    from highres3d.samplers.grid import GridSampler

    sampler = GridSampler(SHAPE, ROI, overlap=overlap)
    outputs = [predict(volume[None, x:x + ROI, y:y + ROI, z:z + ROI]) for x, y, z in sampler.locations]
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        aggregator = GridAggregator(sampler, 2, blend=blend)
        for out, location in zip(outputs, sampler.locations):
            aggregator.add_batch(out, location[None])
        aggregator.result()
        times.append(time.perf_counter() - t0)
    return times[1:]


def blending_in_place(predict, volume, overlap: float, blend: str, reps: int, one_ring: bool = False) -> list[float]:
    """Seconds of the aggregator fed right after each window's model call, the model's time left out.

    As in predict_volume, the model has just pushed the accumulator out of the
    CPU caches when a window arrives; "blending alone" replays stored outputs
    with nothing in between, so its memory stays in cache and it flatters the
    blending (docs/performance.md). The aggregator runs inline here, not beside
    the model. ``one_ring``: every window shares one ring over the padded width
    (``COLUMNS_APART_MAX_RATIO = 0``), the layout before columns, for an A/B in
    the same run.
    """
    import highres3d.aggregators.grid as grid
    from highres3d.samplers.grid import GridSampler

    sampler = GridSampler(SHAPE, ROI, overlap=overlap)
    saved = grid.COLUMNS_APART_MAX_RATIO
    if one_ring:
        grid.COLUMNS_APART_MAX_RATIO = 0.0
    times = []
    try:
        for _ in range(reps + 1):
            spent, aggregator = 0.0, None
            for x, y, z in sampler.locations:
                out = predict(volume[None, x:x + ROI, y:y + ROI, z:z + ROI])
                t0 = time.perf_counter()
                aggregator = aggregator or grid.GridAggregator(sampler, 2, blend=blend)
                aggregator.add_batch(out, [[x, y, z]])
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
            aggregator.result()
            times.append(spent + time.perf_counter() - t0)
    finally:
        grid.COLUMNS_APART_MAX_RATIO = saved
    return times[1:]


def run_ours(args) -> list[dict]:
    import keras
    import tensorflow as tf

    from highres3d.inference import predict_volume, two_class_margin_fn

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.blend_threads:
        import highres3d.aggregators.grid as grid

        # Every aggregator here (predict_volume's, "alone", "in place") takes its default from this rule.
        grid.default_blend_threads = lambda: args.blend_threads
    volume = make_volume()
    inputs = keras.Input((None, None, None, CHANNELS))
    model = keras.Model(inputs, keras.layers.Conv3D(CHANNELS, 1)(inputs))
    # predict_volume gets the model, as users call it; for two-class labels it calls the model
    # extended by l1 - l0 (one channel out), and the model-only pass calls that same function.
    predict = two_class_margin_fn(model)
    rows = []
    for overlap in OVERLAPS:
        # predict_volume stitches in a thread while the model runs, so the model's own
        # wall time inside the call no longer separates the two: each call is paired
        # with a model-only pass over the same windows right before it, and
        # stitching = whole call - that pass.
        def call(blend):
            t0 = time.perf_counter()
            predict_volume(model, volume, ROI, overlap=overlap, blend=blend, batch_size=args.batch_size)
            return time.perf_counter() - t0

        model_pass(predict, volume, overlap, args.batch_size)
        samples = {blend: ([], []) for blend in BLENDS}
        for blend in BLENDS:
            call(blend)  # warm-up: the aggregator's first buffers and threads
        for _ in range(args.reps):
            for blend in BLENDS:
                model_s = model_pass(predict, volume, overlap, args.batch_size)
                total = call(blend)
                samples[blend][0].append(total)
                samples[blend][1].append(total - model_s)
        for blend in BLENDS:
            totals, stitches = samples[blend]
            alone = blending_alone(predict, volume, overlap, blend, args.reps)
            in_place = blending_in_place(predict, volume, overlap, blend, args.reps)
            row = dict(method="highres3d", overlap=overlap, mode=blend, windows=n_windows(overlap),
                       totals=totals, stitches=stitches, alone=alone, in_place=in_place)
            if blend != "crop":  # crop writes labels straight into the output: no accumulator
                row["in_place_ring"] = blending_in_place(predict, volume, overlap, blend, args.reps, one_ring=True)
            rows.append(row)
            print(f"  highres3d overlap {overlap} {blend}: {min(totals) * 1e3:.0f} ms, "
                  f"stitching {np.median(stitches) * 1e3:.0f} ms, alone {np.median(alone) * 1e3:.0f} ms, "
                  f"in place {np.median(in_place) * 1e3:.0f} ms", file=sys.stderr, flush=True)

    def seconds(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    model_only = lambda: predict(volume[None])  # noqa: E731
    whole = lambda: predict_volume(model, volume, None)  # noqa: E731
    seconds(model_only), seconds(whole)
    pairs = [(seconds(model_only), seconds(whole)) for _ in range(args.reps)]
    rows.append(dict(method="highres3d", overlap="-", mode="whole volume", windows=1, totals=[w for _, w in pairs],
                     stitches=[w - m for m, w in pairs]))
    return rows


def run_ours_real(args) -> list[dict]:
    import tensorflow as tf

    from highres3d.inference import predict_volume
    from highres3d.models import HighResNet3D

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    volume = make_volume()
    keras_model = HighResNet3D(in_channels=CHANNELS, num_classes=2)
    keras_model.predict_on_batch(np.zeros((1, 32, 32, 32, CHANNELS), np.float32))
    rows = []
    settings = [("144^3 ov 0.25 gaussian", dict(window_size=144, overlap=0.25, blend="gaussian"))]
    if args.real_whole:
        settings.append(("whole volume", dict(window_size=None)))
    for name, kw in settings:
        t0 = time.perf_counter()
        predict_volume(keras_model, volume, batch_size=1, **kw)
        seconds = time.perf_counter() - t0
        rows.append(dict(method="highres3d HighResNet3D", mode=name, seconds=seconds))
        print(f"  highres3d real net {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- peers (torch venv)


def run_peers(args) -> dict:
    import torch
    import torchio as tio
    from monai.inferers import sliding_window_inference

    torch.set_num_threads(args.threads)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(make_volume(), -1, 0)))[None]  # (1, C, X, Y, Z)
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(CHANNELS, CHANNELS, 1).eval()

    def trivial(batch):
        # On this 1x1x1 Conv3d torch's oneDNN (mkldnn) CPU path was far slower than its native
        # one; kernel size 1 is a known weak case of oneDNN (pytorch/pytorch PRs 40610, 48885).
        with torch.backends.mkldnn.flags(enabled=False):
            return conv(batch)

    rows = []
    with torch.inference_mode():
        # An untimed pass first: torch's first large allocations and thread start-up
        # otherwise land on whichever configuration is timed first.
        for mode in ("constant", "gaussian"):
            sliding_window_inference(x, (ROI,) * 3, args.batch_size, trivial, overlap=0.0, mode=mode)
        for overlap in OVERLAPS:
            for mode in ("constant", "gaussian"):
                def call():
                    clock = ModelClock(trivial)
                    sliding_window_inference(x, (ROI,) * 3, args.batch_size, clock, overlap=overlap, mode=mode)
                    return clock.seconds
                totals, stitches = timed(call, args.reps)
                rows.append(dict(method="MONAI swi", overlap=overlap, mode=mode, totals=totals, stitches=stitches))
                print(f"  MONAI overlap {overlap} {mode}: {min(totals) * 1e3:.0f} ms", file=sys.stderr, flush=True)
            voxels = int(round(overlap * ROI))
            voxels += voxels % 2  # TorchIO needs an even overlap
            for mode in () if args.no_torchio else ("crop", "average", "hann"):
                def call():
                    clock = ModelClock(trivial)
                    subject = tio.Subject(image=tio.ScalarImage(tensor=x[0]))
                    sampler = tio.inference.GridSampler(subject, ROI, voxels)
                    aggregator = tio.inference.GridAggregator(sampler, overlap_mode=mode)
                    loader = torch.utils.data.DataLoader(sampler, batch_size=args.batch_size, num_workers=0)
                    for batch in loader:
                        aggregator.add_batch(clock(batch["image"][tio.DATA]), batch[tio.LOCATION])
                    aggregator.get_output_tensor()
                    return clock.seconds
                totals, stitches = timed(call, args.reps)
                rows.append(dict(method=f"TorchIO (overlap {voxels} vox)", overlap=overlap, mode=mode,
                                 totals=totals, stitches=stitches))
                print(f"  TorchIO overlap {voxels} {mode}: {min(totals) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    real = []
    if args.real_net:
        from monai.networks.nets import HighResNet

        net = HighResNet(spatial_dims=3, in_channels=CHANNELS, out_channels=2).eval()
        with torch.inference_mode():
            net(torch.zeros(1, CHANNELS, 32, 32, 32))
            t0 = time.perf_counter()
            sliding_window_inference(x, (144,) * 3, 1, net, overlap=0.25, mode="gaussian")
        real.append(dict(method="MONAI HighResNet", mode="144^3 ov 0.25 gaussian", seconds=time.perf_counter() - t0))
        print(f"  MONAI real net: {real[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    import monai

    return {"rows": rows, "real": real, "versions": f"torch {torch.__version__}, monai {monai.__version__}, "
                                                    f"torchio {tio.__version__}"}


# --------------------------------------------------------------------------- table


def quartile_range(row: dict) -> str:
    """The quartiles of a row's stitching samples in ms, as "15 to 34" (round(): no "-0")."""
    low, high = (round(q * 1e3) for q in row["stitch_quartiles"])
    return f"{low} to {high}"


def stitching_ms(row: dict) -> str:
    """The median stitching time, with the quartiles of its samples where the row has them."""
    spread = f" ({quartile_range(row)})" if row.get("stitch_quartiles") else ""
    return f"{round(row['stitch'] * 1e3)}{spread}"


def print_table(rows, headers):
    widths = [max(len(h), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up, per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds alternating the peers and highres3d (samples pooled)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON (benchmarks/run_all.py reads it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1, help="windows per model call, for every method")
    parser.add_argument("--real-net", action="store_true", help="also time the real HighRes3DNet (minutes)")
    parser.add_argument("--real-whole", action="store_true", help="with --real-net: also highres3d's whole-volume pass")
    _peers.add_arguments(parser)
    parser.add_argument("--peers-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: one round, one repetition")
    parser.add_argument("--no-torchio", action="store_true",
                        help="time MONAI only among the peers (the stitching target compares with MONAI)")
    parser.add_argument("--blend-threads", type=int, metavar="N",
                        help="highres3d blends on N threads instead of default_blend_threads() (an A/B of that rule)")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.rounds = 1, 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.peers_json:
        print(json.dumps(run_peers(args)))
        return 0

    peers_python = _peers.resolve(args)
    peer_rounds, our_rounds, peers = [], [], None
    for round_ in range(args.rounds):
        # Peers and ours alternate, so a busy spell on a shared machine hits both.
        if peers_python:
            cmd = [peers_python, __file__, "--peers-json", "--reps", str(args.reps), "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size)] + (["--real-net"] if args.real_net and round_ == 0 else []) \
                + (["--no-torchio"] if args.no_torchio else [])
            env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
            print(f"round {round_ + 1}/{args.rounds}, peers: {' '.join(cmd)}", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            sys.stderr.write(done.stderr[-3000:] if done.returncode else done.stderr)
            if done.returncode == 0:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                peers = peers or result
                peer_rounds.append(result["rows"])
        print(f"round {round_ + 1}/{args.rounds}, highres3d", file=sys.stderr, flush=True)
        our_rounds.append(run_ours(args))
    ours = summarise(our_rounds)
    if peers:
        peers["rows"] = summarise(peer_rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "peers": peers}, indent=1))
    import tensorflow as tf

    print(f"\nvolume {CHANNELS}x{'x'.join(map(str, SHAPE))}, windows {ROI}^3, trivial Conv 1x1x1 {CHANNELS}->{CHANNELS}, "
          f"batch {args.batch_size}, {args.threads} threads"
          + (f" ({args.blend_threads} blending)" if args.blend_threads else "")
          + f", {args.rounds} rounds x {args.reps} reps after a warm-up "
          "(whole call: best; stitching: median), peers and ours alternating; "
          f"tensorflow {tf.__version__}" + (f"; {peers['versions']}" if peers else ""))
    monai = {(r["overlap"], r["mode"]): r for r in (peers or {}).get("rows", []) if r["method"] == "MONAI swi"}
    table = []
    for r in ours:
        ref = None
        if r["mode"] in ("crop", "average"):
            ref = monai.get((r["overlap"], "constant"))
        elif r["mode"] == "gaussian":
            ref = monai.get((r["overlap"], "gaussian"))
        ratio = f"{r['stitch'] / ref['stitch']:.2f}" if ref and ref["stitch"] > 0 else "-"
        alone = f"{r['alone'] * 1e3:.0f}" if "alone" in r else "-"
        alone_ratio = f"{r['alone'] / ref['stitch']:.2f}" if "alone" in r and ref and ref["stitch"] > 0 else "-"
        in_place = f"{r['in_place'] * 1e3:.0f}" if "in_place" in r else "-"
        ring = f"{r['in_place_ring'] * 1e3:.0f}" if "in_place_ring" in r else "-"
        table.append([r["method"], r["overlap"], r["mode"], r["windows"], f"{r['total'] * 1e3:.0f}",
                      stitching_ms(r), ratio, alone, alone_ratio, in_place, ring])
    for r in (peers or {}).get("rows", []):
        table.append([r["method"], r["overlap"], r["mode"], n_windows(r["overlap"]) if r["method"] == "MONAI swi" else "-",
                      f"{r['total'] * 1e3:.0f}", stitching_ms(r), "", "", "", "", ""])
    print_table(table, ["method", "overlap", "mode", "windows", "total ms", "stitching ms (quartiles)", "stitching / MONAI",
                        "blending alone ms", "alone / MONAI", "in place ms", "in place, one ring ms"])
    print("stitching = whole call minus model time (median of paired samples, their quartiles in brackets); blending alone = highres3d's aggregator "
          "on the same model outputs with no model beside it (median); in place = the aggregator inline right after "
          "each model call, the model's time left out (median), with its columns and with one ring; highres3d "
          "crop/average compare with MONAI 'constant'.")

    if args.real_net:
        real = run_ours_real(args) + (peers or {}).get("real", [])
        print("\nreal network, whole 2x240x240x155 volume:")
        print_table([[r["method"], r["mode"], f"{r['seconds']:.1f}"] for r in real], ["method", "mode", "seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
