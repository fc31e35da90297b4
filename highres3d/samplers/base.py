"""What every training-window sampler shares: window geometry, edge policies, cropping.

Coordinates
-----------
A window is located by its **start corner in volume voxel coordinates**
(``Window.start``): the window covers ``start[i] <= x < start[i] + size[i]`` on
each axis.  With edge policy ``pad`` a start may be negative or the window may
reach past the far edge; those voxels hold the pad values.  Padding is never
materialised for the whole volume: the padded volume ``P`` is only a way to
describe a window, ``P = np.pad(volume, [(a, b), ...], constant_values=...)``
with ``a >= -start`` gives ``window == P[start + a : start + a + size]``.

A window's *centre voxel* is ``start + size // 2`` (NiftyNet and TorchIO use the
same convention; for an even size it is the voxel just past the geometric
middle).  Samplers choose centre voxels and derive starts from them.

Edge policies
-------------
``pad`` (default)
    Any voxel of the volume may be a centre, so structures touching the border
    are sampled as often as any other (nnU-Net's choice).  Images are padded
    with ``pad_value``, labels with ``label_pad_value`` (0 = background;
    the losses have no ignore index, so training configs require a class).
``valid``
    Centres at least half a window from every edge, so windows lie entirely
    inside the volume (NiftyNet's and TorchIO's choice).  A volume smaller
    than the window on any axis is a :class:`~highres3d.errors.DataError`.
``clamp``
    Any voxel may be a centre, then the window is shifted inwards to lie inside
    the volume (MONAI's choice).  Voxels near the border end up off-centre, so
    windows overlap the border region more often than its share of the volume.
    On an axis shorter than the window the volume is centred and padded.

Memory order
------------
Images are always indexed ``(X, Y, Z, C)``.  Their memory may be
*interleaved* (``(X, Y, Z, C)`` C order, as loaded) or *channel-major*
(:func:`channel_major`: each channel one contiguous block, the peers' ``(C, X,
Y, Z)`` order behind an ``(X, Y, Z, C)`` view).  Which one windows copy out of
faster depends on the machine: channel-major was 1.3-2x faster on the
development machines of 2026-12-03 (the rows of one channel are half as long
and follow each other twice as closely), interleaved 1.2-1.4x faster on the
one of 2026-12-04 (half as many rows, each twice as long).  So
:func:`fastest_layout` times both on the volume at hand, once per process, and
the trainer stores its training volumes in the winner
(:func:`in_layout`); its pipeline then hands the model's step channel-first
batches (to transpose on the device) from channel-major volumes, and
channel-last batches from interleaved ones.  :func:`crop` keeps the source's
memory order for the windows it allocates.
"""
from __future__ import annotations

import abc
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np

from highres3d.errors import ConfigError, DataError

__all__ = [
    "EDGE_POLICIES",
    "EdgePolicy",
    "Window",
    "WindowSampler",
    "crop",
    "as_generator",
    "channel_major",
    "fastest_layout",
    "in_layout",
    "is_channel_major",
    "window_triple",
    "LAYOUTS",
]

EdgePolicy = Literal["pad", "valid", "clamp"]
EDGE_POLICIES: tuple[str, ...] = ("pad", "valid", "clamp")


def window_triple(size: int | Sequence[int], name: str = "window_size") -> tuple[int, int, int]:
    """``96`` -> ``(96, 96, 96)``; validates three positive integers."""
    if isinstance(size, (int, float, np.integer, np.floating)):
        size = (size,) * 3
    size = tuple(size)
    if len(size) != 3 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
        raise ConfigError(f"{name}: expected one positive integer or three (x, y, z), got {list(size)}")
    return tuple(int(s) for s in size)


