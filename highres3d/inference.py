"""Whole-volume prediction: a grid of windows (or one pass) through a model, stitched back.

``predict_volume`` works on a preprocessed (X, Y, Z, C) array with any model
that maps a (B, x, y, z, C) batch to (B, x, y, z, K) logits: a Keras model
(called through its compiled ``predict_on_batch``) or any callable returning
something ``numpy.asarray`` accepts.  ``predict_subject`` adds the training
preprocessing in front and the mapping back onto the input file's original
grid behind it.  ``load_run`` finds a trained model and the config it was
trained with.

Modes and what they cost (docs/inference.md has the figures):

* whole volume (``window_size=None``): one model call over the whole volume;
  exact (no window edges), usually the fastest, memory grows with the volume.
* windows with ``blend="crop"``: each voxel comes from the window where it is
  farthest from an interior edge; exact when that margin is at least the
  network's receptive-field radius (HighRes3DNet: 43 voxels, i.e. overlap ≥ 86).
* windows with ``average`` / ``gaussian``: smooth seams, approximate near
  window edges, the usual choice with small overlaps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from highres3d.aggregators.grid import GridAggregator, _thread_pool, argmax_channels
from highres3d.errors import ConfigError, DataError
from highres3d.memory import OutOfMemory, inference_advice, out_of_memory, out_of_memory_error
from highres3d.samplers.grid import GridSampler

__all__ = [
    "predict_volume", "predict_subject", "SubjectPrediction", "load_run", "mirror_axes", "as_predict_fn",
    "input_patterns", "predict_subjects", "resolve_precision", "native_bfloat16", "compute_precision", "predict_folder",
    "predict_folder_in_workers", "FolderPrediction", "SEG_SUFFIX", "PROB_SUFFIX",
]

#: Output file names: ``<subject>_seg.nii.gz`` (labels) and ``<subject>_prob.nii.gz`` (probabilities).
SEG_SUFFIX = "_seg.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"


def as_predict_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """A function batch -> numpy logits for a Keras model or any callable."""
    predict_on_batch = getattr(model, "predict_on_batch", None)
    if predict_on_batch is not None:
        # Keras' compiled predict step is several times faster than an eager call.
        def run(batch):
            out = predict_on_batch(batch)
            return out[0] if isinstance(out, (list, tuple)) else out
    else:
        run = model

    def predict(batch: np.ndarray) -> np.ndarray:
        out = run(batch)
        if hasattr(out, "numpy"):
            out = out.numpy()
        return np.asarray(out)

    return predict


#: Per Keras model, per precision: the model extended by :func:`_margin_layer` (same layers, same weights).
_MARGIN_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def _margin_layer() -> type:
    import keras

    class TwoClassMargin(keras.layers.Layer):
        """``(B, x, y, z, 2) -> (B, x, y, z)``: ``scores[..., 1] - scores[..., 0]``, in float32."""

        def __init__(self, **kwargs):
            super().__init__(dtype="float32", **kwargs)

        def call(self, scores):
            return scores[..., 1] - scores[..., 0]

        def compute_output_shape(self, input_shape):
            return tuple(input_shape[:-1])

    return TwoClassMargin


def two_class_margin_fn(model, precision: str = "float32") -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """A predict function returning ``l1 - l0`` per voxel, computed inside the model's compiled call.

    Two-class labels need only the sign of the (blended) difference of the
    two output channels, whether they are logits or probabilities: a positive
    weighted mean does not change it. Computed inside the compiled call, the
    model hands over one float32 channel instead of two, and stitching reads
    half the bytes. Returns None where that does not apply (not a functional
    Keras model with one (B, x, y, z, 2) output); the caller then subtracts in
    NumPy. One extended model per precision is kept, so each is traced once
    under its precision's layer policies.
    """
    try:
        import keras
    except ImportError:
        return None
    if not isinstance(model, keras.Model):
        return None
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return None
    if not inputs or not outputs or len(outputs) != 1 or len(outputs[0].shape) != 5 or outputs[0].shape[-1] != 2:
        return None
    per_precision = _MARGIN_MODELS.setdefault(model, {})
    if precision not in per_precision:
        per_precision[precision] = keras.Model(inputs, _margin_layer()()(outputs[0]), name=f"{model.name}_margin")
    return as_predict_fn(per_precision[precision])


def _cpu_has_bfloat16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def _backend_gpus() -> list[tuple[str, Optional[tuple[int, int]]]]:
    """(name, CUDA compute capability or None) of every GPU the Keras backend computes on.

    The backend's own view, capabilities included; :func:`highres3d.workers.visible_gpus` is the
    other probe, which names the GPUs to deal out to workers without starting TensorFlow.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = []
        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            capability = details.get("compute_capability")
            gpus.append((details.get("device_name", device.name), tuple(capability) if capability else None))
        return gpus
    if backend == "jax":
        import jax

        gpus = []
        for device in jax.devices():
            if device.platform != "gpu":
                continue
            capability = getattr(device, "compute_capability", None)
            gpus.append((device.device_kind, tuple(int(v) for v in str(capability).split(".")) if capability else None))
        return gpus
    if backend == "torch":
        import torch

        return [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                for i in range(torch.cuda.device_count())]
    return []


