"""Stitching window predictions back into a volume.

Three blending modes:

``crop``
    NiftyNet's border discard, done right: neighbouring windows split their
    overlap at its midpoint and each voxel is *written* (not summed) from the
    one window whose interior edge is farthest from it.  No accumulator, no
    division; bit-exact for an identity model, and exact for a network whose
    receptive-field radius is at most :meth:`GridSampler.min_margin`.
``average``
    Mean of every window covering a voxel (MONAI ``constant``, TorchIO
    ``average``).
``gaussian``
    Weighted mean with a separable Gaussian per window, σ = window / 8 per axis
    (nnU-Net, MONAI ``gaussian``).  Each 1-D profile is clamped at 1e-3 of its
    peak so no weight is zero and corner voxels never divide by ~0.

What is blended are the raw model outputs (logits), as nnU-Net and MONAI do;
``probabilities`` are the softmax of the blended logits and ``labels`` their
argmax (a model that already ends in a softmax is blended as is:
``from_logits=False``).

Memory: the grid is a Cartesian product of per-axis starts, so the sum of the
weights covering a voxel is the product of three 1-D sums and needs no
full-volume weight map.  Windows arrive x-outer (the sampler's order); once a
window starting at ``x = s`` arrives, every voxel with ``x < s`` is final.  The
aggregator therefore keeps a float32 accumulator only for the slab of
``window_x`` planes currently being covered (a ring: padded plane ``p`` lives
at ``p % window_x``, so nothing is shifted), finalises the planes it leaves
behind (argmax to uint8 for labels) and reuses them for the planes ahead.
The ring is split along z into columns, one per window start along z
(``window_z`` wide), wherever that holds at most
:data:`COLUMNS_APART_MAX_RATIO` (2) times the memory of one ring over the
padded width; otherwise every window shares that one ring.

Two-class labels accumulate a single channel, the weighted logit difference
``l1 - l0``, whose sign is the label (half the memory traffic and buffer);
``predict_volume`` has a Keras model compute that difference inside its
compiled call (:func:`highres3d.inference.two_class_margin_fn`), so the
aggregator reads one channel per window instead of two.  For labels the
largest float buffer is ``window_x * Y * Z * C`` float32 for one ring (BraTS
240×240×155, 96-voxel windows, 2 classes: 29 MB, against 71 MB for a full
accumulator; 100 classes at 384³ with 128³ windows: 7.5 GB instead of 22.6 GB),
at most twice that as columns (:attr:`GridAggregator.buffer_bytes` tells; finishing planes
adds about 1 MB of scratch per thread and column);
``crop`` needs no float buffer at all.  Only ``probabilities``/``logits`` output holds a
full (X, Y, Z, C) float32 array, because that is what is returned.

Speed: blending is bound by memory traffic, not arithmetic, and the model
call between two windows pushes the accumulator out of the CPU caches.  In a
column of its own, each y-z plane of a window is one contiguous block of
memory, which the processor streams from main memory about 3x faster than the
96 short strided rows the same plane spans in a ring over the whole width (in
place after a model call, 2 CPUs: 0.24 against 0.71 ms per 96³ window; see
docs/performance.md).  The columns are summed plane by plane, in cache, when
planes are finalised.  Each window's output is read once, in blocks of y-z
planes holding about 1 MB of it.  Gaussian weights are separable too: for two-class labels a block is multiplied by one y-z plane of
weights and a scalar per x plane (no 3-D weight array is read per window);
with more channels a read-only (x, y, z, C) weight array is built once per
window size and kept.  Threads take one contiguous run of blocks each rather
than a task per block (fewer hand-overs between threads).  What is
left per window is reading its output (2 × 96³ float32 = 7 MB, or the 3.5 MB
margin of a two-class model) and one read-modify-write of its column (3.5 MB):
see
docs/performance.md for what that costs against MONAI.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from highres3d.samplers.grid import GridSampler
from highres3d.workers import available_cpus

__all__ = ["GridAggregator", "BLEND_MODES", "OUTPUTS", "COLUMNS_APART_MAX_RATIO", "argmax_channels",
           "default_blend_threads", "gaussian_profile", "softmax"]

BLEND_MODES = ("crop", "average", "gaussian")
OUTPUTS = ("labels", "probabilities", "logits")

#: Floor of each 1-D Gaussian profile relative to its peak (MONAI clamps its 3-D map at 1e-3).
GAUSSIAN_FLOOR = 1e-3


def gaussian_profile(length: int, sigma_scale: float = 0.125) -> np.ndarray:
    """1-D blending weights, peak 1 at the window centre, clamped above 0."""
    centre = (length - 1) / 2.0
    sigma = max(sigma_scale * length, 1e-6)
    x = np.arange(length, dtype=np.float64)
    profile = np.exp(-0.5 * ((x - centre) / sigma) ** 2)
    profile /= profile.max()
    return np.maximum(profile, GAUSSIAN_FLOOR).astype(np.float32)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in float32, computed in place on a copy."""
    out = np.array(logits, dtype=np.float32, copy=True)
    out -= out.max(axis=axis, keepdims=True)
    np.exp(out, out=out)
    out /= out.sum(axis=axis, keepdims=True)
    return out


