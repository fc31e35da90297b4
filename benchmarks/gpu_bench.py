"""GPU figures: HighResNet3D on Keras 3 (JAX backend) against MONAI's HighResNet on PyTorch, same GPU, same run.

Measured, per precision (float32; bfloat16 = Keras' ``mixed_bfloat16`` policy /
``torch.autocast(dtype=torch.bfloat16)``):

* forward and training-step windows/s at 96³ for batch 1, 2 and 4 (training
  step = forward, Dice loss, backward, Adam; both compiled: ``jit_compile``
  for ours, eager PyTorch for MONAI as its users run it);
* whole-volume inference of a 2×240×240×155 subject in one pass
  (``highres3d.inference.predict_volume(window_size=None)`` and one MONAI
  forward), seconds per subject;
* ours only: augmented windows/s of RandomAffine3D on the device (batches
  of 4 margin crops already there), the device's share of
  ``augmentation.device: accelerator``;
* ours only, in a process of its own limited to 2 host cores (``--part
  pipeline``): augmented windows/s delivered as batches with the volumes on
  the device, class-weighted positions drawn on the host (item 3 end to end),
  and the share of HighResNet3D's training step (batch 4, float32) that
  waits for input when that pipeline feeds it;
* last, float32 only: the same subject in 96³ windows (overlap 0.25,
  gaussian blending, 4 windows per call), ``predict_volume`` against MONAI's
  ``sliding_window_inference``, seconds per subject: what ``highres3d infer``
  does with a volume too large for one pass.

Targets (issue 12): training step ≥ 1.0× MONAI, whole volume < 1 s, augmented ≥ 1,000 windows/s
(on the device, and delivered with 2 host cores).

``benchmarks/gpu.sh`` sets up the environment and runs this; ``--quick`` (16³,
batch 1, one repetition, CPU is fine) is a smoke run.  ``--part ours`` or
``--part peer`` runs one side only (their JSON rows can be merged).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOLUME = (240, 240, 155)


def best(fn, reps: int, sync=lambda out: out) -> float:
    """Smallest wall time of ``reps`` calls after two untimed ones (compilation, autotuning)."""
    for _ in range(2):
        sync(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def jobs(args) -> list[tuple[str, object]]:
    """(precision, batch size or "whole") in the order they are measured: the figures with targets first.

    A run cut short by its time limit then still holds batch 1 and the whole
    volume in both precisions.
    """
    first = [(p, job) for p in args.precisions for job in (args.batches[0], "whole")]
    rest = [(p, b) for b in args.batches[1:] for p in args.precisions]
    return first + [(args.precisions[0], "augment")] + rest + [(args.precisions[0], "windows")]


class Rows(list):
    """Measured rows, written to ``--json`` after each one (atomically), so a killed run keeps what it measured."""

    def __init__(self, path: str | None, earlier: list[dict]):
        super().__init__(earlier)
        self.path = Path(path) if path else None

    def add(self, row: dict) -> None:
        self.append(row)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".partial")
            tmp.write_text(json.dumps(list(self), indent=1))
            os.replace(tmp, self.path)


AUGMENT_BATCH = 4
#: Windowed whole-volume inference: the defaults of ``highres3d infer`` but 4 windows per call.
WINDOW_OVERLAP, WINDOW_BATCH = 0.25, 4


def augmentation_rate(args) -> tuple[float, float]:
    """Augmented windows/s of ``augmentation.device: accelerator`` on this device (issue 12, item 3).

    RandomAffine3D (±10° per axis, ±10 % scaling, XLA-compiled resampling)
    turns batches of margin crops of two float32 channels and a label, already
    on the device, into windows of ``args.size``³: the device's share of the
    augmented pipeline. The CPU's share, delivering the crops or the window
    positions of volumes kept on the device, is measured by
    ``benchmarks/samplers.py`` on the CPU. Returns (windows/s of the compiled
    resampling, as in the training step; windows/s of the layer called alone).
    """
    import keras
    import numpy as np

    from highres3d.augment.layer import RandomAffine3D, compiled_resample_crops

    layer = RandomAffine3D(args.size, rotation_degrees=10.0, scale_range=0.1, seed=0)
    rng = np.random.default_rng(0)
    shape = (AUGMENT_BATCH,) + layer.crop_size
    crops = keras.ops.convert_to_tensor(rng.normal(size=shape + (2,)).astype("float32"))
    labels = keras.ops.convert_to_tensor(rng.integers(0, 2, size=shape).astype("uint8"))

    def ready(out):
        for tensor in out:
            getattr(tensor, "block_until_ready", lambda: None)()  # JAX dispatches asynchronously
        return out

    # Called on its own, the layer draws its parameters op by op (eagerly) before the compiled
    # resampling; inside the compiled training step the draw fuses with the rest. Both are timed.
    eager = best(lambda: layer((crops, labels), training=True), args.reps, ready)
    matrices, _, _ = layer._draw(AUGMENT_BATCH, 2)
    resample = compiled_resample_crops()
    compiled = best(lambda: resample(crops, labels, matrices, layer.window_size), args.reps, ready)
    return AUGMENT_BATCH / compiled, AUGMENT_BATCH / eager


#: Host cores of the delivered-pipeline row: the issue's "2 cores" feeding the accelerator.
PIPELINE_CORES = 2
PIPELINE_VOLUMES = 2


def pipeline_rate(args, rows: Rows) -> None:
    """Augmented windows/s delivered as batches with 2 host cores and the volumes on the device (item 3).

    What ``training.cache: device`` with ``augmentation.device: accelerator``
    does, end to end: the host draws class-weighted window positions
    (:class:`~highres3d.samplers.ClassWeightedSampler`, NumPy) for batches of
    4 from BraTS-size subjects held on the device; one compiled call cuts each
    window's margin crop from its resident subject and resamples it with
    RandomAffine3D (random draw included, through the layer's
    ``stateless_call``).  The process is limited to 2 host cores before JAX
    starts, so every thread it makes stays on them.  The cut is a
    ``jax.lax.dynamic_slice`` of each subject padded once by half a window + margin,
    standing in for ``ResidentVolumes.cut`` (TensorFlow, not on the GPU
    machine); the first batch is checked against the sampler's own crop.
    """
    cores = sorted(os.sched_getaffinity(0))[:PIPELINE_CORES]
    os.sched_setaffinity(0, cores)
    sys.path.insert(0, str(ROOT))
    import jax
    import keras
    import numpy as np

    from highres3d.augment.layer import RandomAffine3D
    from highres3d.samplers import ClassWeightedSampler
    from highres3d.samplers.base import crop

    batch, size = AUGMENT_BATCH, args.size
    layer = RandomAffine3D(size, rotation_degrees=10.0, scale_range=0.1, seed=0)
    margin, crop_size = np.array(layer.margin), layer.crop_size
    pad = size - size // 2 + int(margin.max())  # every crop of a 'pad'-edge window start lies inside
    sampler = ClassWeightedSampler(size)
    rng = np.random.default_rng(0)
    volumes, states, images, labels = [], [], [], []
    for _ in range(PIPELINE_VOLUMES):
        image = rng.standard_normal(args.volume + (2,), dtype=np.float32)
        grid = np.indices(args.volume, sparse=True)
        centre = [s // 2 + int(rng.integers(-s // 8, s // 8 + 1)) for s in args.volume]
        # A tumour-like ball, 1-2 % of the voxels: the class the sampler balances against background.
        radius = max(2, min(args.volume) // 8)
        label = (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)
        volume = type("Volume", (), dict(image=image, label=label, subject_id=f"synthetic-{len(volumes)}"))()
        volumes.append(volume)
        states.append(sampler.prepare(volume))
        images.append(np.pad(image, [(pad, pad)] * 3 + [(0, 0)], constant_values=sampler.pad_value))
        labels.append(np.pad(label, pad, constant_values=sampler.label_pad_value))
    images_dev, labels_dev = jax.device_put(np.stack(images)), jax.device_put(np.stack(labels))
    del images, labels

    def windows_rows():
        """(volume, crop start in the padded volume) per window: what the host sends each batch."""
        which = rng.integers(0, PIPELINE_VOLUMES, size=batch)
        starts = np.concatenate([sampler.locations(volumes[v], 1, rng, states[v]) for v in which])
        return np.concatenate([which[:, None], starts - margin + pad], axis=1).astype(np.int32)

    def cut(images, labels, row):
        image = jax.lax.dynamic_slice(images, (row[0], row[1], row[2], row[3], 0), (1,) + crop_size + (2,))[0]
        label = jax.lax.dynamic_slice(labels, (row[0], row[1], row[2], row[3]), (1,) + crop_size)[0]
        return image, label

    def step(state, images, labels, positions):
        image, label = jax.vmap(cut, in_axes=(None, None, 0))(images, labels, positions)
        (image, label), state = layer.stateless_call([], state, (image, label), training=True)
        return image, label, state

    step = jax.jit(step)
    first = windows_rows()
    image, label = jax.jit(jax.vmap(cut, in_axes=(None, None, 0)))(images_dev, labels_dev, first)
    for row, got, got_label in zip(first, np.asarray(image), np.asarray(label)):
        start = row[1:] - pad
        volume = volumes[row[0]]
        if not (np.array_equal(got, crop(volume.image, start, crop_size, sampler.pad_value))
                and np.array_equal(got_label, crop(volume.label, start, crop_size, sampler.label_pad_value))):
            raise AssertionError(f"pipeline: the device cut at {tuple(start)} is not the sampler's crop")
    layer.build(((batch,) + crop_size + (2,), (batch,) + crop_size))  # no weights: marks it ready for stateless_call
    state = [v.value for v in layer.non_trainable_variables]
    for _ in range(2):  # compilation
        out = step(state, images_dev, labels_dev, windows_rows())
        state = out[2]
        out[0].block_until_ready()
    batches = max(5, 20 * args.reps)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        image, label, state = step(state, images_dev, labels_dev, windows_rows())
    image.block_until_ready()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    row = dict(method="highres3d", precision="float32", what="pipeline", batch=batch, size=size,
               windows_s=batches * batch / seconds, seconds=seconds / batches, cores=len(cores),
               host_cpu_ms_per_window=cpu * 1e3 / (batches * batch), volumes=PIPELINE_VOLUMES,
               versions=f"keras {keras.__version__}, backend {keras.backend.backend()}")
    rows.add(row)  # saved before the training step is compiled: a time limit there keeps the delivered rate
    print(f"  ours delivered pipeline, {len(cores)} host cores, volumes on the device: {row['windows_s']:.0f} "
          f"augmented windows/s ({row['host_cpu_ms_per_window']:.2f} host CPU-ms a window)", file=sys.stderr, flush=True)
    row.update(_fed_training_step(args, step, state, images_dev, labels_dev, windows_rows))
    rows.save()
    print(f"  training step fed by it {row['step_fed_s'] * 1e3:.0f} ms, alone {row['step_alone_s'] * 1e3:.0f} ms: "
          f"{100 * row['wait_fraction']:.1f} % waiting for input", file=sys.stderr, flush=True)


def _fed_training_step(args, augment_step, augment_state, images_dev, labels_dev, positions) -> dict:
    """The share of a training step that waits for input when the pipeline above feeds it.

    HighResNet3D's float32 training step (Dice loss, Adam; Keras' stateless
    API under ``jax.jit``) on batches of 4, timed alone on one fixed batch and
    fed by the pipeline (host positions, then cut, augmentation and step in one
    compiled call).  The waiting share is ``1 - alone / fed``: what the input
    path adds to a step.
    """
    import jax
    import keras
    import numpy as np

    from highres3d.losses import DiceLoss
    from highres3d.models import HighResNet3D

    keras.utils.set_random_seed(0)
    model = HighResNet3D(in_channels=2, num_classes=2)
    model.build((None,) + (args.size,) * 3 + (2,))
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = DiceLoss()

    def loss_of(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    gradient = jax.value_and_grad(loss_of, has_aux=True)

    def train(state, x, y):
        trainable, non_trainable, slots = state
        (loss, non_trainable), grads = gradient(trainable, non_trainable, x, keras.ops.cast(y, "int32"))
        trainable, slots = optimizer.stateless_apply(slots, grads, trainable)
        return loss, (trainable, non_trainable, slots)

    def fed(state, aug_state, batch_positions):
        image, label, aug_state = augment_step(aug_state, images_dev, labels_dev, batch_positions)
        loss, state = train(state, image, label)
        return loss, state, aug_state

    alone, fed = jax.jit(train), jax.jit(fed)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    x, y, _ = augment_step(augment_state, images_dev, labels_dev, positions())
    steps = max(3, 2 * args.reps)

    def timed(call):
        nonlocal state, augment_state
        for i in range(steps + 2):  # two untimed: compilation
            if i == 2:
                t0 = time.perf_counter()
            loss, state, augment_state = call(state, augment_state)
        np.asarray(loss)
        return (time.perf_counter() - t0) / steps

    step_alone = timed(lambda state, aug: alone(state, x, y) + (aug,))
    step_fed = timed(lambda state, aug: fed(state, aug, positions()))
    return dict(step_alone_s=step_alone, step_fed_s=step_fed, wait_fraction=max(0.0, 1.0 - step_alone / step_fed))


@functools.cache
def subject(shape: tuple[int, int, int]):
    """The synthetic two-channel subject of the whole-volume rows, made once for all of them."""
    import numpy as np

    return np.random.default_rng(0).normal(size=shape + (2,)).astype("float32")


def ours(args, rows: Rows) -> None:
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    from highres3d.inference import predict_volume
    from highres3d.losses import DiceLoss
    from highres3d.models import HighResNet3D

    versions = f"keras {keras.__version__}, backend {keras.backend.backend()}"
    models = {}

    def model_for(precision):
        # The policy is read when the layers are built: one model per precision, kept for its later jobs.
        if precision not in models:
            keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
            keras.utils.set_random_seed(0)
            model = HighResNet3D(in_channels=2, num_classes=2)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=DiceLoss(), jit_compile=True)
            keras.mixed_precision.set_global_policy("float32")
            models[precision] = model
        return models[precision]

    for precision, job in jobs(args):
        if job == "augment":
            windows_s, layer_alone = augmentation_rate(args)
            rows.add(dict(method="highres3d", precision="float32", what="augment", batch=AUGMENT_BATCH,
                          size=args.size, seconds=AUGMENT_BATCH / windows_s, windows_s=windows_s,
                          layer_alone_windows_s=layer_alone, versions=versions))
            print(f"  ours augmentation {AUGMENT_BATCH}x{args.size}^3: {windows_s:.0f} windows/s compiled, "
                  f"{layer_alone:.0f} with the layer called alone", file=sys.stderr, flush=True)
            continue
        model = model_for(precision)
        if job == "windows":
            volume = subject(args.volume)
            seconds = best(lambda: predict_volume(model, volume, args.size, overlap=WINDOW_OVERLAP, blend="gaussian",
                                                  batch_size=WINDOW_BATCH), max(1, args.reps // 2))
            rows.add(dict(method="highres3d", precision=precision, what="windows", batch=WINDOW_BATCH,
                          size="x".join(map(str, args.volume)), window=args.size, seconds=seconds, versions=versions))
            print(f"  ours {precision} whole volume in {args.size}^3 windows: {seconds:.2f} s", file=sys.stderr,
                  flush=True)
            continue
        if job == "whole":
            volume = subject(args.volume)
            whole = best(lambda: predict_volume(model, volume, None), max(1, args.reps // 2))
            rows.add(dict(method="highres3d", precision=precision, what="whole volume", batch=1,
                          size="x".join(map(str, args.volume)), seconds=whole, versions=versions))
            print(f"  ours {precision} whole volume: {whole:.2f} s", file=sys.stderr, flush=True)
            continue
        batch = job
        rng = np.random.default_rng(batch)
        x = rng.normal(size=(batch,) + (args.size,) * 3 + (2,)).astype("float32")
        y = rng.integers(0, 2, size=(batch,) + (args.size,) * 3).astype("int32")
        fwd = best(lambda: model.predict_on_batch(x), args.reps, np.asarray)
        rows.add(dict(method="highres3d", precision=precision, what="forward", batch=batch, size=args.size,
                      seconds=fwd, windows_s=batch / fwd, versions=versions))
        train = best(lambda: model.train_on_batch(x, y), args.reps, np.asarray)
        rows.add(dict(method="highres3d", precision=precision, what="train", batch=batch, size=args.size,
                      seconds=train, windows_s=batch / train, versions=versions))
        print(f"  ours {precision} {batch}x{args.size}^3: fwd {fwd * 1e3:.1f} ms, train {train * 1e3:.1f} ms",
              file=sys.stderr, flush=True)


def peer(args, rows: Rows) -> None:
    import monai
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceLoss
    from monai.networks.nets import HighResNet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = (lambda out: torch.cuda.synchronize()) if device.type == "cuda" else (lambda out: out)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    versions = f"torch {torch.__version__}, monai {monai.__version__}, {name}"
    nets = {}
    for precision, job in jobs(args):
        if job == "augment":  # ours only: MONAI's augmentation runs on the CPU in its DataLoader
            continue
        if precision not in nets:
            torch.manual_seed(0)
            net = HighResNet(spatial_dims=3, in_channels=2, out_channels=2).to(device)
            nets[precision] = (net, torch.optim.Adam(net.parameters(), lr=1e-3))
        net, optimizer = nets[precision]
        loss_fn = DiceLoss(to_onehot_y=True, softmax=True)

        def autocast(precision=precision):
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")

        if job == "windows":
            volume = torch.randn(1, 2, *args.volume, device=device)

            def windows():
                net.eval()
                with torch.inference_mode(), autocast():
                    return sliding_window_inference(volume, (args.size,) * 3, WINDOW_BATCH, net, WINDOW_OVERLAP,
                                                    mode="gaussian").argmax(1).cpu()

            seconds = best(windows, max(1, args.reps // 2), sync)
            rows.add(dict(method="MONAI HighResNet", precision=precision, what="windows", batch=WINDOW_BATCH,
                          size="x".join(map(str, args.volume)), window=args.size, seconds=seconds, versions=versions))
            print(f"  MONAI {precision} whole volume in {args.size}^3 windows: {seconds:.2f} s", file=sys.stderr,
                  flush=True)
            del volume
            continue

        if job == "whole":
            volume = torch.randn(1, 2, *args.volume, device=device)

            def whole():
                net.eval()
                with torch.inference_mode(), autocast():
                    return net(volume).argmax(1).cpu()

            seconds = best(whole, max(1, args.reps // 2), sync)
            rows.add(dict(method="MONAI HighResNet", precision=precision, what="whole volume", batch=1,
                          size="x".join(map(str, args.volume)), seconds=seconds, versions=versions))
            print(f"  MONAI {precision} whole volume: {seconds:.2f} s", file=sys.stderr, flush=True)
            del volume
            continue
        batch = job
        x = torch.randn(batch, 2, *(args.size,) * 3, device=device)
        y = torch.randint(0, 2, (batch, 1, *(args.size,) * 3), device=device)

        def forward():
            net.eval()
            with torch.inference_mode(), autocast():
                return net(x)

        def train():
            net.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(net(x).float(), y)
            loss.backward()
            optimizer.step()

        fwd = best(forward, args.reps, sync)
        rows.add(dict(method="MONAI HighResNet", precision=precision, what="forward", batch=batch, size=args.size,
                      seconds=fwd, windows_s=batch / fwd, versions=versions))
        step = best(train, args.reps, sync)
        rows.add(dict(method="MONAI HighResNet", precision=precision, what="train", batch=batch, size=args.size,
                      seconds=step, windows_s=batch / step, versions=versions))
        print(f"  MONAI {precision} {batch}x{args.size}^3: fwd {fwd * 1e3:.1f} ms, train {step * 1e3:.1f} ms",
              file=sys.stderr, flush=True)


def table(rows: list[dict]) -> str:
    theirs = {(r["precision"], r["what"], r["batch"]): r for r in rows if r["method"] != "highres3d"}
    lines = ["| measurement | precision | ours | MONAI | MONAI time / ours | target |", "|---|---|---|---|---|---|"]
    order = {"forward": 0, "train": 1, "whole volume": 2, "windows": 3, "augment": 4, "pipeline": 5}
    ours_rows = sorted((r for r in rows if r["method"] == "highres3d"),
                       key=lambda r: (r["precision"] != "float32", r["batch"], order[r["what"]]))
    for r in ours_rows:
        p = theirs.get((r["precision"], r["what"], r["batch"]))
        ratio = f"{p['seconds'] / r['seconds']:.2f}" if p else "-"
        # Targets hold for the sizes only: a --quick run (16³, a small volume) is not judged.
        full = r["size"] == 96 or r["size"] == "x".join(map(str, VOLUME))

        def judged(text: str, met: bool) -> str:
            return f"{text} ({'met' if met else 'missed'})" if full else f"{text} (not judged: smoke-run size)"

        if r["what"] == "augment":
            alone = r.get("layer_alone_windows_s")
            lines.append(f"| augmented windows/s (RandomAffine3D's compiled resampling on device, batch {r['batch']} "
                         f"of {r['size']}³{f'; {alone:.0f} with the layer called alone' if alone else ''}) | float32 | "
                         f"{r['windows_s']:.0f} | - | - | {judged('≥ 1,000', r['windows_s'] >= 1000)} |")
            continue
        if r["what"] == "pipeline":
            fed = (f"; feeding HighResNet3D's training step: {r['step_fed_s'] * 1e3:.0f} ms a step against "
                   f"{r['step_alone_s'] * 1e3:.0f} ms alone, {100 * r['wait_fraction']:.1f} % waiting for input"
                   if "wait_fraction" in r else "")
            lines.append(f"| augmented windows/s delivered as batches of {r['batch']} of {r['size']}³, {r['cores']} host "
                         f"cores, volumes on the device (class-weighted positions from the host, cut + RandomAffine3D "
                         f"in one compiled call; {r['host_cpu_ms_per_window']:.2f} host CPU-ms a window{fed}) | "
                         f"float32 | {r['windows_s']:.0f} | - | - | {judged('≥ 1,000', r['windows_s'] >= 1000)} |")
            continue
        if r["what"] == "windows":
            lines.append(f"| whole volume {r['size']} in {r['window']}³ windows (overlap {WINDOW_OVERLAP}, gaussian, "
                         f"{r['batch']} per call), s | {r['precision']} | {r['seconds']:.2f} | "
                         f"{p['seconds']:.2f} | {ratio} | |" if p else
                         f"| whole volume {r['size']} in {r['window']}³ windows, s | {r['precision']} | "
                         f"{r['seconds']:.2f} | - | - | |")
            continue
        if r["what"] == "whole volume":
            name, value, other = f"whole volume {r['size']}, s", f"{r['seconds']:.2f}", f"{p['seconds']:.2f}" if p else "-"
            target = judged("< 1 s", r["seconds"] < 1)
        else:
            name = f"{r['what']} {r['batch']}x{r['size']}³, windows/s"
            value, other = f"{r['windows_s']:.1f}", f"{p['windows_s']:.1f}" if p else "-"
            target = ""
            if r["what"] == "train" and p:
                target = judged("≥ 1.0", p["seconds"] >= r["seconds"])
        lines.append(f"| {name} | {r['precision']} | {value} | {other} | {ratio} | {target} |")
    return "\n".join(lines)


#: Where the recorded GPU figures live in the repository; benchmarks/run_all.py renders them into docs/performance.md.
RECORD = ROOT / "benchmarks" / "results" / "gpu.json"


def record(rows: list[dict], path: Path, commit: str, measured: str, command: str) -> None:
    """Keep a GPU run's rows in the repository with what they measured: the commit, when, and the command.

    The GPU machine has no git and is given back after the run, so its rows are
    recorded here, on the machine that holds the repository.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(dict(commit=commit, measured=measured, command=command, rows=rows), indent=1) + "\n")
    os.replace(tmp, path)


