"""Worker processes (highres3d.workers): whole prefixed lines, a failing worker, Ctrl-C.

The workers here run small scripts through ``runpy.run_path`` (a picklable
module-level function), so no TensorFlow is loaded and each spawn costs well
under a second; tests/test_experiments.py runs real trainings in workers.
"""
import os
import runpy
import signal
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


def test_ctrl_c_lets_every_worker_save_once_then_reraises(tmp_path, capsys):
    # Each worker "trains" until interrupted, then takes a while to "save its checkpoint".
    body = (
        "import os, sys, time\n"
        "folder, index = {folder!r}, {index}\n"
        "open(os.path.join(folder, f'started{{index}}'), 'w').write(str(os.getpid()))\n"
        "try:\n"
        "    while True:\n"
        "        time.sleep(0.05)\n"
        "except KeyboardInterrupt:\n"
        "    time.sleep(0.5)\n"
        "    open(os.path.join(folder, f'saved{{index}}'), 'w').close()\n"
        "    raise\n"
    )
    jobs = _scripts(tmp_path, [body.format(folder=str(tmp_path), index=i) for i in range(2)])

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
