"""Running out of memory: recognising it on any backend, foreseeing it on the host, and a message that names the fix.

A device that runs out of memory raises its backend's own error
(TensorFlow's ``ResourceExhaustedError``, ``RESOURCE_EXHAUSTED`` from XLA on
JAX, torch's ``OutOfMemoryError``), hundreds of lines about allocators and
graph nodes that do not say which setting to change.  The trainer and the
inference loop turn it into :class:`OutOfMemory`: where it happened, the
allocator's own line, and the settings the memory grows with, each with its
current value.  A host out of memory (Python's ``MemoryError``) gets the same
treatment, with the host's settings.

The host's memory can be foreseen: volumes preprocessed into RAM all have a
size known once the first is loaded.  A job that cannot hold them would
otherwise be ended by the kernel's (or the scheduler's) OOM killer with one
word, ``Killed``, after loading for minutes.  :class:`HostMemoryCheck` stops it
after the first volume instead, and :func:`host_memory_available` counts the
job's cgroup limit (what SLURM's ``--mem`` sets), not only the machine's
free memory.

:func:`peak_memory` tells how much each GPU held at its peak, so that the
first training step that fits also shows how much room is left.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
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
_ABOUT_MEMORY = re.compile(r"\bOOM\b|out of memory|allocat|memory", re.IGNORECASE)
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
        # Resource exhaustion that is not memory (gRPC's "message larger than max" between workers) is left alone.
        if (type(current).__name__ in OUT_OF_MEMORY_ERRORS or "RESOURCE_EXHAUSTED" in text) and _ABOUT_MEMORY.search(text):
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
    """What to lower when ``phase`` of a training run ran out of memory on ``device``.

    ``phase``: ``"step"``, ``"validation"`` (windows), ``"volume validation"`` (whole subjects),
    ``"checkpoint"``, ``"device cache"`` (placing the volumes on the device) or ``"after the step"``.
    """
    t = cfg.training
    if device == "host":
        advice = []
        if t.cache == "ram":
            advice.append("training.cache: ram keeps every preprocessed volume in memory; disk memory-maps them "
                          "(preprocessed once), lazy preprocesses each at every visit")
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


# --------------------------------------------------------------------------- the host


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None


def _stat(folder: Path, key: str) -> int:
    found = re.search(rf"^{key} (\d+)$", _read(folder / "memory.stat") or "", re.MULTILINE)
    return int(found.group(1)) if found else 0


def host_memory_available(root: str | Path = "/") -> Optional[tuple[int, str]]:
    """Bytes this process may still allocate on the host, and what sets that figure; None where unknown.

    The smallest of the machine's available memory (``MemAvailable``) and, for
    every memory cgroup of the process and its ancestors that has a limit
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``: SLURM's
    ``--mem``, a container's limit), the limit minus what the cgroup uses.
    The page cache the cgroup can drop (``inactive_file``) does not count as
    used: reading a dataset fills it.  ``root`` stands for ``/`` in tests.
    """
    root = Path(root)
    found = []
    meminfo = re.search(r"^MemAvailable:\s+(\d+) kB", _read(root / "proc/meminfo") or "", re.MULTILINE)
    if meminfo:
        found.append((int(meminfo.group(1)) * 1024, "the machine's available memory (MemAvailable)"))
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        if fields[1] == "":
            base, limit_file, usage_file, inactive = root / "sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"
        elif "memory" in fields[1].split(","):
            base, limit_file, usage_file, inactive = (root / "sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                                      "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        parts = PurePosixPath(fields[2]).parts[1:]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            text = (_read(folder / limit_file) or "").strip()
            if not text.isdigit() or int(text) >= 2**60:  # "max", absent, or v1's "no limit"
                continue
            limit, used = int(text), int((_read(folder / usage_file) or "0").strip() or 0)
            free = max(0, limit - max(0, used - _stat(folder, inactive)))
            found.append((free, f"the memory limit of this job's cgroup, {limit / 2**30:.1f} GiB ({limit_file})"))
    return min(found) if found else None


#: Set by :func:`highres3d.workers.run_in_workers` in each worker: how many share this machine's memory.
WORKERS_ENV = "HIGHRES3D_WORKER_PROCESSES"


def worker_processes() -> int:
    """How many worker processes of one command share this machine's memory (1 outside workers)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def volumes_in_ram(cache: str, split: str) -> bool:
    """Whether a run with ``training.cache: cache`` holds the preprocessed volumes of ``split`` in RAM.

    ``disk`` memory-maps both splits; ``lazy`` preprocesses a training volume at
    every visit but keeps the validation volumes, which every validation reads
    whole; ``ram`` and ``device`` hold both (``device`` copies the training
    volumes to the accelerator from there).
    """
    if cache == "disk":
        return False
    return split != "training" or cache != "lazy"