def recorded_section(path: Path = RECORD) -> list[str]:
    """The lines of docs/performance.md's GPU section from the recorded run, or [] when none is recorded."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    versions = "; ".join(sorted({r["versions"] for r in data["rows"]}))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return [f"`{data['command']}` at commit `{data['commit']}`, measured {data['measured']} ({versions}); "
            f"recorded in `{where}`, which `benchmarks/run_all.py` renders here (it does not "
            "measure the GPU).", "", table(data["rows"])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("both", "ours", "pipeline", "peer", "none"), default="both",
                        help="which side to measure ('pipeline': the delivered augmented pipeline on 2 host cores, in a "
                             "process of its own; 'none': only print the table of --merge)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 16^3, batch 1, 32^3 volume, one rep")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], metavar="B",
                        help="batch sizes of the forward and training-step rows (default 1 2 4)")
    parser.add_argument("--json", metavar="PATH", help="write the rows here")
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON", help="rows of earlier parts to add")
    parser.add_argument("--record", nargs="?", const=str(RECORD), metavar="PATH",
                        help="with --part none: keep the merged rows in the repository (default %(const)s) for "
                             "docs/performance.md, with --commit, --measured and --command")
    parser.add_argument("--commit", help="the commit the GPU run measured (default: HEAD here)")
    parser.add_argument("--measured", help="when the GPU run measured (default: now, UTC)")
    parser.add_argument("--command", dest="gpu_command", default="bash benchmarks/gpu.sh",
                        help="the command that measured (default: %(default)s)")
    args = parser.parse_args()
    args.size, args.batches, args.volume = 96, tuple(args.batches), VOLUME
    args.precisions = ("float32", "bfloat16")
    if args.quick:
        args.size, args.batches, args.volume, args.reps = 16, (1,), (32, 32, 24), 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    earlier = [r for path in args.merge if Path(path).is_file() for r in json.loads(Path(path).read_text())]
    rows = Rows(args.json, earlier)
    if args.part in ("both", "ours"):
        ours(args, rows)
    if args.part == "pipeline":
        pipeline_rate(args, rows)
    if args.part in ("both", "peer"):
        peer(args, rows)
    if args.part == "none":
        rows.save()  # the merged rows
        if args.record:
            if not rows:
                parser.error("--record: no rows to record (name the GPU run's JSON files with --merge)")
            import datetime
            import subprocess

            commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                   capture_output=True, text=True).stdout.strip()
            measured = args.measured or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            record(list(rows), Path(args.record), commit, measured, args.gpu_command)
    print("; ".join(sorted({r["versions"] for r in rows})))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
