"""``highres3d config check|show|keys``: validate and display configs."""
from __future__ import annotations

from highres3d.cli.common import add_config_arguments, load_config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("config", help="validate or display a config file", description=__doc__)
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate a config (keys, types, ranges, extends)")
    add_config_arguments(check, positional=True)
    check.set_defaults(func=run_check)
    show = sub.add_parser("show", help="print the resolved config with every default filled in")
    add_config_arguments(show, positional=True)
    show.set_defaults(func=run_show)
    keys = sub.add_parser("keys", help="list every config key with its default and meaning")
    keys.set_defaults(func=run_keys)
    from highres3d.cli.niftynet import register_config_action

    register_config_action(sub)


def run_check(args) -> int:
    cfg = load_config_from_args(args)
    window = "x".join(map(str, cfg.sampler.window_size))
    if cfg.datasets:
        heads = ", ".join(f"{d.name} ({d.num_classes} classes)" for d in cfg.datasets)
        print(f"{cfg.source_file}: OK (multi-domain, {len(cfg.datasets[0].modalities)} modalities, heads {heads}, "
              f"window {window})")
        return 0
    print(f"{cfg.source_file}: OK ({len(cfg.dataset.modalities)} modalities, {cfg.network.num_classes} classes, "
          f"window {window})")
    return 0


def run_show(args) -> int:
    from highres3d.config import dump_config

    cfg = load_config_from_args(args)
    print(f"# resolved from {cfg.source_file}")
    print(dump_config(cfg), end="")
    return 0


def run_keys(args) -> int:
    from highres3d.config import describe_schema

    print(describe_schema())
    return 0
