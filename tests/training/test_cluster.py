"""TF_CONFIG checks, the SLURM helper and the messages of multi-worker training (no cluster needed)."""
import json

import pytest

from highres3d.cli.main import main
from highres3d.config import load_config
from highres3d.errors import ConfigError
from highres3d.training.cluster import (
    expand_hostlist,
    failure_reason,
    tf_config_from_slurm,
    worker_failure,
    worker_from_tf_config,
)
from highres3d.training.run import RunFolder


def tf_config(cluster, task):
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": task})}


def test_worker_from_tf_config():
    two = {"worker": ["node1:2000", "node2:2000"]}
    worker = worker_from_tf_config(tf_config(two, {"type": "worker", "index": 1}))
    assert (worker.index, worker.count, worker.is_chief, worker.label) == (1, 2, False, "worker 1/2")
    assert worker.describe() == ("multi_worker: worker 1 of 2 (writes only to a scratch folder); "
                                 "cluster node1:2000, node2:2000")
    assert worker_from_tf_config(tf_config(two, {"type": "worker", "index": 0})).is_chief
    # A separate chief task is worker 0 and the workers follow it.
    with_chief = {"chief": ["head:2000"], "worker": ["node1:2000"]}
    assert worker_from_tf_config(tf_config(with_chief, {"type": "chief", "index": 0})).is_chief
    assert worker_from_tf_config(tf_config(with_chief, {"type": "worker", "index": 0})).index == 1


@pytest.mark.parametrize("environ, problem", [
    ({}, r"\$TF_CONFIG is not set"),
    ({"TF_CONFIG": "{cluster: 1"}, r"\$TF_CONFIG: not valid JSON"),
    (tf_config({"ps": ["a:1"], "worker": ["b:1"]}, {"type": "worker"}), r"task types \['ps'\] are not used"),
    (tf_config({"worker": ["node1"]}, {"type": "worker", "index": 0}), r"'node1' is not \"host:port\""),
    (tf_config({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 2}), r"task index 2 is not one of 0..1"),
    (tf_config({"worker": ["a:1", "a:1"]}, {"type": "worker", "index": 0}), "lists an address twice"),
    (tf_config({"worker": ["a:1"]}, {"index": 0}), '"task" must name'),
])
def test_bad_tf_config_names_the_variable_and_the_fix(environ, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        worker_from_tf_config(environ)
    assert "highres3d cluster tf-config" in str(info.value) and '"task": {"type": "worker"' in str(info.value)


def test_multi_worker_training_without_tf_config_stops_before_anything_is_written(tmp_path, monkeypatch):
    from highres3d.training import Trainer

    monkeypatch.delenv("TF_CONFIG", raising=False)
    cfg = load_config("demo/brats.yaml", overrides=["training.strategy=multi_worker"], data_root=tmp_path / "data")
    with pytest.raises(ConfigError, match=r"training.strategy multi_worker: \$TF_CONFIG is not set"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, hosts", [
    ("gpu01", ["gpu01"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_malformed_lists(text):
    with pytest.raises(ConfigError, match="host list"):
        expand_hostlist(text)


def test_tf_config_from_slurm():
    env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
    spec = tf_config_from_slurm(env, port=2222)
    assert spec == {"cluster": {"worker": ["gpu07:2222", "gpu08:2222"]}, "task": {"type": "worker", "index": 1}}
    # What it prints is what the trainer reads.
    worker = worker_from_tf_config({"TF_CONFIG": json.dumps(spec)})
    assert (worker.index, worker.count) == (1, 2)
    with pytest.raises(ConfigError, match="one task per node"):
        tf_config_from_slurm(dict(env, SLURM_NTASKS="4"))
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST and SLURM_PROCID are not set"):
        tf_config_from_slurm({})


def test_cli_prints_tf_config_and_checks_it(monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[1-3]")
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert main(["cluster", "tf-config", "--port", "3000"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["cluster"]["worker"] == ["node1:3000", "node2:3000", "node3:3000"]
    monkeypatch.setenv("TF_CONFIG", printed.strip())
    assert main(["cluster", "check"]) == 0
    assert capsys.readouterr().out.startswith("multi_worker: worker 2 of 3 (writes only to a scratch folder)")
    monkeypatch.setenv("TF_CONFIG", "[]")
    assert main(["cluster", "check"]) == 2
    assert 'highres3d: error: $TF_CONFIG: no "cluster" object' in capsys.readouterr().err


def test_worker_failure_message():
    heartbeat = Exception("Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
                          "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe "
                          "tasks have crashed.\n [[{{node CollectiveReduceV2}}]] /job:worker/replica:0/task:0")
    assert failure_reason(heartbeat) == "worker 1 stopped sending heartbeats"
    reset = Exception("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
                      "information from remote target /job:worker/replica:0/task:0 while calling ...")
    assert failure_reason(reset) == "recvmsg:Connection reset by peer, from worker 0"
    assert str(worker_failure(reset, None, None, "runs/x")) == (
        "multi_worker: a worker was lost before training started (recvmsg:Connection reset by peer, from worker 0); "
        "runs/x: no checkpoint was written yet, so start the run again")


def test_a_run_resumes_under_another_strategy(tmp_path):
    run = RunFolder(tmp_path / "run")
    data = tmp_path / "data"
    run.prepare(load_config("demo/brats.yaml", overrides=["training.strategy=multi_worker"], data_root=data),
                resume=False, overwrite=False)
    state = run.prepare(load_config("demo/brats.yaml", data_root=data), resume=True, overwrite=False)
    assert state.iteration == 0
    with pytest.raises(Exception, match=r"changed: training.lr"):
        run.prepare(load_config("demo/brats.yaml", overrides=["training.lr=0.5"], data_root=data), resume=True,
                    overwrite=False)