#: NVIDIA GPUs compute bfloat16 natively (tensor cores) from Ampere, compute capability 8.0, on.
BFLOAT16_MIN_COMPUTE_CAPABILITY = (8, 0)


def native_bfloat16() -> tuple[bool, str]:
    """Whether the device the model computes on has native bfloat16 arithmetic, and why.

    With a GPU visible to the Keras backend the GPU decides, not the CPU:
    bfloat16 needs compute capability 8.0 (Ampere) or newer on every visible
    GPU; a V100 or T4 emulates it, however new the host's CPU.  Without a GPU,
    the CPU needs AVX512_BF16 or AMX (``lscpu``).
    """
    gpus = _backend_gpus()
    if gpus:
        def describe(name, capability):
            return f"{name} (compute capability {'.'.join(map(str, capability)) if capability else 'unknown'})"

        slow = [describe(*gpu) for gpu in gpus if gpu[1] is None or gpu[1] < BFLOAT16_MIN_COMPUTE_CAPABILITY]
        if slow:
            return False, f"GPU {', '.join(slow)} has no native bfloat16 (needs compute capability 8.0+)"
        return True, f"GPU {', '.join(describe(*gpu) for gpu in gpus)} computes bfloat16 natively"
    if _cpu_has_bfloat16():
        return True, "this CPU computes bfloat16 natively (avx512_bf16 / amx_bf16)"
    return False, "this CPU has no native bfloat16 (no avx512_bf16 / amx_bf16), so it would be emulated"


