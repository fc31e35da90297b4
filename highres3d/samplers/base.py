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
"""
from __future__ import annotations

import abc
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
    "window_triple",
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


def crop(
    array: np.ndarray,
    start: Sequence[int],
    size: Sequence[int],
    pad_value: float = 0,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Copy ``array[start : start + size]`` (first three axes), padding outside the array.

    Trailing axes (channels) are kept whole.  A window entirely inside the
    array costs one slice copy; only windows that cross the border pay for a
    fill of the pad value.  ``out`` (shape ``size + array.shape[3:]``) lets
    callers write straight into a batch buffer.
    """
    shape = array.shape[:3]
    if out is None:
        out = np.empty(tuple(size) + array.shape[3:], dtype=array.dtype)
    s0, s1, s2 = (int(v) for v in start)
    w0, w1, w2 = size
    if s0 >= 0 and s1 >= 0 and s2 >= 0 and s0 + w0 <= shape[0] and s1 + w1 <= shape[1] and s2 + w2 <= shape[2]:
        out[...] = array[s0 : s0 + w0, s1 : s1 + w1, s2 : s2 + w2]
        return out
    out.fill(pad_value)
    lo = [max(s, 0) for s in (s0, s1, s2)]
    hi = [min(s + w, n) for s, w, n in zip((s0, s1, s2), size, shape)]
    if all(h > l for l, h in zip(lo, hi)):
        out[lo[0] - s0 : hi[0] - s0, lo[1] - s1 : hi[1] - s1, lo[2] - s2 : hi[2] - s2] = array[
            lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
        ]
    return out


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
