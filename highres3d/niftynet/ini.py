"""Convert a NiftyNet 0.5 segmentation application config (``.ini``) into a highres3d config.

Contract: :func:`convert_ini` reads the INI (``configparser``; ``#``/``;``
comments), maps every key it can onto the highres3d schema, keeping the value's
meaning, and lists every other key with the reason it is not carried over; the
result always validates (:func:`highres3d.config.config_from_dict`). A key
whose value cannot be honoured (another network, a 2D window, an unknown loss)
is an error, and all such errors are reported together.

Path rules follow NiftyNet: ``model_dir`` is relative to the INI's folder;
``dataset_split_file`` and ``histogram_ref_file`` are relative to
``model_dir``; ``path_to_search`` and ``csv_file`` are tried relative to the
current folder first, then to the INI's folder (a path found in neither is
kept relative to the INI and reported as a warning, so a model can be imported
on a machine without the training data). The YAML written by
``config from-niftynet -o`` states paths relative to its own folder.

Meaning-preserving conversions (the table in ``docs/niftynet.md`` lists all):

* ``decay`` (with ``reg_type = L2``) -> ``network.l2_decay``: the model adds
  ``decay * sum(w^2) / 2`` per kernel, as NiftyNet's ``tf.nn.l2_loss``;
* ``border`` -> ``inference.overlap = 2 * border / window`` and
  ``blend: crop`` (NiftyNet cropped ``border`` voxels off each window);
* ``window_sampling`` weighted / balanced / uniform -> ``sampler.type``
  label / class_weighted (equal class probabilities) / uniform;
* ``rotation_angle`` and ``scaling_percentage`` ranges -> the largest
  magnitude (the ranges are symmetric in practice; asymmetric ones are noted);
* ``random_flipping_axes`` (-1 = off) -> ``augmentation.flip_axes``;
* ``starting_iter`` N (or -1) and ``max_iter`` M -> initialise from
  ``model_dir``'s checkpoint N (imported as a run folder, see
  :attr:`Conversion.pending_import`) and train ``M - N`` iterations;
* ``vars_to_freeze`` (default ``vars_to_restore``, NiftyNet's rule) ->
  ``transfer.freeze`` (the regex is used verbatim against NiftyNet names);
  ``vars_to_restore`` with ``starting_iter``: the imported starting model
  keeps initial values for the variables the regex does not match;
* ``validation_max_iter`` batches -> ``training.validation_windows`` windows;
* ``label_normalisation`` -> ``preprocessing.labels`` read from the
  ``histogram_ref_file`` entries ``label_label-from`` / ``-to`` (values not
  listed become 0, as in NiftyNet).
"""
from __future__ import annotations

import configparser
import copy
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from highres3d.errors import ConfigError

SYSTEM_SECTIONS = ("SYSTEM", "NETWORK", "TRAINING", "INFERENCE", "EVALUATION", "SEGMENTATION")
OTHER_APPLICATIONS = ("REGRESSION", "GAN", "AUTOENCODER", "CLASSIFICATION", "REGISTRATION")
INPUT_KEYS = ("csv_file", "csv_data_file", "path_to_search", "filename_contains", "filename_not_contains",
              "filename_removefromid", "spatial_window_size", "pixdim", "axcodes", "interp_order", "loader")
_LOSSES = {"dice": "dice", "dice_ns": "dice_ns", "gdsc": "generalised_dice", "crossentropy": "cross_entropy",
           "diceplusxent": "dice_ce"}
_OPTIMISERS = {"adam": ("adam", None), "rmsprop": ("rmsprop", None),
               "nesterov": ("sgd", None),
               "momentum": ("sgd", "highres3d's SGD uses Nesterov momentum 0.9; NiftyNet's 'momentum' was classical momentum 0.9")}