def resolve_precision(precision: str = "auto") -> str:
    """``inference.precision`` as ``"float32"`` or ``"bfloat16"``.

    Args:
        precision: ``"auto"`` (bfloat16 where the compute device has native
            bfloat16 arithmetic, see :func:`native_bfloat16`: there it
            measured 2.4x faster at equal Dice on a CPU; float32 elsewhere,
            where bfloat16 is emulated), ``"float32"`` or ``"bfloat16"``.
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"inference.precision: expected auto, float32 or bfloat16, got {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if native_bfloat16()[0] else "float32"


#: Each model's compiled bfloat16 predict function, kept between calls: tracing the full network
#: costs seconds, as much as a whole 64³ pass, and would otherwise be paid at every subject.
_BFLOAT16_PREDICT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def compute_precision(model, precision: str):
    """Run a Keras model's layers in ``precision`` (float32 weights kept), restoring them afterwards.

    The model's compiled predict function of each precision is kept, so
    alternating precisions, or predicting subject after subject in bfloat16,
    traces the network once per precision (and input shape), not at every call.

    Args:
        model: a Keras model; anything else is left as it is.
        precision: ``"float32"`` or ``"bfloat16"`` (Keras' ``mixed_bfloat16`` policy).
    """
    import keras

    from highres3d.models import all_layers

    layers = all_layers(model) if precision == "bfloat16" and isinstance(model, keras.Model) else []
    saved = [layer.dtype_policy for layer in layers]
    float32_predict = getattr(model, "predict_function", None) if layers else None
    try:
        for layer in layers:
            layer.dtype_policy = "mixed_bfloat16"
        if layers:
            # A function traced in float32 would ignore the new policies: use the bfloat16 one (or trace it).
            model.predict_function = _BFLOAT16_PREDICT.get(model)
        yield model
    finally:
        for layer, policy in zip(layers, saved):
            layer.dtype_policy = policy
        if layers:
            if model.predict_function is not None:
                _BFLOAT16_PREDICT[model] = model.predict_function
            model.predict_function = float32_predict


def mirror_axes(tta_mirror: Union[bool, Sequence[int]]) -> list[tuple[int, ...]]:
    """Axis combinations for mirroring test-time augmentation (identity first).

    ``True`` means all 8 combinations of the three spatial axes (nnU-Net's
    default); a sequence of axes limits the flips to those (e.g. ``(0,)`` for a
    left-right flip only, when training only flipped that axis).
    """
    if tta_mirror is False or tta_mirror is None:
        return [()]
    axes = (0, 1, 2) if tta_mirror is True else tuple(sorted(set(int(a) for a in tta_mirror)))
    if any(a not in (0, 1, 2) for a in axes):
        raise ConfigError(f"tta_mirror: axes must be among 0, 1, 2; got {list(axes)}")
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


@functools.cache
def _stitch_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="highres3d-stitch")


def _predict_batch(predict: Callable, batch: np.ndarray, combos: list[tuple[int, ...]]) -> np.ndarray:
    if combos == [()]:
        # The aggregator only reads the output: no copy (the model may return its own buffer).
        return np.asarray(predict(batch), dtype=np.float32)
    total = None
    for combo in combos:
        flipped = np.ascontiguousarray(np.flip(batch, axis=tuple(a + 1 for a in combo))) if combo else batch
        out = predict(flipped)
        if combo:
            out = np.flip(out, axis=tuple(a + 1 for a in combo))
        if total is None:
            total = np.array(out, dtype=np.float32, copy=True)
        else:
            total += out
    if len(combos) > 1:
        total /= len(combos)
    return total


def predict_volume(
    model,
    image: np.ndarray,
    window_size: Optional[Union[int, Sequence[int]]] = (144, 144, 144),
    *,
    overlap: Union[float, int, Sequence] = 0.25,
    border: Optional[Union[int, Sequence[int]]] = None,
    blend: str = "gaussian",
    batch_size: int = 1,
    output: str = "labels",
    tta_mirror: Union[bool, Sequence[int]] = False,
    pad_mode: str = "constant",
    pad_value: float = 0.0,
    sigma_scale: float = 0.125,
    from_logits: Optional[bool] = None,
    progress: Union[bool, None] = False,
    precision: str = "float32",
) -> np.ndarray:
    """Predict a whole (X, Y, Z, C) volume with a model trained on windows.

    Args:
        model: a Keras model or callable mapping (B, x, y, z, C) to (B, x, y, z, K) logits;
            it must not write into its input (a single window may arrive as a
            read-only view of the volume).
        image: the preprocessed volume, (X, Y, Z, C) or (X, Y, Z).
        window_size: window in voxels (int or triple); ``None`` = one
            whole-volume pass (exact, memory-hungry).
        overlap: between neighbouring windows, a fraction of the window
            (float < 1) or voxels (int).
        border: alternatively NiftyNet's border (voxels dropped per interior
            side, i.e. half the overlap).
        blend: ``"crop"``, ``"average"`` or ``"gaussian"`` (see
            :mod:`highres3d.aggregators.grid`).
        batch_size: windows per model call.
        output: ``"labels"`` (uint8 (X, Y, Z)), ``"probabilities"`` (softmax,
            float32 (X, Y, Z, K)) or ``"logits"`` (float32 (X, Y, Z, K)).
        tta_mirror: average over mirrored inputs: ``True`` (all 8 flips) or
            the axes to flip.
        pad_mode: how a volume smaller than the window is padded (a
            ``numpy.pad`` mode).
        pad_value: the value of ``constant`` padding.
        sigma_scale: Gaussian blending's sigma as a fraction of the window.
        from_logits: whether the model outputs logits; None reads the
            model's ``softmax`` attribute (HighResNet3D) and otherwise assumes logits.
        progress: show a progress bar over the windows (None = when stderr is a terminal).
        precision: compute precision of a Keras model, ``"float32"``,
            ``"bfloat16"`` or ``"auto"`` (see :func:`resolve_precision`);
            other callables run as they are.
    """
    precision = resolve_precision(precision)
    with compute_precision(model, precision):
        return _predict_volume(model, image, window_size, overlap=overlap, border=border, blend=blend,
                               batch_size=batch_size, output=output, tta_mirror=tta_mirror, pad_mode=pad_mode,
                               pad_value=pad_value, sigma_scale=sigma_scale, from_logits=from_logits, progress=progress,
                               precision=precision)


def _predict_volume(model, image, window_size, *, overlap, border, blend, batch_size, output, tta_mirror, pad_mode,
                    pad_value, sigma_scale, from_logits, progress, precision) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise DataError(f"predict_volume: expected an (X, Y, Z, C) array, got shape {image.shape}")
    if batch_size < 1:
        raise ConfigError(f"inference.batch_size: expected a positive integer, got {batch_size}")
    image = image.astype(np.float32, copy=False)
    sampler = GridSampler(image.shape[:3], window_size, overlap=overlap, border=border)
    padded = sampler.pad(image, mode=pad_mode, constant_values=pad_value)
    if len(sampler) == 1:
        # One window has nothing to blend; writing it directly is exact and needs no accumulator.
        blend = "crop"
    margin = two_class_margin_fn(model, precision) if output == "labels" else None
    predict = margin or as_predict_fn(model)
    combos = mirror_axes(tta_mirror)
    locations = sampler.locations
    wx, wy, wz = sampler.window
    batches = range(0, len(locations), batch_size)
    if progress is not False:
        from highres3d.progress import track

        batches = track(batches, "windows", unit="batches", enabled=progress)
    aggregator = None
    pending = None
    buffer = None
    pool = _thread_pool(None)
    stitcher = _stitch_thread() if pool is not None and len(locations) > batch_size else None
    for first in batches:
        locs = locations[first:first + batch_size]
        if len(locs) == 1 and (sampler.window == sampler.padded_shape or combos == [()]):
            # One window goes to the model as a read-only view: converting a strided
            # view to a tensor costs no more than a contiguous array, so copying it
            # first would be a second, wasted copy.
            x, y, z = locs[0]
            batch = padded[None, x:x + wx, y:y + wy, z:z + wz]
            batch.flags.writeable = False
        else:
            if buffer is None or len(buffer) != len(locs):
                buffer = np.empty((len(locs), wx, wy, wz, image.shape[-1]), dtype=np.float32)
            jobs = [(i, lo) for i in range(len(locs)) for lo in range(0, wx, 8)]

            def copy_block(job, locs=locs):
                i, lo = job
                x, y, z = locs[i]
                hi = min(lo + 8, wx)
                buffer[i, lo:hi] = padded[x + lo:x + hi, y:y + wy, z:z + wz]

            if pool is None:
                for job in jobs:
                    copy_block(job)
            else:
                list(pool.map(copy_block, jobs))
            batch = buffer
        logits = _predict_batch(predict, batch, combos)
        if aggregator is None:
            if logits.ndim != (4 if margin else 5):
                raise DataError(f"predict_volume: the model returned shape {logits.shape}; expected (B, x, y, z, classes)")
            if from_logits is None:
                from_logits = not bool(getattr(model, "softmax", False))
            aggregator = GridAggregator(
                sampler, 2 if margin else logits.shape[-1], blend=blend, output=output, sigma_scale=sigma_scale,
                from_logits=from_logits,
            )
        # Stitching runs in a thread of its own while the model computes the next
        # batch; waiting for the previous batch first keeps one batch in flight.
        if pending is not None:
            pending.result()
        pending = stitcher.submit(aggregator.add_batch, logits, locs) if stitcher is not None else None
        if stitcher is None:
            aggregator.add_batch(logits, locs)
    if pending is not None:
        pending.result()
    return aggregator.result()


# --------------------------------------------------------------------------- subjects and runs


@dataclass
class SubjectPrediction:
    """A subject's prediction on the original grid of its first image file."""

    subject_id: str
    labels: np.ndarray  # original grid, uint8 class indices
    probabilities: Optional[np.ndarray]  # original grid (X, Y, Z, K) float32, or None
    info: object  # highres3d.io.nifti.SpatialInfo of the first modality
    seconds: dict  # "load", "predict", "restore" wall times


