"""Running out of memory: recognising it on any backend, and a message that names the fix.

A device that runs out of memory raises its backend's own error
(TensorFlow's ``ResourceExhaustedError``, ``RESOURCE_EXHAUSTED`` from XLA on
JAX, torch's ``OutOfMemoryError``), hundreds of lines about allocators and
graph nodes that do not say which setting to change.  The trainer and the
inference loop turn it into :class:`OutOfMemory`: where it happened, the
allocator's own line, and the settings the memory grows with, each with its
current value.  A host out of memory (Python's ``MemoryError``) gets the same
treatment, with the host's settings.

:func:`peak_memory` tells how much each GPU held at its peak, so that the
first training step that fits also shows how much room is left.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from highres3d.errors import Highres3dError

#: Names of the exception classes that mean "a device ran out of memory" (matched by name, so that
#: no backend has to be imported to recognise another backend's error).
OUT_OF_MEMORY_ERRORS = ("ResourceExhaustedError", "OutOfMemoryError")

#: The allocator's one-line account in each backend's message.
_ALLOCATOR_LINE = re.compile(
    r"(OOM when allocating tensor[^\n\[]*(?:\[[^\]]*\][^\n\[]*)?"  # TensorFlow
    r"|Out of memory while trying to allocate[^\n]*"  # XLA (JAX)
    r"|(?:CUDA )?out of memory\. Tried to allocate[^\n(]*)",  # torch
    re.IGNORECASE,
)
_DEVICE = re.compile(r"device:(GPU|CPU|TPU):(\d+)|\((GPU) (\d+);")


class OutOfMemory(Highres3dError):
    """A device (or the host) ran out of memory; the message says where and which settings to lower.

    Attributes:
        allocator: the backend's own account of the failed allocation (one line).
        device: ``"GPU:0"`` and the like where the backend names it, ``"host"`` for Python's
            ``MemoryError``, else ``"the device"``.
    """

    def __init__(self, message: str, allocator: str, device: str) -> None:
        super().__init__(message)
        self.allocator = allocator
        self.device = device


def out_of_memory(err: BaseException) -> Optional[tuple[str, str]]:
    """``(device, allocator line)`` when ``err``, or an error it wraps, is an out-of-memory error; else None."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, MemoryError):
            return "host", _allocator_line(text) or "MemoryError"
        if type(current).__name__ in OUT_OF_MEMORY_ERRORS or "RESOURCE_EXHAUSTED" in text:
            found = _DEVICE.search(text)
            device = "the device"
            if found:
                device = f"{found.group(1)}:{found.group(2)}" if found.group(1) else f"GPU:{found.group(4)}"
            return device, _allocator_line(text) or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


def _allocator_line(text: str) -> str:
    found = _ALLOCATOR_LINE.search(text)
    if found:
        return found.group(0).strip().rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def out_of_memory_error(what: str, found: tuple[str, str], advice: Sequence[str], after: str = "") -> OutOfMemory:
    """The :class:`OutOfMemory` of ``what`` (e.g. "the training step at iteration 3"), ``found`` by :func:`out_of_memory`."""
    device, allocator = found
    lines = [f"out of memory on {device} in {what} ({allocator})."]
    if advice:
        lines.append("To fit, change one of:")
        lines += [f"  - {line}" for line in advice]
    if after:
        lines.append(after)
    return OutOfMemory("\n".join(lines), allocator, device)


def _shape(size: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in size)


def training_advice(cfg, phase: str, device: str) -> list[str]:
    """What to lower when ``phase`` of a training run (see :data:`TRAINING_PHASES`) ran out of memory on ``device``."""
    t = cfg.training
    if device == "host":
        advice = []
        if t.cache == "ram":
            advice.append("training.cache: ram keeps every preprocessed volume in memory; lazy reloads them instead")
        advice.append(f"training.shuffle_buffer ({t.shuffle_buffer} windows held ahead of the step)")
        return advice
    if phase == "device cache":
        return ["training.cache: device holds every training volume on the device; ram keeps them in host memory "
                "and sends windows"]
    if phase == "volume validation":
        inf = cfg.inference
        if inf.mode == "whole_volume":
            return ["inference.mode: whole_volume validates each subject in one pass; windows needs less "
                    "(inference.window_size)"]
        advice = [f"inference.window_size ({_shape(inf.window_size)}; memory grows with its voxels)"]
        if inf.batch_size > 1:
            advice.append(f"inference.batch_size ({inf.batch_size}; memory grows in proportion)")
        return advice
    advice = [f"training.batch_size ({t.batch_size}; memory grows in proportion)",
              f"sampler.window_size ({_shape(cfg.sampler.window_size)}; memory grows with its voxels)"]
    if t.compute_dtype == "float32":
        advice.append("training.mixed_precision: bfloat16 about halves the activations (native on GPUs of compute "
                      "capability 8.0 and later; float16 on older ones)")
    if t.cache == "device":
        advice.append("training.cache: device holds every training volume on the device; ram frees that memory")
    return advice


#: Where in a training run memory can run out, as :func:`training_advice` reads it.
TRAINING_PHASES = ("step", "validation", "volume validation", "checkpoint", "device cache")


def inference_advice(window_size: Optional[Sequence[int]], batch_size: int, precision: str, device: str) -> list[str]:
    """What to lower when segmenting a subject ran out of memory (``window_size`` None: the whole-volume pass)."""
    if device == "host":
        return ["the subject's volume and its class scores must fit in host memory; --workers N holds N subjects "
                "at a time"]
    if window_size is None:
        return ["--whole-volume (inference.mode: whole_volume) computes each subject in one pass; windows need less "
                "(--window, inference.window_size)"]
    advice = [f"--window / inference.window_size ({_shape(window_size)}; memory grows with its voxels)"]
    if batch_size > 1:
        advice.append(f"--batch-size / inference.batch_size ({batch_size}; memory grows in proportion)")
    if precision == "float32":
        advice.append("--precision bfloat16 / inference.precision: bfloat16 about halves the activations (native on "
                      "GPUs of compute capability 8.0 and later)")
    return advice


def peak_memory() -> list[tuple[str, int]]:
    """``(device, peak bytes)`` of every GPU TensorFlow computes on; [] without one (or without TensorFlow)."""
    import sys

    if "tensorflow" not in sys.modules:
        return []
    import tensorflow as tf

    peaks = []
    for device in tf.config.list_logical_devices("GPU"):
        name = device.name.split("device:")[-1]
        try:
            peaks.append((name, int(tf.config.experimental.get_memory_info(name)["peak"])))
        except (ValueError, KeyError):
            continue  # a device whose allocator keeps no statistics
    return peaks


def describe_peak(peaks: Sequence[tuple[str, int]]) -> str:
    """One line of :func:`peak_memory`'s figures ("" when there are none)."""
    return ", ".join(f"{name} {peak / 2**30:.2f} GiB" for name, peak in peaks)
