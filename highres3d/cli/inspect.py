"""``highres3d inspect model``: the parameter table of a HighResNet3D (thesis Table 6.1).

Builds the network of a config (``--config``), or loads a saved model
(``--model``: a .keras file or a run folder), applies a freeze level, and
prints per layer group the trainable, frozen and non-trainable (BatchNorm
statistics) counts, the BatchNorm mode in training, and NiftyNet's checkpoint
accounting (moving statistics, their zero-debias copies and step counters, and
Adam's two beta powers under conv_0) that gives the thesis' 812,312.
"""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="inspect a model: per-group parameter table (thesis Table 6.1)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inner = parser.add_subparsers(dest="inspect_what", metavar="WHAT")
    model = inner.add_parser(
        "model",
        help="per-group trainable / frozen / non-trainable counts and NiftyNet checkpoint sizes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", help="a YAML config (or the name of a shipped one): build its network")
    source.add_argument("-m", "--model", help="a .keras model file or a run folder (best.keras, else model.keras)")
    model.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set network.width_multiplier=0.5 (with --config)",
    )
    model.add_argument(
        "--freeze",
        metavar="K|GROUPS|REGEX",
        help="freeze the first K groups, comma-separated group names, or a NiftyNet vars_to_freeze regex "
        "(default: the config's transfer.freeze with --config, none with --model)",
    )
    model.add_argument(
        "--bn-policy",
        choices=("niftynet", "keras"),
        help="BatchNorm of frozen groups (default: the config's transfer.bn_policy, else niftynet)",
    )
    model.set_defaults(func=run_model)
    parser.set_defaults(func=lambda args: _usage(parser))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _parse_freeze(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    from highres3d.models.highresnet import GROUPS

    names = [part.strip() for part in text.split(",")]
    if all(name in GROUPS for name in names):
        return names
    return text


def run_model(args: argparse.Namespace) -> int:
    from highres3d.reporting import parameters_table
    from highres3d.transfer import freeze, load_model

    freeze_spec = _parse_freeze(args.freeze)
    bn_policy = args.bn_policy
    if args.config:
        from highres3d.config import load_config
        from highres3d.models import build_model, build_multi_domain_model

        cfg = load_config(args.config, overrides=args.overrides)
        model = build_multi_domain_model(cfg) if cfg.datasets else build_model(cfg)
        if args.freeze is None:
            freeze_spec = cfg.transfer.freeze
            if isinstance(freeze_spec, tuple):
                freeze_spec = list(freeze_spec)
        bn_policy = bn_policy or cfg.transfer.bn_policy
        described = f"config {args.config}"
    else:
        if args.overrides:
            from highres3d.errors import ConfigError

            raise ConfigError("--set only applies with --config")
        model = load_model(args.model)
        described = f"model {args.model}"
    bn_policy = bn_policy or "niftynet"
    report = freeze(model, freeze_spec, bn_policy=bn_policy)
    print(
        f"{model.name} from {described}: in_channels={getattr(model, 'in_channels', '?')}, "
        f"num_classes={getattr(model, 'num_classes', None) or getattr(model, 'heads', '?')}, activation={getattr(model, 'activation', '?')}, "
        f"widths={getattr(model, 'widths', None)}"
    )
    print(f"freeze={freeze_spec!r}, bn_policy={bn_policy}: {report.summary()}")
    print()
    print(parameters_table(model))
    if hasattr(model, "head_names"):  # a multi-domain trunk: its heads are not layer groups of the table
        from highres3d.models.multidomain import head_name

        heads = [f"{name} {model.get_layer(head_name(name)).count_params():,}" for name in model.head_names]
        print(f"heads (one conv_2 per dataset, parameters, not in the table): {', '.join(heads)}")
    return 0
