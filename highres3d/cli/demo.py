"""``highres3d demo``: synthesize data, pretrain, fine-tune vs. scratch, infer, evaluate, compare.

Runs the thesis' transfer-learning study in miniature on this machine's CPU
(about 9–10 minutes on 2 cores); a second run reuses what is already done.
"""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the whole study in miniature on synthetic data (about 9–10 min on a 2-core CPU)",
                                   description=__doc__)
    parser.add_argument("-o", "--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--iterations", type=int, help="training iterations per model (default: the demo configs')")
    parser.add_argument("--train-source", action="store_true",
                        help="train the source model here instead of using the shipped preset ixi_hippocampus_demo")
    parser.add_argument("--ixi-subjects", type=int, default=8,
                        help="synthetic IXI-like subjects for --train-source (default 8)")
    parser.add_argument("--brats-subjects", type=int, default=20, help="synthetic BraTS-like subjects (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of both demo configs, e.g. --set sampler.window_size=[16,16,16]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    from highres3d.demo import run_demo

    run_demo(args.output, ixi_subjects=args.ixi_subjects, brats_subjects=args.brats_subjects,
             iterations=args.iterations, seed=args.seed, overrides=args.overrides,
             show_progress=False if args.no_progress else None, train_source=args.train_source)
    return 0
