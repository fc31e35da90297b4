"""Window sampling, augmentation and input-pipeline throughput on a BraTS-size subject.

One synthetic subject: 2 x 240 x 240 x 155 float32 channels (a textured
ellipsoidal head) and a uint8 label with ~0.5 % tumour core; 96^3 windows.

Rows (one thread unless stated):
  * numpy memory-copy floor: one window (2 float32 channels + uint8 label)
    copied out of the volume at a uniform corner, from (X, Y, Z, C) memory
    and from the peers' (C, X, Y, Z) memory;
  * our UniformSampler / ClassWeightedSampler / WeightedSampler: per-volume
    setup and windows/s (next() on the sampler's iterator, as training and
    TorchIO's LabelSampler draw them: starts in blocks, one aligned copy each),
    on the volume as the trainer stores it (in the memory layout windows copy
    out of fastest on this machine, ``highres3d.samplers.fastest_layout``), and
    the class-weighted one also on the other layout for reference;
  * our CPU rotation + scaling (+-10 deg per axis, +-10 %), sampled straight
    from the volume (location + resampling = the whole cost of a window);
  * our tf.data pipeline on 2 cores delivering batches of 4 as training does
    (channel-first batches from channel-major volumes, channel-last from
    interleaved ones): plain windows,
    margin crops for on-device augmentation, and CPU augmentation; for the
    margin crops also the augmented windows/s once RandomAffine3D resamples
    them on the same cores (XLA-compiled and not); and for each, the fraction
    of a small model's training step that waits for input;
  * peers, when their interpreter is given by --peers-python or
    $HIGHRES3D_PEERS_PYTHON (see benchmarks/README.md; re-runs this file
    there with --section peers and reads its JSON): MONAI RandCropByLabelClassesd
    (indices per call, and with ClassesToIndicesd), RandAffined, TorchIO
    LabelSampler and RandomAffine; and the class-weighted batches of 4 their
    training loops get (TorchIO Queue + DataLoader, MONAI DataLoader with 2
    workers), beside our tf.data pipeline's.

The copy floors, our samplers and the peers' samplers (MONAI with
ClassesToIndicesd, TorchIO LabelSampler) are measured in --rounds rounds
(default 3) that alternate the peers' process and ours, and each row pools its
repetitions over the rounds: this machine's copy speed moves by up to 2x within
minutes, and a single pass per side let that decide the ratio.

Run from the repository root, never beside another benchmark:

    .venv/bin/python benchmarks/samplers.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import _peers  # noqa: E402  (benchmarks/_peers.py: this script's folder is sys.path[0])
import numpy as np  # noqa: E402

W = 96
SHAPE = (240, 240, 155)
DEG, SCALE = 10.0, 0.10


# --------------------------------------------------------------------------- data
def make_subject(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(image (X, Y, Z, 2) float32, label (X, Y, Z) uint8) resembling a BraTS case.

    A head ellipsoid filled with smooth random texture (coarse noise zoomed up),
    zero outside; a tumour core made of a noisy-edged ellipsoid of radii 17-21
    voxels inside the head, brighter in channel 0 and darker in channel 1.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    centre = np.asarray(SHAPE) / 2

    def ellipsoid(c, radii):
        return sum(((g - ci) / r) ** 2 for g, ci, r in zip(grid, c, radii))

    def texture(cells: int) -> np.ndarray:
        coarse = rng.standard_normal(tuple(math.ceil(n / cells) + 2 for n in SHAPE)).astype(np.float32)
        return ndimage.zoom(coarse, cells, order=1)[: SHAPE[0], : SHAPE[1], : SHAPE[2]]

    head_r2 = ellipsoid(centre, (0.4 * SHAPE[0], 0.37 * SHAPE[1], 0.42 * SHAPE[2]))
    head = head_r2 <= 1
    tumour_centre = centre + rng.uniform(-0.25, 0.25, 3) * np.asarray(SHAPE) * 0.5
    tumour = (np.sqrt(ellipsoid(tumour_centre, rng.uniform(17, 21, 3))) + 0.3 * texture(6) < 1) & head
    image = np.zeros(SHAPE + (2,), np.float32)
    for ch, contrast in enumerate((35.0, -20.0)):
        values = 90 + 25 * texture(8) + 8 * texture(3) + 15 * (1 - head_r2) + contrast * tumour
        image[..., ch] = np.where(head, values, 0)
    return image, tumour.astype(np.uint8)


# --------------------------------------------------------------------------- timing
def rates(fn, n: int, reps: int) -> list[float]:
    """Windows/s of ``fn`` (one window per call) in each of ``reps`` repetitions, after a warm-up one."""
    samples = []
    for rep in range(reps + 1):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if rep:
            samples.append(n / (time.perf_counter() - t0))
    return samples


def spread(samples: list[float]) -> tuple[float, float, float]:
    return statistics.median(samples), min(samples), max(samples)


def rate(fn, n: int, reps: int) -> tuple[float, float, float]:
    """Windows/s of ``fn``: median, min, max over reps, after a warm-up rep."""
    return spread(rates(fn, n, reps))


def pool_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Rows measured in several rounds, one per method: every round's samples pooled (median, min, max).

    Ours and the peers' run in alternating rounds, so a slow spell of the machine
    (its copy speed moves by up to 2x within minutes) lands on both sides.
    """
    pooled: dict[str, dict] = {}
    for rows in rounds:
        for row in rows:
            into = pooled.setdefault(row["method"], dict(row, samples=[], setups=[], rounds=0))
            into["samples"] += row["samples"]
            into["rounds"] += 1
            if row.get("setup_ms") is not None:
                into["setups"].append(row["setup_ms"])
    out = []
    for row in pooled.values():
        setups = row.pop("setups")
        row["windows_s"] = spread(row["samples"])
        row["setup_ms"] = statistics.median(setups) if setups else None
        out.append(row)
    return out