def as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    """Accept a Generator, a seed, or None (fresh OS entropy)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def is_channel_major(array: np.ndarray, contiguous: bool = False) -> bool:
    """True for an ``(X, Y, Z, C)`` array whose channels lie in separate blocks of memory
    (``contiguous``: each channel one C-contiguous block, as :func:`channel_major` makes them)."""
    if array.ndim != 4 or array.shape[3] == 1 or abs(array.strides[3]) <= abs(array.strides[0]):
        return False
    return not contiguous or np.moveaxis(array, 3, 0).flags.c_contiguous


def channel_major(image: np.ndarray) -> np.ndarray:
    """``image`` ``(X, Y, Z, C)`` with channel-major memory: a view of a ``(C, X, Y, Z)`` array.

    Same values and indexing; windows copy out of it faster (see the module
    docstring).  Returns ``image`` itself when it already is so, or has one channel.
    """
    if image.ndim != 4 or image.shape[3] == 1 or is_channel_major(image, contiguous=True):
        return image
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(image, 3, 0)), 0, 3)


Layout = Literal["channel_major", "interleaved"]
LAYOUTS: tuple[str, ...] = ("channel_major", "interleaved")


def in_layout(image: np.ndarray, layout: Layout) -> np.ndarray:
    """``image`` ``(X, Y, Z, C)`` with ``layout`` memory (a copy only when its memory differs)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"memory layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    if layout == "channel_major":
        return channel_major(image)
    return np.ascontiguousarray(image)


_PROBE_WINDOWS = 4  # windows per layout per round; a 96^3 two-channel window copies in about 0.5 ms
_PROBE_ROUNDS = 4
_fastest: dict[tuple, tuple[str, dict[str, float]]] = {}


def fastest_layout(image: np.ndarray, window_size: int | Sequence[int]) -> tuple[Layout, dict[str, float]]:
    """The memory layout windows of ``window_size`` copy out of ``image`` fastest on this machine.

    Returns ``(layout, windows_per_s)``: ``"channel_major"`` or ``"interleaved"``
    (see the module docstring), and the rate :func:`crop` reached from each.
    Both layouts are timed on the same geometry, alternating in rounds of a
    few random windows inside the volume, and the best round of each counts
    (other work on the machine only ever slows a round down).  About 35 ms
    for a BraTS-size volume and 96^3 windows, and one copy of ``image`` for the
    other layout, once per process for each (dtype, channels, window): later
    calls return the first answer, so every volume of a run gets the same
    layout, whatever its shape.  A one-channel image has one layout
    (``"interleaved"``).
    """
    window = window_triple(window_size)
    if image.ndim != 4 or image.shape[3] == 1:
        return "interleaved", {}
    key = (image.dtype.str, image.shape[3], window)  # not the volume's shape: one layout for every volume of a run
    if key not in _fastest:
        arrays = {name: in_layout(image, name) for name in LAYOUTS}
        size = tuple(min(w, n) for w, n in zip(window, image.shape[:3]))
        rng = np.random.default_rng(0)
        high = np.asarray(image.shape[:3]) - size + 1  # windows inside the volume: one copy each, no fill
        for start in rng.integers(0, high, size=(2 * _STAGE_TRIALS, 3)):
            crop(arrays["interleaved"], start, size)  # lets the staged/direct choice of this geometry settle first
        best = dict.fromkeys(LAYOUTS, float("inf"))
        for r in range(_PROBE_ROUNDS):
            for name in LAYOUTS if r % 2 else LAYOUTS[::-1]:
                t0 = time.perf_counter()
                for start in rng.integers(0, high, size=(_PROBE_WINDOWS, 3)):
                    crop(arrays[name], start, size)
                best[name] = min(best[name], (time.perf_counter() - t0) / _PROBE_WINDOWS)
        rates = {name: 1.0 / seconds for name, seconds in best.items()}
        _fastest[key] = (max(rates, key=rates.get), rates)
    return _fastest[key]


