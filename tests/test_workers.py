"""Worker processes (highres3d.workers): whole prefixed lines, a failing worker, Ctrl-C.

The workers here run small scripts through ``runpy.run_path`` (a picklable
module-level function), so no TensorFlow is loaded and each spawn costs well
under a second; tests/test_experiments.py runs real trainings in workers.
"""
import os
import runpy
import signal
import sys
import threading
import time

import pytest

from highres3d import workers
from highres3d.errors import ConfigError, WorkerError
from highres3d.progress import Progress


def test_line_prefix_stream_passes_whole_prefixed_lines_and_is_not_a_terminal():
    lines = []
    stream = workers.LinePrefixStream("[worker 0/2] ", lines.append)
    assert not stream.isatty() and stream.writable()
    assert stream.write("first li") == len("first li")
    stream.flush()
    assert lines == []  # a partial line waits for its end
    stream.write("ne\nsecond\nthi")
    assert lines == ["[worker 0/2] first line", "[worker 0/2] second"]
    # A carriage return ends a line too (a redrawn bar becomes plain lines); empty lines are dropped.
    stream.write("rd\r\n\n\rbar 1\rbar 2\n")
    assert lines[2:] == ["[worker 0/2] third", "[worker 0/2] bar 1", "[worker 0/2] bar 2"]
    print("via print", file=stream)
    assert lines[-1] == "[worker 0/2] via print"
    stream.write("tail without newline")
    stream.close()
    assert lines[-1] == "[worker 0/2] tail without newline" and len(lines) == 7
    with pytest.raises(ValueError):
        stream.write("after close")
    # Progress sees no terminal there: plain lines, never a bar.
    assert Progress(10, "train", stream=workers.LinePrefixStream("", lines.append)).terminal is False


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_workers_must_be_a_whole_number_of_processes(bad):
    with pytest.raises(ConfigError, match="--workers"):
        workers.check_workers(bad)
    workers.check_workers(1)


def _scripts(folder, bodies):
    paths = []
    for i, body in enumerate(bodies):
        path = folder / f"worker{i}.py"
        path.write_text(body)
        paths.append({"path_name": str(path)})
    return paths


def test_a_failing_worker_is_named_after_the_others_finish(tmp_path, capsys):
    done = tmp_path / "done0"
    jobs = _scripts(tmp_path, [
        # Worker 0 is still busy when the others fail: it must be allowed to finish.
        f"import sys, time\nprint('hello from 0')\nprint('progress 1/2', file=sys.stderr)\ntime.sleep(1.5)\n"
        f"open({str(done)!r}, 'w').close()\nprint('finished', end='')\n",
        "print('about to fail')\nraise RuntimeError('broken on purpose')\n",
        "from highres3d.errors import ConfigError\nraise ConfigError('training.lr: expected a number')\n",
    ])
    echoed = []
    with pytest.raises(WorkerError) as caught:
        workers.run_in_workers(runpy.run_path, jobs, echo=echoed.append, hint="Run it again to resume")
    message = str(caught.value)
    assert "worker 1/3 failed (exit code 1): RuntimeError: broken on purpose" in message
    assert "worker 2/3 failed (exit code 2): training.lr: expected a number" in message
    assert "worker 0/3" not in message and "The other 1 worker finished" in message
    assert message.endswith("Run it again to resume") and caught.value.failed == [(1, 1), (2, 2)]
    assert done.exists()
    # Standard output through echo, standard error to ours; every line whole and prefixed.
    assert {"[worker 0/3] hello from 0", "[worker 0/3] finished", "[worker 1/3] about to fail"} <= set(echoed)
    err = capsys.readouterr().err.splitlines()
    assert "[worker 0/3] progress 1/2" in err
    assert "[worker 1/3] RuntimeError: broken on purpose" in err
    assert "[worker 2/3] highres3d: error: training.lr: expected a number" in err


def _saving_workers(folder, count=2):
    """Scripts of workers that "train" until interrupted, then take a while to "save their checkpoint".

    Each writes ``started<i>`` (its pid) when running and ``saved<i>`` (the interrupt's type) when saved;
    the save takes 2 s, long enough for the parent's own signal to land on a loaded machine.
    """
    body = (
        "import os, time\n"
        "folder, index = {folder!r}, {index}\n"
        "open(os.path.join(folder, f'started{{index}}'), 'w').write(str(os.getpid()))\n"
        "try:\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "except KeyboardInterrupt as stop:\n"
        "    time.sleep(2.0)\n"
        "    open(os.path.join(folder, f'saved{{index}}'), 'w').write(type(stop).__name__)\n"
        "    raise\n"
    )
    return _scripts(folder, [body.format(folder=str(folder), index=i) for i in range(count)])


