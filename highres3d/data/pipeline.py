"""tf.data input pipelines: windows from preprocessed volumes, batched for ``model.fit``.

Two sources
-----------
*In RAM* (a sequence of volumes): every volume is held in memory (a memory
estimate is printed) and only **window locations** flow through tf.data::

    volume order (shuffled each epoch, repeated)
      -> interleave over ``cycle_length`` volumes: ``windows_per_volume`` starts each
      -> shuffle(``shuffle_buffer``) of starts     (a few bytes each, so cheap)
      -> batch(``batch_size``)
      -> parallel map: copy each window straight into the batch buffer
         (CPU augmentation, if any, resamples straight into it too)
      -> prefetch

  so a window is copied once, from the volume into its batch.

*Lazy* (a sequence of zero-argument callables that return a volume): the
interleave loads ``cycle_length`` volumes in parallel and cuts
``windows_per_volume`` windows from each; the shuffle buffer then holds whole
windows (TorchIO's Queue without its synchronous refill).

Augmentation
------------
``augmentation=None``: plain windows.  With an
:class:`~highres3d.augment.AffineAugmentation`, ``augment_on="cpu"`` resamples
each window on the CPU inside the pipeline; ``augment_on="device"`` makes the
pipeline crop ``window + 2 * margin`` (see
:func:`~highres3d.augment.affine_margin`) and leaves the resampling to
:class:`~highres3d.augment.RandomAffine3D` in the training step, so the CPU
only copies.

Elements and determinism
------------------------
Each element is ``(image, label)``: ``image`` ``(B, X, Y, Z, C)`` float32
(``(B, C, X, Y, Z)`` with ``data_format="channels_first"``, which copies
faster out of :func:`~highres3d.samplers.channel_major` volumes; the consumer
then applies :func:`to_channels_last` on the device) and
``label`` ``(B, X, Y, Z)`` in ``label_dtype`` (``"uint8"`` by default: a quarter
of the bytes of int32, and Keras' sparse losses accept it; ``"int32"`` when
``label_pad_value`` is negative or classes exceed 255).  For a given ``seed``
the stream of batches is identical from run to run: volume order, window
locations and augmentation parameters all derive from the seed (through
``numpy.random.SeedSequence`` per volume visit), and every parallel stage
keeps its order.

Distribution
------------
``num_shards``/``shard_index`` or a ``tf.distribute.InputContext`` (from
``strategy.distribute_datasets_from_function``) give each input pipeline a
disjoint share: whole volumes when there are at least as many volumes as
shards, else every ``num_shards``-th window.  With an input context,
``batch_size`` is the global batch and each pipeline yields its per-replica
share.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, Optional

import numpy as np
import tensorflow as tf

from highres3d.augment.affine import AffineAugmentation
from highres3d.errors import ConfigError, DataError
from highres3d.memory import format_bytes
from highres3d.samplers.base import WindowSampler, crop

__all__ = ["crop_geometry", "make_training_dataset", "make_validation_dataset", "memory_estimate", "to_channels_last"]

AUTOTUNE = tf.data.AUTOTUNE
_LOCATION_TAG, _AUGMENT_TAG = 1, 2
DATA_FORMATS = ("channels_last", "channels_first")


def to_channels_last(images):
    """``(B, C, X, Y, Z)`` -> ``(B, X, Y, Z, C)``: the model's input layout (run it in the training step)."""
    return tf.transpose(images, (0, 2, 3, 4, 1))


def _is_loader(item: Any) -> bool:
    return callable(item) and not hasattr(item, "image")