def predict_subject(
    model,
    subject,
    config,
    *,
    probabilities: bool = False,
    tta_mirror: Optional[Union[bool, Sequence[int]]] = None,
    whole_volume: Optional[bool] = None,
    window_size: Optional[Sequence[int]] = None,
    overlap: Optional[float] = None,
    blend: Optional[str] = None,
    batch_size: Optional[int] = None,
    progress: Union[bool, None] = False,
    precision: Optional[str] = None,
) -> SubjectPrediction:
    """Preprocess a subject as in training, predict, and map back to its original grid.

    ``config`` is the run's :class:`highres3d.config.Config`: its
    ``preprocessing`` and ``dataset.modalities`` define the input exactly as
    the model saw it in training, its ``inference`` section the windows; the
    keyword arguments override the latter.  Labels return to the original
    grid by nearest neighbour, probabilities by linear interpolation.
    """
    volume, load_s = _load_for_prediction(subject, config)
    result, predict_s = _predict_loaded(
        model, volume, config, probabilities=probabilities, tta_mirror=tta_mirror, whole_volume=whole_volume,
        window_size=window_size, overlap=overlap, blend=blend, batch_size=batch_size, progress=progress,
        precision=precision)
    labels, probs, restore_s = _restore(result, volume.info, probabilities)
    return SubjectPrediction(subject.id, labels, probs, volume.info,
                             {"load": load_s, "predict": predict_s, "restore": restore_s})


