"""Multi-worker training (``training.strategy: multi_worker``): who this process is, who writes, what a lost worker means.

Every worker runs the same ``highres3d train`` command with its own
``TF_CONFIG``. TensorFlow's ``MultiWorkerMirroredStrategy`` all-reduces the
gradients, so the weights stay identical on every worker; each worker's input
pipeline draws its own share of the training windows (the pipeline seeds
derive from the input pipeline id, :mod:`highres3d.data.pipeline`).

Worker 0 is the chief: it alone writes the run folder (``config.yaml``,
``state.json``, ``metrics.csv``, checkpoints, ``best.keras``, TensorBoard).
The others go through the same saves (the documented TensorFlow pattern: every
worker takes part in every save) into a private scratch folder that is removed
when training ends (:class:`highres3d.training.run.WorkerRunFolder`). The run
folder must be on a file system every worker sees, like the data: a resumed
worker reads the chief's newest checkpoint from it.

A worker that dies stops the others within seconds: TensorFlow's coordination
service notices the missing heartbeats and aborts the pending collective;
:func:`worker_failure` turns that into one line naming the lost task and the
iteration the run can be resumed from.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from highres3d.errors import ConfigError, Highres3dError

TF_CONFIG = "TF_CONFIG"
DEFAULT_PORT = 23456

_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host0:23456", "host1:23456"]}, '
            '"task": {"type": "worker", "index": 0}}\'')
_FIX = (f"set it on every worker, e.g. {_EXAMPLE} (index 1 on the second), or on SLURM "
        "export TF_CONFIG=$(highres3d cluster tf-config) inside srun; "
        "or use training.strategy default/mirrored on one machine")


class WorkerFailure(Highres3dError):
    """Another worker of a multi-worker run was lost; the run is resumable from its last checkpoint."""


@dataclass(frozen=True)
class Worker:
    """This process's place in a training cluster.

    Args:
        index: position among the workers; 0 is the chief (a TF ``chief`` task
            counts as 0 and the ``worker`` tasks follow it).
        count: number of workers.
        addresses: ``host:port`` of every worker, chief first.
    """

    index: int = 0
    count: int = 1
    addresses: tuple[str, ...] = ()

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes the run folder."""
        return self.index == 0

    @property
    def label(self) -> str:
        """``worker 1/2``: the prefix of a non-chief worker's messages."""
        return f"worker {self.index}/{self.count}"

    def describe(self) -> str:
        """One line for the start of a run's log."""
        role = "chief, writes the run folder" if self.is_chief else "writes only to a scratch folder"
        return f"multi_worker: worker {self.index} of {self.count} ({role}); cluster {', '.join(self.addresses)}"


SINGLE = Worker()


