"""``highres3d cluster tf-config|check``: the TF_CONFIG of a multi-worker run.

``tf-config`` prints the ``TF_CONFIG`` of this SLURM task (one worker per
node, from ``SLURM_JOB_NODELIST`` and ``SLURM_PROCID``); run it inside the job
step, on every node::

    srun bash -c 'export TF_CONFIG=$(highres3d cluster tf-config) && highres3d train ...'

``check`` reads ``$TF_CONFIG`` as ``training.strategy: multi_worker`` will and
prints this worker's place in the cluster (or what is wrong with it).
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("cluster", help="TF_CONFIG for multi-worker training (SLURM) and its check",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    config = sub.add_parser("tf-config", help="print this SLURM task's TF_CONFIG (one worker per node)")
    config.add_argument("--port", type=int, default=None,
                        help="port every worker listens on (default 23456; pick another if it is taken)")
    config.set_defaults(func=run_tf_config)
    check = sub.add_parser("check", help="check $TF_CONFIG and print this worker's index and the cluster")
    check.set_defaults(func=run_check)


def run_tf_config(args) -> int:
    import json

    from highres3d.training.cluster import DEFAULT_PORT, tf_config_from_slurm

    print(json.dumps(tf_config_from_slurm(port=DEFAULT_PORT if args.port is None else args.port)))
    return 0


def run_check(args) -> int:
    from highres3d.training.cluster import worker_from_tf_config

    print(worker_from_tf_config().describe())
    return 0