# The three stages of predict_subject, separate so that predict_subjects can overlap one subject's
# loading and another's restoring and writing with the model's work on a third.
def _load_for_prediction(subject, config):
    """The subject's images preprocessed as in training, and the seconds it took."""
    from highres3d.data.preprocess import load_volume

    t0 = time.perf_counter()
    # Prediction needs only the images: a label (and its mapping) is evaluation's business.
    images_only = dataclasses.replace(subject, label=None) if getattr(subject, "label", None) is not None else subject
    volume = load_volume(images_only, config.preprocessing, config.dataset.modalities, label_required=False)
    return volume, time.perf_counter() - t0


def _predict_loaded(model, volume, config, *, probabilities: bool, tta_mirror, whole_volume, window_size, overlap, blend,
                    batch_size, progress, precision):
    """``predict_volume`` with the run's ``inference`` settings under the overrides given; and its seconds."""
    inf = config.inference
    whole = (inf.mode == "whole_volume") if whole_volume is None else whole_volume
    window = None if whole else tuple(window_size or inf.window_size)
    batch_size = batch_size or inf.batch_size
    precision = resolve_precision(precision or inf.precision)
    t0 = time.perf_counter()
    try:
        result = predict_volume(
            model,
            volume.image,
            window,
            overlap=inf.overlap if overlap is None else overlap,
            blend=blend or inf.blend,
            batch_size=batch_size,
            output="probabilities" if probabilities else "labels",
            tta_mirror=inf.tta_mirror if tta_mirror is None else tta_mirror,
            progress=progress,
            precision=precision,
        )
    except Exception as err:
        found = out_of_memory(err)
        if found is None:
            raise
        shape = "x".join(map(str, volume.image.shape[:3]))
        what = (f"the whole-volume pass over {shape} voxels" if window is None else
                f"{'x'.join(map(str, window))} windows of a {shape} volume, batch {batch_size}, {precision}")
        raise out_of_memory_error(what, found, inference_advice(window, batch_size, precision, found[0])) from err
    return result, time.perf_counter() - t0


def _restore(result: np.ndarray, info, probabilities: bool):
    """Labels (and probabilities) back on the input's original grid, and the seconds it took."""
    from highres3d.io.nifti import to_original_grid

    t0 = time.perf_counter()
    if probabilities:
        labels = argmax_channels(result, np.uint8 if result.shape[-1] <= 256 else np.uint16)
        probs = to_original_grid(result, info, order=1)
    else:
        labels, probs = result, None
    labels = to_original_grid(labels, info, order=0)
    return labels, probs, time.perf_counter() - t0


def load_run(model_path: str | Path, config_path: Optional[str | Path] = None):
    """Load a trained Keras model and the config it was trained with.

    ``model_path`` is a run folder (uses ``best.keras``, else ``model.keras``,
    and ``config.yaml``) or a ``.keras`` file (its folder's ``config.yaml``
    unless ``config_path`` is given).  Returns ``(model, config, model_file)``.
    """
    from highres3d.transfer import load_model

    model_file, config_path, config = _run_files(model_path, config_path)
    model = load_model(model_file)
    try:
        in_channels = model.inputs[0].shape[-1]
    except (AttributeError, IndexError, TypeError):  # a subclassed model has no symbolic inputs
        in_channels = getattr(model, "in_channels", None)
    if in_channels is not None and in_channels != len(config.dataset.modalities):
        raise ConfigError(
            f"{config_path}: dataset.modalities lists {len(config.dataset.modalities)} modalities "
            f"({', '.join(config.dataset.modalities)}) but {model_file} takes {in_channels} input channels"
        )
    return model, config, model_file


def _run_files(model_path: str | Path, config_path: Optional[str | Path]):
    """``(model_file, config_path, config)`` of :func:`load_run`, checked without loading the model."""
    from highres3d.config import load_config
    from highres3d.transfer import resolve_source

    model_file = resolve_source(model_path)
    if not model_file.name.endswith(".keras"):
        raise DataError(f"{model_file}: expected a run folder or a .keras model file")
    if config_path is None:
        config_path = model_file.parent / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(
                f"{config_path}: not found; the model's preprocessing is unknown. Pass --config with the "
                "config the model was trained with"
            )
    config = load_config(config_path)
    if config.datasets:
        raise ConfigError(
            f"{model_file}: a multi-domain pretrained trunk (one head per source dataset), not a segmentation model; "
            "use it as transfer.source of a target config (or --source-multi-domain) and segment with that run"
        )
    return model_file, config_path, config


# --------------------------------------------------------------------------- folders