class _Source:
    """Volumes (in RAM or behind loaders) plus the per-volume sampler state."""

    def __init__(self, volumes: Sequence[Any], sampler: WindowSampler) -> None:
        if len(volumes) == 0:
            raise ConfigError("training data: the list of volumes is empty")
        kinds = {_is_loader(v) for v in volumes}
        if len(kinds) > 1:
            raise ConfigError("training data: give either volumes or loader callables, not a mix")
        self.lazy = kinds.pop()
        self.volumes = list(volumes)
        self.sampler = sampler
        self._states: list[Any] = [None] * len(self.volumes)
        if not self.lazy:
            for i in range(len(self.volumes)):
                self.volume(i)

    def __len__(self) -> int:
        return len(self.volumes)

    def volume(self, i: int) -> Any:
        v = self.volumes[i]() if self.lazy else self.volumes[i]
        if getattr(v, "label", None) is None:
            raise DataError(f"subject {getattr(v, 'subject_id', i)}: training windows need a label map")
        return v

    def state(self, i: int, volume: Any) -> Any:
        if self.lazy:
            return self.sampler.prepare(volume)
        if self._states[i] is None:
            # Built on first visit; a race only duplicates a few ms of work.
            self._states[i] = self.sampler.prepare(volume)
        return self._states[i]

    def first(self) -> Any:
        return self.volume(0)


