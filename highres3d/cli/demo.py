"""``highres3d demo``: the transfer-learning study in miniature on synthetic data.

Synthesizes 20 BraTS-like subjects and compares three ways to learn the tumour
core: from scratch, fine-tuning the shipped hippocampus preset with its first
two layer groups frozen, and fine-tuning a 3D network inflated from the shipped
2D hippocampus preset (inflated_center, the best method of the transfer-methods
experiment); each on a small training subset and on the whole training split,
with 3 seeds: 18 trainings, two at a time in worker processes on a machine with
two or more CPUs.  Prints mean ± sd test Dice and the iterations each run
needed, and writes overlays and a dot plot.  About 8 minutes on a 2-core CPU
with native bfloat16 (it trains in bfloat16 there), about 10 in float32;
a second run reuses what is already done.
"""
from __future__ import annotations


def register(subparsers) -> None:
    from highres3d.demo import METHODS, SEEDS

    parser = subparsers.add_parser("demo", help="the study in miniature on synthetic data (8-10 min on a 2-core CPU)",
                                   description=__doc__)
    parser.add_argument("-o", "--output", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--methods", type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                        default=list(METHODS), metavar="M1,M2",
                        help=f"transfer methods compared (default: {','.join(METHODS)}; "
                             "see highres3d experiment transfer-methods --help)")
    parser.add_argument("--seeds", type=int, help=f"training seeds per cell (default {SEEDS}; 1 with --quick)")
    parser.add_argument("--iterations", type=int, help="training.max_iter of every training (default: the demo configs')")
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute smoke run of the whole pipeline (tiny windows, 4 iterations, "
                             "8 subjects, 1 seed); its figures mean nothing")
    parser.add_argument("--train-source", action="store_true",
                        help="train the 3D source model here instead of using the shipped preset ixi_hippocampus_demo "
                             "(inflated_center keeps the shipped 2D preset ixi_hippocampus_2d_demo)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="trainings run at a time, in worker processes, each with its share of the CPUs "
                             "(default: 2 with two or more CPUs available, else 1)")
    parser.add_argument("--ixi-subjects", type=int, default=8,
                        help="synthetic IXI-like subjects for --train-source (default 8)")
    parser.add_argument("--brats-subjects", type=int, help="synthetic BraTS-like subjects (default 20; 8 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthesis and the first training seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of both demo configs, e.g. --set dataset.split.subset_sizes=[5]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    parser.set_defaults(func=run)


def run(args) -> int:
    from highres3d.demo import run_demo

    run_demo(args.output, ixi_subjects=args.ixi_subjects, brats_subjects=args.brats_subjects,
             iterations=args.iterations, seed=args.seed, seeds=args.seeds, methods=args.methods,
             overrides=args.overrides, show_progress=False if args.no_progress else None,
             train_source=args.train_source, quick=args.quick, workers=args.workers)
    return 0