def host_memory_fix(cache: str) -> str:
    """What holds fewer preprocessed volumes in RAM, for a run with ``training.cache: cache``."""
    fewer = "a smaller dataset.split.validation_fraction (or a split file) holds fewer validation volumes"
    if volumes_in_ram(cache, "training"):
        return ("training.cache: disk memory-maps the training and validation volumes, preprocessed once (lazy "
                f"preprocesses each training volume at every visit); {fewer}")
    if volumes_in_ram(cache, "validation"):
        return f"training.cache: disk memory-maps the validation volumes too; {fewer}"
    return fewer


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def require_host_memory(head: str, need: float, fix: str, available=None) -> None:
    """Raise :class:`OutOfMemory` when ``need`` more bytes will not fit in what this process may still use.

    The message is ``head`` (e.g. "training: 300 preprocessed volumes need"), the figures, and ``fix``.
    ``available`` stands for :func:`host_memory_available` (tests); nothing is raised where it is unknown.
    """
    found = (available or host_memory_available)()
    if found is None:
        return
    free, source = found
    sharing = worker_processes()
    if sharing > 1:
        # Every worker of the machine loads its own volumes at the same time, so each counts on its share.
        free, source = free // sharing, f"a 1/{sharing} share, for {sharing} worker processes, of {source}"
    if need > free:
        raise OutOfMemory(
            f"{head} {format_bytes(need)} and this process may use {format_bytes(free)} more ({source}). "
            f"Stopped before the system ends the job; {fix}",
            allocator=f"{format_bytes(need)} needed, {format_bytes(free)} free", device="host")


class HostMemoryCheck:
    """Stops preprocessing into RAM as soon as the volumes still to load cannot fit in the host's memory.

    Call :meth:`loaded` after each volume; the volumes to come are taken to be
    as large as the mean of those loaded so far (a dataset's volumes share
    their preprocessing, so its first tells the rest).  ``data check`` (run
    before training) reckons the same from the files' headers; this is the
    count of what preprocessing really made.

    Args:
        what: what is loaded, for the message (``"training"``).
        total: the number of volumes to load, ``also`` included.
        fix: the settings that load less, for the message.
        available: a function giving :func:`host_memory_available`'s answer.
    """

    def __init__(self, what: str, total: int, fix: str, available=None) -> None:
        self.what, self.total, self.fix, self.available = what, total, fix, available
        self.count = 0
        self.nbytes = 0

    def loaded(self, nbytes: int) -> None:
        """Count one more loaded volume of ``nbytes``; raise :class:`OutOfMemory` when the rest cannot fit."""
        self.count += 1
        self.nbytes += int(nbytes)
        left = self.total - self.count
        if left <= 0:
            return
        each = self.nbytes / self.count
        require_host_memory(
            f"{self.what}: {self.total} preprocessed volumes need about {format_bytes(each * self.total)} in RAM "
            f"({format_bytes(each)} each, from the {self.count} loaded); the {left} still to load need",
            each * left, self.fix, self.available)