@pytest.fixture()
def signals_reach_this_process():
    """SIGINT raises KeyboardInterrupt in this process and neither signal is blocked, for the test's duration.

    The fresh-clone CI run saw the parent miss its SIGINT twice (its workers got theirs), in a pytest
    worker that had run other test files first; it never happened here in isolation.  Whatever an
    earlier test left, these tests need the defaults a terminal's process has; the state found is
    printed, so a failure shows it.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
    print(f"found: SIGINT handler {previous!r}, blocked signals {sorted(blocked)}", file=sys.stderr)
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_lets_every_worker_save_once_then_reraises(tmp_path, capsys, signals_reach_this_process):
    jobs = _saving_workers(tmp_path)

    def press_ctrl_c():
        started = [tmp_path / f"started{i}" for i in range(2)]
        while not all(p.exists() and p.read_text() for p in started):
            time.sleep(0.05)
        # A terminal sends SIGINT to the whole process group: the workers get one from it,
        # and the parent forwards another; the second must not cut the save short.
        for path in started:
            os.kill(int(path.read_text()), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        workers.run_in_workers(runpy.run_path, jobs, echo=lambda line: None)
    presser.join(5)
    assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()
    err = capsys.readouterr().err
    assert "waiting for 2 workers to save their work" in err
    assert "[worker 0/2] interrupted" in err and "[worker 1/2] interrupted" in err


@pytest.mark.parametrize("count, gpus, expected", [
    (2, [], [{}, {}]),
    # Enough GPUs: disjoint shares, every GPU used, no memory growth needed.
    (2, ["0", "1"], [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]),
    (2, ["2", "3", "5", "7"], [{"CUDA_VISIBLE_DEVICES": "2,5"}, {"CUDA_VISIBLE_DEVICES": "3,7"}]),
    # Too few: shared round robin, and each process grows its memory instead of taking nearly all of it.
    (3, ["0", "1"], [{"CUDA_VISIBLE_DEVICES": "0", "TF_FORCE_GPU_ALLOW_GROWTH": "true"},
                     {"CUDA_VISIBLE_DEVICES": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true"},
                     {"CUDA_VISIBLE_DEVICES": "0", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}]),
])
def test_gpus_are_dealt_to_workers_without_two_sharing_one_while_there_are_enough(count, gpus, expected):
    assert workers.gpu_placement(count, gpus) == expected


@pytest.mark.parametrize("value, expected", [
    ("0,1", ["0", "1"]), ("3", ["3"]), (" 1 , 2 ", ["1", "2"]), ("GPU-8c1f", ["GPU-8c1f"]),
    # CUDA reads up to the first invalid entry: -1 or an empty value hides every GPU.
    ("-1", []), ("", []), ("1,-1,2", ["1"]),
])
def test_a_schedulers_gpu_allocation_is_respected(monkeypatch, value, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert workers.visible_gpus() == expected


def test_without_an_allocation_the_gpus_nvidia_smi_lists_are_used(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert workers.visible_gpus() == ["0", "1"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert workers.visible_gpus() == []
    smi.unlink()
    assert workers.visible_gpus() == []


def test_each_worker_starts_with_its_gpus_in_its_environment(tmp_path, monkeypatch):
    # A user's own memory-growth choice stands; the GPU share is always the worker's own.
    monkeypatch.setenv("TF_FORCE_GPU_ALLOW_GROWTH", "false")
    # Each also knows how many workers share the machine's memory (highres3d.memory.HostMemoryCheck).
    body = ("import os\nprint('SEES', os.environ.get('CUDA_VISIBLE_DEVICES'), "
            "os.environ.get('TF_FORCE_GPU_ALLOW_GROWTH'), os.environ.get('HIGHRES3D_WORKER_PROCESSES'))\n")
    jobs = _scripts(tmp_path, [body] * 3)
    echoed = []
    workers.run_in_workers(runpy.run_path, jobs, gpus=["4", "6"], echo=echoed.append)
    assert {line for line in echoed if "SEES" in line} == {
        "[worker 0/3] SEES 4 false 3", "[worker 1/3] SEES 6 false 3", "[worker 2/3] SEES 4 false 3"}
    assert "[worker 1/3] GPU 6 (shared with other workers; memory not grown)" in echoed
    echoed.clear()
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH")
    workers.run_in_workers(runpy.run_path, jobs[:2], gpus=["4", "6"], echo=echoed.append)
    assert {line for line in echoed if "SEES" in line} == {"[worker 0/2] SEES 4 None 2", "[worker 1/2] SEES 6 None 2"}
    assert "[worker 0/2] GPU 4" in echoed


def test_sigterm_from_a_scheduler_lets_every_worker_save_then_reraises_terminated(tmp_path, capsys,
                                                                                signals_reach_this_process):
    # SLURM signals every process of the job: each worker and the parent get SIGTERM, and a worker
    # must still finish saving when the parent forwards its own interrupt.
    from highres3d.signals import Terminated, sigterm_as_interrupt

    jobs = _saving_workers(tmp_path)

    def scheduler_terminates_the_job():
        started = [tmp_path / f"started{i}" for i in range(2)]
        while not all(p.exists() and p.read_text() for p in started):
            time.sleep(0.05)
        for path in started:
            os.kill(int(path.read_text()), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    sender = threading.Thread(target=scheduler_terminates_the_job, daemon=True)
    sender.start()
    with pytest.raises(Terminated), sigterm_as_interrupt():
        workers.run_in_workers(runpy.run_path, jobs, echo=lambda line: None)
    sender.join(5)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone after the block
    # A worker with both signals pending (its SIGTERM, the parent's SIGINT) sees the lower-numbered
    # SIGINT first: either way it saves once and stops.
    assert {(tmp_path / f"saved{i}").read_text() for i in range(2)} <= {"Terminated", "KeyboardInterrupt"}
    err = capsys.readouterr().err
    assert "terminated (SIGTERM): waiting for 2 workers to save their work" in err
    for i in range(2):
        assert f"[worker {i}/2] terminated (SIGTERM)" in err or f"[worker {i}/2] interrupted" in err


def test_a_worker_terminated_alone_is_named_with_its_exit_status(tmp_path):
    # scancel of one process, or the kernel's OOM handling through a wrapper: the others carry on.
    body = ("import os, signal, time\n"
            "if {index} == 1:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n")
    jobs = _scripts(tmp_path, [body.format(index=i) for i in range(2)])
    with pytest.raises(WorkerError, match=r"worker 1/2 failed \(exit code 143\)") as caught:
        workers.run_in_workers(runpy.run_path, jobs, echo=lambda line: None)
    assert caught.value.failed == [(1, 143)]
