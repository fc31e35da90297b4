"""float32 against bfloat16 at equal Dice: training time and test Dice of the same model.

Synthesises the small BraTS-like set, then trains ``demo/brats.yaml`` from scratch
twice with the same seed, data and iterations, once with ``training.mixed_precision:
false`` (float32) and once with ``bfloat16``, and segments the held-out (inference
split) subjects of each run with ``inference.precision`` float32 and bfloat16. It
prints, per run, the training wall time and, per inference precision, the mean
foreground Dice of the held-out subjects (the one scorer,
:func:`highres3d.experiments.evaluate_run`) and the segmentation time.

The two trainings run back to back in one process, so both see the same machine
load; the 1-minute load average is printed. Run it from the repository root::

    .venv/bin/python benchmarks/mixed_precision.py --iterations 400 --out mp_bench

Options: ``--subjects 20 --iterations 400 --seed 0 --set key=value ...`` (further
config overrides, e.g. ``--set network.width_multiplier=0.25``); ``--json FILE``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder (data, runs, predictions); reused if present")
    parser.add_argument("--subjects", type=int, default=20, help="synthetic BraTS-like subjects (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=400, help="training iterations per run (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from highres3d.config import load_config
    from highres3d.data.dataset import Dataset
    from highres3d.data.synth import synthesize_brats
    from highres3d.experiments import evaluate_run
    from highres3d.training import train

    out = Path(args.out).resolve()
    data = out / "data"
    if not (data / "synth_manifest.json").exists():
        synthesize_brats(data, args.subjects, size="small", seed=args.seed)
    results = []
    loads = [os.getloadavg()[0]]
    for training in ("float32", "bfloat16"):
        overrides = [f"training.seed={args.seed}", f"training.max_iter={args.iterations}",
                     f"training.mixed_precision={'false' if training == 'float32' else training}", *args.overrides]
        cfg = load_config("demo/brats.yaml", overrides=overrides, data_root=data)
        run_dir = out / "runs" / training
        start = time.perf_counter()
        train(cfg, run_dir, overwrite=True, echo=lambda *_: None, show_progress=False)
        train_s = time.perf_counter() - start
        loads.append(os.getloadavg()[0])
        subjects = Dataset.from_config(cfg.dataset).split("inference")
        for inference in ("float32", "bfloat16"):
            inf_cfg = load_config("demo/brats.yaml", overrides=overrides + [f"inference.precision={inference}"],
                                  data_root=data)
            start = time.perf_counter()
            rows = evaluate_run(inf_cfg, run_dir, {"inference": subjects},
                                out / "predictions" / f"{training}_{inference}", echo=lambda *_: None,
                                show_progress=False)
            infer_s = time.perf_counter() - start
            dice = [r["dice"] for r in rows]
            results.append({"training": training, "inference": inference, "train_s": train_s, "infer_s": infer_s,
                            "dice_mean": statistics.mean(dice), "dice_sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                            "n": len(dice), "dice": dice})
            loads.append(os.getloadavg()[0])
            print(f"  {training} training, {inference} inference: Dice {results[-1]['dice_mean']:.4f} "
                  f"(train {train_s:.0f} s, segment {infer_s:.1f} s, load {loads[-1]:.2f})", file=sys.stderr, flush=True)

    print(f"demo/brats.yaml from scratch, {args.iterations} iterations, seed {args.seed}, {args.subjects} subjects; "
          f"{os.cpu_count()} CPUs; 1-minute load average {min(loads):.2f}-{max(loads):.2f}")
    print("| training | inference | training wall s | segmenting held-out s | held-out Dice (mean ± sd, n) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['training']} | {r['inference']} | {r['train_s']:.0f} | {r['infer_s']:.1f} | "
              f"{r['dice_mean']:.4f} ± {r['dice_sd']:.4f} ({r['n']}) |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "loads": loads, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