# Two copy paths for a window.  *Direct*: one slice assignment, i.e. for each
# window row a short run out of the volume's row, with a gap after it.
# *Staged*: the window's rows are read whole (one contiguous run per plane)
# into a small scratch block that stays in cache, and the window is cut out of
# that.  Staged reads up to 2x the bytes but streams them; which one wins
# depends on the processor's prefetchers and on the row lengths.  On the AMD
# EPYC measured for docs/performance.md, staged was 1.18-1.35x faster for
# 2-channel float32 96^3 windows of 155-voxel rows (BraTS), and 0.68-0.95x for
# one or four channels.  So each row geometry is timed both ways on its first
# windows and then keeps the faster path.  Both paths give identical windows.
_STAGE_MIN_FRACTION = 0.5  # staged reads (row / window row) <= 2x the bytes
_STAGE_BYTES = 1 << 20  # one block of staged planes: the per-core L2 cache of the machines measured
_STAGE_TRIALS = 5  # timed windows per path before a row geometry keeps the faster one
_scratch = threading.local()
_copy_times: dict[tuple, tuple[list[float], list[float]]] = {}
_staged_wins: dict[tuple, bool] = {}


def _scratch_bytes(nbytes: int) -> np.ndarray:
    """A per-thread byte buffer of at least ``nbytes`` (tf.data crops in several threads)."""
    buf = getattr(_scratch, "buffer", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _scratch.buffer = np.empty(nbytes, np.uint8)
    return buf


def _copy_staged_planes(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], out: np.ndarray, rows_bytes: int) -> None:
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    planes = min(x1 - x0, _STAGE_BYTES // rows_bytes)
    scratch = _scratch_bytes(planes * rows_bytes)
    for x in range(x0, x1, planes):
        n = min(planes, x1 - x)
        block = scratch[: n * rows_bytes].view(array.dtype).reshape((n, y1 - y0) + array.shape[2:])
        block[...] = array[x : x + n, y0:y1]
        out[x - x0 : x - x0 + n] = block[:, :, z0:z1]


def _copy_box(array: np.ndarray, lo: Sequence[int], hi: Sequence[int], out: np.ndarray) -> None:
    """``out[...] = array[lo:hi]`` (first three axes, all inside), by the faster copy path."""
    (x0, y0, z0), (x1, y1, z1) = lo, hi
    rows_bytes = (y1 - y0) * array[0, 0].nbytes  # one plane's rows, every voxel of the last axis
    if not (
        array.flags.c_contiguous
        and x1 - x0 > 1
        and _STAGE_MIN_FRACTION * array.shape[2] <= z1 - z0 < array.shape[2]
        and rows_bytes <= _STAGE_BYTES
    ):
        out[...] = array[x0:x1, y0:y1, z0:z1]
        return
    key = (array.dtype.str, array.shape[1:], z1 - z0)
    staged = _staged_wins.get(key)
    if staged is None:
        times = _copy_times.setdefault(key, ([], []))
        staged = len(times[1]) < len(times[0])  # alternate: direct, staged, direct, ...
        t0 = time.perf_counter()
    if staged:
        _copy_staged_planes(array, lo, hi, out, rows_bytes)
    else:
        out[...] = array[x0:x1, y0:y1, z0:z1]
    if key not in _staged_wins:
        # Per-voxel times, so border boxes of other sizes count alike; min is the least disturbed.
        times[staged].append((time.perf_counter() - t0) / out.size)
        if min(len(t) for t in times) >= _STAGE_TRIALS:
            _staged_wins[key] = min(times[1]) < min(times[0])


def crop(
    array: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    pad_value: float = 0,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Copy ``array[start : start + size]`` (first three axes), padding outside the array.

    Trailing axes (channels) are kept whole.  A window entirely inside the
    array costs one copy; only windows that cross the border pay for a fill of
    the pad value.  ``out`` (shape ``size + array.shape[3:]``) lets callers
    write straight into a batch buffer; by default the window is allocated in
    the source's memory order (:func:`channel_major` or not).
    """
    shape = array.shape[:3]
    if out is None and is_channel_major(array):
        out = np.moveaxis(np.empty((array.shape[3],) + tuple(size), dtype=array.dtype), 0, 3)
    elif out is None:
        out = np.empty(tuple(size) + array.shape[3:], dtype=array.dtype)
    start = tuple(int(v) for v in start)
    lo = [max(s, 0) for s in start]
    hi = [min(s + w, n) for s, w, n in zip(start, size, shape)]
    if lo == list(start) and all(h - s == w for s, h, w in zip(start, hi, size)):
        _copy_box(array, lo, hi, out)
        return out
    if not all(h > l for l, h in zip(lo, hi)):
        out.fill(pad_value)
        return out
    inside = tuple(slice(l - s, h - s) for s, l, h in zip(start, lo, hi))
    _fill_outside(out, inside, pad_value)
    _copy_box(array, lo, hi, out[inside])
    return out


def _fill_outside(out: np.ndarray, inside: tuple[slice, slice, slice], value: float) -> None:
    """Fill every voxel of ``out`` outside the box ``inside`` (first three axes), each once.

    A window crossing the border then writes each voxel once: filling it whole
    first and copying over the inside wrote the inside twice, which cost a
    border window about as much as a second copy.
    """
    region = [slice(None)] * 3
    for axis, part in enumerate(inside):
        for side in (slice(0, part.start), slice(part.stop, out.shape[axis])):
            if side.stop > side.start:
                region[axis] = side
                out[tuple(region)] = value
        region[axis] = part  # the slabs of later axes lie within the inside of this one


@dataclass(frozen=True)
class Window:
    """One training window and where it came from.

    ``image`` is ``(x, y, z, C)`` float32 (all channels of the volume),
    ``label`` ``(x, y, z)`` in the volume's label dtype (``None`` when the
    volume has no label), ``weight`` the cropped sampling map for samplers that
    use one (else ``None``).  ``start`` is in volume coordinates (see the
    module docstring); all arrays are aligned voxel for voxel.
    """

    subject_id: str
    start: tuple[int, int, int]
    image: np.ndarray
    label: Optional[np.ndarray] = None
    weight: Optional[np.ndarray] = None

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(self.image.shape[:3])

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(s + w for s, w in zip(self.start, self.size))

    @property
    def centre(self) -> tuple[int, int, int]:
        """The centre voxel, ``start + size // 2``, in volume coordinates."""
        return tuple(s + w // 2 for s, w in zip(self.start, self.size))


class WindowSampler(abc.ABC):
    """Base class: draws window locations from a volume and crops aligned windows.

    Subclasses implement :meth:`prepare` (per-volume state, built once and
    reusable for any number of draws) and :meth:`draw_centres`.  Everything
    else (edge policy, starts, cropping, the generator interface) lives here.

    A *volume* is any object with ``image`` ``(X, Y, Z, C)``, ``label``
    ``(X, Y, Z)`` or ``None`` and optionally ``subject_id``.
    """

    uses_label: bool = False

    def __init__(
        self,
        window_size: int | Sequence[int],
        *,
        edge_policy: EdgePolicy = "pad",
        pad_value: float = 0.0,
        label_pad_value: int = 0,
    ) -> None:
        self.window_size = window_triple(window_size)
        if edge_policy not in EDGE_POLICIES:
            raise ConfigError(f"sampler edge policy: expected one of {list(EDGE_POLICIES)}, got {edge_policy!r}")
        self.edge_policy: EdgePolicy = edge_policy
        self.pad_value = float(pad_value)
        self.label_pad_value = int(label_pad_value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window_size={self.window_size}, edge_policy={self.edge_policy!r})"

    # ------------------------------------------------------------------ geometry
    def centre_domain(self, shape: Sequence[int], subject_id: str = "?") -> tuple[np.ndarray, np.ndarray]:
        """Inclusive bounds ``(lo, hi)`` of the centre voxels allowed by the edge policy."""
        shape = np.asarray(shape[:3], dtype=np.int64)
        w = np.asarray(self.window_size, dtype=np.int64)
        if self.edge_policy != "valid":
            return np.zeros(3, np.int64), shape - 1
        if np.any(shape < w):
            raise DataError(
                f"subject {subject_id}: volume {tuple(int(s) for s in shape)} is smaller than the window "
                f"{self.window_size} and the sampler's edge policy is 'valid'; use edge 'pad' "
                "(or 'clamp') to pad small volumes, or a smaller window"
            )
        return w // 2, shape - w + w // 2

    def starts_from_centres(self, centres: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """Start corners (volume coordinates) of the windows centred on ``centres`` ``(n, 3)``."""
        w = np.asarray(self.window_size, dtype=np.int64)
        starts = np.asarray(centres, dtype=np.int64) - w // 2
        if self.edge_policy == "clamp":
            shape = np.asarray(shape[:3], dtype=np.int64)
            # Centred, not flush, on axes shorter than the window: pads both sides evenly.
            upper = np.where(shape >= w, shape - w, (shape - w) // 2)
            lower = np.minimum(0, upper)
            starts = np.clip(starts, lower, upper)
        return starts

    # ------------------------------------------------------------------ per volume
    def prepare(self, volume: Any) -> Any:
        """Per-volume state for :meth:`draw_centres` (tables, CDFs); build once, reuse."""
        check_volume(volume, self.uses_label)
        return self.centre_domain(volume.image.shape, _sid(volume))

    @abc.abstractmethod
    def draw_centres(self, state: Any, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` centre voxels ``(n, 3)`` int64 in volume coordinates."""

    def locations(
        self, volume: Any, n: int, rng: np.random.Generator | int | None = None, state: Any = None
    ) -> np.ndarray:
        """``n`` window starts ``(n, 3)`` int64 (volume coordinates).

        Pass ``state`` from :meth:`prepare` to skip the per-volume setup.
        """
        if state is None:
            state = self.prepare(volume)
        centres = self.draw_centres(state, int(n), as_generator(rng))
        return self.starts_from_centres(centres, volume.image.shape)

    def crop(
        self,
        volume: Any,
        start: Sequence[int],
        out_image: Optional[np.ndarray] = None,
        out_label: Optional[np.ndarray] = None,
    ) -> Window:
        """The aligned window at ``start``: all image channels, label, weight map if used."""
        start = tuple(int(s) for s in start)
        image = crop(volume.image, start, self.window_size, self.pad_value, out_image)
        label = None
        if volume.label is not None:
            label = crop(volume.label, start, self.window_size, self.label_pad_value, out_label)
        return Window(_sid(volume), start, image, label, self._crop_weight(volume, start))

    def _crop_weight(self, volume: Any, start: tuple[int, int, int]) -> Optional[np.ndarray]:
        return None

    def __call__(
        self, volume: Any, num_windows: Optional[int] = None, rng: np.random.Generator | int | None = None
    ) -> Iterator[Window]:
        """Yield windows from ``volume``: ``num_windows`` of them, or forever if ``None``.

        The per-volume setup runs once, when the first window is requested.
        """
        rng = as_generator(rng)
        state = self.prepare(volume)
        count = 0
        while num_windows is None or count < num_windows:
            block = 64 if num_windows is None else min(64, num_windows - count)
            for start in self.locations(volume, block, rng, state):
                yield self.crop(volume, start)
            count += block


def _sid(volume: Any) -> str:
    return str(getattr(volume, "subject_id", "?"))


def check_volume(volume: Any, need_label: bool = False) -> None:
    """Clear errors for arrays that cannot be sampled."""
    image = getattr(volume, "image", None)
    if not isinstance(image, np.ndarray) or image.ndim != 4:
        raise DataError(
            f"subject {_sid(volume)}: image must be a numpy array (X, Y, Z, C), got "
            f"{getattr(image, 'shape', type(image).__name__)}"
        )
    label = getattr(volume, "label", None)
    if label is None:
        if need_label:
            raise DataError(f"subject {_sid(volume)}: this sampler needs a label map, but the volume has none")
        return
    if label.shape != image.shape[:3]:
        raise DataError(f"subject {_sid(volume)}: label shape {label.shape} != image shape {image.shape[:3]}")
