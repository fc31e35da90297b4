"""``highres3d experiment freeze-levels|dataset-size|transfer-methods``: grids of runs, evaluated into results.csv."""
from __future__ import annotations

from highres3d.cli.common import add_config_arguments, load_config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("experiment", help="run the freeze-level, dataset-size or transfer-methods grid",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, text in (
        ("freeze-levels", "scratch + freeze 1..5 on the whole training split (Table 6.2)"),
        ("dataset-size", "nested subsets S1..Sn x scratch and freeze 1, 2, 3 (Tables 6.3-6.6)"),
        ("transfer-methods", "scratch, fine-tuning, freeze 1..5, discriminative rates, gradual unfreezing, Mean-Var, "
                             "Transfusion, 2D-inflated, multi-domain, dual-stage (docs/transfer.md)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        add_config_arguments(p)
        p.add_argument("-o", "--output", help="experiment folder (default: <training.output_dir>/<experiment>_<dataset.name>)")
        if name == "transfer-methods":
            p.add_argument("--methods", help="comma-separated methods, e.g. scratch,finetune,discriminative (default: all)")
            p.add_argument("--source-2d", help="2D source model (run folder or .keras) of the inflated_* methods")
            p.add_argument("--source-multi-domain", metavar="PATH",
                           help="multi-domain pretrained model (run folder of a datasets: config, .keras or "
                                "preset:NAME) of the multi_domain method")
        else:
            p.add_argument("--levels", help="comma-separated levels, e.g. scratch,1,2 (default: the thesis' levels)")
        p.add_argument("--repeats", type=int, default=1, help="seeds per cell; tables report mean ± sd")
        p.add_argument("--list", action="store_true", help="list the runs of the grid and exit")
        p.add_argument("--only", action="append", metavar="RUN", help="run only this run (repeatable)")
        p.add_argument("--shard", metavar="I/N", help="run every N-th run starting at the I-th, I from 0 (job arrays)")
        p.add_argument("--workers", type=int, default=1, metavar="N",
                       help="train N runs at a time in worker processes on this machine, each with its share of "
                            "the CPUs; their output is prefixed [worker i/N] (default 1; not with --shard)")
        p.add_argument("--max-iter", type=int, help="override training.max_iter")
        p.add_argument("--no-progress", action="store_true", help="no progress display")
        p.set_defaults(func=run, grid=name)


def run(args) -> int:
    from pathlib import Path

    from highres3d import experiments, reporting

    if args.max_iter is not None:
        args.overrides.append(f"training.max_iter={args.max_iter}")
    cfg = load_config_from_args(args)
    levels = args.levels.split(",") if getattr(args, "levels", None) else None
    if args.grid == "transfer-methods":
        methods = args.methods.split(",") if args.methods else experiments.TRANSFER_METHODS
        specs = experiments.transfer_methods_grid(cfg, methods, args.repeats, source_2d=args.source_2d,
                                                  source_multi_domain=args.source_multi_domain)
    elif args.grid == "freeze-levels":
        specs = experiments.freeze_level_grid(cfg, levels or experiments.FREEZE_LEVELS, args.repeats)
    else:
        specs = experiments.dataset_size_grid(cfg, levels or experiments.DATASET_SIZE_LEVELS, repeats=args.repeats)
    specs = experiments.select_runs(specs, args.only, args.shard)
    if args.list:
        for spec in specs:
            print(spec.name)
        return 0
    folder = Path(args.output) if args.output else Path(cfg.training.output_dir) / f"{args.grid}_{cfg.dataset.name}"
    rows = experiments.run_experiment(cfg, specs, folder, shard=args.shard, workers=args.workers,
                                      show_progress=False if args.no_progress else None)
    for table in reporting.experiment_tables(rows):
        print(table)
    if args.grid == "transfer-methods":
        print(reporting.transfer_methods_table(reporting.load_experiment(folder)))
    if args.workers > 1:
        print(f"results: {folder}/results.<i>of<N>.csv, one file per worker")
    else:
        print(f"results: {experiments.results_path(folder, args.shard)}")
    return 0
