"""``training.strategy: multi_worker`` with two real worker processes on localhost.

The workers are separate Python processes with their own ``TF_CONFIG`` on free
localhost ports, as on a cluster. A small script trains through the library's
``on_step`` hook and appends, per iteration, a digest of the weights and of
the worker's share of the batch to a trace file that the test compares.
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest

from highres3d.config import load_config
from highres3d.data.synth import synthesize_brats

TINY = [
    "sampler.window_size=[16,16,16]",
    "network.width_multiplier=0.25",
    "training.batch_size=2",
    "training.validation_every=2",
    "training.checkpoint_every=2",
    "training.max_checkpoints=2",
    "training.validation_windows=2",
    "inference.window_size=[32,32,32]",
    "augmentation.device=cpu",
    "training.strategy=multi_worker",
]

WORKER = r"""
import hashlib, json, os, signal, sys, time
import numpy as np
from highres3d.config import load_config
from highres3d.errors import Highres3dError
from highres3d.training import train

data, run_dir, trace, resume, die_at = sys.argv[1:6]
cfg = load_config("demo/brats.yaml", overrides=sys.argv[6:], data_root=data)

def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    return h.hexdigest()[:16]

def on_step(iteration, model, images, labels):
    row = {"iteration": iteration, "trainable": digest(model.trainable_weights), "all": digest(model.weights),
           "batch": digest([images, labels]), "windows": len(images), "time": time.time()}
    with open(trace, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    if str(iteration) == die_at:
        os.kill(os.getpid(), signal.SIGKILL)  # dies like a node that is lost or OOM-killed

try:
    result = train(cfg, run_dir, resume=resume == "resume", on_step=on_step)
except Highres3dError as err:  # what the CLI does with it
    print(f"highres3d: error: {err}", file=sys.stderr)
    sys.exit(2)
print("RESULT", result.iterations, result.run_dir)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    synthesize_brats(root, 5, size="small", seed=3)
    return root


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_env(ports, index, tmp):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", HIGHRES3D_PROGRESS_INTERVAL="0", TMPDIR=str(tmp),
               TF_CONFIG=json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                     "task": {"type": "worker", "index": index}}))
    # One thread pool each: two workers share this machine's few cores.
    env.update(TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    return env


def run_workers(data, run_dir, tmp_path, tag, *overrides, resume=False, die_at=None):
    """Two workers of the WORKER script; worker 1 kills itself after iteration ``die_at``."""
    ports = free_ports(2)
    processes, scratch = [], []
    for index in range(2):
        tmp = tmp_path / f"{tag}_tmp{index}"
        tmp.mkdir()
        scratch.append(tmp)
        argv = [sys.executable, "-c", WORKER, str(data), str(run_dir), str(tmp_path / f"{tag}_trace{index}.jsonl"),
                "resume" if resume else "new", str(die_at) if index == 1 and die_at else "-"]
        processes.append(subprocess.Popen(argv + TINY + list(overrides), env=worker_env(ports, index, tmp),
                                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [None, None]
    try:
        # The other worker first, then the chief: when it ends, it has noticed a lost worker.
        for index in (1, 0):
            out, err = processes[index].communicate(timeout=300)
            outputs[index] = (processes[index].returncode, out, err)
        chief_end = time.time()
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    traces = [[json.loads(line) for line in (tmp_path / f"{tag}_trace{i}.jsonl").read_text().splitlines()]
              for i in range(2)]
    # At most the time from worker 1's last step (its death, when die_at) to the chief's end.
    return Launch(outputs, traces, scratch, chief_end - traces[1][-1]["time"], [p.pid for p in processes])


@dataclass
class Launch:
    outputs: list  # (returncode, stdout, stderr) of each worker
    traces: list  # the on_step rows of each worker
    scratch: list  # each worker's $TMPDIR
    chief_lag: float  # seconds from the other worker's last step to the chief's end, at most
    pids: list


def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """Two workers train; worker 1 dies after iteration 5; both are started again with --resume and finish at 6."""
    tmp_path = tmp_path_factory.mktemp("multi_worker")
    run_dir = tmp_path / "run"
    killed = run_workers(data, run_dir, tmp_path, "killed", "training.max_iter=6", die_at=5)
    state_after_kill = json.loads((run_dir / "state.json").read_text())
    resumed = run_workers(data, run_dir, tmp_path, "resumed", "training.max_iter=6", resume=True)
    return run_dir, killed, state_after_kill, resumed


def test_a_lost_worker_ends_the_run_with_one_clear_line(run):
    run_dir, killed, state, _ = run
    (rc0, out0, err0), (rc1, _, _) = killed.outputs
    assert rc1 == -signal.SIGKILL
    assert rc0 == 2, err0[-3000:]
    message = err0.strip().splitlines()[-1]
    assert message == (f"highres3d: error: multi_worker: a worker was lost during iteration 6 (worker 1 stopped "
                       f"sending heartbeats); {run_dir}: the run can be resumed from iteration 4: start every "
                       "worker again with --resume"), message
    # TensorFlow's coordination service notices the missing heartbeats within seconds, not at a collective timeout.
    assert killed.chief_lag < 60, killed.chief_lag
    # The chief's newest checkpoint is the one the message names, complete, and nothing half-written is left.
    assert state["iteration"] == 4 and state["checkpoints"][-1] == "iter_000004.keras" and not state["finished"]
    assert not list(run_dir.rglob("*.part*"))


def test_resume_continues_from_the_chief_checkpoint_on_both_workers(run):
    run_dir, killed, _, resumed = run
    for rc, out, err in resumed.outputs:
        assert rc == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == f"RESULT 6 {run_dir}"  # the run folder, never a scratch folder
    assert [r["iteration"] for r in resumed.traces[0]] == [5, 6] == [r["iteration"] for r in resumed.traces[1]]
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_000004.keras'} at iteration 4" in resumed.outputs[1][1]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] and state["iteration"] == 6
    assert [int(r["iteration"]) for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    # Iteration 5 was trained twice (before the loss and after the resume) from the same checkpoint: same weights.
    assert resumed.traces[0][0]["trainable"] == killed.traces[0][4]["trainable"]


def test_weights_agree_on_every_worker_after_every_step(run):
    _, killed, _, resumed = run
    for traces in (killed.traces, resumed.traces):
        chief, other = traces[0][: len(traces[1])], traces[1]
        assert [r["iteration"] for r in chief] == [r["iteration"] for r in other]
        for a, b in zip(chief, other):
            assert a["trainable"] == b["trainable"], a["iteration"]
            # BatchNorm statistics follow each worker's windows; averaged at every validation and checkpoint.
            assert (a["all"] == b["all"]) == (a["iteration"] % 2 == 0), a["iteration"]
    assert len({r["trainable"] for r in killed.traces[0]}) == 5  # the weights do change


def test_each_worker_draws_its_own_windows_reproducibly(run, data):
    """Worker i's batches are input pipeline i of 2: different from the other's, and a pure function of the seed."""
    import hashlib

    import keras
    import tensorflow as tf

    from highres3d.data.dataset import Dataset
    from highres3d.data.pipeline import make_training_dataset
    from highres3d.training.trainer import Trainer, build_sampler, load_volumes

    run_dir, killed, _, resumed = run
    traces = [killed.traces[i][:4] + resumed.traces[i] for i in range(2)]  # iterations 1-6 with the resumed 5, 6
    assert all(r["windows"] == 1 for t in traces for r in t)  # global batch 2 = 1 window per worker
    for a, b in zip(*traces):
        assert a["batch"] != b["batch"], a["iteration"]
    # The same windows again, in this process, from the run's own config (its histogram landmarks) and the pipeline.
    cfg = load_config(run_dir / "config.yaml", overrides=["training.strategy=default"])
    volumes = load_volumes(Dataset.from_config(cfg.dataset).split("training"), cfg, "training", lambda *_: None, False)
    augmentation = Trainer(cfg, run_dir)._augmentation()
    assert augmentation is not None  # the windows are resampled on the CPU: rotation and scaling are checked too
    keras.utils.set_random_seed(cfg.training.seed)  # as the trainer does: tf.data's shuffles use the global seed too
    for index, trace in enumerate(traces):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2)
        batches = make_training_dataset(volumes, build_sampler(cfg), batch_size=cfg.training.batch_size,
                                        windows_per_volume=cfg.sampler.windows_per_volume,
                                        shuffle_buffer=cfg.training.shuffle_buffer, seed=cfg.training.seed,
                                        augmentation=augmentation, input_context=context, echo=None)
        for row, (images, labels) in zip(trace, batches.take(len(trace)).as_numpy_iterator()):
            h = hashlib.sha256()
            for a in (images, labels):
                h.update(np.ascontiguousarray(a).tobytes())
            assert h.hexdigest()[:16] == row["batch"], (index, row["iteration"])


def test_only_the_chief_writes_the_run_folder(run):
    run_dir, killed, _, resumed = run
    assert (run_dir / "best.keras").exists() and (run_dir / "model.keras").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "iter_000004.keras", "iter_000004.state.npz", "iter_000006.keras", "iter_000006.state.npz"]
    # TensorBoard names its event files after the writing process: the chief's only, one per start.
    chief_pids = {str(launch.pids[0]) for launch in (killed, resumed)}
    writers = {p.name.split(".")[-3] for p in (run_dir / "tensorboard").iterdir()}  # events.out.tfevents.T.HOST.PID.N.v2
    assert writers == chief_pids, (writers, chief_pids)
    for launch in (killed, resumed):
        (_, out0, err0), (_, out1, err1) = launch.outputs
        assert "multi_worker: worker 0 of 2 (chief, writes the run folder); cluster localhost:" in out0
        assert "[worker 1/2] multi_worker: worker 1 of 2 (writes only to a scratch folder)" in out1
        assert "train: " in err0 and "train: " not in err1  # progress on the chief only
    # The other worker's scratch folder is removed at the end (the killed worker could not clean up).
    assert not list(resumed.scratch[1].iterdir()) and not list(resumed.scratch[0].iterdir())
    assert [p.name for p in killed.scratch[1].iterdir() if p.name.startswith("highres3d-")][0].startswith(
        "highres3d-worker1-")


def test_volumes_on_the_device_with_two_workers(data, tmp_path):
    """training.cache device: each worker keeps its own copy (nothing broadcast; collectives cannot send uint8)."""
    launch = run_workers(data, tmp_path / "run", tmp_path, "device", "training.max_iter=2", "training.cache=device",
                         "augmentation.device=accelerator")
    for rc, out, err in launch.outputs:
        assert rc == 0, err[-3000:]
        assert "held on the device" in out and out.strip().splitlines()[-1] == f"RESULT 2 {tmp_path / 'run'}"
    # the workers cut different windows and end every step with the same trainable weights
    assert launch.traces[0][-1]["batch"] != launch.traces[1][-1]["batch"]
    assert [r["trainable"] for r in launch.traces[0]] == [r["trainable"] for r in launch.traces[1]]
    assert len({r["trainable"] for r in launch.traces[0]}) == 2  # and they change
