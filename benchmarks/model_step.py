"""Forward and training-step time of HighResNet3D, next to MONAI's HighResNet.

Times the full-width network (2 input channels, 2 classes, 809,380 trainable
parameters) on random windows: a forward pass in inference mode and one
training step (forward in training mode, NiftyNet Dice loss, backward, Adam),
for each window size and batch size, with a fixed number of CPU threads.

In the same run, when an interpreter with torch and MONAI is given
(``--peers-python``, default ``$HIGHRES3D_PEERS_PYTHON``; see
benchmarks/README.md), the script re-invokes itself there with ``--peer`` to time
``monai.networks.nets.HighResNet(spatial_dims=3, in_channels=2, out_channels=2)``
the same way (``torch.set_num_threads``; forward under ``inference_mode``;
train step = ``DiceLoss(to_onehot_y=True, softmax=True)`` + Adam), and prints
both with the ratio MONAI / ours (> 1: we are faster) and the achieved GFLOP/s
(1.616 MFLOP per voxel forward, a training step counted as 3x the forward).

Run it from the repository root, alone on the machine (other load skews the
numbers; never beside another benchmark)::

    .venv/bin/python benchmarks/model_step.py

Options: ``--sizes 32,64 --batches 1,2 --threads 2 --reps 3 --jit on|off|both``;
``--precision float32|bfloat16|both`` (bfloat16: Keras' ``mixed_bfloat16`` policy,
as ``training.mixed_precision``; rows marked ``bf16``);
``--volume small|full|none`` (default small): also time whole-volume inference of a
synthetic BraTS-like subject (small: 64x64x48; full: 240x240x155; two channels,
z-scored) in one pass with ``predict_volume(..., precision=...)`` for each
precision, as ``inference.precision`` does it (a float32 model whose layers compute
in bfloat16 for the call), and the voxel agreement (Dice of the foreground) of
the two segmentations;
``--quick`` for a smoke run at 16^3; ``--json FILE`` to keep the raw timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _peers  # benchmarks/_peers.py: this script's folder is sys.path[0]

#: 807,936 multiply-adds per output voxel (stride 1, 'same' padding everywhere).
FORWARD_FLOP_PER_VOXEL = 2 * 807_936
TRAIN_FLOP_FACTOR = 3.0


def timed(fn: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    """Wall-clock seconds of ``reps`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summarise(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


def reps_for(size: int, reps: int | None) -> int:
    if reps is not None:
        return reps
    return 5 if size <= 32 else 3


# --------------------------------------------------------------------------- ours (Keras 3)


class Ours:
    """Our full-width model compiled once per XLA setting; times one configuration at a time."""

    def __init__(self, threads: int, jit_modes: list[bool], precisions: tuple[str, ...] = ("float32",)) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import numpy as np
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        import keras

        from highres3d.losses import DiceLoss
        from highres3d.models import HighResNet3D

        self.np = np
        self.models = {}
        for precision in precisions:
            # training.mixed_precision: bfloat16 compute, float32 weights (Keras' mixed_bfloat16 policy).
            keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
            for jit in jit_modes:
                keras.utils.set_random_seed(0)
                model = HighResNet3D(in_channels=2, num_classes=2)
                trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
                assert trainable == 809_380, trainable
                model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=DiceLoss(), jit_compile=jit)
                name = "xla" if jit else "default"
                self.models[name if precision == "float32" else f"{name} bf16"] = model
        keras.mixed_precision.set_global_policy("float32")
        # Whole-volume inference uses one float32 model and inference.precision's switch, as predict_volume does.
        keras.utils.set_random_seed(0)
        self.volume_model = HighResNet3D(in_channels=2, num_classes=2)
        self.versions = f"TensorFlow {tf.__version__}, Keras {keras.__version__}"

    def whole_volume(self, image, precision: str, reps: int) -> tuple[dict[str, Any], Any]:
        """Seconds of one whole-volume ``predict_volume`` pass in ``precision``, and its segmentation."""
        from highres3d.inference import predict_volume

        seg = predict_volume(self.volume_model, image, None, precision=precision)
        times = timed(lambda: predict_volume(self.volume_model, image, None, precision=precision), reps, 0)
        return summarise(times), seg

    def run(self, variant: str, size: int, batch: int, reps: int) -> dict[str, Any]:
        model = self.models[variant]
        rng = self.np.random.default_rng(size * 10 + batch)
        x = rng.normal(size=(batch, size, size, size, 2)).astype("float32")
        y = rng.integers(0, 2, size=(batch, size, size, size)).astype("int32")
        forward = timed(lambda: model.predict_on_batch(x), reps, 1)
        train = timed(lambda: model.train_on_batch(x, y), reps, 1)
        return {"size": size, "batch": batch, "forward": summarise(forward), "train": summarise(train)}


def synthetic_volume(size: str):
    """Two z-scored channels of synthetic BraTS-like subject 0, (X, Y, Z, 2) float32."""
    import numpy as np

    from highres3d.data.synth.brats import MODALITIES, make_subject

    images, _, _ = make_subject(0, seed=0, size=size)
    channels = [images[m].astype(np.float32) for m in MODALITIES[:2]]
    return np.stack([(c - c.mean()) / (c.std() + 1e-6) for c in channels], -1)


# --------------------------------------------------------------------------- MONAI (torch), run in the peer venv


def peer_server(threads: int) -> None:
    """Peer mode: builds MONAI's HighResNet, then answers 'size batch reps' lines with JSON lines."""
    import monai
    import torch
    from monai.losses import DiceLoss as MonaiDiceLoss
    from monai.networks.nets import HighResNet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = HighResNet(spatial_dims=3, in_channels=2, out_channels=2)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    loss_fn = MonaiDiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    print(json.dumps({"torch": torch.__version__, "monai": monai.__version__, "trainable": trainable}), flush=True)
    for line in sys.stdin:
        size, batch, reps = (int(v) for v in line.split())
        x = torch.randn(batch, 2, size, size, size)
        y = torch.randint(0, 2, (batch, 1, size, size, size))

        def forward() -> None:
            net.eval()
            with torch.inference_mode():
                net(x)

        def train() -> None:
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()

        result = {"size": size, "batch": batch, "forward": summarise(timed(forward, reps, 1)),
                  "train": summarise(timed(train, reps, 1))}
        print(json.dumps(result), flush=True)


class Peer:
    """MONAI in its own interpreter (torch lives in another virtualenv), driven line by line."""

    def __init__(self, python: str, threads: int) -> None:
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--peer", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.meta = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"MONAI peer exited with {self.proc.wait()}")
        return json.loads(line)

    def run(self, size: int, batch: int, reps: int) -> dict[str, Any]:
        self.proc.stdin.write(f"{size} {batch} {reps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# --------------------------------------------------------------------------- report


def gflops(size: int, batch: int, seconds: float, factor: float = 1.0) -> float:
    return factor * FORWARD_FLOP_PER_VOXEL * batch * size**3 / seconds / 1e9


def table(ours: dict[str, list[dict[str, Any]]], peer_results: list[dict[str, Any]], stat: str = "median_s") -> str:
    peer_by_key = {(r["size"], r["batch"]): r for r in peer_results}
    header = ["window", "variant", "fwd ms", "MONAI fwd ms", "fwd ratio", "fwd GFLOP/s",
              "train ms", "MONAI train ms", "train ratio", "train GFLOP/s"]
    rows = []
    for variant, results in ours.items():
        for r in results:
            size, batch = r["size"], r["batch"]
            fwd, train = r["forward"][stat], r["train"][stat]
            p = peer_by_key.get((size, batch))
            pf = p["forward"][stat] if p else None
            pt = p["train"][stat] if p else None
            rows.append([
                f"{batch}x{size}^3", variant,
                f"{fwd * 1e3:,.0f}", f"{pf * 1e3:,.0f}" if pf else "-", f"{pf / fwd:.2f}" if pf else "-",
                f"{gflops(size, batch, fwd):.0f}",
                f"{train * 1e3:,.0f}", f"{pt * 1e3:,.0f}" if pt else "-", f"{pt / train:.2f}" if pt else "-",
                f"{gflops(size, batch, train, TRAIN_FLOP_FACTOR):.0f}",
            ])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,64", help="cubic window sizes (default: %(default)s)")
    parser.add_argument("--batches", default="1,2", help="batch sizes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks (default: %(default)s)")
    parser.add_argument("--reps", type=int, help="timed repetitions (default: 5 at <= 32^3, else 3), after 1 warm-up")
    parser.add_argument("--jit", choices=("on", "off", "both"), default="both",
                        help="XLA compilation of our step (default: %(default)s)")
    _peers.add_arguments(parser, "MONAI")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "both"), default="float32",
                        help="compute precision of our model; bfloat16 = training.mixed_precision (default: %(default)s)")
    parser.add_argument("--volume", choices=("small", "full", "none"), default="small",
                        help="whole-volume inference of a synthetic subject per precision (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16^3, batch 1, 1 rep")
    parser.add_argument("--json", metavar="FILE", help="write all timings as JSON")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches, args.reps = "16", "1", 1
    args.sizes = [int(s) for s in str(args.sizes).split(",")]
    args.batches = [int(b) for b in str(args.batches).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer:
        peer_server(args.threads)
        return 0

    peers_python = _peers.resolve(args)
    jit_modes = {"on": [True], "off": [False], "both": [False, True]}[args.jit]
    precisions = ("float32", "bfloat16") if args.precision == "both" else (args.precision,)
    ours = Ours(args.threads, jit_modes, precisions)
    peer = None
    if peers_python:
        try:
            peer = Peer(peers_python, args.threads)
        except (OSError, RuntimeError) as err:
            print(f"MONAI not run: {err}", file=sys.stderr)
    ours_results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in ours.models}
    peer_results: list[dict[str, Any]] = []
    loads = []
    # Interleaved per configuration, so that both frameworks see the same machine load.
    for size in args.sizes:
        for batch in args.batches:
            reps = reps_for(size, args.reps)
            for variant in ours.models:
                ours_results[variant].append(ours.run(variant, size, batch, reps))
            if peer is not None:
                peer_results.append(peer.run(size, batch, reps))
            loads.append(os.getloadavg()[0])
            print(f"  {batch}x{size}^3 done (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
    if peer is not None:
        peer.close()
    volume_results = {}
    if args.volume != "none":
        image = synthetic_volume(args.volume)
        volume_results["shape"] = list(image.shape[:3])
        segs = {}
        for precision in precisions:
            volume_results[precision], segs[precision] = ours.whole_volume(image, precision, args.reps or 2)
            loads.append(os.getloadavg()[0])
        if len(segs) == 2:
            a, b = (segs[p] == 1 for p in precisions)
            volume_results["agreement_dice"] = float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))

    print(f"HighResNet3D (809,380 trainable) vs MONAI HighResNet; {args.threads} threads; "
          f"{platform.machine()}, {os.cpu_count()} CPUs; 1-min load average during the run "
          f"{min(loads):.2f}-{max(loads):.2f}")
    meta = peer.meta if peer is not None else None
    print(f"ours: {ours.versions}"
          + (f"; MONAI {meta['monai']}, torch {meta['torch']} ({meta['trainable']:,} trainable)" if meta else "; MONAI: not run"))
    print("ratio = MONAI time / our time (> 1: ours faster); GFLOP/s at 1.616 MFLOP/voxel forward, training 3x")
    for stat, title in (("median_s", "median"), ("min_s", "best")):
        print(f"\n{title} of {', '.join(str(reps_for(s_, args.reps)) for s_ in args.sizes)} repetitions (per window size):")
        print(table(ours_results, peer_results, stat))
    if volume_results:
        print(f"\nwhole-volume inference, one pass over a synthetic {'x'.join(map(str, image.shape[:3]))} subject "
              "(full-width model, predict_volume):")
        for precision in precisions:
            r = volume_results[precision]
            print(f"  {precision:8s}  median {r['median_s']:.2f} s  best {r['min_s']:.2f} s")
        if len(precisions) == 2:
            f32, bf16 = (volume_results[p]["median_s"] for p in ("float32", "bfloat16"))
            print(f"  float32 / bfloat16 time: {f32 / bf16:.2f}; segmentations agree to Dice "
                  f"{volume_results['agreement_dice']:.4f} (random weights: a stringent check, most voxels are near the boundary)")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours_results, "peer": peer_results, "peer_meta": meta,
                                               "volume": volume_results, "threads": args.threads, "load": loads},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