def setup_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


# --------------------------------------------------------------------------- ours
def volumes(image, label):
    """The subject as the trainer stores it (the layout windows copy out of fastest here) and in the other layout.

    Returns ``(stored, other, layout)``: the trainer's rule
    (``highres3d.training.trainer.load_volumes``, ``training.cache: ram``) picks
    ``layout`` with :func:`~highres3d.samplers.fastest_layout`.
    """
    from types import SimpleNamespace

    from highres3d.samplers import LAYOUTS, fastest_layout, in_layout

    layout, _ = fastest_layout(image, W)
    other = next(name for name in LAYOUTS if name != layout)
    stored = SimpleNamespace(subject_id="brats-like", image=in_layout(image, layout), label=label)
    return stored, SimpleNamespace(subject_id="brats-like", image=in_layout(image, other), label=label), layout


def layout_name(layout: str) -> str:
    return "(X,Y,Z,C) memory" if layout == "interleaved" else "channel-major memory"


def ours_sampling(volume, other, quick: bool) -> list[dict]:
    """The copy floors and our samplers, round-robin within the round; each row keeps its samples.

    ``volume`` is the subject as the trainer stores it, ``other`` in the other memory layout.
    """
    from highres3d.samplers import ClassWeightedSampler, UniformSampler, WeightedSampler, is_channel_major

    interleaved, major = (other, volume) if is_channel_major(volume.image) else (volume, other)
    image, label = interleaved.image, interleaved.label

    reps = 2 if quick else 7
    n_fast = 30 if quick else 200
    rows = []
    rng = np.random.default_rng(0)
    hi = np.asarray(SHAPE) - W + 1

    def floor():
        i, j, k = rng.integers(0, hi)
        np.ascontiguousarray(image[i : i + W, j : j + W, k : k + W])
        np.ascontiguousarray(label[i : i + W, j : j + W, k : k + W])

    channels_first = np.moveaxis(major.image, 3, 0)  # contiguous (C, X, Y, Z)

    def floor_cf():
        i, j, k = rng.integers(0, hi)
        np.ascontiguousarray(channels_first[:, i : i + W, j : j + W, k : k + W])
        np.ascontiguousarray(label[i : i + W, j : j + W, k : k + W])

    measured = [
        dict(method="numpy memory-copy floor, (X,Y,Z,C) layout", fn=floor, kind="floor"),
        dict(method="numpy memory-copy floor, (C,X,Y,Z) layout (peers')", fn=floor_cf),
    ]
    samplers = [
        ("highres3d UniformSampler", UniformSampler(W)),
        ("highres3d ClassWeightedSampler {0:1, 1:1}", ClassWeightedSampler(W, {0: 1, 1: 1})),
        ("highres3d WeightedSampler (label map as weights)", WeightedSampler(W, "label")),
    ]
    layout = "channel_major" if volume is major else "interleaved"
    samplers = [(f"{name}, {layout_name(layout)} (the trainer's choice here)", sampler) for name, sampler in samplers]
    reference = (f"highres3d ClassWeightedSampler {{0:1, 1:1}}, {layout_name('interleaved' if volume is major else 'channel_major')}",
                 ClassWeightedSampler(W, {0: 1, 1: 1}))
    for (name, sampler), source in zip(samplers + [reference], [volume] * len(samplers) + [other]):
        setup = setup_ms(lambda: sampler.prepare(source), reps)
        # As training draws them, and as TorchIO's LabelSampler is timed: next() on the
        # sampler's iterator (setup once, window starts drawn in blocks, one crop per window).
        windows = sampler(source, None, rng)

        def draw(windows=windows):
            next(windows)

        kind = "sampler" if source is volume else "sampler_reference"
        measured.append(dict(method=name, setup_ms=setup, fn=draw, kind=kind))
    # Round-robin repetitions: drift from other jobs on the machine hits every row alike.
    for row in measured:
        row["fn"]()
    samples = {id(row): [] for row in measured}
    for _ in range(reps):
        for row in measured:
            t0 = time.perf_counter()
            for _ in range(n_fast):
                row["fn"]()
            samples[id(row)].append(n_fast / (time.perf_counter() - t0))
    for row in measured:
        r = samples[id(row)]
        rows.append(dict({k: v for k, v in row.items() if k != "fn"}, windows_s=spread(r), samples=r))
    channels_first = None  # frees the copy; floor_cf is not called again
    print("floor and samplers done", file=sys.stderr, flush=True)
    return rows


