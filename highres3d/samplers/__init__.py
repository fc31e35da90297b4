"""Window samplers: where training windows come from, and the grid for inference.

NumPy only (importable without TensorFlow).  Training samplers share one
interface (:class:`WindowSampler`): ``prepare(volume)`` builds the per-volume
state once, ``locations(volume, n, rng, state)`` draws window starts in O(1)
each, ``crop(volume, start)`` copies the aligned window, and calling the sampler
yields :class:`Window` objects TorchIO-style::

    sampler = ClassWeightedSampler(96, {0: 1, 1: 1})
    for window in sampler(volume, num_windows=8, rng=42):
        window.image, window.label, window.start

Training volumes are best stored in the memory layout windows copy out of
fastest on the machine (:func:`fastest_layout` times both, :func:`in_layout`
converts), and windows keep it.

Edge policies and coordinates: :mod:`highres3d.samplers.base`.
"""
from highres3d.samplers.base import (
    EDGE_POLICIES,
    LAYOUTS,
    Window,
    WindowSampler,
    channel_major,
    crop,
    fastest_layout,
    in_layout,
    is_channel_major,
)
from highres3d.samplers.class_weighted import ClassCoordinates, ClassWeightedSampler, ClassWeightedState
from highres3d.samplers.grid import GridSampler
from highres3d.samplers.uniform import UniformSampler
from highres3d.samplers.weighted import WeightedSampler, WeightedState

__all__ = [
    "EDGE_POLICIES",
    "LAYOUTS",
    "ClassCoordinates",
    "ClassWeightedSampler",
    "ClassWeightedState",
    "GridSampler",
    "UniformSampler",
    "WeightedSampler",
    "WeightedState",
    "Window",
    "WindowSampler",
    "channel_major",
    "fastest_layout",
    "in_layout",
    "crop",
    "is_channel_major",
]
