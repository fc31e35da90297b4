"""Import a NiftyNet (TensorFlow 1) HighRes3DNet checkpoint into a highres3d run folder.

Contract:

* ``MODEL_DIR/models/model.ckpt-N`` (or ``MODEL_DIR/model.ckpt-N``) is read with
  TensorFlow's checkpoint reader (``tf.train.load_checkpoint``); no TF1 graph
  is built. The newest ``N`` is used unless an iteration is given.
* Every NiftyNet variable of the network is mapped onto
  :class:`~highres3d.models.HighResNet3D`:
  ``<scope>/conv_0_bn_<act>/conv_/w`` -> ``conv_0/conv/kernel``,
  ``.../bn_/{beta,gamma,moving_mean,moving_variance}`` -> ``conv_0/bn/...``,
  ``<scope>/res_<s>_<b>/{bn_0,bn_1,conv_0,conv_1}/...`` -> ``res_<s>_<b>/...``,
  ``conv_1_bn_<act>``, ``conv_2_bn`` likewise, and PReLU slopes
  ``.../prelu_acti_[i]/alpha`` (NiftyNet's real scope; ``acti_[i]/alpha`` is
  accepted too) -> ``.../act[_i]/alpha``. Kernels keep their layout
  ``(k, k, k, in, out)``.
* Input channels, classes, channel widths and the activation are read off the
  shapes and scope names, so any width of HighRes3DNet imports.
* Optimiser slots (``.../Adam``, ``.../Adam_1``, ``beta1_power``,
  ``beta2_power``; Momentum/RMSProp/Adagrad alike), TF1's zero-debias copies of
  the BN statistics (``.../biased``, ``.../local_step``), ``global_step`` and
  any variable outside the network's scope are ignored and counted in the
  report. The stored ``moving_mean`` /
  ``moving_variance`` are already de-biased, so they load as they are.
* A checkpoint that does not fit raises :class:`~highres3d.errors.DataError`
  listing every missing, extra and wrongly shaped variable at once.
* The run folder (``model.keras``, ``config.yaml``, ``niftynet_import.json``
  and the histogram reference file when the INI uses one) is assembled in a
  temporary folder beside the target and renamed into place, so it is never
  half-written, and an existing folder is only replaced with ``overwrite``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from highres3d.errors import DataError, Highres3dError
from highres3d.signals import interrupts_deferred
from highres3d.utils import current_umask

IMPORT_REPORT = "niftynet_import.json"
_CKPT = re.compile(r"^model\.ckpt-(\d+)\.index$")
_OPTIMISER_SLOTS = ("Adam", "Adam_1", "Momentum", "RMSProp", "RMSProp_1", "Adagrad", "Adadelta", "Adadelta_1", "Ftrl", "Ftrl_1")
_OPTIMISER_SCALARS = ("beta1_power", "beta2_power")
# NiftyNet activation token in scope names -> canonical activation of HighResNet3D.
_ACTIVATIONS = {"relu": "relu", "leakyrelu": "leaky_relu", "prelu": "prelu", "elu": "elu"}


# --------------------------------------------------------------------------- finding and reading


def available_iterations(model_dir: str | os.PathLike) -> tuple[Path, list[int]]:
    """The folder holding ``model.ckpt-N`` files and the iterations found there (sorted)."""
    model_dir = Path(model_dir)
    for folder in (model_dir / "models", model_dir):
        if folder.is_dir():
            found = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _CKPT.match(p.name)))
            if found:
                return folder, found
    if not model_dir.exists():
        raise DataError(f"{model_dir}: folder not found (expected NiftyNet's model_dir)")
    raise DataError(
        f"{model_dir}: no NiftyNet checkpoint (expected models/model.ckpt-<iteration>.index and .data-* files)"
    )


def find_checkpoint(model_dir: str | os.PathLike, iteration: Optional[int] = None) -> tuple[Path, int]:
    """The checkpoint prefix ``.../model.ckpt-N`` and ``N``: the newest, or ``iteration``."""
    folder, found = available_iterations(model_dir)
    if iteration is None or iteration < 0:  # NiftyNet's -1 means the latest too
        iteration = found[-1]
    elif iteration not in found:
        raise DataError(
            f"{folder}: no checkpoint for iteration {iteration}; available: {', '.join(map(str, found))}"
        )
    return folder / f"model.ckpt-{iteration}", iteration


def read_checkpoint(prefix: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint by name (the TF1 and TF2 formats both read)."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes = reader.get_variable_to_shape_map()
        return {name: np.asarray(reader.get_tensor(name)) for name in shapes if not name.startswith("_")}
    except (tf.errors.OpError, ValueError) as err:
        raise DataError(f"{prefix}: cannot read the checkpoint ({err.__class__.__name__}: {err})") from None


# --------------------------------------------------------------------------- names


@dataclasses.dataclass
class Classified:
    """A checkpoint's variables sorted by role."""

    network: dict[str, np.ndarray]
    optimiser: list[str]
    zero_debias: list[str]
    global_step: list[str]
    other: list[str]


