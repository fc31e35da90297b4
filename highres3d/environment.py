"""Where and with what a run was trained: one record per start or resume, kept in the run folder.

A run may be started on one node and resumed on others (after a time limit, a
preemption, with more workers), so a single description of "the environment"
would be wrong.  :func:`describe` gives one session's: when, the command
line, the host and the scheduler's job, the CPUs, the GPUs TensorFlow sees,
the memory the job could still use, Python and the versions of the packages
that decide the numbers, and the source commit when highres3d runs from a git
checkout.  :class:`~highres3d.training.run.RunFolder` appends it to
``sessions.json`` whenever a run starts or resumes, so a result can be traced
to the software and hardware that produced each of its iterations.
"""
from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

#: The packages whose versions decide a run's numbers or its files.
PACKAGES = ("highres3d", "tensorflow", "keras", "numpy", "scipy", "nibabel", "scikit-image", "jax", "torch")
#: Where schedulers put the job's id (SLURM, PBS, LSF).
JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
#: The scheduler's variables that identify a job, its array task and its nodes.
SCHEDULER_VARIABLES = JOB_VARIABLES + ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
                                       "SLURM_PROCID", "SLURM_CPUS_PER_TASK", "SLURM_RESTART_COUNT")
#: Variables that change what the devices do.
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "TF_FORCE_GPU_ALLOW_GROWTH", "TF_GPU_ALLOCATOR", "KERAS_BACKEND",
                    "TF_CONFIG", "HIGHRES3D_WORKER_PROCESSES", "OMP_NUM_THREADS")


def describe(from_iteration: int = 0) -> dict[str, Any]:
    """This process's session: a JSON-ready dict (see the module docstring)."""
    from highres3d.memory import format_bytes, host_memory_available

    memory = host_memory_available()
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "from_iteration": int(from_iteration),
        "command": list(sys.argv),
        "host": socket.gethostname(),
        "scheduler": {name: os.environ[name] for name in SCHEDULER_VARIABLES if name in os.environ},
        "variables": {name: os.environ[name] for name in DEVICE_VARIABLES if name in os.environ},
        "cpu": cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": gpus(),
        "host_memory_available": f"{format_bytes(memory[0])} ({memory[1]})" if memory else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: version for name in PACKAGES if (version := _version(name))},
        "highres3d_commit": source_commit(),
    }


def require_usable_gpus(what: str) -> None:
    """Stop ``what`` when this job has NVIDIA GPUs that TensorFlow cannot use.

    TensorFlow then runs on the CPU, tens of times slower, and says so only in
    a log line that ``TF_CPP_MIN_LOG_LEVEL`` (set by the CLI) hides: the job
    would take days where hours were booked.  The job's GPUs are those of
    :func:`highres3d.workers.visible_gpus` (the scheduler's
    ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``).  Hiding them
    (``CUDA_VISIBLE_DEVICES=-1``) runs on the CPU on purpose.
    """
    from highres3d.workers import visible_gpus

    given = visible_gpus()
    if not given:
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    from highres3d.errors import Highres3dError

    where = (f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in os.environ
             else "nvidia-smi -L")
    if not tf.test.is_built_with_cuda():
        why = "this TensorFlow was built without CUDA: pip install 'tensorflow[and-cuda]' (Linux)"
    else:
        why = ("TensorFlow could not load the CUDA driver or libraries: nvidia-smi shows the driver, and "
               "TF_CPP_MIN_LOG_LEVEL=0 python -c \"import tensorflow as tf; print(tf.config.list_physical_devices('GPU'))\" "
               "prints what TensorFlow could not load")
    raise Highres3dError(f"{what}: this job has {len(given)} GPU(s) ({where}) but TensorFlow sees none, so it would "
                         f"run on the CPU, tens of times slower; {why}. To run on the CPU on purpose, hide the GPUs: "
                         "CUDA_VISIBLE_DEVICES=-1")


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The processor's model name (Linux reports it in /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[str]:
    """The GPUs TensorFlow sees, by name; only asked when TensorFlow is already imported (a trainer's process)."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return []
    names = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (RuntimeError, ValueError):
            details = {}
        capability = details.get("compute_capability")
        name = details.get("device_name", device.name)
        names.append(f"{name} (compute capability {capability[0]}.{capability[1]})" if capability else name)
    return names


def source_commit() -> Optional[str]:
    """The git commit of the highres3d source when it runs from a checkout (an editable install), else None."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False)
        if done.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