def argmax_channels(values: np.ndarray, dtype=np.uint8, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``argmax`` over the last axis (first maximum wins), as labels of ``dtype``.

    NumPy's ``argmax(axis=-1)`` walks a short last axis voxel by voxel (~30x
    slower for two classes); one vectorised comparison per class is not.

    Args:
        values: (..., C) scores.
        dtype: label dtype of the result.
        out: an array of ``values.shape[:-1]`` (a view into a larger volume
            is fine) to write the labels into instead of a new one.
    """
    if values.shape[-1] == 2 and np.dtype(dtype if out is None else out.dtype).itemsize == 1:
        target = np.empty(values.shape[:-1], dtype=dtype) if out is None else out
        # Written straight into the (uint8) labels: no bool temporary, one pass.
        np.greater(values[..., 1], values[..., 0], out=target.view(np.bool_))
        return target
    if out is not None:
        out[...] = argmax_channels(values, out.dtype)
        return out
    best = np.array(values[..., 0], dtype=np.float32, copy=True)
    labels = np.zeros(best.shape, dtype=dtype)
    better = np.empty(best.shape, dtype=bool)
    for c in range(1, values.shape[-1]):
        channel = values[..., c]
        np.greater(channel, best, out=better)
        np.copyto(labels, c, where=better)
        np.maximum(best, channel, out=best)
    return labels


def _margin_labels(margin: np.ndarray, out: np.ndarray) -> None:
    """Two-class labels from ``l1 - l0`` into uint8 ``out``: 1 where positive (ties go to 0, as in argmax)."""
    np.greater(margin, 0, out=out.view(np.bool_))


#: Window output handled per step of blending: large enough that the Python step
#: costs little against the arithmetic (measured 1.35 -> 1.08 ms per 96^3 window
#: going from 4 planes to 14), small enough to stay near the 1-2 MB L2 of one core.
_BLOCK_BYTES = 1 << 20


def _block_planes(plane_bytes: int) -> int:
    return max(1, _BLOCK_BYTES // max(1, int(plane_bytes)))


@functools.cache
def _shared_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="highres3d-blend")


def _resolve_threads(threads: Optional[int]) -> int:
    # None sizes predict_volume's pool (window copies; whether to stitch beside the model),
    # not the blending, whose rule is default_blend_threads.
    if threads is None:
        threads = min(available_cpus(), 4)
    return max(1, int(threads))


def default_blend_threads() -> int:
    """Threads a :class:`GridAggregator` blends with when it is not told.

    One on a machine with at most 2 CPUs. There, fed inline after each model
    call, one thread took 8-11 % less time than two to blend a BraTS volume (a
    hand-over to the pool per window, on work bound by memory bandwidth that one
    core already uses). Inside ``predict_volume``, beside the model, the two were
    equal within noise and one used less CPU (docs/performance.md). Above 2
    CPUs, as many as there are, at most 4 (not measured against one).
    """
    cpus = available_cpus()
    return 1 if cpus <= 2 else min(cpus, 4)


def _thread_pool(threads: Optional[int]) -> Optional[ThreadPoolExecutor]:
    threads = _resolve_threads(threads)
    return _shared_pool(threads) if threads > 1 else None


@functools.lru_cache(maxsize=4)
def _gaussian_weights(window: tuple[int, int, int], sigma_scale: float, channels: int) -> np.ndarray:
    """The (x, y, z, C) Gaussian weights of a window, read-only and kept for the next volume."""
    px, py, pz = (gaussian_profile(w, sigma_scale) for w in window)
    weights = px[:, None, None] * py[None, :, None] * pz[None, None, :]
    # Repeated over channels so the multiply runs over contiguous memory
    # (broadcasting a trailing axis of 1 makes NumPy loop over C at a time).
    weights = np.ascontiguousarray(np.broadcast_to(weights[..., None], weights.shape + (channels,)))
    weights.flags.writeable = False
    return weights


def _split_runs(items: list, parts: int) -> list[list]:
    """``items`` cut into at most ``parts`` contiguous runs of near-equal length."""
    parts = max(1, min(parts, len(items)))
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


#: Columns are kept apart while they hold at most this many times the ring's memory.
COLUMNS_APART_MAX_RATIO = 2.0


def _column_layout(sampler: GridSampler, channels: tuple) -> tuple[np.ndarray, list[int], list[int], list[int]]:
    """The accumulator: a ring of ``window_x`` planes, split along z into columns.

    Window ``k`` along z adds into column ``column_of[k]`` from z offset
    ``z_offset[k]``. Each window gets a column of its own (``window_z`` wide)
    where that costs at most :data:`COLUMNS_APART_MAX_RATIO` times one ring
    over the whole padded width: a window's y-z plane is then one contiguous
    block of the column, and adding to it runs about 3x faster once the model
    has pushed the accumulator out of cache than the strided rows of a shared
    ring (docs/performance.md). Otherwise all windows share one column, the
    padded width. Columns are summed plane by plane when planes are finalised.

    Returns (columns array (n, window_x, Y, width) + channels, each column's
    padded z start, column_of, z_offset).
    """
    wx, wy, wz = sampler.window
    _, py, pz = sampler.padded_shape
    z_starts = [int(z) for z in sampler.starts[2]]
    if 1 < len(z_starts) and len(z_starts) * wz <= COLUMNS_APART_MAX_RATIO * pz:
        column_z, width = z_starts, wz
        column_of, z_offset = list(range(len(z_starts))), [0] * len(z_starts)
    else:
        column_z, width = [0], pz
        column_of, z_offset = [0] * len(z_starts), z_starts
    columns = np.zeros((len(column_z), wx, py, width) + channels, dtype=np.float32)
    return columns, column_z, column_of, z_offset


def _label_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


class GridAggregator:
    """Collects window outputs from a :class:`GridSampler` grid into a volume.

    Args:
        sampler: the grid the windows come from.
        num_classes: channels C of the model output (classes).
        blend: ``"crop"``, ``"average"`` or ``"gaussian"``.
        output: ``"labels"`` (argmax, uint8; uint16 above 256 classes),
            ``"probabilities"`` (softmax of the blended logits, float32
            (X, Y, Z, C)) or ``"logits"`` (the blended model output itself).
        sigma_scale: Gaussian σ as a fraction of the window (default 1/8).
        from_logits: the model outputs logits (softmax applied for
            ``probabilities``); False when it already outputs probabilities.
        threads: threads for blending (default: :func:`default_blend_threads`).

    Feed windows with :meth:`add_batch` in the sampler's order (``crop`` takes
    any order), then call :meth:`result`.
    """

    def __init__(self, sampler: GridSampler, num_classes: int, blend: str = "gaussian",
                 output: str = "labels", sigma_scale: float = 0.125, from_logits: bool = True,
                 threads: Optional[int] = None):
        if blend not in BLEND_MODES:
            raise ValueError(f"blend: expected one of {BLEND_MODES}, got {blend!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {output!r}")
        self.sampler = sampler
        self.num_classes = int(num_classes)
        self.blend = blend
        self.output = output
        self.from_logits = bool(from_logits)
        self._index = [{int(s): i for i, s in enumerate(starts)} for starts in sampler.starts]
        self._regions = sampler.crop_regions()
        self._received = 0
        shape = sampler.shape
        if output == "labels":
            self._out = np.zeros(shape, dtype=_label_dtype(self.num_classes))
        else:
            self._out = np.zeros(shape + (self.num_classes,), dtype=np.float32)
        if blend != "crop":
            if blend == "gaussian":
                self._profiles = [gaussian_profile(w, sigma_scale) for w in sampler.window]
            else:
                self._profiles = [np.ones(w, dtype=np.float32) for w in sampler.window]
            # Sum of the weights of every window covering each padded voxel, per axis.
            self._axis_sums = []
            for starts, w, size, profile in zip(sampler.starts, sampler.window, sampler.padded_shape, self._profiles):
                total = np.zeros(size, dtype=np.float64)
                for s in starts:
                    total[s:s + w] += profile
                self._axis_sums.append(total.astype(np.float32))
            # Two-class labels need only the sign of the blended logit difference
            # (a positive weight sum does not change it): one accumulated channel.
            self._difference = output == "labels" and self.num_classes == 2
            channels = () if self._difference else (self.num_classes,)
            weights = None
            if blend == "gaussian":
                if self._difference:
                    # One channel: weighted plane by plane from the 1-D profiles (a y-z plane of
                    # weights and a scalar per x plane, both in cache), no 3-D weight array.
                    weights = (self._profiles[0], self._profiles[1][:, None] * self._profiles[2][None, :])
                else:
                    weights = _gaussian_weights(tuple(sampler.window), float(sigma_scale), self.num_classes)
            self._weights = weights
            self._columns, self._column_z, self._column_of, self._z_offset = _column_layout(sampler, channels)
            self._threads = default_blend_threads() if threads is None else max(1, int(threads))
            self._pool = _thread_pool(self._threads)
            self._local = threading.local()
            self._slab_start = 0
            self._group = 0
            self._group_counts = np.zeros(self.sampler.grid_shape[0], dtype=np.int64)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the float accumulator held while blending (0 for ``crop``); the output is not counted."""
        columns = getattr(self, "_columns", None)
        return 0 if columns is None else int(columns.nbytes)

    # ------------------------------------------------------------------ feeding

    def add_batch(self, windows: np.ndarray, locations: np.ndarray) -> None:
        """Add model outputs ``(B, wx, wy, wz, C)`` for window starts ``(B, 3)``.

        For two-class labels the outputs may instead be margins ``(B, wx, wy, wz)``,
        ``scores[..., 1] - scores[..., 0]`` (see
        :func:`highres3d.inference.two_class_margin_fn`): the same labels from
        half the bytes.
        """
        windows = np.asarray(windows)
        locations = np.asarray(locations).reshape(-1, 3)
        expected = tuple(self.sampler.window) + (self.num_classes,)
        if windows.ndim == 4 and self.output == "labels" and self.num_classes == 2:
            expected = expected[:-1]
        if windows.ndim != len(expected) + 1 or tuple(windows.shape[1:]) != expected or len(windows) != len(locations):
            raise ValueError(
                f"model output of shape {windows.shape} for {len(locations)} windows; expected (B,) + {expected}: "
                "the network must keep the spatial size of its input ('same' padding) and output one channel per class"
            )
        for window, start in zip(windows, locations):
            if self.blend == "crop":
                self._write_owned(window, start)
            else:
                self._accumulate(window, start)
            self._received += 1

    def _grid_index(self, start) -> tuple[int, int, int]:
        try:
            return tuple(self._index[a][int(start[a])] for a in range(3))
        except KeyError:
            raise ValueError(f"window start {tuple(int(s) for s in start)} is not on this aggregator's grid") from None

    def _write_owned(self, window: np.ndarray, start) -> None:
        idx = self._grid_index(start)
        src, dst = [], []
        for a in range(3):
            lo, hi = self._regions[a][idx[a]]
            # Owned region in padded coordinates, clipped to the unpadded volume.
            before = self.sampler.pad_before[a]
            lo_v = max(lo, before)
            hi_v = min(hi, before + self.sampler.shape[a])
            if hi_v <= lo_v:
                return
            src.append(slice(lo_v - int(start[a]), hi_v - int(start[a])))
            dst.append(slice(lo_v - before, hi_v - before))
        part = window[tuple(src)]
        if window.ndim == 3:  # a two-class margin (two_class_margin_fn)
            _margin_labels(part, self._out[tuple(dst)])
        elif self.output == "labels":
            argmax_channels(part, out=self._out[tuple(dst)])
        else:
            self._out[tuple(dst)] = self._finish(part, None)

    def _accumulate(self, window: np.ndarray, start) -> None:
        ix, _, iz = self._grid_index(start)
        if ix != self._group:
            per_group = self.sampler.grid_shape[1] * self.sampler.grid_shape[2]
            if ix < self._group or any(self._group_counts[g] != per_group for g in range(self._group, ix)):
                raise ValueError(
                    f"window at x={int(start[0])} arrived out of order: add windows in the sampler's order "
                    "(x-outer), so finished planes can be released"
                )
            self._flush(int(self.sampler.starts[0][ix]))
            self._group = ix
        self._group_counts[ix] += 1
        wx, wy, wz = self.sampler.window
        x0, y0 = int(start[0]), int(start[1])
        # The window's own column of the accumulator (see _column_layout): y-z planes of
        # one contiguous block each where columns are kept apart.
        column = self._columns[self._column_of[iz]]
        z0 = self._z_offset[iz]
        weights = self._weights
        difference = self._difference
        # The model's own l1 - l0 (two_class_margin_fn): nothing left to subtract, half the bytes to read.
        margins = window.ndim == 3

        def add_planes(lo: int, hi: int) -> None:
            # Window planes [lo, hi) sit in ring planes [r, r + hi - lo), never across the wrap.
            r = (x0 + lo) % wx
            target = column[r:r + hi - lo, y0:y0 + wy, z0:z0 + wz]
            if weights is None and (margins or not difference):
                target += window[lo:hi]  # unweighted and already one value per accumulated voxel
                return
            # A per-thread scratch block: a fresh temporary of this size would be
            # mapped and page-faulted on every call.
            part = self._scratch(target.shape)
            if difference:
                if margins:
                    np.multiply(window[lo:hi], weights[1], out=part)
                else:
                    np.subtract(window[lo:hi, ..., 1], window[lo:hi, ..., 0], out=part)
                    if weights is not None:
                        part *= weights[1]
                if weights is not None:
                    part *= weights[0][lo:hi, None, None]
            else:
                np.multiply(window[lo:hi], weights[lo:hi], out=part)
            target += part

        # Blocks of a few planes stay in cache between the multiply and the add,
        # and NumPy releases the GIL, so threads share the blocks.
        blocks = []
        lo = 0
        step = _block_planes(window[0].nbytes)
        while lo < wx:
            wrap = wx - (x0 + lo) % wx
            hi = min(lo + step, wx, lo + wrap)
            blocks.append((lo, hi))
            lo = hi
        def add_run(run) -> None:
            for lo, hi in run:
                add_planes(lo, hi)

        if self._pool is None:
            add_run(blocks)
        else:
            # One contiguous run of blocks per thread: a task per block cost a thread
            # hand-over each (24 per 96³ window), one run per thread costs one per thread.
            list(self._pool.map(add_run, _split_runs(blocks, self._threads)))

    def _column_layers(self, shape: tuple) -> list[np.ndarray]:
        """One zeroed block of ``shape`` per column, kept per thread.

        Layer ``k`` is only ever written over column ``k``'s z range, so the rest
        of it stays zero from the allocation on; finishing a block of fewer
        planes uses a prefix of the same layers.
        """
        local = self._local
        layers = getattr(local, "layers", None)
        if layers is None or layers.shape[1] < shape[0]:
            layers = local.layers = np.zeros((len(self._columns),) + shape, dtype=np.float32)
        return [layer[:shape[0]] for layer in layers]

    def _scratch(self, shape: tuple) -> np.ndarray:
        local = self._local
        size = int(np.prod(shape))
        buffer = getattr(local, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = local.buffer = np.empty(size, dtype=np.float32)
        return buffer[:size].reshape(shape)

    def _flush(self, until: int, zero: bool = True) -> None:
        """Finalise padded planes [slab_start, until) and move on to ``until``.

        ``zero`` clears their ring planes for the planes ahead (not needed after the last).
        """
        wx = self.sampler.window[0]
        before = self.sampler.pad_before
        x_end = before[0] + self.sampler.shape[0]
        ys = slice(before[1], before[1] + self.sampler.shape[1])
        z_lo, z_hi = before[2], before[2] + self.sampler.shape[2]
        padded_z, width = self.sampler.padded_shape[2], self._columns.shape[3]
        columns = self._columns
        chunks = []
        p = self._slab_start
        # Blocks of about _BLOCK_BYTES of finished planes (the summed block is about that size).
        step = _block_planes(self.sampler.shape[1] * padded_z * columns[0, 0, 0, 0].nbytes)
        while p < until:
            # Contiguous ring runs, split further into blocks for the threads.
            r = p % wx
            q = min(until, p + wx - r, p + step)
            chunks.append((p, q))
            p = q

        def finish(chunk) -> None:
            p, q = chunk
            r = p % wx
            lo, hi = max(p, before[0]), min(q, x_end)
            if hi > lo:
                rows = slice(r + lo - p, r + hi - p)
                dst = self._out[lo - before[0]:hi - before[0]]
                if len(columns) == 1:
                    sums = columns[0, rows, ys, z_lo:z_hi]
                else:
                    # The columns' planes moved to their z place, then summed, in cache. NumPy adds
                    # arrays whose rows differ in stride (window_z against the padded width) at
                    # about 35 ns a row but copies them at 15: so each column is copied into a
                    # layer of its own, already zero outside its z range, and the layers, all of
                    # one layout, are added as whole blocks (11 % less time in place).
                    shape = (hi - lo, self.sampler.shape[1], padded_z) + columns.shape[4:]
                    layers = self._column_layers(shape)
                    for layer, column, z in zip(layers, columns, self._column_z):
                        layer[:, :, z:z + width] = column[rows, ys]
                    block = self._scratch(shape)
                    np.add(layers[0], layers[1], out=block)
                    for layer in layers[2:]:
                        block += layer
                    sums = block[:, :, z_lo:z_hi]
                self._finalise(sums, dst, slice(lo, hi), ys, slice(z_lo, z_hi))
            if zero:
                columns[:, r:r + q - p] = 0

        def finish_run(run) -> None:
            for chunk in run:
                finish(chunk)

        if self._pool is None or len(chunks) < 2:
            finish_run(chunks)
        else:
            list(self._pool.map(finish_run, _split_runs(chunks, self._threads)))
        self._slab_start = until

    def _finalise(self, sums: np.ndarray, dst: np.ndarray, xs: slice, ys: slice, zs: slice) -> None:
        """Weighted sums of padded voxels ``(xs, ys, zs)`` -> their output ``dst``."""
        if self._difference:
            _margin_labels(sums, dst)
        elif self.output == "labels":
            # A positive per-voxel weight sum does not change the argmax.
            argmax_channels(sums, out=dst)
        else:
            norm = (
                self._axis_sums[0][xs, None, None]
                * self._axis_sums[1][None, ys, None]
                * self._axis_sums[2][None, None, zs]
            )[..., None]
            dst[...] = self._finish(sums, norm)

    def _finish(self, logits: np.ndarray, norm) -> np.ndarray:
        if self.output == "labels":
            return argmax_channels(logits, self._out.dtype)
        values = logits / norm if norm is not None else logits
        if self.output == "probabilities" and self.from_logits:
            return softmax(values)
        return values

    # ------------------------------------------------------------------ result

    def result(self) -> np.ndarray:
        """The stitched volume on the sampler's (unpadded) shape."""
        if self._received != len(self.sampler):
            raise ValueError(f"received {self._received} windows, the grid has {len(self.sampler)}")
        if self.blend != "crop" and self._slab_start < self.sampler.padded_shape[0]:
            self._flush(self.sampler.padded_shape[0], zero=False)
        return self._out