def classify(variables: Mapping[str, np.ndarray]) -> Classified:
    """Split checkpoint variables into network weights and what the import ignores."""
    out = Classified({}, [], [], [], [])
    for name, value in sorted(variables.items()):
        leaf = name.rsplit("/", 1)[-1]
        if leaf in _OPTIMISER_SLOTS or leaf in _OPTIMISER_SCALARS:
            out.optimiser.append(name)
        elif leaf == "local_step" or "/biased" in name or leaf == "biased":
            out.zero_debias.append(name)
        elif leaf == "global_step":
            out.global_step.append(name)
        elif leaf in ("w", "beta", "gamma", "moving_mean", "moving_variance", "alpha"):
            out.network[name] = value
        else:
            out.other.append(name)
    return out


def network_scope(names) -> tuple[str, str]:
    """The scope of the network (``HighRes3DNet``) and the NiftyNet activation token, from the names."""
    scopes = {}
    for name in names:
        m = re.match(r"^(.*?)/?conv_0_bn_([a-z0-9]+)/conv_/w$", name)
        if m:
            scopes[m.group(1)] = m.group(2)
    if len(scopes) != 1:
        found = ", ".join(sorted(scopes)) or "none"
        raise DataError(
            "not a NiftyNet HighRes3DNet checkpoint: expected exactly one '<scope>/conv_0_bn_<activation>/conv_/w' "
            f"variable (found scopes: {found})"
        )
    scope, token = next(iter(scopes.items()))
    if token not in _ACTIVATIONS:
        raise DataError(
            f"{scope}/conv_0_bn_{token}: activation {token!r} has no HighResNet3D equivalent "
            f"(supported: {', '.join(_ACTIVATIONS)})"
        )
    return scope, token


def niftynet_names(weight_path: str, scope: str, token: str) -> list[str]:
    """NiftyNet names a HighResNet3D weight path may have in a checkpoint, preferred first."""
    top, leaf, variable = weight_path.split("/")
    nn_var = {"kernel": "w"}.get(variable, variable)
    prefix = f"{scope}/" if scope else ""
    if top in ("conv_0", "conv_1", "conv_2"):
        block = f"{top}_bn" if top == "conv_2" else f"{top}_bn_{token}"
        if leaf == "act":
            return [f"{prefix}{block}/{token}_acti_/{nn_var}", f"{prefix}{block}/acti_/{nn_var}"]
        return [f"{prefix}{block}/{leaf}_/{nn_var}"]
    m = re.fullmatch(r"act_(\d)", leaf)
    if m:
        return [f"{prefix}{top}/{token}_acti_{m.group(1)}/{nn_var}", f"{prefix}{top}/acti_{m.group(1)}/{nn_var}"]
    return [f"{prefix}{top}/{leaf}/{nn_var}"]


