"""Why is the training step slow on a GPU? Dilated 3D convolutions, forward and backward, in JAX/XLA.

``benchmarks/gpu_bench.py`` measured, on an H200 (2026-12-04), our forward pass
faster than MONAI's but our training step 5.6× slower (bfloat16: 27×). This
probe times, at 96³ and batch 1, each convolution HighResNet3D uses (3³,
dilation 1/2/4 at 16/32/64 channels), forward and gradient, float32 and
bfloat16, computed two ways:

* ``dilated``: one convolution with ``rhs_dilation`` (what ``keras.layers.Conv3D``
  with ``dilation_rate`` lowers to);
* ``space_to_batch``: the volume split into its d³ interleaved sub-grids,
  stacked on the batch axis, convolved without dilation, and put back:
  numerically the same (NiftyNet computed dilation this way).

Then the whole model's training step (``train_on_batch``) with either (the
model's ``SpaceToBatchConv3D`` switched back to ``keras.layers.Conv3D``'s op for
the dilated rows).

    KERAS_BACKEND=jax python benchmarks/gpu_conv_probe.py [--quick] [--json PATH]

On the GPU machine, with the carried wheels (benchmarks/README.md, "The GPU figures")::

    site="$(mktemp -d)"
    python3 -m pip install -q --no-index --no-deps --target "$site" --find-links benchmarks/wheels keras namex optree
    PYTHONPATH="$site:$PWD" KERAS_BACKEND=jax python3 benchmarks/gpu_conv_probe.py --json "$OUT/probe.json"
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> float:
    import jax

    for _ in range(2):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16^3 (CPU is fine)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    size, reps = (16, 1) if args.quick else (96, 5)
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rows = []

    def add(**row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))

    def dilated(x, w, d):
        return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", rhs_dilation=(d,) * 3,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    def split(x, w, d):
        # (B, X, Y, Z, C) -> (B d³, X/d, Y/d, Z/d, C): sub-grid (i, j, k) holds the voxels i, j, k (mod d).
        b, sx, sy, sz, c = x.shape
        g = x.reshape(b, sx // d, d, sy // d, d, sz // d, d, c).transpose(0, 2, 4, 6, 1, 3, 5, 7)
        y = dilated(g.reshape(b * d ** 3, sx // d, sy // d, sz // d, c), w, 1)
        y = y.reshape(b, d, d, d, sx // d, sy // d, sz // d, -1).transpose(0, 4, 1, 5, 2, 6, 3, 7)
        return y.reshape(b, sx, sy, sz, -1)

    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        for d, channels in ((1, 16), (2, 32), (4, 64)):
            x = jnp.asarray(rng.normal(size=(1, size, size, size, channels)), dtype=dtype)
            w = jnp.asarray(rng.normal(size=(3, 3, 3, channels, channels)) * 0.05, dtype=dtype)
            for name, conv in (("dilated", dilated), ("space_to_batch", split)):
                if name == "space_to_batch" and d == 1:
                    continue
                fwd = jax.jit(lambda x, w, conv=conv, d=d: conv(x, w, d))
                grad = jax.jit(jax.grad(lambda x, w, conv=conv, d=d: jnp.sum(conv(x, w, d).astype("float32") ** 2),
                                        argnums=(0, 1)))
                add(part="conv", dtype=dtype, dilation=d, channels=channels, method=name,
                    forward_ms=timed(lambda: fwd(x, w), reps) * 1e3, grad_ms=timed(lambda: grad(x, w), reps) * 1e3)
                if name == "space_to_batch":
                    diff = float(jnp.max(jnp.abs(fwd(x, w).astype("float32") - dilated(x, w, d).astype("float32"))))
                    add(part="conv", dtype=dtype, dilation=d, method="max |difference|", value=diff)

    import keras

    from highres3d.losses import DiceLoss
    from highres3d.models import HighResNet3D
    from highres3d.models.highresnet import SpaceToBatchConv3D

    # The model computes dilation by space to batch (SpaceToBatchConv3D); for the "dilated" rows its
    # convolutions are switched back to keras.layers.Conv3D's own op, dilation_rate and all.
    space_to_batch_op = SpaceToBatchConv3D.convolution_op

    def dilated_op(layer, inputs, kernel):
        return keras.layers.Conv3D.convolution_op(layer, inputs, kernel)

    for dtype in ("float32", "bfloat16"):
        for dilation_by in ("dilated", "space_to_batch"):
            SpaceToBatchConv3D.convolution_op = dilated_op if dilation_by == "dilated" else space_to_batch_op
            keras.mixed_precision.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
            keras.utils.set_random_seed(0)
            model = HighResNet3D(in_channels=2, num_classes=2)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=DiceLoss(), jit_compile=True)
            keras.mixed_precision.set_global_policy("float32")
            x = rng.normal(size=(1, size, size, size, 2)).astype("float32")
            y = rng.integers(0, 2, size=(1, size, size, size)).astype("int32")
            fwd = timed(lambda: model.predict_on_batch(x), reps)
            step = timed(lambda: model.train_on_batch(x, y), reps)
            add(part="model", dtype=dtype, method=dilation_by, forward_ms=fwd * 1e3, train_ms=step * 1e3)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")
    raise SystemExit(main())