_ACTIVATIONS = {"leakyrelu": "leaky_relu", "relu": "relu", "prelu": "prelu", "elu": "elu"}
_SAMPLERS = {"uniform": "uniform", "weighted": "label", "balanced": "class_weighted"}
# Keys with no effect in highres3d, and why.
_NO_MEANING = {
    ("SYSTEM", "cuda_devices"): "GPUs are chosen with CUDA_VISIBLE_DEVICES",
    ("SYSTEM", "num_threads"): "tf.data sizes its own thread pool",
    ("SYSTEM", "action"): "the action is the command: highres3d train / infer / evaluate",
    ("SYSTEM", "event_handler"): "highres3d's training loop has no pluggable event handlers",
    ("SYSTEM", "iteration_generator"): "highres3d's training loop has no pluggable iteration generators",
    ("NETWORK", "queue_length"): "no window queue: tf.data prefetches; training.shuffle_buffer sets the shuffling",
    ("NETWORK", "multimod_foreground_type"): "one foreground rule per modality (preprocessing.foreground)",
    ("NETWORK", "volume_padding_mode"): "volumes are not padded; windows reaching outside use sampler.pad_value",
    ("NETWORK", "bias_initializer"): "HighResNet3D's convolutions have no bias (as HighRes3DNet's)",
    ("NETWORK", "weight_initializer_args"): "HighResNet3D initialises kernels with he_normal",
    ("NETWORK", "bias_initializer_args"): "HighResNet3D's convolutions have no bias",
    ("TRAINING", "tensorboard_every_n"): "TensorBoard scalars are written at every validation (training.validation_every)",
    ("TRAINING", "antialiasing"): "augmentation resamples windows, not volumes; no anti-aliasing step",
    ("TRAINING", "isotropic_scaling"): "scaling is drawn per axis",
    ("INFERENCE", "save_seg_dir"): "pass the folder to 'highres3d infer -o DIR'",
    ("INFERENCE", "output_postfix"): "segmentations are written as <subject>_seg.nii.gz",
    ("INFERENCE", "dataset_to_infer"): "'highres3d infer' segments a folder; 'highres3d evaluate' chooses the split",
    ("INFERENCE", "fill_constant"): "every voxel is covered by a window; there is nothing to fill",
    ("INFERENCE", "inference_iter"): "the checkpoint 'highres3d import niftynet --config FILE.ini' imports (unless --iteration)",
    ("EVALUATION", "save_csv_dir"): "pass the folder to 'highres3d evaluate -o DIR'",
    ("EVALUATION", "evaluations"): "'highres3d evaluate' always reports Dice, Jaccard and Hausdorff distances",
    ("EVALUATION", "evaluation_units"): "evaluation is per class (NiftyNet's 'foreground' units)",
    ("SEGMENTATION", "output_prob"): "pass 'highres3d infer --probabilities' to also write probabilities",
    ("SEGMENTATION", "softmax"): "the losses apply the softmax themselves (NiftyNet's default softmax = True)",
    ("SEGMENTATION", "inferred"): "'highres3d evaluate' reads the segmentations it is given",
    ("SEGMENTATION", "evaluation_units"): "evaluation is per class (NiftyNet's 'foreground' units)",
}


@dataclass
class Conversion:
    """The result of :func:`convert_ini`.

    Attributes:
        source: the INI file.
        raw: the highres3d config as a plain dict, paths absolute.
        mapped: ``([SECTION] key, highres3d key)`` for every key carried over.
        unmapped: ``([SECTION] key = value, reason)`` for every key that is not.
        histogram_file: the landmark file the INI uses (absolute), if any.
        pending_import: ``(model_dir, iteration, run folder, vars_to_restore)``
            when training starts from a NiftyNet checkpoint: import it to that
            run folder (``train --config FILE.ini`` does so itself).
        output: where the YAML goes (its paths are written relative to it).
        inference_iter: ``[INFERENCE] inference_iter``, the checkpoint to import.
        model_dir: NiftyNet's ``model_dir``, resolved.
        warnings: input paths that do not exist here (kept relative to the INI).
    """

    source: Path
    raw: dict
    mapped: list[tuple[str, str]] = field(default_factory=list)
    unmapped: list[tuple[str, str]] = field(default_factory=list)
    histogram_file: Optional[Path] = None
    pending_import: Optional[tuple[Path, int, Path, Optional[str]]] = None
    output: Optional[Path] = None
    inference_iter: Optional[int] = None
    model_dir: Optional[Path] = None
    warnings: list[str] = field(default_factory=list)

    def absolute_raw(self) -> dict:
        return copy.deepcopy(self.raw)

    def relative_raw(self, folder: Path) -> dict:
        """The config with its paths relative to ``folder`` (where the YAML is written)."""
        raw = copy.deepcopy(self.raw)

        def rel(value: str) -> str:
            try:
                return os.path.relpath(value, folder)
            except ValueError:  # another drive on Windows
                return value

        ds = raw.get("dataset", {})
        for key in ("root",):
            if key in ds:
                ds[key] = rel(ds[key])
        if "file" in ds.get("split", {}):
            ds["split"]["file"] = rel(ds["split"]["file"])
        if "csv_files" in ds:
            ds["csv_files"] = {k: rel(v) for k, v in ds["csv_files"].items()}
        hist = raw.get("preprocessing", {}).get("histogram", {})
        if "ref_file" in hist:
            hist["ref_file"] = rel(hist["ref_file"])
        for section, key in (("training", "output_dir"), ("transfer", "source")):
            if key in raw.get(section, {}):
                raw[section][key] = rel(raw[section][key])
        return raw

    def yaml_text(self) -> str:
        """The config as commented YAML: the source, every key not mapped and why, then the mapping."""
        folder = self.output.parent if self.output is not None else Path.cwd()
        lines = [f"# converted from NiftyNet config {self.source} by 'highres3d config from-niftynet'",
                 "# paths are relative to this file"]
        if self.pending_import:
            model_dir, iteration, target, restore = self.pending_import
            lines.append(f"# starts from NiftyNet checkpoint {iteration}: 'highres3d train --config {self.source.name}' imports it")
            if not restore:
                lines.append(f"# (or run: highres3d import niftynet {model_dir} --iteration {iteration} -o {target})")
        lines.extend(f"# warning: {w}" for w in self.warnings)
        if self.unmapped:
            lines.append(f"# not mapped ({len(self.unmapped)}):")
            lines.extend(f"#   {key}: {reason}" for key, reason in self.unmapped)
        body = yaml.safe_dump(self.relative_raw(folder), sort_keys=False, default_flow_style=None, width=100)
        tail = [f"# mapped ({len(self.mapped)}):"] + [f"#   {a} -> {b}" for a, b in self.mapped]
        return "\n".join(lines) + "\n" + body + "\n".join(tail) + "\n"