class _Cutter:
    """Copies (or resamples) windows described by location specs into batch buffers."""

    def __init__(
        self,
        source: _Source,
        out_size: tuple[int, int, int],
        in_channels: int,
        label_dtype: np.dtype,
        augmentation: Optional[AffineAugmentation],
        margin: tuple[int, int, int],
        seed_prefix: tuple[int, ...],
        channels_first: bool = False,
    ) -> None:
        self.source = source
        self.out_size = out_size
        self.in_channels = in_channels
        self.label_dtype = label_dtype
        self.augmentation = augmentation
        self.margin = np.asarray(margin, dtype=np.int64)
        self.seed_prefix = seed_prefix
        self.channels_first = channels_first
        self._pools: dict[int, _BufferPool] = {}

    def starts(self, visit: int, index: int, count: int, rng_tag: int = _LOCATION_TAG) -> np.ndarray:
        """Spec rows ``[volume, x, y, z, visit, j]`` for ``count`` windows of one volume visit."""
        volume = self.source.volume(index)
        rng = np.random.default_rng(self.seed_prefix + (int(visit), rng_tag))
        starts = self.source.sampler.locations(volume, count, rng, self.source.state(index, volume))
        spec = np.empty((count, 6), dtype=np.int64)
        spec[:, 0] = index
        spec[:, 1:4] = starts
        spec[:, 4] = visit
        spec[:, 5] = np.arange(count)
        return spec

    def cut(self, specs: np.ndarray, volume: Any = None) -> tuple[np.ndarray, np.ndarray]:
        n = specs.shape[0]
        pool = self._pools.get(n)
        if pool is None:
            shape = (n,) + self.out_size
            image_shape = (n, self.in_channels) + self.out_size if self.channels_first else shape + (self.in_channels,)
            pool = self._pools.setdefault(n, _BufferPool(image_shape, shape, self.label_dtype))
        image, label = pool.get(n)
        # Windows are written through an (X, Y, Z, C) view whichever the buffer's order.
        windows = np.moveaxis(image, 1, 4) if self.channels_first else image
        sampler = self.source.sampler
        for b in range(n):
            vol = volume if volume is not None else self.source.volume(int(specs[b, 0]))
            start = specs[b, 1:4]
            if self.augmentation is not None:
                rng = np.random.default_rng(self.seed_prefix + (int(specs[b, 4]), _AUGMENT_TAG, int(specs[b, 5])))
                self.augmentation.window(
                    vol,
                    start,
                    self.out_size,
                    rng,
                    pad_value=sampler.pad_value,
                    label_pad_value=sampler.label_pad_value,
                    out_image=windows[b],
                    out_label=label[b],
                )
            else:
                start = start - self.margin
                crop(vol.image, start, self.out_size, sampler.pad_value, windows[b])
                crop(vol.label, start, self.out_size, sampler.label_pad_value, label[b])
        return image, label

    def visit_windows(self, visit: int, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Lazy mode: load one volume, cut ``count`` windows from it."""
        volume = self.source.volume(index)
        rng = np.random.default_rng(self.seed_prefix + (int(visit), _LOCATION_TAG))
        starts = self.source.sampler.locations(volume, count, rng, self.source.state(index, volume))
        spec = np.empty((count, 6), dtype=np.int64)
        spec[:, 0], spec[:, 1:4], spec[:, 4], spec[:, 5] = index, starts, visit, np.arange(count)
        return self.cut(spec, volume)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: TensorFlow adopts such buffers without a copy."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class _BufferPool:
    """Recycles batch buffers once nothing but the pool refers to them.

    Fresh 28 MB buffers cost a page fault per 4 kB on first write (a third of
    a crop's time here).  TensorFlow keeps a reference to the ndarray it
    adopted for as long as its tensor lives, so a buffer whose only owner is
    the pool is safe to overwrite.
    """

    def __init__(self, image_shape: tuple[int, ...], label_shape: tuple[int, ...], label_dtype, limit: int = 16) -> None:
        self.image_shape, self.label_shape, self.label_dtype = image_shape, label_shape, label_dtype
        self.limit = limit
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._lock = threading.Lock()
        probe = [(np.empty(1), np.empty(1))]
        self._idle_refs = self._refs(probe, 0)

    @staticmethod
    def _refs(pairs, i) -> int:
        pair = pairs[i]
        return min(sys.getrefcount(pair[0]), sys.getrefcount(pair[1])) + max(
            sys.getrefcount(pair[0]), sys.getrefcount(pair[1])
        )

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if n != self.image_shape[0]:
            return _aligned_empty((n,) + self.image_shape[1:], np.float32), _aligned_empty(
                (n,) + self.label_shape[1:], self.label_dtype
            )
        with self._lock:
            for i in range(len(self._pairs)):
                if self._refs(self._pairs, i) <= self._idle_refs:
                    pair = self._pairs.pop(i)
                    self._pairs.append(pair)
                    # A new tuple takes references inside the lock, so no other thread sees it idle.
                    return pair[0], pair[1]
            pair = (_aligned_empty(self.image_shape, np.float32), _aligned_empty(self.label_shape, self.label_dtype))
            if len(self._pairs) < self.limit:
                self._pairs.append(pair)
            return pair[0], pair[1]


def _options() -> tf.data.Options:
    """Deterministic pipelines without tf.data's autotuning thread.

    Deleting an iterator waits for that thread to leave its sleep, which took
    30-40 s after a training (TensorFlow 2.21, one CPU thread per worker
    process): the run folder was done and nothing printed.  The parallelism
    ``AUTOTUNE`` then stands for is the number of CPUs.
    """
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = False
    return options


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"pipeline {name}: expected a positive integer, got {v!r}")


def _label_dtype(name: str, sampler: WindowSampler) -> np.dtype:
    if name not in ("uint8", "int32"):
        raise ConfigError(f"pipeline label_dtype: expected 'uint8' or 'int32', got {name!r}")
    dtype = np.dtype(name)
    info = np.iinfo(dtype)
    if not info.min <= sampler.label_pad_value <= info.max:
        raise ConfigError(
            f"pipeline label_dtype {name!r} cannot hold the sampler's label_pad_value {sampler.label_pad_value}; "
            "use label_dtype='int32'"
        )
    return dtype


def _sharding(num_shards: int, shard_index: int, input_context, batch_size: int) -> tuple[int, int, int]:
    if input_context is not None:
        num_shards = input_context.num_input_pipelines
        shard_index = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    _check_positive(num_shards=num_shards, batch_size=batch_size)
    if not 0 <= shard_index < num_shards:
        raise ConfigError(f"pipeline shard_index: expected 0 <= index < {num_shards}, got {shard_index}")
    return num_shards, shard_index, batch_size


def memory_estimate(
    volumes: Sequence[Any],
    window_bytes: int,
    batch_size: int,
    in_flight_batches: int,
    buffered_windows: int = 0,
) -> int:
    """Bytes the pipeline holds: volumes in RAM + windows in the shuffle buffer + batches in flight."""
    from highres3d.data.cache import on_disk

    # Memory-mapped volumes (training.cache: disk) live in the page cache, which the system reclaims.
    held = sum(int(v.image.nbytes) + int(v.label.nbytes) for v in volumes
               if not _is_loader(v) and not on_disk(v.image))
    return held + window_bytes * (buffered_windows + batch_size * in_flight_batches)


def _memory_mapped(volumes) -> bool:
    from highres3d.data.cache import on_disk

    return bool(volumes) and all(on_disk(v.image) for v in volumes)


def crop_geometry(sampler: WindowSampler, augmentation: Optional[AffineAugmentation],
                  augment_on: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(crop_size, margin)`` of what the pipeline delivers: the window, or for on-device
    augmentation the window plus the augmentation's margin on every side."""
    margin = (0, 0, 0)
    if augmentation is not None and augment_on == "device":
        margin = tuple(int(m) for m in augmentation.margin(sampler.window_size))
    return tuple(w + 2 * m for w, m in zip(sampler.window_size, margin)), margin


def make_training_dataset(
    volumes: Sequence[Any] | Sequence[Callable[[], Any]],
    sampler: WindowSampler,
    *,
    batch_size: int = 2,
    windows_per_volume: int = 4,
    shuffle_buffer: int = 64,
    cycle_length: int = 4,
    augmentation: Optional[AffineAugmentation] = None,
    augment_on: Literal["cpu", "device"] = "cpu",
    num_parallel_calls: Optional[int] = None,
    prefetch: int = 2,
    seed: int = 0,
    label_dtype: Literal["uint8", "int32"] = "uint8",
    num_shards: int = 1,
    shard_index: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
    in_channels: Optional[int] = None,
    echo: Optional[Callable[[str], None]] = print,
    positions_only: bool = False,
    data_format: Literal["channels_last", "channels_first"] = "channels_last",
) -> tf.data.Dataset:
    """An endless, shuffled stream of ``(image, label)`` window batches for ``model.fit``.

    Args:
        volumes: Preprocessed volumes (objects with ``image`` ``(X, Y, Z, C)`` float32,
            ``label`` ``(X, Y, Z)``, ``subject_id``) held in RAM, or zero-argument
            callables that load one (lazy).
        sampler: A :class:`~highres3d.samplers.WindowSampler`; its ``window_size``,
            edge policy and pad values apply.
        batch_size: Windows per batch (the global batch with ``input_context``).
        windows_per_volume: Windows drawn per visit of a volume before the next visit (TorchIO's
            ``samples_per_volume``; NiftyNet's ``sample_per_volume``).
        shuffle_buffer: Shuffle buffer, in windows.  In RAM it holds window locations only,
            so a large buffer costs nothing; lazily it holds windows.
        cycle_length: Volumes interleaved at once (loaded in parallel when lazy).
        augmentation: ``None`` for plain windows, else an :class:`AffineAugmentation` applied
            on the ``"cpu"`` in the pipeline or on the ``"device"`` (the dataset
            then yields crops larger by the augmentation's margin; apply
            :class:`~highres3d.augment.RandomAffine3D` in the training step).
        augment_on: see ``augmentation``.
        num_parallel_calls: Batches assembled in parallel (``None``: tf.data autotuning).
        prefetch: Batches prefetched (a fixed number keeps memory predictable: an
            autotuned buffer of 96^3 margin crops can grow by 100 MB a batch).
        seed: Everything random derives from it; same seed, same batches.
        label_dtype: ``"uint8"`` (default) or ``"int32"``.
        num_shards: Sharding for ``tf.distribute`` (see the module docstring).
        shard_index: see ``num_shards``.
        input_context: see ``num_shards``.
        in_channels: Image channels; only needed lazily, to avoid loading one volume up front.
        echo: Where the one-line memory estimate goes (``None``: nowhere).
        positions_only: Yield the batches' position rows ``(B, 6)`` int64
            ``[volume, x, y, z, visit, j]`` instead of windows, for volumes held on
            the accelerator (:class:`~highres3d.data.resident.ResidentVolumes` cuts
            them into exactly the windows this pipeline would have delivered).
            Needs volumes in RAM, and no CPU augmentation.
        data_format: ``"channels_last"`` batches ``(B, X, Y, Z, C)``, or ``"channels_first"``
            ``(B, C, X, Y, Z)`` (Keras' names): the faster copy from
            :func:`~highres3d.samplers.channel_major` volumes; apply
            :func:`to_channels_last` in the training step.
    """
    _check_positive(
        batch_size=batch_size, windows_per_volume=windows_per_volume, shuffle_buffer=shuffle_buffer,
        cycle_length=cycle_length,
    )
    if augment_on not in ("cpu", "device"):
        raise ConfigError(f"pipeline augment_on: expected 'cpu' or 'device', got {augment_on!r}")
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"pipeline data_format: expected one of {list(DATA_FORMATS)}, got {data_format!r}")
    if augmentation is not None and not isinstance(augmentation, AffineAugmentation):
        raise ConfigError(f"pipeline augmentation: expected an AffineAugmentation or None, got {augmentation!r}")
    num_shards, shard_index, batch_size = _sharding(num_shards, shard_index, input_context, batch_size)
    source = _Source(volumes, sampler)
    if positions_only and source.lazy:
        raise ConfigError("training.cache 'device': the volumes are copied to the accelerator once, so they must "
                          "be loaded (in RAM), not lazy loaders")
    if positions_only and augmentation is not None and augment_on == "cpu":
        raise ConfigError("training.cache 'device' resamples on the accelerator: set augmentation.device to "
                          "'accelerator' (or training.cache to 'ram' for CPU augmentation)")
    lab_dtype = _label_dtype(label_dtype, sampler)
    if in_channels is None:
        in_channels = int(source.first().image.shape[3]) if source.lazy else int(source.volumes[0].image.shape[3])

    out_size, margin = crop_geometry(sampler, augmentation, augment_on)
    cpu_aug = augmentation if augment_on == "cpu" else None
    channels_first = data_format == "channels_first"
    cutter = _Cutter(source, out_size, in_channels, lab_dtype, cpu_aug, margin, (int(seed), num_shards, shard_index),
                     channels_first)

    # Positions only: a row of six int64 a window.
    window_bytes = int(np.prod(out_size)) * (4 * in_channels + lab_dtype.itemsize) if not positions_only else 6 * 8
    in_flight = (num_parallel_calls or os.cpu_count() or 2) + prefetch + 1
    if echo is not None:
        held = memory_estimate(volumes, window_bytes, batch_size, in_flight, 0 if not source.lazy else shuffle_buffer)
        where = (
            f"{cycle_length} volumes loaded at a time + {shuffle_buffer} buffered windows"
            if source.lazy
            else f"{len(source)} volumes " + ("memory-mapped" if _memory_mapped(source.volumes) else "in RAM")
        )
        echo(
            f"highres3d pipeline: ~{format_bytes(held)} ({where}, ~{in_flight} batches of {batch_size} x "
            f"{'x'.join(map(str, out_size))} windows in flight)"
        )

    shard_volumes = len(source) >= num_shards
    ids = np.arange(len(source), dtype=np.int64)
    if shard_volumes:
        ids = ids[shard_index::num_shards]
    order = (
        tf.data.Dataset.from_tensor_slices(ids)
        .shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .enumerate()
    )
    image_shape = (in_channels,) + out_size if channels_first else out_size + (in_channels,)
    image_spec = tf.TensorSpec((None,) + image_shape, tf.float32)
    label_spec = tf.TensorSpec((None,) + out_size, tf.as_dtype(lab_dtype))

    if not source.lazy:

        def visit_specs(visit, index):
            spec = tf.numpy_function(
                lambda v, i: cutter.starts(int(v), int(i), windows_per_volume), [visit, index], tf.int64,
                stateful=False,
            )
            spec.set_shape((windows_per_volume, 6))
            return tf.data.Dataset.from_tensor_slices(spec)

        windows = order.interleave(visit_specs, cycle_length=cycle_length, block_length=1)
        windows = windows.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        if not shard_volumes:
            windows = windows.shard(num_shards, shard_index)
        if positions_only:
            _check_positive(prefetch=prefetch)
            return windows.batch(batch_size, drop_remainder=True).prefetch(prefetch).with_options(_options())

        def cut_batch(specs):
            image, label = tf.numpy_function(cutter.cut, [specs], [tf.float32, tf.as_dtype(lab_dtype)], stateful=False)
            image.set_shape(image_spec.shape)
            label.set_shape(label_spec.shape)
            return image, label

        batches = windows.batch(batch_size, drop_remainder=True).map(
            cut_batch, num_parallel_calls=num_parallel_calls or AUTOTUNE, deterministic=True
        )
    else:

        def visit_windows(visit, index):
            image, label = tf.numpy_function(
                lambda v, i: cutter.visit_windows(int(v), int(i), windows_per_volume),
                [visit, index],
                [tf.float32, tf.as_dtype(lab_dtype)],
                stateful=False,
            )
            image.set_shape((windows_per_volume,) + image_shape)
            label.set_shape((windows_per_volume,) + out_size)
            return tf.data.Dataset.from_tensor_slices((image, label))

        windows = order.interleave(
            visit_windows, cycle_length=cycle_length, block_length=1,
            num_parallel_calls=num_parallel_calls or cycle_length, deterministic=True,
        )
        windows = windows.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
        if not shard_volumes:
            windows = windows.shard(num_shards, shard_index)
        batches = windows.batch(batch_size, drop_remainder=True)

    _check_positive(prefetch=prefetch)
    return batches.prefetch(prefetch).with_options(_options())


def make_validation_dataset(
    volumes: Sequence[Any] | Sequence[Callable[[], Any]],
    sampler: WindowSampler,
    *,
    batch_size: int = 2,
    windows_per_volume: int = 4,
    seed: int = 0,
    label_dtype: Literal["uint8", "int32"] = "uint8",
    num_shards: int = 1,
    shard_index: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
    in_channels: Optional[int] = None,
    echo: Optional[Callable[[str], None]] = None,
) -> tf.data.Dataset:
    """A finite dataset of the same ``windows_per_volume`` windows per volume every epoch.

    No augmentation and no shuffling, so validation losses of successive
    epochs compare like with like.  Window locations derive from ``seed`` and
    the volume's position in ``volumes``; the last batch may be smaller.
    Elements as in :func:`make_training_dataset`.
    """
    _check_positive(batch_size=batch_size, windows_per_volume=windows_per_volume)
    num_shards, shard_index, batch_size = _sharding(num_shards, shard_index, input_context, batch_size)
    source = _Source(volumes, sampler)
    lab_dtype = _label_dtype(label_dtype, sampler)
    if in_channels is None:
        in_channels = int(source.first().image.shape[3]) if source.lazy else int(source.volumes[0].image.shape[3])
    size = sampler.window_size
    cutter = _Cutter(source, size, in_channels, lab_dtype, None, (0, 0, 0), (int(seed), 0, 0))
    if echo is not None:
        window_bytes = int(np.prod(size)) * (4 * in_channels + lab_dtype.itemsize)
        echo(f"highres3d validation pipeline: ~{format_bytes(memory_estimate(volumes, window_bytes, batch_size, 4))}")
    ids = np.arange(len(source), dtype=np.int64)[shard_index::num_shards]
    image_shape = (None,) + size + (in_channels,)
    if not source.lazy:
        specs = np.concatenate([cutter.starts(int(i), int(i), windows_per_volume) for i in ids]) if ids.size else np.zeros((0, 6), np.int64)

        def cut_batch(batch_specs):
            image, label = tf.numpy_function(cutter.cut, [batch_specs], [tf.float32, tf.as_dtype(lab_dtype)], stateful=False)
            image.set_shape(image_shape)
            label.set_shape((None,) + size)
            return image, label

        ds = tf.data.Dataset.from_tensor_slices(specs).batch(batch_size).map(cut_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:

        def visit_windows(index):
            image, label = tf.numpy_function(
                lambda i: cutter.visit_windows(int(i), int(i), windows_per_volume),
                [index],
                [tf.float32, tf.as_dtype(lab_dtype)],
                stateful=False,
            )
            image.set_shape((windows_per_volume,) + size + (in_channels,))
            label.set_shape((windows_per_volume,) + size)
            return image, label

        ds = tf.data.Dataset.from_tensor_slices(ids).map(visit_windows, num_parallel_calls=2, deterministic=True).unbatch().batch(batch_size)
    return ds.prefetch(AUTOTUNE).with_options(_options())
