"""``highres3d import niftynet`` and ``highres3d config from-niftynet``: move a NiftyNet project over.

``import niftynet MODEL_DIR [--config FILE.ini] [--iteration N] -o RUN_DIR``
reads ``MODEL_DIR/models/model.ckpt-N`` (the newest unless ``--iteration``)
and writes a run folder (``model.keras``, ``config.yaml``,
``niftynet_import.json``) that ``infer``, ``evaluate`` and
``transfer.source`` use like any trained run. With ``--config`` the
application INI becomes the run's config (its histogram reference file, if
any, is copied in).

``config from-niftynet FILE.ini [-o FILE.yaml]`` converts a NiftyNet
application config into a validated highres3d config; keys that have no
equivalent are listed in the output with the reason. Several INIs convert
into a folder (``-o FOLDER``), each to ``<name>.yaml``.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("import", help="import a model trained elsewhere (NiftyNet TF1 checkpoints)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="import_command", metavar="SOURCE", required=True)
    nn = sub.add_parser("niftynet", help="a NiftyNet HighRes3DNet checkpoint (model_dir/models/model.ckpt-N)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    nn.add_argument("model_dir", metavar="MODEL_DIR", help="NiftyNet's model_dir (holding models/model.ckpt-N.*)")
    nn.add_argument("--config", metavar="FILE.ini", help="the NiftyNet application config the model was trained with")
    nn.add_argument("--iteration", type=int, metavar="N", help="checkpoint iteration (default: the newest)")
    nn.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run folder to create")
    nn.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    nn.set_defaults(func=run_import)


def register_config_action(config_subparsers) -> None:
    """Adds ``from-niftynet`` to the ``config`` command group."""
    conv = config_subparsers.add_parser(
        "from-niftynet", help="convert a NiftyNet application .ini into a highres3d YAML config",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    conv.add_argument("ini", metavar="FILE.ini", nargs="+", help="the NiftyNet config(s)")
    conv.add_argument("-o", "--output", metavar="FILE.yaml|FOLDER",
                      help="write here (default: print to the terminal); a folder for several configs")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    conv.set_defaults(func=run_convert)


def run_import(args) -> int:
    from highres3d.niftynet.checkpoint import import_checkpoint, write_run_folder

    config, hist_file, notes, iteration = None, None, [], args.iteration
    if args.config:
        from highres3d.niftynet.ini import convert_ini

        conversion = convert_ini(args.config)
        hist_file = conversion.histogram_file
        notes = [f"{key}: {reason}" for key, reason in conversion.unmapped] + conversion.warnings
        config = conversion.absolute_raw()
        # The run is for prediction: the checkpoint fine-tuning started from is not part of it.
        config.get("transfer", {}).pop("source", None)
        if iteration is None and conversion.inference_iter is not None and conversion.inference_iter >= 0:
            iteration = conversion.inference_iter  # NiftyNet's [INFERENCE] inference_iter
    model, report = import_checkpoint(args.model_dir, iteration)
    run_dir = write_run_folder(model, report, args.output, config=config, histogram_file=hist_file,
                               overwrite=args.overwrite, notes=notes)
    print(report.summary())
    if notes:
        print(f"  {len(notes)} INI key(s) not carried over (listed in {run_dir / 'niftynet_import.json'})")
    print(f"run folder: {run_dir}  (use it with: highres3d infer --model {run_dir} ..., or transfer.source)")
    return 0


def run_convert(args) -> int:
    from pathlib import Path

    from highres3d.errors import ConfigError, Highres3dError

    if len(args.ini) == 1 and not (args.output and Path(args.output).is_dir()):
        _convert_one(args.ini[0], args.output, args.overwrite, show=args.output is None)
        return 0
    # A shelf of projects: every INI into one folder, one failure does not stop the others.
    if not args.output:
        raise ConfigError("several .ini files: pass -o FOLDER for the converted configs")
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for ini in args.ini:
        try:
            _convert_one(ini, folder / (Path(ini).stem + ".yaml"), args.overwrite, show=False)
        except Highres3dError as err:
            failed.append(f"{ini}: {err}")
    if failed:
        print(f"{len(failed)} of {len(args.ini)} config(s) not converted:", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _convert_one(ini, output, overwrite: bool, show: bool) -> None:
    from highres3d.errors import Highres3dError
    from highres3d.niftynet.ini import convert_ini
    from highres3d.utils import OutputExistsError, atomic_path

    conversion = convert_ini(ini, output=output)
    text = conversion.yaml_text()
    if show:
        print(text, end="")
        return
    try:
        with atomic_path(output, overwrite=overwrite) as tmp:
            tmp.write_text(text)
    except OutputExistsError as err:
        raise Highres3dError(str(err)) from None
    print(f"{output}: written ({len(conversion.mapped)} keys mapped, {len(conversion.unmapped)} not mapped)")
    for warning in conversion.warnings:
        print(f"  warning: {warning}")
    for key, reason in conversion.unmapped:
        print(f"  not mapped: {key}: {reason}")