# --------------------------------------------------------------------------- value parsing


def _items(text: str) -> list[str]:
    """NiftyNet's list syntax: ``(96, 96, 96)``, ``96, 96, 96``, ``[a, b]`` or one value."""
    text = text.strip().strip("()[]")
    return [t.strip().strip("'\"") for t in text.split(",") if t.strip().strip("'\"")]


def _bool(text: str, key: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off", ""):
        return False
    raise ConfigError(f"{key}: expected True or False, got {text!r}")


def _number(text: str, key: str, kind=float):
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {text!r}")
        return int(value)
    return value


def _numbers(text: str, key: str, kind=float) -> list:
    return [_number(t, key, kind) for t in _items(text)]


def _existing(text: str, bases: list[Path]) -> Optional[Path]:
    path = Path(os.path.expanduser(text.strip()))
    if path.is_absolute():
        return path if path.exists() else None
    for base in bases:
        if (base / path).exists():
            return (base / path).resolve()
    return None


# --------------------------------------------------------------------------- conversion


class _Converter:
    def __init__(self, path: Path):
        self.path = path
        self.folder = path.parent.resolve()
        self.raw: dict[str, Any] = {}
        self.mapped: list[tuple[str, str]] = []
        self.unmapped: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.histogram_file: Optional[Path] = None
        self.pending_import = None
        parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"), interpolation=None)
        parser.optionxform = str.lower  # NiftyNet's keys are case-insensitive
        try:
            with open(path) as handle:
                parser.read_file(handle)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except configparser.Error as err:
            raise ConfigError(f"{path}: not a valid INI file ({err.message.splitlines()[0]})") from None
        self.ini = {s: dict(parser.items(s)) for s in parser.sections()}
        self.used: set[tuple[str, str]] = set()

    # ---- helpers
    def set(self, dotted: str, value: Any, section: str, key: str) -> None:
        node = self.raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.use(section, key, dotted)

    def use(self, section: str, key: str, target: str) -> None:
        """Record ``[section] key`` as carried over to ``target`` (a key, or a note on the equivalent)."""
        self.used.add((section, key))
        self.mapped.append((f"[{section}] {key}", target))

    def skip(self, section: str, key: str, reason: str) -> None:
        self.used.add((section, key))
        value = self.ini.get(section, {}).get(key, "")
        self.unmapped.append((f"[{section}] {key} = {value}", reason))

    def get(self, section: str, key: str) -> Optional[str]:
        value = self.ini.get(section, {}).get(key)
        return None if value is None or value.strip() == "" else value.strip()

    def error(self, section: str, key: str, problem: str) -> None:
        self.used.add((section, key))
        self.errors.append(f"{self.path}: [{section}] {key}: {problem}")

    # ---- main
    def convert(self) -> Conversion:
        sections = list(self.ini)
        other = [s for s in sections if s.upper() in OTHER_APPLICATIONS]
        if other:
            raise ConfigError(f"{self.path}: [{other[0]}] is a NiftyNet {other[0].lower()} application; "
                              "highres3d converts segmentation applications ([SEGMENTATION]) only")
        if "SEGMENTATION" not in self.ini:
            raise ConfigError(f"{self.path}: no [SEGMENTATION] section; is this a NiftyNet segmentation config?")
        self.model_dir = self._model_dir()
        inputs = [s for s in sections if s not in SYSTEM_SECTIONS and any(k in self.ini[s] for k in INPUT_KEYS)]
        for s in sections:
            if s not in SYSTEM_SECTIONS and s not in inputs:
                self.errors.append(f"{self.path}: [{s}]: not an input section (no path_to_search or csv_file) "
                                   "and not a NiftyNet section")
        self._segmentation(inputs)
        self._inputs(inputs)
        self._system()
        self._network()
        self._training()
        self._inference()
        for section, values in self.ini.items():
            for key in values:
                if (section, key) in self.used:
                    continue
                if (section, key) in _NO_MEANING:
                    self.skip(section, key, _NO_MEANING[(section, key)])
                else:
                    self.skip(section, key, "not a NiftyNet 0.5 segmentation key that highres3d knows")
        if self.errors:
            raise ConfigError(f"{len(self.errors)} problem(s) converting {self.path}:\n  " + "\n  ".join(self.errors))
        from highres3d.config import config_from_dict

        config_from_dict(self.raw)  # the result must validate; a failure here is a converter bug worth seeing
        text = self.get("INFERENCE", "inference_iter")
        inference_iter = _number(text, "inference_iter", int) if text else None
        return Conversion(self.path, self.raw, self.mapped, self.unmapped, self.histogram_file, self.pending_import,
                          inference_iter=inference_iter, model_dir=self.model_dir, warnings=self.warnings)

    def _model_dir(self) -> Path:
        text = self.get("SYSTEM", "model_dir")
        if text is None:
            return self.folder
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else (self.folder / path).resolve()

    def _segmentation(self, inputs: list[str]) -> None:
        S = "SEGMENTATION"
        images = _items(self.get(S, "image") or "")
        if not images:
            self.error(S, "image", "required: the input sections of the image modalities, e.g. image = T1, T2")
            images = []
        missing = [m for m in images if m not in inputs]
        if missing:
            self.error(S, "image", f"no input section [{'], ['.join(missing)}] with path_to_search or csv_file")
        self.set("dataset.modalities", images, S, "image")
        self.images = images
        label = _items(self.get(S, "label") or "")
        self.label = label[0] if label else None
        if len(label) > 1:
            self.error(S, "label", f"one label section expected, got {label}")
        if self.label:
            self.use(S, "label", "dataset.<layout>.label")
            if self.label not in inputs:
                self.error(S, "label", f"no input section [{self.label}]")
        sampler = _items(self.get(S, "sampler") or "")
        if sampler:
            if sampler[0] == self.label:
                self.use(S, "sampler", "sampler.type (the label map weights the windows)")
            else:
                self.skip(S, "sampler", "the weighted sampler's map is the label map in highres3d")
        weight = self.get(S, "weight")
        if weight:
            self.skip(S, "weight", "per-voxel loss weights are not supported; use training.class_weights")
        if self.get(S, "num_classes"):
            self.set("network.num_classes", _number(self.get(S, "num_classes"), "[SEGMENTATION] num_classes", int), S, "num_classes")
        if self.get(S, "label_normalisation") is not None:
            self._label_normalisation(_bool(self.get(S, "label_normalisation"), "label_normalisation"))
        for key in ("min_sampling_ratio", "min_numb_labels", "rand_samples"):
            if self.get(S, key) is not None:
                self.skip(S, key, "the class_weighted sampler draws window centres per class instead")

    def _label_normalisation(self, enabled: bool) -> None:
        S = "SEGMENTATION"
        if not enabled:
            self.use(S, "label_normalisation", "preprocessing.labels (none)")
            return
        from highres3d.data.histogram import label_mapping, read_ref_file

        ref = self._ref_file()
        mapping = label_mapping(read_ref_file(ref), self.label or "label") if ref is not None else None
        if mapping is None:
            self.skip(S, "label_normalisation",
                      "the label mapping is not in histogram_ref_file yet (NiftyNet builds it from the training labels); "
                      "set preprocessing.labels, e.g. {0: 0, 1: 1, 4: 2}")
            return
        self.set("preprocessing.labels", mapping, S, "label_normalisation")
        # NiftyNet gives values missing from the mapping class 0.
        self.raw["preprocessing"]["other_labels"] = 0

    def _ref_file(self) -> Optional[Path]:
        text = self.get("NETWORK", "histogram_ref_file") or "./histogram_ref_file.txt"
        path = Path(os.path.expanduser(text))
        path = path if path.is_absolute() else (self.model_dir / path).resolve()
        return path if path.is_file() else None

    def _inputs(self, inputs: list[str]) -> None:
        wanted = [s for s in inputs if s in self.images or s == self.label]
        for s in inputs:
            if s not in wanted:
                for key in self.ini[s]:
                    self.skip(s, key, f"[{s}] is not used by [SEGMENTATION] image/label")
        search = {s: self.ini[s] for s in wanted if self.get(s, "path_to_search")}
        csv = {s: self.ini[s] for s in wanted if s not in search and (self.get(s, "csv_file") or self.get(s, "csv_data_file"))}
        if search and csv:
            self.errors.append(f"{self.path}: sections {sorted(search)} use path_to_search but {sorted(csv)} only "
                               "csv_file; give every section path_to_search, or every one csv_file")
        bases = [Path.cwd(), self.folder]
        if search:
            self.raw.setdefault("dataset", {})["layout"] = "niftynet_search"
            folders: dict[str, list[str]] = {}
            for s in search:
                resolved = []
                for text in _items(self.get(s, "path_to_search")):
                    path = _existing(text, bases)
                    if path is None:
                        # The data may live elsewhere (importing a model for another machine): keep the
                        # path relative to the INI and say so; matching reports it if it is still missing.
                        path = self.folder / Path(os.path.expanduser(text))
                        self.warnings.append(f"[{s}] path_to_search: folder {text!r} not found (tried relative to "
                                             f"{bases[0]} and {bases[1]}); kept as {path}")
                    resolved.append(str(path))
                folders[s] = resolved
            all_folders = [f for fs in folders.values() for f in fs]
            root = os.path.commonpath(all_folders) if all_folders else str(self.folder)
            self.raw["dataset"]["root"] = root
            sections = {}
            for s in search:
                entry = {"path_to_search": [os.path.relpath(f, root) for f in folders[s]]}
                self.use(s, "path_to_search", f"dataset.search.{s}.path_to_search")
                for key in ("filename_contains", "filename_not_contains", "filename_removefromid"):
                    if self.get(s, key):
                        entry[key] = _items(self.get(s, key))
                        self.use(s, key, f"dataset.search.{s}.{key}")
                for key in ("csv_file", "csv_data_file"):
                    if self.get(s, key):
                        self.skip(s, key, "NiftyNet wrote the matched files there; highres3d matches the folders directly")
                sections[s] = entry
            self.raw["dataset"]["search"] = sections
        elif csv:
            self.raw.setdefault("dataset", {})["layout"] = "niftynet_csv"
            files = {}
            for s in csv:
                key = "csv_file" if self.get(s, "csv_file") else "csv_data_file"
                path = _existing(self.get(s, key), bases)
                if path is None:
                    path = self.folder / Path(os.path.expanduser(self.get(s, key)))
                    self.warnings.append(f"[{s}] {key}: file {self.get(s, key)!r} not found (tried relative to "
                                         f"{bases[0]} and {bases[1]}); kept as {path}")
                files[s] = str(path)
                self.use(s, key, f"dataset.csv_files.{s}")
            self.raw["dataset"]["csv_files"] = files
        self._spatial(wanted)

    def _spatial(self, sections: list[str]) -> None:
        """pixdim, axcodes, interp_order and spatial_window_size of the input sections."""

        def agreed(key: str, parse, target: str):
            values = {s: parse(self.get(s, key)) for s in sections if self.get(s, key) is not None}
            if not values:
                return None
            distinct = {repr(v) for v in values.values()}
            if len(distinct) > 1:
                self.error(sections[0], key, f"differs between sections ({values}); highres3d uses one value for all")
                return None
            for s in values:
                self.use(s, key, target)
            return next(iter(values.values()))

        spacing = agreed("pixdim", lambda t: _numbers(t, "pixdim"), "preprocessing.spacing")
        if spacing is not None:
            if len(spacing) != 3:
                self.error(sections[0], "pixdim", f"expected three spacings, got {spacing}")
            else:
                self.raw.setdefault("preprocessing", {})["spacing"] = spacing
        axcodes = agreed("axcodes", lambda t: "".join(_items(t)).upper(), "preprocessing.orientation")
        if axcodes is not None:
            self.raw.setdefault("preprocessing", {})["orientation"] = axcodes
        window = {s: _numbers(self.get(s, "spatial_window_size"), "spatial_window_size", int)
                  for s in self.images if self.get(s, "spatial_window_size")}
        if window:
            first = next(iter(window.values()))
            if any(w != first for w in window.values()):
                self.error(self.images[0], "spatial_window_size", f"differs between image sections ({window})")
            elif len(first) != 3 or min(first) < 2:
                self.error(self.images[0], "spatial_window_size", f"{first}: highres3d trains 3D windows only")
            else:
                for s in window:
                    self.use(s, "spatial_window_size", "sampler.window_size")
                self.raw.setdefault("sampler", {})["window_size"] = first
        if self.label and self.get(self.label, "spatial_window_size"):
            label_window = _numbers(self.get(self.label, "spatial_window_size"), "spatial_window_size", int)
            if window and label_window != next(iter(window.values())):
                self.skip(self.label, "spatial_window_size", "label windows are always the image windows' size here")
            else:
                self.use(self.label, "spatial_window_size", "sampler.window_size (same window for the label)")
        orders = {s: _number(self.get(s, "interp_order"), "interp_order", int)
                  for s in sections if self.get(s, "interp_order") is not None}
        if self.label in orders:
            self.set("preprocessing.label_interpolation", min(orders.pop(self.label), 5), self.label, "interp_order")
        if orders:
            values = set(orders.values())
            if len(values) == 1:
                self.raw.setdefault("preprocessing", {})["image_interpolation"] = values.pop()
                for s in orders:
                    self.use(s, "interp_order", "preprocessing.image_interpolation")
            else:
                self.raw.setdefault("preprocessing", {})["modality_interpolation"] = orders
                for s in orders:
                    self.use(s, "interp_order", f"preprocessing.modality_interpolation.{s}")
        for s in sections:
            if self.get(s, "loader"):
                self.skip(s, "loader", "images are read with nibabel")

    def _system(self) -> None:
        Y = "SYSTEM"
        if self.get(Y, "model_dir"):
            self.set("training.output_dir", str(self.model_dir), Y, "model_dir")
        gpus = self.get(Y, "num_gpus")
        if gpus is not None:
            n = _number(gpus, "num_gpus", int)
            if n > 1:
                self.set("training.strategy", "mirrored", Y, "num_gpus")
            else:
                self.use(Y, "num_gpus", "training.strategy (default: one device)")
        split = self.get(Y, "dataset_split_file") or "./dataset_split.csv"
        path = Path(os.path.expanduser(split))
        path = path if path.is_absolute() else (self.model_dir / path).resolve()
        if path.is_file():
            self.raw.setdefault("dataset", {}).setdefault("split", {})["file"] = str(path)
            if self.get(Y, "dataset_split_file"):
                self.use(Y, "dataset_split_file", "dataset.split.file")
        elif self.get(Y, "dataset_split_file"):
            self.skip(Y, "dataset_split_file", f"{path} does not exist (yet); the split is drawn from "
                                               "exclude_fraction_for_validation/inference with dataset.split.seed")

    def _network(self) -> None:
        N = "NETWORK"
        name = self.get(N, "name")
        if name is not None:
            if name.lower().rsplit(".", 1)[-1] not in ("highres3dnet",):
                self.error(N, "name", f"{name!r}: highres3d implements HighRes3DNet only (name = highres3dnet)")
            else:
                self.set("network.name", "highresnet3d", N, "name")
        act = self.get(N, "activation_function")
        if act is not None:
            if act.lower() not in _ACTIVATIONS:
                self.error(N, "activation_function", f"{act!r} is not supported (relu, leakyrelu, prelu, elu)")
            else:
                self.set("network.activation", _ACTIVATIONS[act.lower()], N, "activation_function")
        if self.get(N, "batch_size"):
            n = _number(self.get(N, "batch_size"), "batch_size", int)
            self.set("training.batch_size", n, N, "batch_size")
            self.raw.setdefault("inference", {})["batch_size"] = n
        self.batch_size = self.raw.get("training", {}).get("batch_size", 2)
        decay = _number(self.get(N, "decay"), "decay") if self.get(N, "decay") else 0.0
        reg = (self.get(N, "reg_type") or "L2").upper()
        if decay > 0 and reg != "L2":
            self.error(N, "reg_type", f"{reg} regularisation is not supported; only L2 (network.l2_decay)")
        else:
            if self.get(N, "decay"):
                self.set("network.l2_decay", decay, N, "decay")
            if self.get(N, "reg_type"):
                self.use(N, "reg_type", "network.l2_decay (L2)")
        sampling = self.get(N, "window_sampling")
        if sampling is not None:
            if sampling.lower() not in _SAMPLERS:
                self.error(N, "window_sampling", f"{sampling!r}: supported are uniform, weighted, balanced")
            else:
                self.set("sampler.type", _SAMPLERS[sampling.lower()], N, "window_sampling")
        padding = self.get(N, "volume_padding_size")
        if padding is not None:
            if any(v != 0 for v in _numbers(padding, "volume_padding_size", int)):
                # NiftyNet padded the volume so that windows could reach past its edges.
                self.set("sampler.edge_policy", "pad", N, "volume_padding_size")
            else:
                # Unpadded, NiftyNet drew only windows lying inside the volume.
                self.set("sampler.edge_policy", "valid", N, "volume_padding_size")
        keep = self.get(N, "keep_prob")
        if keep is not None:
            if _number(keep, "keep_prob") != 1.0:
                self.skip(N, "keep_prob", "HighRes3DNet has no dropout (NiftyNet ignored keep_prob for it too)")
            else:
                self.use(N, "keep_prob", "(no dropout, as keep_prob = 1)")
        init = self.get(N, "weight_initializer")
        if init is not None:
            if init.lower() == "he_normal":
                self.use(N, "weight_initializer", "HighResNet3D kernel_initializer (he_normal)")
            else:
                self.skip(N, "weight_initializer", "HighResNet3D initialises kernels with he_normal")
        # Intensity normalisation.
        if self.get(N, "whitening") is not None:
            white = _bool(self.get(N, "whitening"), "whitening")
            self.set("preprocessing.normalisation", "zscore" if white else "none", N, "whitening")
        fg_only = _bool(self.get(N, "normalise_foreground_only") or "False", "normalise_foreground_only")
        if self.get(N, "normalise_foreground_only") is not None:
            self.set("preprocessing.normalise_foreground_only", fg_only, N, "normalise_foreground_only")
        fg = self.get(N, "foreground_type")
        if fg is not None:
            if not fg_only:
                self.skip(N, "foreground_type", "no effect in NiftyNet without normalise_foreground_only = True "
                                                "(whitening used every voxel); kept so here")
            else:
                kind = {"otsu_plus": "otsu", "mean_plus": "threshold_plus", "threshold_plus": "threshold_plus",
                        "thresh_plus": "threshold_plus"}.get(fg.lower())
                if kind is None:
                    self.error(N, "foreground_type", f"{fg!r}: supported are otsu_plus, mean_plus, threshold_plus")
                else:
                    self.set("preprocessing.foreground", kind, N, "foreground_type")
        histogram_on = _bool(self.get(N, "normalisation") or "False", "normalisation")
        if self.get(N, "normalisation") is not None:
            self.set("preprocessing.histogram.enabled", histogram_on, N, "normalisation")
        if histogram_on:
            ref = self._ref_file()
            if ref is not None:
                # Modalities the file lacks are learned by train, as NiftyNet did.
                self.histogram_file = ref
                self.raw["preprocessing"]["histogram"]["ref_file"] = str(ref)
            if self.get(N, "histogram_ref_file"):
                self.use(N, "histogram_ref_file", "preprocessing.histogram.ref_file (copied into the run folder)")
        elif self.get(N, "histogram_ref_file"):
            if (self.raw.get("preprocessing", {}).get("labels")):
                self.use(N, "histogram_ref_file", "preprocessing.labels (its label mapping)")
            else:
                self.skip(N, "histogram_ref_file", "normalisation is off and no label mapping is read from it")
        if self.get(N, "norm_type"):
            norm = self.get(N, "norm_type").lower()
            if norm not in ("percentile", "quartile", "median"):
                self.error(N, "norm_type", f"{norm!r}: expected percentile, quartile or median")
            else:
                self.set("preprocessing.histogram.norm_type", norm, N, "norm_type")
        if self.get(N, "cutoff"):
            cutoff = _numbers(self.get(N, "cutoff"), "cutoff")
            if len(cutoff) != 2:
                self.error(N, "cutoff", f"expected two fractions, got {cutoff}")
            else:
                self.set("preprocessing.histogram.cutoff", sorted(cutoff), N, "cutoff")

    def _training(self) -> None:
        T = "TRAINING"
        def g(k):
            return self.get(T, k)

        if g("optimiser"):
            name = g("optimiser").lower()
            if name not in _OPTIMISERS:
                self.error(T, "optimiser", f"{name!r}: supported are adam, rmsprop, nesterov, momentum")
            else:
                target, note = _OPTIMISERS[name]
                self.set("training.optimizer", target, T, "optimiser")
                if note:
                    self.unmapped.append((f"[{T}] optimiser = {name}", f"approximated: {note}"))
        if g("lr"):
            self.set("training.lr", _number(g("lr"), "lr"), T, "lr")
        if g("loss_type"):
            loss = g("loss_type").lower()
            if loss not in _LOSSES:
                self.error(T, "loss_type", f"{g('loss_type')!r}: supported are Dice, Dice_NS, GDSC, CrossEntropy, DicePlusXEnt")
            else:
                self.set("training.loss", _LOSSES[loss], T, "loss_type")
        if g("sample_per_volume"):
            self.set("sampler.windows_per_volume", _number(g("sample_per_volume"), "sample_per_volume", int), T, "sample_per_volume")
        for key, target in (("rotation_angle", "augmentation.rotation_degrees"),
                            ("scaling_percentage", "augmentation.scaling_percent")):
            if g(key):
                values = _numbers(g(key), key)
                magnitude = max(abs(v) for v in values) if values else 0.0
                self.set(target, magnitude, T, key)
                if len(values) == 2 and values[0] != -values[1]:
                    self.unmapped.append((f"[{T}] {key} = {g(key)}", f"asymmetric range: highres3d draws from ±{magnitude:g}"))
        for axis in ("rotation_angle_x", "rotation_angle_y", "rotation_angle_z"):
            if g(axis):
                self.skip(T, axis, "one rotation range for every axis: augmentation.rotation_degrees")
        if g("random_flipping_axes"):
            axes = [a for a in _numbers(g("random_flipping_axes"), "random_flipping_axes", int) if a >= 0]
            self.set("augmentation.flip_axes", axes, T, "random_flipping_axes")
        if g("do_elastic_deformation"):
            if _bool(g("do_elastic_deformation"), "do_elastic_deformation"):
                self.skip(T, "do_elastic_deformation", "elastic deformation is not implemented in highres3d")
            else:
                self.use(T, "do_elastic_deformation", "(no elastic deformation)")
        for key in ("num_ctrl_points", "deformation_sigma", "proportion_to_deform", "bias_field_range", "bf_order"):
            if g(key):
                self.skip(T, key, "elastic deformation and bias-field augmentation are not implemented in highres3d")
        if g("save_every_n"):
            n = _number(g("save_every_n"), "save_every_n", int)
            if n > 0:
                self.set("training.checkpoint_every", n, T, "save_every_n")
            else:
                self.skip(T, "save_every_n", "highres3d always saves checkpoints; training.checkpoint_every stays at its default")
        if g("max_checkpoints"):
            self.set("training.max_checkpoints", max(1, _number(g("max_checkpoints"), "max_checkpoints", int)), T, "max_checkpoints")
        if g("validation_every_n"):
            n = _number(g("validation_every_n"), "validation_every_n", int)
            if n > 0:
                self.set("training.validation_every", n, T, "validation_every_n")
            else:
                self.skip(T, "validation_every_n", "validation cannot be switched off; set dataset.split.validation_fraction: 0")
        if g("validation_max_iter"):
            batches = max(1, _number(g("validation_max_iter"), "validation_max_iter", int))
            self.set("training.validation_windows", batches * self.batch_size, T, "validation_max_iter")
        for key, target in (("exclude_fraction_for_validation", "validation_fraction"),
                            ("exclude_fraction_for_inference", "inference_fraction")):
            if g(key):
                self.set(f"dataset.split.{target}", _number(g(key), key), T, key)
        self.restore = g("vars_to_restore")
        if self.restore is not None:
            try:
                re.compile(self.restore)
            except re.error as err:
                self.error(T, "vars_to_restore", f"not a valid regular expression ({err})")
                self.restore = None
        start = _number(g("starting_iter"), "starting_iter", int) if g("starting_iter") else 0
        max_iter = _number(g("max_iter"), "max_iter", int) if g("max_iter") else None
        if start != 0:
            self._starting_checkpoint(start, max_iter)
        elif g("starting_iter"):
            self.use(T, "starting_iter", "(random initialisation)")
        if max_iter is not None and (T, "max_iter") not in self.used:
            self.set("training.max_iter", max_iter, T, "max_iter")
        freeze = g("vars_to_freeze") or g("vars_to_restore")
        if g("vars_to_restore") and (T, "vars_to_restore") not in self.used:
            self.skip(T, "vars_to_restore", "nothing is restored with starting_iter = 0; "
                                            "used as the vars_to_freeze default (NiftyNet's rule)")
        if freeze:
            self.set("transfer.freeze", freeze, T, "vars_to_freeze" if g("vars_to_freeze") else "vars_to_restore")

    def _inference(self) -> None:
        I = "INFERENCE"
        window = None
        if self.get(I, "spatial_window_size"):
            window = _numbers(self.get(I, "spatial_window_size"), "spatial_window_size", int)
            if len(window) != 3 or min(window) < 2:
                self.error(I, "spatial_window_size", f"{window}: highres3d infers with 3D windows only")
                window = None
            else:
                self.set("inference.window_size", window, I, "spatial_window_size")
        window = window or self.raw.get("sampler", {}).get("window_size")
        if self.get(I, "border") is not None:
            border = _numbers(self.get(I, "border"), "border", int)
            if window is None or len(border) != 3:
                self.error(I, "border", f"{border}: needs three values and a window size to convert")
            else:
                # NiftyNet stepped by window - 2 * border and cropped the border off each window.
                overlap = max(2 * b / w for b, w in zip(border, window))
                if overlap >= 1:
                    self.error(I, "border", f"{border} leaves nothing of the {window} window")
                else:
                    self.set("inference.overlap", round(overlap, 6), I, "border")
                    self.raw["inference"]["blend"] = "crop"
        order = self.get(I, "output_interp_order")
        if order is not None:
            if _number(order, "output_interp_order", int) == 0:
                self.use(I, "output_interp_order", "(labels are mapped back with nearest neighbour)")
            else:
                self.skip(I, "output_interp_order", "labels are always mapped back with nearest neighbour")

    def _starting_checkpoint(self, start: int, max_iter: Optional[int]) -> None:
        T = "TRAINING"
        from highres3d.errors import DataError
        from highres3d.niftynet.checkpoint import find_checkpoint

        try:
            _, iteration = find_checkpoint(self.model_dir, None if start < 0 else start)
        except DataError as err:
            self.error(T, "starting_iter", f"{start}: {err}")
            return
        name = f"highres3d_import_ckpt-{iteration}"
        if self.restore:
            # One import per restore pattern: the weights it leaves out differ.
            name += "-restore-" + hashlib.sha1(self.restore.encode()).hexdigest()[:8]
            self.use(T, "vars_to_restore", "the imported starting model keeps initial values for the variables it does not match")
        target = self.model_dir / name
        self.pending_import = (self.model_dir, iteration, target, self.restore)
        self.set("transfer.source", str(target), T, "starting_iter")
        if max_iter is not None:
            remaining = max_iter - iteration
            if remaining <= 0:
                self.error(T, "max_iter", f"{max_iter} is not beyond the starting checkpoint {iteration}: nothing to train")
            else:
                # NiftyNet's max_iter counts from 0; the iteration counter continued at the checkpoint.
                self.set("training.max_iter", remaining, T, "max_iter")


def convert_ini(path: str | os.PathLike, output: Optional[str | os.PathLike] = None) -> Conversion:
    """Convert a NiftyNet segmentation INI; see the module docstring.

    Args:
        path: the ``.ini`` file.
        output: where the YAML will be written (paths in :meth:`Conversion.yaml_text`
            are made relative to its folder).

    Raises:
        ConfigError: listing every key whose value cannot be honoured.
    """
    conversion = _Converter(Path(path).resolve()).convert()
    conversion.output = Path(output).resolve() if output is not None else None
    return conversion


def is_ini(path: str | os.PathLike) -> bool:
    """True for a NiftyNet config (by its ``.ini`` suffix)."""
    return str(path).lower().endswith(".ini")


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_ini_config(path: str | os.PathLike, overrides: Optional[list[str]] = None,
                    data_root: Optional[str | os.PathLike] = None):
    """Convert an INI and validate it as :func:`highres3d.config.load_config` does a YAML file.

    Returns:
        ``(config, conversion)``; ``config.source_file`` is the INI.
    """
    from highres3d.config import config_from_dict

    conversion = convert_ini(path)
    raw = conversion.absolute_raw()
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. training.lr=1e-4")
        key, value = text.split("=", 1)
        nested: Any = yaml.safe_load(value)
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        raw = _deep_merge(raw, nested)
    root = data_root if data_root is not None else os.environ.get("HIGHRES3D_DATA_ROOT")
    if root:
        raw.setdefault("dataset", {})["root"] = str(Path(root).expanduser().resolve())
    return config_from_dict(raw, base_dir=Path.cwd(), source=conversion.source), conversion


__all__ = ["Conversion", "convert_ini", "is_ini", "load_ini_config"]


CONVERTED_FILE = "niftynet_config.yaml"


def import_pending(conversion: Conversion, echo=print) -> None:
    """Import the NiftyNet checkpoint a converted config starts from, unless already imported."""
    if conversion.pending_import is None:
        return
    model_dir, iteration, target, restore = conversion.pending_import
    if target.exists():
        return
    from highres3d.niftynet.checkpoint import (
        import_checkpoint,
        keep_only_restored,
        write_run_folder,
    )

    model, report = import_checkpoint(model_dir, iteration)
    notes = []
    if restore:
        reset = keep_only_restored(model, report, restore)
        notes.append(f"vars_to_restore {restore!r}: {len(reset)} variable(s) keep initial values: " + ", ".join(reset))
        echo(f"vars_to_restore: {len(report.mapped) - len(reset)} of {len(report.mapped)} variables restored")
    config = conversion.absolute_raw()
    config.get("transfer", {}).pop("source", None)  # the import is the source, it has none itself
    write_run_folder(model, report, target, config=config, histogram_file=conversion.histogram_file, notes=notes)
    echo(f"imported NiftyNet checkpoint {iteration} of {model_dir} into {target}")


def save_conversion(conversion: Conversion, run_dir: str | os.PathLike) -> Optional[Path]:
    """Keep the converted YAML, with its notes on unmapped keys, in the run folder."""
    from highres3d.utils import atomic_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    target = run_dir / CONVERTED_FILE
    conversion.output = target.resolve()
    # Derived from the INI alone, so rewriting it on resume changes nothing.
    with atomic_path(target, overwrite=True) as tmp:
        tmp.write_text(conversion.yaml_text())
    return target