def _shape(weights: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    if name not in weights:
        raise DataError(f"not a complete HighRes3DNet checkpoint: variable {name} is missing")
    return tuple(weights[name].shape)


def infer_architecture(weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``HighResNet3D`` arguments (in_channels, num_classes, activation, filters) from the variables."""
    scope, token = network_scope(weights)
    p = f"{scope}/" if scope else ""
    conv0 = _shape(weights, f"{p}conv_0_bn_{token}/conv_/w")
    res2 = _shape(weights, f"{p}res_2_0/conv_0/w")
    res3 = _shape(weights, f"{p}res_3_0/conv_0/w")
    conv1 = _shape(weights, f"{p}conv_1_bn_{token}/conv_/w")
    conv2 = _shape(weights, f"{p}conv_2_bn/conv_/w")
    if len(conv0) != 5 or len(conv2) != 5:
        raise DataError(f"{p}conv_0_bn_{token}/conv_/w has shape {conv0}: not a 3D network (2D NiftyNet models are not supported)")
    return {
        "in_channels": int(conv0[3]),
        "num_classes": int(conv2[4]),
        "activation": _ACTIVATIONS[token],
        "filters": (int(conv0[4]), int(res2[4]), int(res3[4]), int(conv1[4])),
        "scope": scope,
        "token": token,
    }


@dataclasses.dataclass
class ImportReport:
    """What an import mapped and ignored."""

    checkpoint: str
    iteration: int
    architecture: dict[str, Any]
    mapped: dict[str, str]  # NiftyNet name -> weight path
    ignored: dict[str, list[str]]

    def summary(self) -> str:
        a = self.architecture
        lines = [
            f"{self.checkpoint}: HighRes3DNet, {a['in_channels']} input channel(s), {a['num_classes']} classes, "
            f"activation {a['activation']}, widths {a['filters']}",
            f"  mapped {len(self.mapped)} network variables onto HighResNet3D",
        ]
        for kind, names in self.ignored.items():
            if names:
                lines.append(f"  ignored {len(names)} {kind.replace('_', ' ')} variable(s) (not needed to predict or fine-tune)")
        return "\n".join(lines)


def build_model(weights: Mapping[str, np.ndarray]):
    """A :class:`HighResNet3D` holding the checkpoint's weights; raises DataError listing every misfit."""
    from highres3d.models import HighResNet3D, named_weights

    arch = infer_architecture(weights)
    try:
        model = HighResNet3D(arch["in_channels"], arch["num_classes"], activation=arch["activation"],
                             filters=arch["filters"])
    except ValueError as err:
        raise DataError(f"the checkpoint's shapes do not make a HighRes3DNet: {err}") from None
    mapped: dict[str, str] = {}
    missing, wrong = [], []
    wrong_names: set[str] = set()
    for path, variable in named_weights(model).items():
        candidates = niftynet_names(path, arch["scope"], arch["token"])
        name = next((c for c in candidates if c in weights), None)
        if name is None:
            missing.append(f"{candidates[0]} (for {path}, shape {tuple(variable.shape)})")
            continue
        value = weights[name]
        target = tuple(int(d) for d in variable.shape)
        if value.shape != target and value.size == int(np.prod(target)) and path.endswith("/alpha"):
            value = value.reshape(target)  # NiftyNet keeps PReLU slopes as (C,), Keras as (1, 1, 1, C)
        if value.shape != target:
            wrong.append(f"{name}: shape {tuple(value.shape)}, expected {target} for {path}")
            wrong_names.add(name)
            continue
        variable.assign(value.astype(np.float32))
        mapped[name] = path
    extra = sorted(set(weights) - set(mapped) - wrong_names)
    if missing or wrong or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + "; ".join(missing))
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape: " + "; ".join(wrong))
        if extra:
            parts.append(f"{len(extra)} extra (not part of HighRes3DNet): " + ", ".join(extra))
        raise DataError("the checkpoint does not fit HighRes3DNet: " + " | ".join(parts))
    return model, arch, mapped


def import_checkpoint(model_dir: str | os.PathLike, iteration: Optional[int] = None):
    """Read and map a NiftyNet checkpoint: returns ``(model, ImportReport)``."""
    prefix, iteration = find_checkpoint(model_dir, iteration)
    classified = classify(read_checkpoint(prefix))
    scope, _ = network_scope(classified.network)
    inside = [n for n in classified.other if not scope or n.startswith(scope + "/")]
    if inside:
        # Unknown variables inside the network would mean a different architecture: refuse rather than guess.
        raise DataError(
            f"{prefix}: variables inside {scope or 'the network'} that HighRes3DNet does not have: " + ", ".join(inside)
        )
    unrelated = [n for n in classified.other if n not in inside]
    model, arch, mapped = build_model(classified.network)
    arch = {k: v for k, v in arch.items() if k != "token"}
    report = ImportReport(str(prefix), iteration, arch, mapped, {
        "optimiser_slot": classified.optimiser,
        "zero_debias": classified.zero_debias,
        "global_step": classified.global_step,
        "outside_the_network": unrelated,
    })
    return model, report


def keep_only_restored(model, report: ImportReport, pattern: str, seed: int = 0) -> list[str]:
    """Give every weight whose NiftyNet name ``pattern`` does not match its initial value.

    NiftyNet's ``vars_to_restore`` restored only the matching variables and
    left the others as initialised; applying this to an imported model and then
    loading it in full has the same effect.

    Args:
        model: the imported :class:`HighResNet3D`.
        report: its import report (NiftyNet name -> weight path).
        pattern: the ``vars_to_restore`` regex, searched in the NiftyNet names.
        seed: seed of the fresh initial values.

    Returns:
        The NiftyNet names that were not restored.
    """
    import keras

    from highres3d.models import HighResNet3D, named_weights

    regex = re.compile(pattern)
    arch = report.architecture
    keras.utils.set_random_seed(seed)
    fresh = named_weights(HighResNet3D(arch["in_channels"], arch["num_classes"], activation=arch["activation"],
                                       filters=arch["filters"]))
    weights = named_weights(model)
    reset = []
    for name, path in sorted(report.mapped.items()):
        if not regex.search(name):
            weights[path].assign(fresh[path].numpy())
            reset.append(name)
    return reset


# --------------------------------------------------------------------------- the run folder


def _default_config(arch: Mapping[str, Any]) -> dict:
    n = arch["in_channels"]
    modalities = ["T1", "T2"] if n == 2 else ["image"] if n == 1 else [f"image_{i}" for i in range(n)]
    return {"dataset": {"modalities": modalities}, "network": {}}


def write_run_folder(
    model,
    report: ImportReport,
    run_dir: str | os.PathLike,
    config: Optional[dict] = None,
    histogram_file: Optional[Path] = None,
    overwrite: bool = False,
    notes: Optional[list[str]] = None,
) -> Path:
    """Write an imported model as a run folder that ``infer``, ``evaluate`` and ``transfer.source`` read.

    Args:
        model: the imported :class:`HighResNet3D`.
        report: the import report (saved as ``niftynet_import.json``).
        run_dir: the folder to create.
        config: a raw highres3d config (e.g. converted from the NiftyNet INI);
            its network section is overwritten by what the checkpoint says.
        histogram_file: NiftyNet histogram reference file to copy in.
        overwrite: replace an existing folder.
        notes: extra lines for the report (e.g. INI keys not mapped).

    Raises:
        Highres3dError: when ``run_dir`` exists and ``overwrite`` is false, or
            the config disagrees with the checkpoint.
    """
    from highres3d.config import config_from_dict, dump_config

    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise Highres3dError(f"{run_dir}: already exists and is not empty; pass --overwrite to replace it, or choose another -o")
    arch = report.architecture
    raw = copy.deepcopy(config) if config else _default_config(arch)
    network = raw.setdefault("network", {})
    network.update(num_classes=arch["num_classes"], activation=arch["activation"])
    network.pop("width_multiplier", None)
    modalities = raw.setdefault("dataset", {}).get("modalities", ["T1", "T2"])
    if len(modalities) != arch["in_channels"]:
        raise Highres3dError(
            f"the config lists {len(modalities)} modalities ({', '.join(modalities)}) but the checkpoint's conv_0 "
            f"takes {arch['in_channels']} input channels; fix the image sections of the INI"
        )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", suffix=".part", dir=run_dir.parent))
    try:
        if histogram_file is not None:
            shutil.copyfile(histogram_file, staging / "histogram_ref_file.txt")
            hist = raw.setdefault("preprocessing", {}).setdefault("histogram", {})
            # Relative: config.yaml resolves it against its own folder, so the run folder can move.
            hist["ref_file"] = "histogram_ref_file.txt"
        cfg = config_from_dict(raw)
        widths = tuple(model.widths)
        from highres3d.models.highresnet import scaled_filters

        if widths != scaled_filters(cfg.network.width_multiplier):
            # The config cannot state arbitrary widths; the model file carries them.
            notes = list(notes or []) + [f"channel widths {widths} differ from network.width_multiplier "
                                         f"{cfg.network.width_multiplier}; the model file keeps them"]
        (staging / "config.yaml").write_text(
            f"# imported from NiftyNet checkpoint {report.checkpoint}\n" + dump_config(cfg)
        )
        with interrupts_deferred():  # a Ctrl-C inside Keras' save can hang it: it waits for the save
            model.save(str(staging / "model.keras"))
        payload = dataclasses.asdict(report)
        payload["architecture"]["filters"] = list(arch["filters"])
        payload["notes"] = list(notes or [])
        (staging / IMPORT_REPORT).write_text(json.dumps(payload, indent=2) + "\n")
        os.chmod(staging, 0o777 & ~current_umask())
        if run_dir.exists():
            shutil.rmtree(run_dir)
        os.replace(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return run_dir