def worker_from_tf_config(environ: Optional[Mapping[str, str]] = None) -> Worker:
    """Read and check ``TF_CONFIG`` the way ``MultiWorkerMirroredStrategy`` will use it.

    Args:
        environ: the environment (default: ``os.environ``).

    Returns:
        This process's :class:`Worker`.

    Raises:
        ConfigError: ``TF_CONFIG`` is missing or malformed; the message says what is
            wrong and how to set it.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        raise ConfigError(f"training.strategy multi_worker: ${TF_CONFIG} is not set; {_FIX}")

    def bad(what: str) -> ConfigError:
        return ConfigError(f"${TF_CONFIG}: {what}; {_FIX}")

    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad(f"not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise bad('no "cluster" object')
    cluster = spec["cluster"]
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise bad(f"cluster task types {unknown} are not used by multi_worker training (only chief and worker)")
    addresses: list[str] = []
    for kind in ("chief", "worker"):
        hosts = cluster.get(kind, [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise bad(f'cluster "{kind}" must be a list of "host:port" strings')
        if kind == "chief" and len(hosts) > 1:
            raise bad(f'cluster "chief" lists {len(hosts)} tasks; there is at most one')
        for host in hosts:
            if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", host):
                raise bad(f'cluster {kind} address {host!r} is not "host:port"')
        addresses.extend(hosts)
    if not addresses:
        raise bad('cluster lists no "worker" addresses')
    if len(set(addresses)) != len(addresses):
        raise bad("cluster lists an address twice")
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise bad(f'"task" must name this process\'s type ({" or ".join(repr(k) for k in cluster)}) and index')
    index = task.get("index", 0)
    size = len(cluster[task["type"]])
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise bad(f'task index {index!r} is not one of 0..{size - 1} of the {task["type"]} list')
    position = index if task["type"] == "chief" else len(cluster.get("chief", [])) + index
    return Worker(position, len(addresses), tuple(addresses))


def expand_hostlist(text: str) -> list[str]:
    """Expand a SLURM host list (``gpu[01-03,07],login1``) into host names, in order.

    The syntax of ``scontrol show hostnames``: comma-separated names, each
    with any number of bracketed ranges whose zero padding is kept.

    Args:
        text: the host list, e.g. ``$SLURM_JOB_NODELIST``.

    Raises:
        ConfigError: unbalanced brackets or a malformed range.
    """
    names, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise ConfigError(f"host list {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            if text[start:i].strip():
                names.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise ConfigError(f"host list {text!r}: unbalanced brackets")
    hosts: list[str] = []
    for name in names:
        hosts.extend(_expand_name(name, text))
    return hosts


def _expand_name(name: str, whole: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    values = []
    for part in match.group(1).split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values.extend(f"{n:0{width}d}" for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ConfigError(f"host list {whole!r}: cannot read the range [{match.group(1)}]")
    # Later bracket groups of the same name (rack[1-2]-n[01-02]) expand for every value of this one.
    return [host for value in values for host in _expand_name(head + value + tail, whole)]


def tf_config_from_slurm(environ: Optional[Mapping[str, str]] = None, port: int = DEFAULT_PORT) -> dict[str, Any]:
    """The ``TF_CONFIG`` of this SLURM task: one worker per node, the task's rank as its index.

    Args:
        environ: the environment of one task started by ``srun`` (default:
            ``os.environ``); reads ``SLURM_JOB_NODELIST`` (or
            ``SLURM_NODELIST``), ``SLURM_PROCID`` and ``SLURM_NTASKS``.
        port: the port every worker listens on (the same on each node).

    Returns:
        The ``TF_CONFIG`` object (``json.dumps`` it into the environment).

    Raises:
        ConfigError: not inside a SLURM task, or not one task per node.
    """
    environ = os.environ if environ is None else environ
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    rank = environ.get("SLURM_PROCID")
    if not nodelist or rank is None:
        raise ConfigError("highres3d cluster tf-config: SLURM_JOB_NODELIST and SLURM_PROCID are not set; "
                          "run it inside the job step (srun ... bash -c 'export TF_CONFIG=$(highres3d cluster "
                          "tf-config); highres3d train ...')")
    hosts = expand_hostlist(nodelist)
    tasks = int(environ.get("SLURM_NTASKS", len(hosts)))
    if tasks != len(hosts):
        raise ConfigError(f"highres3d cluster tf-config: {tasks} SLURM tasks on {len(hosts)} nodes; "
                          "multi_worker training runs one task per node (sbatch --ntasks-per-node=1), "
                          "each using all of its node's GPUs")
    if not 1 <= port <= 65535:
        raise ConfigError(f"highres3d cluster tf-config --port {port}: expected 1..65535")
    index = int(rank)
    if not 0 <= index < len(hosts):
        raise ConfigError(f"highres3d cluster tf-config: SLURM_PROCID {rank} is not one of 0..{len(hosts) - 1}")
    return {"cluster": {"worker": [f"{host}:{port}" for host in hosts]}, "task": {"type": "worker", "index": index}}


def all_succeeded(strategy: Any, ok: bool) -> bool:
    """A barrier: every worker says whether its part succeeded and learns whether all did.

    Args:
        strategy: the run's ``tf.distribute`` strategy.
        ok: whether this worker's part succeeded.

    Returns:
        True when every worker passed ``ok=True``.
    """
    import tensorflow as tf

    failed = strategy.run(lambda: tf.constant(0.0 if ok else 1.0))
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, failed, axis=None)) == 0.0


def is_worker_failure(err: BaseException) -> bool:
    """Whether a TensorFlow error means another worker (or the link to it) was lost."""
    import tensorflow as tf

    if isinstance(err, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
        return True
    text = str(err)
    return isinstance(err, tf.errors.OpError) and ("unhealthy" in text or "Collective ops is aborted" in text)


def failure_reason(err: BaseException) -> str:
    """The cause TensorFlow gives for a lost worker, in a few words (the lost tasks, when named)."""
    text = str(err)
    unhealthy = re.search(r"tasks are unhealthy[^:]*:((?:\s*/job:\w+/replica:\d+/task:\d+)+)", text)
    if unhealthy:
        tasks = re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", unhealthy.group(1))
        return f"{', '.join(f'{job} {task}' for job, task in tasks)} stopped sending heartbeats"
    match = re.search(r"Collective ops is aborted by: ([^\n]*)", text)
    reason = match.group(1) if match else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    reason = re.sub(r"^Error reported from /job:\w+/task:\d+: ", "", reason).rstrip(": ")[:200]
    remote = re.search(r"remote target /job:(\w+)/replica:\d+/task:(\d+)", text)
    return f"{reason}, from {remote.group(1)} {remote.group(2)}" if remote else reason


def worker_failure(err: BaseException, iteration: Optional[int], resumable: Optional[int],
                   run_path: os.PathLike) -> WorkerFailure:
    """The one-line error of a run whose peer was lost at ``iteration``.

    Args:
        err: the TensorFlow error that the lost peer caused.
        iteration: the iteration that could not complete (None: lost before training started).
        resumable: the iteration of the newest intact checkpoint (None: none yet).
        run_path: the run folder.
    """
    when = f"during iteration {iteration}" if iteration is not None else "before training started"
    where = (f"the run can be resumed from iteration {resumable}: start every worker again with --resume"
             if resumable else "no checkpoint was written yet, so start the run again")
    return WorkerFailure(f"multi_worker: a worker was lost {when} ({failure_reason(err)}); {run_path}: {where}")


def together(strategy: Any, worker: Worker, action: Any) -> Any:
    """Run ``action()`` on every worker, then wait until all have; a failure anywhere stops all.

    The chief prepares the run folder inside ``action`` before any other worker
    reads it, and a worker whose ``action`` failed (bad data on its node, a run
    folder that exists) does not leave the others waiting for it.

    Args:
        strategy: the run's ``tf.distribute`` strategy.
        worker: this process's :class:`Worker`.
        action: a function of no arguments.

    Returns:
        What ``action`` returned.
    """
    try:
        result = action()
    except Highres3dError:
        all_succeeded(strategy, False)
        raise
    if not all_succeeded(strategy, True):
        raise Highres3dError(f"multi_worker: another worker failed while preparing the run (see its error; "
                             f"this is {worker.label}), so this one stops too")
    return result


def averager(strategy: Any, variables: list) -> Any:
    """A function that sets ``variables`` to their mean over all workers.

    Keras 3 BatchNorm layers update their moving statistics from each worker's
    own windows, so they drift apart while the trained weights stay identical.
    Averaged before each validation and checkpoint, every worker validates
    the same model (so all take the same best-model and early-stopping
    decisions) and the chief saves statistics of the whole batch, as
    Keras 2's on-read ``MEAN`` variables did.

    Args:
        strategy: the run's ``tf.distribute`` strategy.
        variables: the variables to average (the model's non-trainable weights).

    Returns:
        A function of no arguments.
    """
    import tensorflow as tf

    if not variables:
        return lambda: None

    @tf.function
    def means():
        def replica_means():
            context = tf.distribute.get_replica_context()
            # tf.identity: all_reduce wants a tensor, not the distributed variable behind a Keras variable.
            return [context.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value)) for v in variables]

        return strategy.run(replica_means)

    def average() -> None:
        for variable, mean in zip(variables, means()):
            variable.assign(strategy.experimental_local_results(mean)[0])

    return average
