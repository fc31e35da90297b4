"""Figures for docs/niftynet.md: what migrating from NiftyNet 0.5 changes, measured.

1. Window centres of NiftyNet 0.5's ``weighted`` sampler (re-implemented here
   from its published algorithm: minimum subtracted, one draw mapped into the
   upper half of the sorted cumulative mass) against highres3d's
   ``WeightedSampler`` on a ball-shaped label: the share of foreground voxels
   that can be a centre, and the shift of the mean centre.
2. Importing a full-width HighRes3DNet TF1 checkpoint (2 channels, 2 classes,
   with Adam slots and zero-debias copies, written with tf.compat.v1): time,
   the checkpoint's non-Adam scalars (the thesis' Table 6.1 total), and the
   largest difference between the imported model and a NumPy forward pass.
3. Histogram standardisation: learning landmarks and standardising, per volume.

    python benchmarks/niftynet_migration.py [--draws 200000]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "niftynet"))


def niftynet05_weighted(label: np.ndarray, window: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """NiftyNet 0.5's weighted centres, one window per volume visit (sample_per_volume = 1)."""
    half = window // 2
    lo = half
    hi = [n - window + int(window / 2 + 0.6) for n in label.shape]
    cropped = label[lo:hi[0], lo:hi[1], lo:hi[2]].astype(np.float64)
    flat = cropped.ravel() - cropped.min()
    order = np.argsort(flat)
    cdf = np.cumsum(flat[order] / flat.sum())
    ratio = 1 - (rng.random(draws) + 0) / (1 + 1)
    idx = np.argmax(cdf[None, :] >= ratio[:, None], axis=1) if draws <= 2000 else np.searchsorted(cdf, ratio, side="left")
    return np.stack(np.unravel_index(order[idx], cropped.shape), axis=1) + lo


def sampler_figures(draws: int) -> dict:
    from highres3d.samplers.weighted import WeightedSampler

    shape, window = (48, 48, 48), 16
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    label = (np.linalg.norm(grid - 23.5, axis=-1) < 8).astype(np.uint8)
    foreground = np.argwhere(label > 0)
    rng = np.random.default_rng(0)
    nn = niftynet05_weighted(label, window, draws, rng)
    sampler = WeightedSampler(window, edge_policy="valid")
    volume = SimpleNamespace(subject_id="ball", image=np.zeros(shape + (1,), np.float32), label=label, shape=shape)
    ours = sampler.draw_centres(sampler.prepare(volume), draws, rng)
    out = {}
    for name, centres in (("niftynet05", nn), ("highres3d", ours)):
        reached = len({tuple(c) for c in centres})
        shift = centres.mean(axis=0) - foreground.mean(axis=0)
        out[name] = {"reachable_foreground": reached / len(foreground),
                     "mean_centre_shift_vox": [round(float(s), 2) for s in shift]}
    return out


def import_figures() -> dict:
    import niftynet_tf1 as tf1

    from highres3d.niftynet.checkpoint import (
        find_checkpoint,
        import_checkpoint,
        read_checkpoint,
    )

    variables = tf1.niftynet_variables(num_classes=2, widths=(16, 32, 64, 80))
    with tempfile.TemporaryDirectory() as tmp:
        tf1.save_tf1_checkpoint(Path(tmp), variables, 5558)
        prefix, _ = find_checkpoint(tmp)
        every = read_checkpoint(prefix)
        non_adam = sum(v.size for k, v in every.items() if "Adam" not in k and k != "global_step")
        t0 = time.perf_counter()
        model, report = import_checkpoint(tmp)
        seconds = time.perf_counter() - t0
    image = np.random.default_rng(1).normal(size=(1, 16, 16, 16, 2)).astype(np.float32)
    got = np.asarray(model(image, training=False))[0]
    expected = tf1.reference_forward(image[0], variables, "leakyrelu")
    return {"import_seconds": round(seconds, 2), "checkpoint_variables": len(every),
            "non_adam_scalars": int(non_adam), "mapped": len(report.mapped),
            "ignored": {k: len(v) for k, v in report.ignored.items()},
            "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "max_abs_diff_vs_numpy": float(np.abs(got - expected).max()),
            "max_abs_logit": float(np.abs(expected).max())}


def histogram_figures(n: int = 10, size: int = 96) -> dict:
    from highres3d.data import histogram

    rng = np.random.default_rng(2)
    volumes = [(rng.gamma(2.0, 10.0 * (1 + i % 3), (size,) * 3)).astype(np.float32) for i in range(n)]
    t0 = time.perf_counter()
    reference = histogram.learn_landmarks([(str(i), v) for i, v in enumerate(volumes)], (0.01, 0.99))
    learn = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for v in volumes:
        histogram.standardise(v, None, reference, (0.01, 0.99), "percentile")
    apply = (time.perf_counter() - t0) / n
    return {"volume": f"{size}^3", "learn_s_per_volume": round(learn, 3), "apply_s_per_volume": round(apply, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=200_000)
    args = parser.parse_args()
    print("sampler:", sampler_figures(args.draws))
    print("histogram:", histogram_figures())
    print("import:", import_figures())


if __name__ == "__main__":
    main()