@dataclass
class FolderPrediction:
    """What :func:`predict_subjects` / :func:`predict_folder` did, subject by subject."""

    output_dir: Path
    written: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def segmentation(self, subject_id: str) -> Path:
        """The label file of a subject."""
        return self.output_dir / f"{subject_id}{SEG_SUFFIX}"

    def summary(self) -> str:
        text = (f"done in {self.seconds:.1f} s: {len(self.written)} written, {len(self.existing)} already there "
                f"(--overwrite replaces them), {len(self.skipped)} skipped (missing input files), "
                f"{len(self.failed)} failed")
        if self.skipped:
            text += "\nskipped subjects:\n" + "\n".join(f"  {p}" for p in self.skipped)
        if self.failed:
            text += "\nfailed subjects:\n" + "\n".join(f"  {sid}: {msg}" for sid, msg in self.failed)
        return text


def input_patterns(config, input_dir: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Filename pattern (with ``{subject}``) of each input modality of a model.

    ``overrides`` are ``MODALITY=PATTERN`` strings (a bare ``PATTERN`` for a
    single-modality model); without them the run's config decides: its
    ``dataset.patterns``, or for an nnU-Net layout ``<case>_<channel index>`` files
    matched to the modalities **by name** through ``dataset.json`` (looked up in
    ``input_dir``, its parent, then the training ``dataset.root``), so a config
    listing its modalities in another order than ``dataset.json`` still reads
    the right file per channel.
    """
    from highres3d.data.dataset import read_nnunet_channels

    modalities = list(config.dataset.modalities)
    if overrides:
        patterns = {}
        for item in overrides:
            modality, sep, pattern = item.partition("=")
            if not sep:
                if len(modalities) != 1 or len(overrides) != 1:
                    raise ConfigError(
                        f"--pattern {item}: the model takes {len(modalities)} modalities ({', '.join(modalities)}); "
                        "give one --pattern MODALITY=PATTERN for each"
                    )
                modality, pattern = modalities[0], item
            if modality not in modalities:
                raise ConfigError(f"--pattern {item}: unknown modality {modality!r}; the model takes {', '.join(modalities)}")
            patterns[modality] = pattern
    elif config.dataset.layout == "nnunet":
        places = [Path(input_dir), Path(input_dir).parent] if input_dir is not None else []
        places += [Path(config.dataset.root)] if config.dataset.root is not None else []
        meta = next((p / "dataset.json" for p in places if (p / "dataset.json").is_file()), None)
        if meta is None:
            raise ConfigError(
                f"nnU-Net input: no dataset.json in {', '.join(map(str, places)) or 'any known folder'} to match "
                "channels to modalities by name; pass --pattern MODALITY={subject}_0000.nii.gz for each modality"
            )
        index, ending = read_nnunet_channels(meta, modalities)
        patterns = {m: f"{{subject}}_{index[m]:04d}{ending}" for m in modalities}
    else:
        patterns = {m: p for m, p in config.dataset.patterns.items() if m in modalities}
    missing = [m for m in modalities if m not in patterns]
    if missing:
        raise ConfigError(
            f"no filename pattern for modality {', '.join(missing)}; pass --pattern {missing[0]}=... "
            "(e.g. {subject}_" + missing[0].lower() + ".nii.gz)"
        )
    for m, p in patterns.items():
        if "{subject}" not in p:
            raise ConfigError(f"pattern {p!r} for {m}: must contain {{subject}}")
    return patterns


def predict_subjects(
    model,
    config,
    subjects: Sequence,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    probabilities: bool = False,
    echo: Optional[Callable[[str], None]] = print,
    show_progress: Optional[bool] = None,
    **options,
) -> FolderPrediction:
    """Segment subjects into ``output_dir`` on their original grids; the loop behind ``infer``.

    Each subject gives ``<id>_seg.nii.gz`` (and ``<id>_prob.nii.gz`` with
    ``probabilities``), written atomically.  A subject whose outputs exist is
    skipped unless ``overwrite``; a subject that fails (unreadable file, out
    of memory) is recorded in :attr:`FolderPrediction.failed` and the others
    go on.  ``options`` go to :func:`predict_subject` (``tta_mirror``,
    ``whole_volume``, ``window_size``, ``overlap``, ``blend``, ``batch_size``,
    ``precision``).

    The model works on one subject while a thread loads the next and another
    restores and writes the previous one (as nnU-Net's background
    preprocessing and export do): on a GPU the model's share of a subject is
    under a second, less than reading and writing its files.  At most three
    subjects are in memory at once.
    """
    from highres3d.environment import require_usable_gpus
    from highres3d.io.nifti import save_like
    from highres3d.progress import Progress

    output_dir = Path(output_dir)
    require_usable_gpus(f"infer into {output_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    result = FolderPrediction(output_dir)
    started = time.perf_counter()
    say = echo or (lambda text: None)
    predict_options = _predict_options(options)  # a misspelt option stops here, not once per subject
    precision = predict_options["precision"] or config.inference.precision
    say(f"precision: {resolve_precision(precision)}" + (f" [auto: {native_bfloat16()[1]}]" if precision == "auto" else ""))

    advised = []

    def fail(subject, err: BaseException) -> None:
        if isinstance(err, OutOfMemory):
            # What to lower is said once; a folder of large subjects would repeat it for each.
            result.failed.append((subject.id, str(err).splitlines()[0]))
            say(f"{subject.id}: FAILED: {err if not advised else result.failed[-1][1]}")
            advised.append(subject.id)
            return
        result.failed.append((subject.id, f"{err.__class__.__name__}: {err}"))
        say(f"{subject.id}: FAILED: {result.failed[-1][1]}")

    def restore_and_write(prediction, info, seg_path: Path, prob_path: Path) -> tuple[float, float]:
        labels, probs, restore_s = _restore(prediction, info, probabilities)
        t0 = time.perf_counter()
        save_like(labels, info, seg_path, dtype=labels.dtype, overwrite=True)
        if probs is not None:
            save_like(probs, info, prob_path, dtype="float32", overwrite=True)
        return restore_s, time.perf_counter() - t0

    def finish(subject, seg_path: Path, written, load_s: float, predict_s: float) -> None:
        try:
            restore_s, write_s = written.result()
        except Exception as err:
            fail(subject, err)
        else:
            result.written.append(subject.id)
            say(f"{subject.id}: {load_s + predict_s + restore_s + write_s:.1f} s (load {load_s:.1f}, "
                f"predict {predict_s:.1f}, restore {restore_s:.1f}, write {write_s:.1f}) -> {seg_path}")
        progress.update()

    with Progress(len(subjects), "infer", unit="subjects", enabled=show_progress) as progress:
        todo = []
        for subject in subjects:
            paths = (output_dir / f"{subject.id}{SEG_SUFFIX}", output_dir / f"{subject.id}{PROB_SUFFIX}")
            if not overwrite and all(p.exists() for p in paths[: 2 if probabilities else 1]):
                result.existing.append(subject.id)
                progress.update()
            else:
                todo.append((subject, *paths))
        # Leaving the block (Ctrl-C included) waits for the load and the write in flight: nothing is
        # left half-written, and there is at most one of each.
        with ThreadPoolExecutor(1, thread_name_prefix="highres3d-load") as loader, \
                ThreadPoolExecutor(1, thread_name_prefix="highres3d-write") as writer:
            loading = loader.submit(_load_for_prediction, todo[0][0], config) if todo else None
            pending = None
            for k, (subject, seg_path, prob_path) in enumerate(todo):
                loaded = loading
                loading = loader.submit(_load_for_prediction, todo[k + 1][0], config) if k + 1 < len(todo) else None
                try:
                    with progress.phase(f"segmenting {subject.id}"):
                        volume, load_s = loaded.result()
                        prediction, predict_s = _predict_loaded(model, volume, config, probabilities=probabilities,
                                                                **predict_options)
                except Exception as err:
                    # One bad subject must not cost the others their segmentations; Ctrl-C still stops the run.
                    fail(subject, err)
                    progress.update()
                    continue
                if pending is not None:
                    finish(*pending)
                pending = (subject, seg_path, writer.submit(restore_and_write, prediction, volume.info, seg_path, prob_path),
                           load_s, predict_s)
                del prediction, volume
            if pending is not None:
                with progress.phase(f"writing {pending[0].id}"):
                    finish(*pending)
    result.seconds = time.perf_counter() - started
    return result


def _predict_options(options: dict) -> dict:
    """:func:`predict_subject`'s keyword arguments (but ``probabilities``), defaults filled in, for :func:`_predict_loaded`."""
    import inspect

    defaults = {name: parameter.default for name, parameter in inspect.signature(predict_subject).parameters.items()
                if parameter.kind is parameter.KEYWORD_ONLY and name != "probabilities"}
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {**defaults, **options}


def predict_folder(
    model,
    config,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    patterns: Sequence[str] = (),
    shard: Optional[str] = None,
    echo: Optional[Callable[[str], None]] = print,
    **kwargs,
) -> FolderPrediction:
    """Segment every subject found in ``input_dir`` (see :func:`input_patterns`) into ``output_dir``.

    ``shard="I/N"`` takes every N-th subject (in sorted order) from the I-th,
    numbered from 0.  Subjects lacking one of their modality files are listed
    in :attr:`FolderPrediction.skipped`.  Other arguments as :func:`predict_subjects`.
    """
    from highres3d.data.dataset import discover_subjects
    from highres3d.utils import parse_shard

    index, count = parse_shard(shard)
    input_dir = _input_folder(input_dir)
    problems: list[str] = []
    if config.dataset.layout == "niftynet_search" and not patterns:
        # A NiftyNet model finds new data with the filename rules it was trained with.
        from highres3d.niftynet.matching import subjects_in_folder

        found = {m: {"contains": list(config.dataset.search[m].filename_contains)} for m in config.dataset.modalities}
        subjects = subjects_in_folder(input_dir, config.dataset, problems)
    else:
        found = input_patterns(config, input_dir, patterns)
        subjects = discover_subjects(input_dir, found, list(config.dataset.modalities), problems)
    if not subjects:
        raise DataError(f"{input_dir}: no subjects match {found}; set --pattern")
    subjects = sorted(subjects, key=lambda s: s.id)[index::count]
    if echo is not None:
        echo(f"{len(subjects)} subject(s)" + (f" (shard {index}/{count})" if count > 1 else "") + f" -> {output_dir}")
        for problem in problems:
            echo(f"skipped {problem}")
    result = predict_subjects(model, config, subjects, output_dir, echo=echo, **kwargs)
    result.skipped = problems
    return result


def _input_folder(input_dir: str | Path) -> Path:
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(f"{input_dir}: input folder not found")
    return input_dir


def predict_folder_in_workers(
    model: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    workers: int,
    config: Optional[str | Path] = None,
    patterns: Sequence[str] = (),
    echo: Callable[[str], None] = print,
    **kwargs,
) -> FolderPrediction:
    """:func:`predict_folder` in ``workers`` processes on this machine, worker ``i`` segmenting shard ``i/N``.

    For a machine with several GPUs (each worker gets its own while there are
    enough, see :func:`highres3d.workers.gpu_placement`) or several CPUs (each
    worker gets ``max(1, CPUs // N)`` TensorFlow threads, and one subject's
    loading and writing overlap another's prediction).  Each worker loads the
    model itself: ``model`` and ``config`` as for :func:`load_run`.  Their
    lines come back prefixed ``[worker i/N]``; the result merges theirs, so a
    subject that fails in a worker is listed like in one process.

    Raises:
        ConfigError: for ``workers`` below 1.
        WorkerError: when a worker itself failed (a bad model file, out of
            memory while loading); the other workers' subjects are written.
    """
    import json
    import tempfile

    from highres3d.progress import count_noun
    from highres3d.workers import available_cpus, check_workers, run_in_workers

    check_workers(workers)
    # Checked here once, not in every worker: a wrong path would otherwise fail N times over.
    _run_files(model, config)
    _input_folder(input_dir)
    started = time.perf_counter()
    threads = max(1, available_cpus() // workers)
    echo(f"{workers} worker processes, {count_noun(threads, 'CPU thread')} each, worker i segmenting shard i/{workers}")
    with tempfile.TemporaryDirectory(prefix="highres3d-infer-") as reports:
        jobs = [{"model": str(model), "config": None if config is None else str(config), "input_dir": str(input_dir),
                 "output_dir": str(output_dir), "patterns": list(patterns), "shard": f"{i}/{workers}",
                 "report": str(Path(reports) / f"{i}.json"), "options": kwargs} for i in range(workers)]
        run_in_workers(_predict_worker, jobs, threads=threads, echo=echo,
                       hint="Run the same command again: the subjects already written are kept (skipped unless --overwrite)")
        parts = [json.loads(Path(job["report"]).read_text()) for job in jobs]
    result = FolderPrediction(Path(output_dir), seconds=time.perf_counter() - started)
    for part in parts:
        result.written += part["written"]
        result.existing += part["existing"]
        result.failed += [tuple(item) for item in part["failed"]]
        # Every worker lists the folder's incomplete subjects; each is said once.
        result.skipped += [problem for problem in part["skipped"] if problem not in result.skipped]
    return result


def _predict_worker(model: str, config: Optional[str], input_dir: str, output_dir: str, patterns: list[str], shard: str,
                    report: str, options: dict) -> None:
    """One worker of :func:`predict_folder_in_workers`: its shard, and what it did as JSON in ``report``."""
    import json

    from highres3d.utils import atomic_path

    loaded, cfg, model_file = load_run(model, config)
    print(f"model {model_file}")
    done = predict_folder(loaded, cfg, input_dir, output_dir, patterns=patterns, shard=shard, **options)
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps({"written": done.written, "existing": done.existing, "skipped": done.skipped,
                                   "failed": done.failed}))