def ours_pipeline(volume, quick: bool) -> list[dict]:
    """CPU augmentation and the tf.data pipeline, measured once."""
    from highres3d.augment import AffineAugmentation
    from highres3d.samplers import ClassWeightedSampler

    reps = 2 if quick else 7
    n_slow = 5 if quick else 20
    rows = []
    rng = np.random.default_rng(1)
    sampler = ClassWeightedSampler(W, {0: 1, 1: 1})
    state = sampler.prepare(volume)
    aug = AffineAugmentation(rotation_degrees=DEG, scale_range=SCALE)

    def augmented():
        start = sampler.locations(volume, 1, rng, state)[0]
        aug.window(volume, start, W, rng)

    rows.append(
        dict(
            method=f"highres3d ClassWeighted + CPU rotation/scaling (+-{DEG:g} deg, +-{100 * SCALE:g} %)",
            windows_s=rate(augmented, n_slow, reps),
            kind="augment",
        )
    )
    print("augmentation done", file=sys.stderr, flush=True)
    rows += pipeline(volume, quick)
    return rows


def _small_step():
    """A compiled training step of a small model (two 3^3 convolutions, 8 features) on 96^3 batches."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((W, W, W, 2))
    x = keras.layers.Conv3D(8, 3, padding="same", activation="relu")(inputs)
    logits = keras.layers.Conv3D(2, 3, padding="same")(x)
    model = keras.Model(inputs, logits)
    optimizer = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def pipeline(volume, quick: bool) -> list[dict]:
    """Batches of 4 from make_training_dataset: delivery rate, then the step's wait for input.

    Delivery: windows/s that ``next()`` on the dataset yields, nothing else running.
    Augmented (device): the crops plus :class:`RandomAffine3D` resampling them in
    the consumer, as the training step does (XLA-compiled, the default, and the
    ordinary graph), i.e. augmented windows/s on the same 2 cores.
    Waiting: a small model's training step consumes the batches (with the layer
    first for ``device``); the share of the loop's wall time spent blocked in
    ``next()``, i.e. the fraction of a training step that waits for input.
    """
    import tensorflow as tf

    from highres3d.augment import AffineAugmentation, RandomAffine3D
    from highres3d.data.pipeline import crop_geometry, make_training_dataset, to_channels_last
    from highres3d.data.resident import ResidentVolumes
    from highres3d.samplers import ClassWeightedSampler
    from highres3d.training.trainer import batch_data_format

    batch = 4
    aug = AffineAugmentation(rotation_degrees=DEG, scale_range=SCALE)
    rows = []
    margin_bytes = np.prod([W + 2 * m for m in aug.margin(W)]) / W**3
    configs = [
        ("tf.data pipeline, 2 cores, plain 96^3 windows", None, "cpu", 40, "target >= 1000/s"),
        (
            "tf.data pipeline, 2 cores, on-device aug. (CPU crops window+margin)", aug, "device", 25,
            f"crops are {margin_bytes:.1f}x the bytes of a 96^3 window; resampling not included",
        ),
        ("tf.data pipeline, 2 cores, CPU rotation/scaling", aug, "cpu", 6, ""),
        (
            "tf.data pipeline, 2 cores, on-device aug., volumes on device (window positions only)", aug, "resident",
            250, "training.cache: device; the step cuts the crops from the resident volumes",
        ),
    ]
    step = _small_step()
    layers = {jit: RandomAffine3D.from_augmentation(aug, W, seed=0, jit_resample=jit) for jit in (True, False)}
    # The batches' layout follows the trainer's rule for this volume; channel-first batches are turned to the
    # model's layout in the step, as the trainer does.
    data_format = batch_data_format([volume])
    as_model = to_channels_last if data_format == "channels_first" else (lambda x: x)
    augment = {jit: tf.function(lambda x, y, layer=layer: layer((as_model(x), y), training=True))
               for jit, layer in layers.items()}
    augment_cl = {jit: tf.function(lambda x, y, layer=layer: layer((x, y), training=True))
                  for jit, layer in layers.items()}

    sampler = ClassWeightedSampler(W, {0: 1, 1: 1})
    crop_size, margin = crop_geometry(sampler, aug, "device")
    resident = ResidentVolumes([volume], crop_size, margin)
    cut = tf.function(resident.cut)

    def dataset(augmentation, where):
        return make_training_dataset(
            [volume], sampler, batch_size=batch, windows_per_volume=8, augmentation=augmentation,
            augment_on="device" if where == "resident" else where, seed=1, echo=None,
            positions_only=where == "resident",
            data_format="channels_last" if where == "resident" else data_format,
        )

    def pair(element):
        # training.cache device: the pipeline yields positions, cut into crops on the "device" (here: the CPU).
        return (element, None) if not isinstance(element, (tuple, list)) else element

    def measure(it, n_batches, consume=None):
        rates = []
        cpu0 = os.times()
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n_batches):
                x, y = pair(next(it))
                if consume is not None:
                    consume(x, y)
            rates.append(batch * n_batches / (time.perf_counter() - t0))
        cpu1 = os.times()
        # CPU time per window tells the capacity even when other jobs share the cores.
        cpu_ms = 1e3 * (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / (3 * batch * n_batches)
        return (statistics.median(rates), min(rates), max(rates)), cpu_ms

    for name, augmentation, where, n_batches, note in configs:
        if quick:
            n_batches = max(3, n_batches // 5)
        ds = dataset(augmentation, where)
        it = iter(ds)
        for _ in range(4):
            x, y = pair(next(it))
        crop = tuple(int(s) for s in (cut(x)[0].shape[1:4] if where == "resident" else as_model(x).shape[1:4]))
        windows_s, cpu_ms = measure(it, n_batches)
        note = f"{cpu_ms:.3f} CPU-ms/window" + (f"; {note}" if note else "")
        rows.append(dict(method=f"{name} [{'x'.join(map(str, crop))}]", windows_s=windows_s, kind="pipeline", note=note))
        if where == "resident":
            # The cut and the resampling, both on the device; on this machine the device is the 2 CPU cores.
            fn = tf.function(lambda rows: augment_cl[True](*cut(rows)))
            fn(x)[0].numpy()
            aug_rate, aug_cpu = measure(it, max(2, n_batches // 50), lambda x, y: fn(x)[0].numpy())
            rows.append(dict(
                method=f"augmented windows/s, 2 cores, volumes on device (resident cut + RandomAffine3D, XLA) "
                       f"[{W}x{W}x{W}]", windows_s=aug_rate, kind="augmented", note=f"{aug_cpu:.1f} CPU-ms/window"))
        if where == "device":
            # What training with augmentation.device: accelerator gets on these cores: crops, then the layer.
            for jit in (True, False):
                fn = augment[jit]
                fn(x, y)[0].numpy()  # traced (and compiled) outside the timing
                n_aug = max(2, n_batches // (4 if jit else 12))
                aug_rate, aug_cpu = measure(it, n_aug, lambda x, y, fn=fn: fn(x, y)[0].numpy())
                rows.append(dict(
                    method=f"augmented windows/s, 2 cores, device: accelerator (crops + RandomAffine3D, "
                           f"{'XLA' if jit else 'graph, jit_resample=False'}) [{W}x{W}x{W}]",
                    windows_s=aug_rate, kind="augmented", note=f"{aug_cpu:.1f} CPU-ms/window"))
        # The share of a training step spent waiting for the next batch (input-bound when near 1).
        if where == "resident":
            def consume(x, y):
                return step(*augment_cl[True](*cut(x)))
        elif where == "device":
            def consume(x, y):
                return step(*augment[True](x, y))
        else:
            def consume(x, y):
                return step(as_model(x), y)
        consume(x, y).numpy()
        waited = total = 0.0
        n_steps = 3 if quick else 8
        for _ in range(n_steps):
            t0 = time.perf_counter()
            x, y = pair(next(it))
            t1 = time.perf_counter()
            consume(x, y).numpy()
            waited, total = waited + t1 - t0, total + time.perf_counter() - t0
        rows.append(dict(method=f"input wait, {name.split(', ', 2)[-1]}: small model's step on batches of {batch}",
                         windows_s=(batch * n_steps / total,) * 3, kind="wait", wait_fraction=waited / total,
                         note=f"{100 * waited / total:.0f} % of the step waits for input "
                              f"({1e3 * total / n_steps:.0f} ms/step)"))
        del it, ds
        print(f"pipeline {where} done", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- peers
def peers(path: str, quick: bool, sampling_only: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    import monai
    import torchio as tio
    from monai.data import MetaTensor
    from monai.transforms import ClassesToIndicesd, RandAffined, RandCropByLabelClassesd

    reps = 2 if quick else 5
    n_fast, n_slow = (30, 3) if quick else (100, 10)
    data = np.load(path)
    image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(data["image"], 3, 0)))
    label = torch.from_numpy(np.ascontiguousarray(data["label"][None]))
    rows = []

    def materialise(*arrays):
        for a in arrays:
            (a.as_tensor() if hasattr(a, "as_tensor") else a).contiguous()

    base = {"image": MetaTensor(image), "label": MetaTensor(label)}
    to_indices = ClassesToIndicesd(keys="label", num_classes=2)
    with_indices = to_indices(dict(base))
    for precomputed in (True,) if sampling_only else (False, True):
        crop = RandCropByLabelClassesd(
            keys=["image", "label"], label_key="label", spatial_size=(W, W, W), ratios=[1, 1], num_classes=2,
            num_samples=1, indices_key="label_cls_indices" if precomputed else None,
        )
        crop.set_random_state(0)
        source = with_indices if precomputed else base

        def draw(crop=crop, source=source):
            out = crop(source)[0]
            materialise(out["image"], out["label"])

        rows.append(
            dict(
                method=f"MONAI {monai.__version__} RandCropByLabelClassesd "
                + ("+ ClassesToIndicesd" if precomputed else "(default: indices every call)"),
                setup_ms=setup_ms(lambda: to_indices(dict(base)), reps) if precomputed else None,
                samples=rates(draw, n_fast if precomputed else n_slow, reps),
                kind="peer_sampler",
            )
        )
    print("monai crops done", file=sys.stderr, flush=True)

    subject = tio.Subject(image=tio.ScalarImage(tensor=image), label=tio.LabelMap(tensor=label))
    label_sampler = tio.LabelSampler(patch_size=W, label_name="label", label_probabilities={0: 1, 1: 1})

    def tio_setup():
        pm = label_sampler.get_probability_map(subject)
        label_sampler.get_cumulative_distribution_function(label_sampler.process_probability_map(pm, subject))

    torch.manual_seed(0)
    patches = label_sampler(subject)

    def tio_draw():
        p = next(patches)
        materialise(p["image"].data, p["label"].data)

    rows.append(
        dict(
            method=f"TorchIO {tio.__version__} LabelSampler {{0:1, 1:1}}",
            setup_ms=setup_ms(tio_setup, reps),
            samples=rates(tio_draw, n_fast, reps),
            kind="peer_sampler",
        )
    )
    print("torchio sampler done", file=sys.stderr, flush=True)
    if sampling_only:
        return rows
    rows += peer_pipelines(subject, label_sampler, with_indices, quick)

    # Augmentation peers work on pre-cut windows, i.e. their augmentation cost alone.
    pool = [next(patches) for _ in range(8)]
    counter = iter(range(10**9))
    affine = RandAffined(
        keys=["image", "label"], mode=("bilinear", "nearest"), prob=1.0, rotate_range=(math.radians(DEG),) * 3,
        scale_range=(SCALE,) * 3, padding_mode="zeros",
    )
    affine.set_random_state(0)
    monai_pool = [{"image": MetaTensor(p["image"].data), "label": MetaTensor(p["label"].data)} for p in pool]
    rows.append(
        dict(
            method="MONAI RandAffined (on pre-cut windows)",
            windows_s=rate(lambda: affine(monai_pool[next(counter) % 8]), n_slow, reps),
            kind="peer_augment",
        )
    )
    random_affine = tio.RandomAffine(scales=SCALE, degrees=DEG, image_interpolation="linear", label_interpolation="nearest")
    rows.append(
        dict(
            method="TorchIO RandomAffine (on pre-cut windows)",
            windows_s=rate(lambda: random_affine(pool[next(counter) % 8]), n_slow, reps),
            kind="peer_augment",
        )
    )
    print("peer augmentation done", file=sys.stderr, flush=True)
    return rows


def peer_pipelines(subject, label_sampler, with_indices, quick: bool) -> list[dict]:
    """Class-weighted batches of 4 as the peers' training loops get them, next to our tf.data pipeline.

    TorchIO: ``Queue`` + ``DataLoader``, its documented patch pipeline; the
    queue cuts the patches in the main process (its ``num_workers`` load
    subjects, and this one is already in memory, so 0).  MONAI:
    ``RandCropByLabelClassesd(num_samples=4)`` with cached indices in a
    ``DataLoader`` with 2 worker processes, one batch per item.  Both stack the
    windows into a contiguous batch, as ours does.  The queue reloads the
    subject every ``samples_per_volume`` patches and its LabelSampler then
    builds the probability map again (its setup, ~0.1 s here); 64 patches per
    load is generous to it (TorchIO's examples use fewer).
    """
    import torchio as tio
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandCropByLabelClassesd
    from torch.utils.data import DataLoader as TorchLoader

    batch = 4
    n_batches = 6 if quick else 40
    reps = 2 if quick else 3

    def endless(make):
        while True:
            yield from make()

    def delivered(it) -> tuple[float, float, float]:
        for _ in range(3):
            next(it)
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n_batches):
                images, labels = next(it)
                assert images.shape[0] == batch and images.is_contiguous() and labels.is_contiguous()
            rates.append(batch * n_batches / (time.perf_counter() - t0))
        return spread(rates)

    rows = []
    queue = tio.Queue(tio.SubjectsDataset([subject]), max_length=64, samples_per_volume=64, sampler=label_sampler,
                      num_workers=0)
    loader = TorchLoader(queue, batch_size=batch, num_workers=0)
    batches = ((b["image"][tio.DATA], b["label"][tio.DATA]) for b in endless(lambda: loader))
    rows.append(dict(method=f"TorchIO Queue(LabelSampler) + DataLoader, batches of {batch}",
                     windows_s=delivered(batches), kind="peer_pipeline"))
    crop = RandCropByLabelClassesd(
        keys=["image", "label"], label_key="label", spatial_size=(W, W, W), ratios=[1, 1], num_classes=2,
        num_samples=batch, indices_key="label_cls_indices",
    )
    monai_loader = DataLoader(Dataset([with_indices] * 100_000, transform=crop), batch_size=1, num_workers=2,
                              persistent_workers=True)
    batches = ((b["image"].as_tensor(), b["label"].as_tensor()) for b in monai_loader)
    rows.append(dict(method=f"MONAI RandCropByLabelClassesd(num_samples={batch}) + DataLoader(num_workers=2)",
                     windows_s=delivered(batches), kind="peer_pipeline"))
    del batches, monai_loader
    print("peer pipelines done", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- report
def table(rows: list[dict]) -> str:
    # The target compares with the faster of the two layouts' copy floors.
    floor = max(r["windows_s"][0] for r in rows if "memory-copy floor" in r["method"])
    peer_aug = [r["windows_s"][0] for r in rows if r.get("kind") == "peer_augment"]
    best_peer_aug = max(peer_aug) if peer_aug else None
    ours_batches = next((r["windows_s"][0] for r in rows if r.get("kind") == "pipeline"
                         and r["method"].startswith("tf.data pipeline, 2 cores, plain")), None)
    lines = []
    header = ("method", "setup ms", "windows/s median [min-max]", "vs fastest floor", "note")
    body = []
    for r in rows:
        med, lo, hi = r["windows_s"]
        setup = "-" if r.get("setup_ms") is None else f"{r['setup_ms']:.1f}"
        note = ""
        if r.get("kind") == "augment" and best_peer_aug:
            note = f"{med / best_peer_aug:.2f}x the faster peer (target >= 2x)"
        elif r.get("kind") in ("pipeline", "augmented", "wait"):
            note = r["note"]
        elif r.get("kind") == "peer_pipeline" and ours_batches:
            note = f"ours (tf.data, 2 cores) {ours_batches / med:.2f}x"
        elif r.get("kind") == "sampler" and "ClassWeighted" in r["method"]:
            note = "target >= 90 % of the fastest floor, setup <= 20 ms"
        body.append((r["method"], setup, f"{med:.1f} [{lo:.1f}-{hi:.1f}]", f"{100 * med / floor:.0f} %", note))
    widths = [max(len(str(x[i])) for x in body + [header]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths)] + body:
        lines.append(" | ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    _peers.add_arguments(ap)
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds alternating the peers' samplers and ours, samples pooled (default 3; --quick: 1)")
    ap.add_argument("--section", choices=("ours", "peers", "peer-samplers"), default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--subject", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args()

    if args.section in ("peers", "peer-samplers"):
        print(json.dumps(peers(args.subject, args.quick, sampling_only=args.section == "peer-samplers")))
        return
    rounds = 1 if args.quick else max(1, args.rounds)

    peers_python = _peers.resolve(args)
    image, label = make_subject()
    print(
        f"subject: image {image.shape} float32, label {label.shape} uint8, tumour {label.mean() * 100:.2f} % of the volume; "
        f"window {W}^3; cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    volume, other, layout = volumes(image, label)
    print(f"the trainer stores this subject in {layout_name(layout)} (highres3d.samplers.fastest_layout)", flush=True)
    sampling_rounds, peer_other = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "subject.npz")
        if peers_python:
            np.savez(path, image=image, label=label)
        for round_ in range(rounds):
            # The peers' samplers and ours alternate: a slow spell of the machine hits both.
            round_rows = []
            if peers_python:
                section = "peers" if round_ == 0 else "peer-samplers"
                cmd = [peers_python, __file__, "--section", section, "--subject", path] + (["--quick"] if args.quick else [])
                print(f"round {round_ + 1}/{rounds}: peers ({section})", file=sys.stderr, flush=True)
                done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
                if done.returncode == 0:
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    round_rows += [r for r in result if "samples" in r]
                    peer_other += [r for r in result if "samples" not in r]
                else:
                    print(f"peer section failed (exit {done.returncode}); table without them this round", file=sys.stderr)
            print(f"round {round_ + 1}/{rounds}: highres3d samplers", file=sys.stderr, flush=True)
            round_rows += ours_sampling(volume, other, args.quick)
            sampling_rounds.append(round_rows)
    pooled = pool_rounds(sampling_rounds)
    ours_rows = [r for r in pooled if not r.get("kind", "").startswith("peer")]
    rows = ours_rows + ours_pipeline(volume, args.quick) + [r for r in pooled if r.get("kind", "").startswith("peer")]
    rows += peer_other
    print(table(rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter teardown can hang on tf.data threads still parked in numpy_function.
    os._exit(0)


if __name__ == "__main__":
    main()
