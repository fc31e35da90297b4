"""Typed, immutable configuration loaded from YAML.

A config file is a mapping of sections (``dataset``, ``preprocessing``,
``network``, ``sampler``, ``augmentation``, ``training``, ``inference``,
``transfer``, ``evaluation``).  Every key has a default, so a file only states
what differs.  Loading is strict: an unknown key, a wrong type or an
out-of-range value raises :class:`~highres3d.errors.ConfigError` naming the key
path and what was expected, e.g.::

    training.lr: expected a positive number, got 'fast'
    dataset.modalitys: unknown key, did you mean 'modalities'?

``extends: base.yaml`` merges the file over a base config (mappings merge key
by key; lists and scalars replace).  Relative paths resolve against the file
that wrote them, so a base config and its children may live in different
folders.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from highres3d.errors import ConfigError

# --------------------------------------------------------------------------- checks


def _positive(value) -> Optional[str]:
    return None if value > 0 else "expected a positive number"


def _non_negative(value) -> Optional[str]:
    return None if value >= 0 else "expected a number >= 0"


def _split_names(value) -> Optional[str]:
    # The split names of data/dataset.py; spelled out so config.py imports no data code.
    known = ("training", "validation", "inference")
    if not value or any(v not in known for v in value):
        return f"expected one or more of {', '.join(known)}"
    return None


def _fraction(value) -> Optional[str]:
    return None if 0 <= value < 1 else "expected a fraction in [0, 1)"


def _positive_ints(value) -> Optional[str]:
    return None if all(v > 0 for v in value) else "expected positive integers"


def _three_positive_ints(value) -> Optional[str]:
    if len(value) != 3 or any(v <= 0 for v in value):
        return "expected three positive integers [x, y, z]"
    return None


def _three_positive_numbers(value) -> Optional[str]:
    if value is None:
        return None
    if len(value) != 3 or any(v <= 0 for v in value):
        return "expected three positive numbers [x, y, z] in mm"
    return None


def _axcodes(value) -> Optional[str]:
    value = value.upper()
    pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
    if len(value) != 3 or not all(any(c in p for c in value) and sum(c in p for c in value) == 1 for p in pairs):
        return "expected a 3-letter orientation code with one of L/R, A/P, S/I each, e.g. 'RAS' or 'LPS'"
    return None


def _spline_order(value) -> Optional[str]:
    return None if 0 <= value <= 5 else "expected a spline order between 0 and 5"


def _spline_orders(value) -> Optional[str]:
    bad = [k for k, v in value.items() if not 0 <= v <= 5]
    return f"expected spline orders between 0 and 5 (check {bad})" if bad else None


def _probabilities(value) -> Optional[str]:
    if value is None:
        return None
    if any(v < 0 for v in value) or sum(value) <= 0:
        return "expected non-negative class probabilities with a positive sum"
    return None


def _field(default, doc: str, check=None, path: bool = False):
    """A config field with documentation, an optional value check and path resolution."""
    metadata = {"doc": doc, "check": check, "path": path}
    if isinstance(default, (dict, list)):
        def factory(d=default):
            return type(d)(d)

        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- closed sets

#: HighResNet3D's layer groups in network order; defined here so a config is checked without importing
#: Keras, and used by the model as ``highres3d.models.GROUPS``.
LAYER_GROUPS: tuple[str, ...] = ("conv_0", "res_1", "res_2", "res_3", "conv_1", "conv_2")

#: Prefix of a named pretrained model wherever a model path is accepted (``transfer.source: preset:NAME``).
PRESET_SCHEME = "preset:"

#: Training losses (:func:`highres3d.losses.get_loss` also reads NiftyNet's spellings in code).
LossName = Literal["dice", "dice_ns", "generalised_dice", "cross_entropy", "dice_ce"]
#: Inference compute precision; "auto" = bfloat16 on a CPU with native bfloat16 (AVX512_BF16 / AMX), else float32.
Precision = Literal["auto", "float32", "bfloat16"]
#: Mixed-precision compute dtypes of training (``training.mixed_precision``; ``true`` is read as float16).
MixedPrecisionName = Literal["float16", "bfloat16"]

#: Freeze specifications by name: ``all_but_last`` freezes every group except the classifier ``conv_2``.
FREEZE_KEYWORDS: tuple[str, ...] = ("all_but_last",)

#: A freeze specification: leading groups (0-5), a keyword, group names, or a NiftyNet regex.
FreezeSpec = Union[int, str, tuple[str, ...]]

#: Window samplers (``sampler.type`` and ``training.stages[i].sampler.type``).
SamplerName = Literal["uniform", "label", "class_weighted"]


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SplitConfig:
    """How subjects are divided into training / validation / inference (test)."""

    file: Optional[Path] = _field(None, "NiftyNet-style CSV 'subject,split' (training/validation/inference)", path=True)
    validation_fraction: float = _field(0.1, "fraction of subjects for validation when no split file is given", _fraction)
    inference_fraction: float = _field(0.1, "fraction of subjects held out for inference/test when no split file is given", _fraction)
    seed: int = _field(0, "seed of the random split")
    subset_sizes: tuple[int, ...] = _field((), "nested training subsets S1 ⊂ S2 ⊂ … by size (dataset-size study)", _positive_ints)
    subset_files: tuple[Path, ...] = _field((), "nested training subsets from files (one subject id per line, or NiftyNet split CSVs)", path=True)


@dataclass(frozen=True)
class SearchSection:
    """One NiftyNet input section for layout 'niftynet_search' (NiftyNet 0.5 file matching)."""

    path_to_search: tuple[str, ...] = _field((), "folders searched (not recursively); relative ones are relative to dataset.root")
    filename_contains: tuple[str, ...] = _field((), "substrings every matched file name contains")
    filename_not_contains: tuple[str, ...] = _field((), "substrings no matched file name contains")
    filename_removefromid: tuple[str, ...] = _field((), "substrings cut out of the file name to form the subject id (default: filename_contains)")


@dataclass(frozen=True)
class DatasetConfig:
    """Where the subjects' files are and how they are named."""

    name: str = _field("dataset", "a short name used in run folders and reports")
    root: Optional[Path] = _field(None, "the dataset folder; patterns and nnU-Net layouts are relative to it", path=True)
    layout: Literal["patterns", "niftynet_csv", "nnunet", "niftynet_search"] = _field("patterns", "how subjects are found")
    modalities: tuple[str, ...] = _field(("T1", "T2"), "image modalities, in channel order")
    patterns: dict[str, str] = _field({}, "layout 'patterns': one filename pattern with {subject} per modality, 'label' and optionally 'mask'")
    csv_files: dict[str, Path] = _field({}, "layout 'niftynet_csv': one 'subject_id,path' CSV per modality, 'label' and optionally 'mask'", path=True)
    missing: Literal["error", "skip"] = _field("error", "a subject with a missing file (image, or the label of a training/validation subject): 'error' stops before training and lists them all; 'skip' leaves the subject out with a warning")
    split: SplitConfig = _field(SplitConfig(), "the data split")
    search: dict[str, SearchSection] = _field({}, "layout 'niftynet_search': one NiftyNet input section per modality, 'label' and optionally 'mask'")


@dataclass(frozen=True)
class DomainConfig(DatasetConfig):
    """One source dataset of multi-domain pretraining (``datasets:``): a dataset with its own labels and head."""

    num_classes: int = _field(2, "output classes of this dataset's head, background included", _positive)
    labels: dict[int, int] = _field({}, "label mapping raw value -> class index of this dataset (as preprocessing.labels)")
    other_labels: Optional[int] = _field(None, "class index for raw values missing from 'labels' (as preprocessing.other_labels)")
    weight: float = _field(1.0, "sampling weight: the probability of a batch from this dataset is weight / sum of weights", _positive)
    spacing: Optional[tuple[float, float, float]] = _field(None, "working voxel spacing in mm; null: the median spacing of this dataset's training subjects (Med3D)", _three_positive_numbers)


@dataclass(frozen=True)
class HistogramConfig:
    """Histogram standardisation (Nyúl et al. 2000) as NiftyNet's ``normalisation = True``."""

    enabled: bool = _field(False, "map intensities piece-wise linearly onto landmarks learned from the training subjects, before whitening")
    ref_file: Optional[Path] = _field(None, "landmark file in NiftyNet's histogram_ref_file format; null: learned into the run folder", path=True)
    norm_type: Literal["percentile", "quartile", "median"] = _field("percentile", "which landmarks define the pieces")
    cutoff: tuple[float, float] = _field((0.01, 0.99), "lowest and highest percentile (fractions) of the intensity range", lambda v: None if 0 <= v[0] < v[1] <= 1 else "expected two fractions 0 <= low < high <= 1")


@dataclass(frozen=True)
class PreprocessingConfig:
    """Reorientation, resampling, intensity normalisation and label mapping."""

    orientation: str = _field("RAS", "working-space orientation (axis codes)", _axcodes)
    spacing: Optional[tuple[float, float, float]] = _field(None, "working voxel spacing in mm; null keeps each file's spacing", _three_positive_numbers)
    image_interpolation: int = _field(3, "spline order when resampling images", _spline_order)
    label_interpolation: int = _field(0, "spline order when resampling labels (0 = nearest)", _spline_order)
    modality_interpolation: dict[str, int] = _field({}, "per-modality spline orders overriding image_interpolation", _spline_orders)
    normalisation: Literal["zscore", "percentile_zscore", "none"] = _field("zscore", "intensity normalisation per modality: 'zscore' over the foreground; 'percentile_zscore' clips each modality to its clip_percentiles first (Med3D: 0.5 and 99.5), then z-scores")
    clip_percentiles: tuple[float, float] = _field((0.5, 99.5), "normalisation 'percentile_zscore': the lowest and highest percentile (0-100) of each modality's foreground kept", lambda v: None if 0 <= v[0] < v[1] <= 100 else "expected two percentiles 0 <= low < high <= 100")
    foreground: Literal["all", "threshold_plus", "otsu", "mask"] = _field("all", "voxels whose mean and std define the z-score ('mask': the subject's 'mask' file from dataset.patterns or csv_files)")
    normalise_foreground_only: bool = _field(False, "set voxels outside the foreground mask to 0 after whitening")
    labels: dict[int, int] = _field({}, "label mapping raw value -> class index, e.g. {17: 1, 53: 1}; empty = labels are already class indices")
    other_labels: Optional[int] = _field(None, "class index for raw values missing from 'labels'; null makes them an error")
    affine_tolerance: float = _field(1e-3, "maximum difference (mm) between the affines of a subject's files", _positive)
    histogram: HistogramConfig = _field(HistogramConfig(), "histogram standardisation before whitening")


@dataclass(frozen=True)
class NetworkConfig:
    """The segmentation network."""

    name: Literal["highresnet3d"] = _field("highresnet3d", "network architecture")
    num_classes: int = _field(2, "number of output classes including background", _positive)
    activation: Literal["relu", "leaky_relu", "prelu", "elu"] = _field("leaky_relu", "activation function (leaky slope 0.02 as NiftyNet)")
    width_multiplier: float = _field(1.0, "scales every layer's channel count (1.0 = NiftyNet's 809,380 parameters)", _positive)
    l2_decay: float = _field(0.0, "L2 weight regularisation (NiftyNet's 'decay')", _non_negative)
    dims: Literal[2, 3] = _field(3, "3: HighResNet3D; 2: the 2D HighResNet (same groups and names, 2D kernels) applied slice by slice along slice_axis; train it on slices with sampler.window_size 1 along that axis")
    slice_axis: int = _field(2, "the spatial axis (0, 1, 2 = x, y, z) a 2D network slices along, and along which transfer.inflate adds the kernels' third axis", lambda v: None if v in (0, 1, 2) else "expected 0, 1 or 2")


@dataclass(frozen=True)
class SamplerConfig:
    """How training and validation windows are drawn."""

    type: SamplerName = _field("class_weighted", "window sampler: 'class_weighted' (a probability per class), 'label' (centres weighted by the label map, NiftyNet's weighted sampler as the thesis ran it), 'uniform'")
    window_size: tuple[int, int, int] = _field((96, 96, 96), "training window size in voxels", _three_positive_ints)
    windows_per_volume: int = _field(1, "windows drawn from a volume before moving to the next", _positive)
    class_probabilities: Optional[tuple[float, ...]] = _field(None, "class_weighted: probability of a window centred on each class (default equal)", _probabilities)
    edge_policy: Literal["pad", "valid", "clamp"] = _field("pad", "'pad': any voxel may be a centre; 'valid': windows stay inside the volume; 'clamp': windows shifted inside, padded only when the volume is smaller")
    pad_value: float = _field(0.0, "image value outside the volume (after whitening)")
    label_pad_value: int = _field(0, "label value outside the volume", _non_negative)


@dataclass(frozen=True)
class AugmentationConfig:
    """Random per-window augmentation during training."""

    rotation_degrees: float = _field(0.0, "maximum rotation (±) about each axis, degrees", _non_negative)
    scaling_percent: float = _field(0.0, "maximum scaling (±) per axis, percent", lambda v: None if 0 <= v < 100 else "expected a percentage in [0, 100)")
    flip_axes: tuple[int, ...] = _field((), "axes (0, 1, 2) flipped with probability 0.5", lambda v: None if all(a in (0, 1, 2) for a in v) else "expected axes among 0, 1, 2")
    intensity_scale: float = _field(0.0, "maximum relative intensity scaling (±)", _non_negative)
    intensity_shift: float = _field(0.0, "maximum intensity shift (±), in whitened units", _non_negative)
    device: Literal["cpu", "accelerator"] = _field("accelerator", "where rotation/scaling resample the window")


@dataclass(frozen=True)
class StageSamplerConfig:
    """The sampler settings a training stage overrides (unset keys keep ``sampler``'s)."""

    type: Optional[SamplerName] = _field(None, "window sampler of this stage (null: sampler.type)")
    class_probabilities: Optional[tuple[float, ...]] = _field(None, "class_weighted: probability of a window centred on each class (null: sampler.class_probabilities)", _probabilities)


@dataclass(frozen=True)
class StageConfig:
    """One stage of multi-stage training: what it changes, for how many iterations."""

    name: Optional[str] = _field(None, "a short name shown in logs and stages.csv (default stage<i>)")
    iterations: Optional[int] = _field(None, "iterations of this stage (required); the stages' iterations sum to training.max_iter", _positive)
    freeze: Optional[FreezeSpec] = _field(None, "layer groups frozen in this stage, as transfer.freeze (null: transfer.freeze)")
    sampler: StageSamplerConfig = _field(StageSamplerConfig(), "sampler type and class probabilities of this stage")
    lr: Optional[float] = _field(None, "base learning rate of this stage; training.lr_schedule runs over the stage (null: training.lr)", _positive)
    lr_multipliers: Optional[dict[str, float]] = _field(None, "learning-rate multiplier per layer group (null: training.lr_multipliers)", lambda v: None if all(x > 0 for x in v.values()) else "expected positive multipliers")
    lr_decay: Optional[float] = _field(None, "discriminative decay factor from the top (null: training.lr_decay)", _positive)
    loss: Optional[LossName] = _field(None, "training loss of this stage (null: training.loss)")


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation loop."""

    max_iter: int = _field(1000, "number of training iterations", _positive)
    batch_size: int = _field(2, "windows per iteration", _positive)
    optimizer: Literal["adam", "sgd", "rmsprop", "adamw"] = _field("adam", "optimiser")
    lr: float = _field(1e-3, "learning rate", _positive)
    lr_schedule: Literal["constant", "cosine", "step"] = _field("constant", "learning-rate schedule (over each stage when training.stages is set)")
    lr_multipliers: dict[str, float] = _field({}, "discriminative learning rates: a multiplier per layer group, e.g. {conv_2: 1.0, res_3: 0.5} (unlisted groups: 1.0); one optimizer per group", lambda v: None if all(x > 0 for x in v.values()) else "expected positive multipliers")
    lr_decay: Optional[float] = _field(None, "discriminative learning rates as a decay from the top: lr_g = lr / lr_decay^d, d = groups below conv_2 (ULMFiT: 2.6)", _positive)
    stages: tuple[StageConfig, ...] = _field((), "multi-stage training: a list of stages, each overriding freeze, sampler, lr, multipliers or loss for its iterations")
    loss: LossName = _field("dice", "training loss (dice_ns: Dice with a plain, not squared, denominator)")
    class_weights: Optional[tuple[float, ...]] = _field(None, "per-class loss weights", _probabilities)
    validation_every: int = _field(10, "validate on windows every n iterations", _positive)
    validation_windows: int = _field(4, "validation windows per validation step", _positive)
    checkpoint_every: int = _field(150, "save a checkpoint every n iterations", _positive)
    max_checkpoints: int = _field(5, "checkpoints kept (the best model is always kept)", _positive)
    patience: int = _field(0, "stop after this many whole-volume validations without a better Dice (0 = never)", _non_negative)
    seed: int = _field(0, "seed of initialisation, sampling and augmentation")
    cache: Literal["ram", "lazy", "device", "disk"] = _field("ram", "keep preprocessed volumes in memory, reload them (lazy), hold the training volumes on the accelerator (device: the pipeline sends window positions only; needs augmentation.device accelerator), or preprocess them once into training.cache_dir and memory-map them (disk)")
    cache_dir: Optional[Path] = _field(None, "training.cache disk: the folder of preprocessed volumes, shared by every run and job with the same preprocessing (null: preprocessed_volumes/ in training.output_dir)", path=True)
    shuffle_buffer: int = _field(32, "windows in the shuffle buffer", _positive)
    mixed_precision: Union[bool, MixedPrecisionName] = _field(False, "compute in float16 (with loss scaling) or bfloat16 (no loss scaling, so per-group learning rates work) with float32 weights; false: float32; true: float16 (older configs)")
    strategy: Literal["default", "mirrored", "multi_worker"] = _field("default", "tf.distribute strategy")
    output_dir: Path = _field(Path("runs"), "folder where run folders are created", path=True)

    @property
    def preprocessed_dir(self) -> Path:
        """Where ``training.cache: disk`` keeps the preprocessed volumes."""
        return Path(self.cache_dir) if self.cache_dir is not None else Path(self.output_dir) / "preprocessed_volumes"

    @property
    def compute_dtype(self) -> str:
        """``"float32"``, ``"float16"`` or ``"bfloat16"``: ``mixed_precision`` with ``true`` read as float16."""
        if self.mixed_precision is True:
            return "float16"
        return self.mixed_precision or "float32"


@dataclass(frozen=True)
class InferenceConfig:
    """Whole-volume prediction."""

    mode: Literal["windows", "whole_volume"] = _field("windows", "grid of windows, or one pass over the whole volume")
    window_size: tuple[int, int, int] = _field((144, 144, 144), "inference window size in voxels", _three_positive_ints)
    overlap: float = _field(0.25, "overlap between neighbouring windows as a fraction of the window", _fraction)
    blend: Literal["crop", "average", "gaussian"] = _field("gaussian", "how overlapping windows are combined")
    batch_size: int = _field(1, "windows per model call", _positive)
    tta_mirror: bool = _field(False, "average predictions over mirrored inputs")
    precision: Precision = _field("auto", "compute precision: bfloat16 (float32 weights) is ~2.4x faster where the CPU has AVX512_BF16/AMX; auto picks it there, and on a GPU of compute capability 8.0+")


@dataclass(frozen=True)
class TransferConfig:
    """Initialisation from a pretrained model (transfer learning)."""

    source: Optional[Path] = _field(None, "a .keras file, a run folder, or preset:NAME (see 'highres3d models list') to initialise from", path=True)
    freeze: FreezeSpec = _field(0, "leading layer groups to freeze (0-5), 'all_but_last', group names, or a NiftyNet vars_to_freeze regex")
    bn_policy: Literal["niftynet", "keras"] = _field("niftynet", "frozen BatchNorm: 'niftynet' keeps updating statistics, 'keras' freezes them")
    channel_init: Literal["mean", "zeros"] = _field("mean", "initialisation of input channels the source model lacks")
    mean_var: tuple[str, ...] = _field((), "Mean-Var re-initialisation (Raghu et al. 2019) of these layer groups after loading: weights redrawn from N(mean, var) of each pretrained tensor, BatchNorm reset to identity")
    inflate: Optional[Literal["center", "average", "scaled"]] = _field(None, "2D source into a 3D network: each (k, k, c_in, c_out) kernel becomes (k, k, k, c_in, c_out) along the source's slice axis: 'center' (2D kernel on the middle slice), 'average' (W/k on every slice), 'scaled' (alpha_t * W, sum alpha_t = 1)")
    inflate_alpha: Optional[tuple[float, ...]] = _field(None, "inflate 'scaled': the weights alpha_t of the k slices (normalised to sum 1); null: a Gaussian of inflate_sigma", _probabilities)
    inflate_sigma: float = _field(1.0, "inflate 'scaled' without inflate_alpha: standard deviation, in slices, of the Gaussian alpha_t", _positive)
    transfusion: Optional[int] = _field(None, "Transfusion: copy the first k layer groups (0-5) and Mean-Var re-initialise the rest (exclusive with mean_var)")


@dataclass(frozen=True)
class EvaluationConfig:
    """Metrics on whole volumes."""

    truth_labels: dict[int, int] = _field({}, "mapping of ground-truth values to classes (empty = preprocessing.labels)")
    splits: tuple[str, ...] = _field(("training", "validation", "inference"), "the splits an experiment segments and scores after each run (the thesis tables report all three; a grid that reports test Dice needs only 'inference')", _split_names)


@dataclass(frozen=True)
class Config:
    """A whole highres3d configuration."""

    dataset: DatasetConfig = _field(DatasetConfig(), "the dataset")
    preprocessing: PreprocessingConfig = _field(PreprocessingConfig(), "preprocessing")
    network: NetworkConfig = _field(NetworkConfig(), "network")
    sampler: SamplerConfig = _field(SamplerConfig(), "window sampling")
    augmentation: AugmentationConfig = _field(AugmentationConfig(), "augmentation")
    training: TrainingConfig = _field(TrainingConfig(), "training")
    inference: InferenceConfig = _field(InferenceConfig(), "inference")
    transfer: TransferConfig = _field(TransferConfig(), "transfer learning")
    evaluation: EvaluationConfig = _field(EvaluationConfig(), "evaluation")
    datasets: tuple[DomainConfig, ...] = _field((), "multi-domain pretraining (Chen et al. 2019, Med3D): source datasets sharing one trunk, each with its own head; replaces 'dataset' and network.num_classes")
    source_file: Optional[Path] = field(default=None, compare=False, metadata={"internal": True})

    @property
    def in_channels(self) -> int:
        return len(self.dataset.modalities)


# --------------------------------------------------------------------------- building


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args[-1] is Ellipsis else f"a list of {len(args)} values"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(value: Any, tp, key: str, base_dir: Optional[Path], is_path: bool):
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: Optional[str] = None):
        raise ConfigError(f"{key}: expected {expected or _describe(tp)}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            fail()
        return _build(tp, value, key, base_dir)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, base_dir, is_path)
            except ConfigError as err:
                errors.append(err)
        fail()
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}{hint}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail()
        return value
    if tp is float:
        if isinstance(value, bool):
            fail()
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as users expect.
            try:
                return float(value)
            except ValueError:
                fail()
        if not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    if tp is Path:
        if not isinstance(value, (str, os.PathLike)):
            fail()
        if str(value).startswith(PRESET_SCHEME):
            return Path(str(value))
        path = Path(_expand(str(value)))
        if is_path and base_dir is not None and not path.is_absolute():
            path = (base_dir / path).resolve()
        return path
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            fail()
        if args and args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", base_dir, is_path) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)} values")
        return tuple(_convert(v, a, f"{key}[{i}]", base_dir, is_path) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            fail()
        key_type, value_type = args
        out = {}
        for k, v in value.items():
            ck = _convert(k, key_type, f"{key} key", base_dir, False) if key_type is not str else str(k)
            out[ck] = _convert(v, value_type, f"{key}.{k}", base_dir, is_path)
        return out
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema error


def _build(cls, raw: Mapping, prefix: str, base_dir: Optional[Path]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f", did you mean {close[0]!r}?" if close else f" (known keys: {', '.join(fields)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        f = fields[key]
        check = f.metadata.get("check")
        try:
            converted = _convert(value, hints[key], path, base_dir, f.metadata.get("path", False))
        except ConfigError:
            if check in (_positive, _non_negative, _fraction):
                # Name the range in the message, not only the type.
                expected = {_positive: "a positive number", _non_negative: "a number >= 0", _fraction: "a fraction in [0, 1)"}[check]
                raise ConfigError(f"{path}: expected {expected}, got {value!r}") from None
            raise
        if check is not None and converted is not None:
            problem = check(converted)
            if problem:
                raise ConfigError(f"{path}: {problem}, got {value!r}")
        kwargs[key] = converted
    return cls(**kwargs)


def _cross_checks(cfg: Config) -> None:
    _check_dataset(cfg.dataset, cfg.preprocessing, "dataset")
    _check_datasets(cfg)
    pp = cfg.preprocessing
    classes = set(pp.labels.values()) | ({pp.other_labels} if pp.other_labels is not None else set())
    if classes and max(classes) >= cfg.network.num_classes:
        raise ConfigError(
            f"preprocessing.labels: maps to class {max(classes)} but network.num_classes is {cfg.network.num_classes}"
        )
    _check_class_lists(cfg)
    sizes = cfg.dataset.split.subset_sizes
    if list(sizes) != sorted(set(sizes)):
        raise ConfigError(f"dataset.split.subset_sizes: expected strictly increasing sizes, got {list(sizes)}")
    if cfg.dataset.split.validation_fraction + cfg.dataset.split.inference_fraction >= 1:
        raise ConfigError("dataset.split: validation_fraction + inference_fraction must be < 1")
    _check_freeze(cfg.transfer.freeze)
    _check_learning_rates(cfg.training.lr_multipliers, cfg.training.lr_decay, "training")
    _check_mean_var(cfg.transfer)
    _check_stages(cfg)
    _check_device_cache(cfg)


def _check_device_cache(cfg: Config) -> None:
    if cfg.training.cache == "device":
        problem = device_cache_problem(cfg)
        if problem:
            raise ConfigError(problem)


def device_cache_problem(cfg: Config) -> Optional[str]:
    """Why ``cfg`` could not use ``training.cache: device`` (None: it could, whatever its cache is now).

    ``device`` cuts windows in the training step, so the step must also resample them.
    """
    from highres3d.augment.affine import AffineAugmentation  # NumPy only

    if not AffineAugmentation.from_config(cfg.augmentation).is_identity and cfg.augmentation.device != "accelerator":
        return ("training.cache: 'device' cuts the windows on the accelerator, so augmentation must run "
                "there too: set augmentation.device to 'accelerator' (or training.cache to 'ram')")
    if cfg.datasets:
        return "training.cache: 'device' is not supported by multi-domain pretraining ('datasets'); use 'ram', 'disk' or 'lazy'"
    return None


def _check_class_lists(cfg: Config) -> None:
    """Per-class lists and the pad label against network.num_classes."""
    if cfg.sampler.class_probabilities is not None and len(cfg.sampler.class_probabilities) != cfg.network.num_classes:
        raise ConfigError(
            f"sampler.class_probabilities: expected {cfg.network.num_classes} values (one per class), got {len(cfg.sampler.class_probabilities)}"
        )
    if cfg.sampler.label_pad_value >= cfg.network.num_classes:
        # No loss masks an "ignore" value: padding must be a real class (normally background).
        raise ConfigError(
            f"sampler.label_pad_value: expected a class index below network.num_classes={cfg.network.num_classes}, "
            f"got {cfg.sampler.label_pad_value}"
        )
    if cfg.training.class_weights is not None and len(cfg.training.class_weights) != cfg.network.num_classes:
        raise ConfigError(f"training.class_weights: expected {cfg.network.num_classes} values (one per class)")


#: Keys a multi-domain config cannot use, with the reason (each dataset has its own classes; one plain stage).
_NOT_MULTI_DOMAIN = {
    "sampler.class_probabilities": ("one value per class, and the datasets' class counts differ; "
                                    "leave it null (equal probabilities per dataset)"),
    "training.class_weights": "one value per class, and the datasets' class counts differ",
    "preprocessing.histogram": "histogram landmarks would have to be learned per dataset; use normalisation 'percentile_zscore'",
    "training.stages": "multi-domain pretraining runs one stage",
    "training.lr_multipliers": "the heads are not layer groups of HighResNet3D",
    "training.lr_decay": "the heads are not layer groups of HighResNet3D",
    "training.mixed_precision": "not supported by the multi-domain trainer",
    "transfer.freeze": "every dataset's loss trains the whole trunk",
    "transfer.mean_var": "initialise the trunk with transfer.source only",
    "transfer.transfusion": "initialise the trunk with transfer.source only",
    "transfer.inflate": "initialise the trunk with transfer.source only",
}


def _check_datasets(cfg: Config) -> None:
    """The ``datasets:`` list of multi-domain pretraining: every problem named by its key."""
    if not cfg.datasets:
        return
    if dataclasses.replace(cfg.dataset, root=None) != DatasetConfig():
        raise ConfigError("dataset: not used when 'datasets' is given (multi-domain pretraining); "
                          "move its keys into the entries of 'datasets'")
    defaults = Config()
    for key, reason in _NOT_MULTI_DOMAIN.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) != getattr(getattr(defaults, section), name):
            raise ConfigError(f"{key}: cannot be used with 'datasets' (multi-domain pretraining): {reason}")
    if cfg.preprocessing.labels or cfg.preprocessing.other_labels is not None:
        raise ConfigError("preprocessing.labels: with 'datasets' each entry has its own 'labels' and 'other_labels'")
    if cfg.preprocessing.spacing is not None:
        raise ConfigError("preprocessing.spacing: with 'datasets' each entry has its own 'spacing' "
                          "(null: the dataset's median spacing)")
    problems = []
    names = [d.name for d in cfg.datasets]
    channels = len(cfg.datasets[0].modalities)
    for i, d in enumerate(cfg.datasets):
        key = f"datasets[{i}]"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", d.name):
            problems.append(f"{key}.name: {d.name!r} names a head layer; use letters, digits and '_', "
                            "starting with a letter")
        elif names.count(d.name) > 1:
            problems.append(f"{key}.name: {d.name!r} is used by more than one dataset; names must be unique")
        if len(d.modalities) != channels:
            problems.append(f"{key}.modalities: {len(d.modalities)} modalities {list(d.modalities)}, but "
                            f"datasets[0] has {channels}; the shared trunk has one input layer, so every "
                            "dataset needs the same number of channels")
        classes = set(d.labels.values()) | ({d.other_labels} if d.other_labels is not None else set())
        if classes and max(classes) >= d.num_classes:
            problems.append(f"{key}.labels: maps to class {max(classes)} but {key}.num_classes is {d.num_classes}")
        if cfg.sampler.label_pad_value >= d.num_classes:
            problems.append(f"sampler.label_pad_value: expected a class index below {key}.num_classes={d.num_classes}")
        if d.split.validation_fraction + d.split.inference_fraction >= 1:
            problems.append(f"{key}.split: validation_fraction + inference_fraction must be < 1")
        try:
            _check_dataset(d, cfg.preprocessing, key)
        except ConfigError as err:
            problems.append(str(err))
    if len(cfg.datasets) < 2:
        problems.append("datasets: multi-domain pretraining needs at least two datasets (one dataset: use 'dataset')")
    if problems:
        raise ConfigError("; ".join(problems))


def _check_dataset(ds: DatasetConfig, pp: PreprocessingConfig, prefix: str) -> None:
    """The file-layout keys of one dataset (``dataset`` or an entry of ``datasets``)."""
    if ds.layout == "patterns":
        missing = [m for m in ds.modalities if m not in ds.patterns]
        if ds.patterns and missing:
            raise ConfigError(f"{prefix}.patterns: no pattern for modalit{'ies' if len(missing) > 1 else 'y'} {', '.join(missing)}")
        bad = [k for k, p in ds.patterns.items() if "{subject}" not in p]
        if bad:
            raise ConfigError(f"{prefix}.patterns.{bad[0]}: the pattern must contain '{{subject}}'")
        extra = [k for k in ds.patterns if k not in ds.modalities and k not in ("label", "mask")]
        if extra:
            raise ConfigError(f"{prefix}.patterns.{extra[0]}: not a modality ({', '.join(ds.modalities)}), 'label' or 'mask'")
    if ds.layout == "niftynet_csv":
        missing = [m for m in ds.modalities if m not in ds.csv_files]
        if missing:
            raise ConfigError(f"{prefix}.csv_files: no CSV file for modality {missing[0]}")
    if len(set(ds.modalities)) != len(ds.modalities):
        raise ConfigError(f"{prefix}.modalities: duplicate names in {list(ds.modalities)}")
    if not ds.modalities:
        raise ConfigError(f"{prefix}.modalities: expected at least one modality")
    unknown = [m for m in pp.modality_interpolation if m not in ds.modalities]
    if unknown:
        raise ConfigError(f"preprocessing.modality_interpolation.{unknown[0]}: not one of the modalities {list(ds.modalities)}")
    if ds.layout == "niftynet_search":
        _niftynet_search_checks(ds, prefix)
    if pp.foreground == "mask" and ds.layout != "nnunet" and "mask" not in {"patterns": ds.patterns, "niftynet_search": ds.search}.get(ds.layout, ds.csv_files):
        where = {"patterns": "patterns", "niftynet_search": "search"}.get(ds.layout, "csv_files")
        raise ConfigError(f"{prefix}.{where}.mask: required when preprocessing.foreground is 'mask'")


def _check_freeze(freeze, key: str = "transfer.freeze") -> None:
    if isinstance(freeze, int):
        # Freezing all six groups would leave nothing to train.
        if not 0 <= freeze < len(LAYER_GROUPS):
            raise ConfigError(f"{key}: expected a number of layer groups between 0 and {len(LAYER_GROUPS) - 1}, got {freeze}")
        return
    names = [freeze] if isinstance(freeze, str) else list(freeze)
    if isinstance(freeze, str) and (freeze.strip().isdigit() or freeze in LAYER_GROUPS or freeze in FREEZE_KEYWORDS):
        return
    if isinstance(freeze, str):
        import re

        try:
            re.compile(freeze)
        except re.error as err:
            raise ConfigError(f"{key}: {freeze!r} is neither a layer group nor a valid regular expression ({err})") from None
        return
    unknown = [n for n in names if n not in LAYER_GROUPS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LAYER_GROUPS, n=1)
        hint = f", did you mean {close[0]!r}?" if close else f"; groups are {', '.join(LAYER_GROUPS)}"
        raise ConfigError(f"{key}: unknown layer group {unknown[0]!r}{hint}")
    if len(set(names)) == len(LAYER_GROUPS):
        raise ConfigError(f"{key}: freezes all six layer groups, leaving nothing to train; leave conv_2 out")


def _check_mean_var(transfer: TransferConfig) -> None:
    unknown = [g for g in transfer.mean_var if g not in LAYER_GROUPS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LAYER_GROUPS, n=1)
        hint = f", did you mean {close[0]!r}?" if close else f"; groups are {', '.join(LAYER_GROUPS)}"
        raise ConfigError(f"transfer.mean_var: unknown layer group {unknown[0]!r}{hint}")
    if transfer.transfusion is not None and not 0 <= transfer.transfusion < len(LAYER_GROUPS):
        raise ConfigError(
            f"transfer.transfusion: expected the number of copied groups between 0 and {len(LAYER_GROUPS) - 1}, "
            f"got {transfer.transfusion}")
    if transfer.mean_var and transfer.transfusion is not None:
        raise ConfigError("transfer: give mean_var (group names) or transfusion (copied groups), not both")
    if transfer.inflate is not None and transfer.source is None:
        raise ConfigError("transfer.inflate: inflates the kernels of a 2D source model; set transfer.source")
    if transfer.inflate_alpha is not None and transfer.inflate != "scaled":
        raise ConfigError("transfer.inflate_alpha: only used by transfer.inflate: scaled")
    if (transfer.mean_var or transfer.transfusion is not None) and transfer.source is None:
        raise ConfigError("transfer.mean_var / transfer.transfusion: the statistics come from a pretrained model; "
                          "set transfer.source")


def _check_learning_rates(multipliers, decay, prefix: str) -> None:
    unknown = [g for g in (multipliers or {}) if g not in LAYER_GROUPS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LAYER_GROUPS, n=1)
        hint = f", did you mean {close[0]!r}?" if close else f"; groups are {', '.join(LAYER_GROUPS)}"
        raise ConfigError(f"{prefix}.lr_multipliers: unknown layer group {unknown[0]!r}{hint}")
    if multipliers and decay is not None:
        raise ConfigError(f"{prefix}: give lr_multipliers or lr_decay, not both (lr_decay computes the multipliers)")


def _check_stages(cfg: Config) -> None:
    t = cfg.training
    for i, stage in enumerate(t.stages):
        key = f"training.stages[{i}]"
        if stage.iterations is None:
            raise ConfigError(f"{key}.iterations: required (how many iterations the stage runs)")
        if stage.freeze is not None:
            _check_freeze(stage.freeze, f"{key}.freeze")
        _check_learning_rates(stage.lr_multipliers, stage.lr_decay, key)
        probabilities = stage.sampler.class_probabilities
        if probabilities is not None and len(probabilities) != cfg.network.num_classes:
            raise ConfigError(
                f"{key}.sampler.class_probabilities: expected {cfg.network.num_classes} values (one per class), got {len(probabilities)}"
            )
    if t.stages:
        total = sum(stage.iterations for stage in t.stages)
        if total != t.max_iter:
            raise ConfigError(
                f"training.stages: the stages' iterations sum to {total} but training.max_iter is {t.max_iter}; "
                "make them equal"
            )
        names = [s.name for s in t.stages if s.name is not None]
        if len(set(names)) != len(names):
            raise ConfigError(f"training.stages: stage names must differ, got {names}")
    uses_groups = bool(t.lr_multipliers) or t.lr_decay is not None or any(
        s.lr_multipliers is not None or s.lr_decay is not None for s in t.stages)
    if t.compute_dtype == "float16" and uses_groups:
        raise ConfigError(
            "training.mixed_precision: float16 cannot be combined with per-group learning rates (lr_multipliers or "
            "lr_decay, one optimizer per layer group share no loss scale); use bfloat16, which needs no loss scaling, "
            "or turn one of them off"
        )


def _niftynet_search_checks(ds: DatasetConfig, prefix: str = "dataset") -> None:
    problems = [f"{prefix}.search.{m}: no input section for modality {m} (layout 'niftynet_search')"
                for m in ds.modalities if m not in ds.search]
    for name, section in ds.search.items():
        if name not in ds.modalities and name not in ("label", "mask"):
            problems.append(f"{prefix}.search.{name}: not a modality ({', '.join(ds.modalities)}), 'label' or 'mask'")
        if not section.path_to_search:
            problems.append(f"{prefix}.search.{name}.path_to_search: required (one or more folders)")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def _absolutise(raw: Any, cls, base_dir: Path) -> Any:
    """Resolve the relative paths one file wrote against that file's folder."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return raw
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        f = fields.get(key)
        if f is None:
            out[key] = value
        elif dataclasses.is_dataclass(hints[key]):
            out[key] = _absolutise(value, hints[key], base_dir)
        elif _list_item_type(hints[key]) is not None and isinstance(value, list):
            # A list of mappings (datasets, training.stages): each entry's paths resolve like a section's.
            out[key] = [_absolutise(v, _list_item_type(hints[key]), base_dir) for v in value]
        elif f.metadata.get("path"):
            out[key] = _resolve_path_values(value, base_dir)
        else:
            out[key] = value
    return out


def _list_item_type(tp) -> Any:
    """The dataclass of a ``tuple[Dataclass, ...]`` field, else None."""
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return item
    return None


def _expand(value: str) -> str:
    # "{cwd}" lets shipped configs name folders in the user's working directory
    # (run folders, pretrained models) instead of inside the installed package.
    return os.path.expanduser(os.path.expandvars(value.replace("{cwd}", str(Path.cwd()))))


def _resolve_path_values(value: Any, base_dir: Path) -> Any:
    if isinstance(value, str) and value.startswith(PRESET_SCHEME):
        return value  # a named preset, not a file path
    if isinstance(value, str):
        p = Path(_expand(value))
        return str(p if p.is_absolute() else (base_dir / p).resolve())
    if isinstance(value, list):
        return [_resolve_path_values(v, base_dir) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_path_values(v, base_dir) for k, v in value.items()}
    return value


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def packaged_config_dir() -> Path:
    """The folder of configs shipped inside the package (``highres3d/configs``)."""
    return Path(__file__).resolve().parent / "configs"


def find_config(name: str | os.PathLike) -> Path:
    """Return a config path: an existing file, or the bare name of a shipped config."""
    path = Path(name)
    if path.exists():
        return path.resolve()
    if not path.is_absolute():
        for candidate in (packaged_config_dir() / path, packaged_config_dir() / path.name):
            if candidate.suffix == "":
                candidate = candidate.with_suffix(".yaml")
            if candidate.exists():
                return candidate.resolve()
    shipped = sorted(p.relative_to(packaged_config_dir()).as_posix() for p in packaged_config_dir().rglob("*.yaml"))
    close = difflib.get_close_matches(str(name), shipped, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else (f"; shipped configs: {', '.join(shipped)}" if shipped else "")
    raise ConfigError(f"{name}: config file not found{hint}")


def _load_raw(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"{path}: 'extends' forms a cycle ({chain})")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    data = _absolutise(data, Config, path.parent)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: expected the path of a base config, got {parent!r}")
    parent_path = Path(os.path.expanduser(parent))
    if not parent_path.is_absolute():
        local = (path.parent / parent_path).resolve()
        parent_path = local if local.exists() else find_config(parent)
    return _deep_merge(_load_raw(parent_path, seen + (path,)), data)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. training.lr=1e-4")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def config_from_dict(raw: Mapping, base_dir: Optional[Path] = None, source: Optional[Path] = None) -> Config:
    """Validate a mapping (e.g. from YAML) into a :class:`Config`."""
    raw = dict(raw)
    raw.pop("extends", None)
    cfg = _build(Config, raw, "", base_dir)
    if source is not None:
        cfg = dataclasses.replace(cfg, source_file=source)
    _cross_checks(cfg)
    return cfg


def load_config(
    path: str | os.PathLike,
    overrides: Optional[list[str]] = None,
    data_root: Optional[str | os.PathLike] = None,
) -> Config:
    """Load, merge (``extends``) and validate a YAML config.

    ``path`` may be a file or the bare name of a config shipped with the package.
    ``overrides`` are ``section.key=value`` strings applied last (YAML values).
    ``data_root`` replaces ``dataset.root`` (relative to the current folder);
    when it is not given, the environment variable ``HIGHRES3D_DATA_ROOT`` does.
    With ``datasets:`` (multi-domain pretraining) it is a folder of datasets:
    each entry's root becomes ``data_root/<its name>``.
    """
    file = find_config(path)
    raw = _load_raw(file, ())
    for text in overrides or []:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        # Paths typed on the command line are relative to where the user is.
        raw = _deep_merge(raw, _absolutise(nested, Config, Path.cwd()))
    root = data_root if data_root is not None else os.environ.get("HIGHRES3D_DATA_ROOT")
    if root:
        root = Path(root).expanduser().resolve()
        entries = raw.get("datasets")
        if isinstance(entries, list) and entries:
            raw["datasets"] = [{**e, "root": str(root / str(e.get("name", "")))} if isinstance(e, dict) else e
                               for e in entries]
        else:
            raw.setdefault("dataset", {})["root"] = str(root)
    return config_from_dict(raw, base_dir=file.parent, source=file)


# --------------------------------------------------------------------------- output


def to_dict(obj: Any) -> Any:
    """A plain, YAML-ready structure of a config (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_config(cfg: Config, relative_to: Optional[Path] = None) -> str:
    """The resolved config as YAML; loading it again gives an equal config.

    Args:
        cfg: the config.
        relative_to: a folder; paths inside it are written relative to it, so
            a config saved in that folder (a run folder) still finds them after
            the folder is moved (loading resolves relative paths against the
            config file's folder).
    """
    data = to_dict(cfg)
    if relative_to is not None:
        data = _relative_paths(data, Path(relative_to).resolve())
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def _relative_paths(value: Any, folder: Path) -> Any:
    if isinstance(value, dict):
        return {k: _relative_paths(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_paths(v, folder) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        if path.is_relative_to(folder):
            return path.relative_to(folder).as_posix()
    return value


def describe_schema() -> str:
    """Every key with its default and meaning, for documentation."""
    lines = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        cls = hints[section.name]
        item = _list_item_type(cls)
        if item is not None:
            lines.append(f"{section.name}: []  # {section.metadata['doc']}; each entry:")
            lines.extend(f"#   {line}" for line in _describe_fields(item, ""))
            continue
        lines.append(f"{section.name}:  # {cls.__doc__.strip().splitlines()[0]}")
        lines.extend(_describe_fields(cls, "  "))
    return "\n".join(lines)


def _describe_fields(cls, indent: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{indent}{f.name}:  # {f.metadata['doc']}")
            lines.extend(_describe_fields(hints[f.name], indent + "  "))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        item = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is tuple else None
        if item is not None and dataclasses.is_dataclass(item):
            # A list of mappings (training.stages): each entry's keys, as comments.
            lines.append(f"{indent}{f.name}: []  # {f.metadata['doc']}; each entry:")
            lines.extend(f"{indent}#   {line}" for line in _describe_fields(item, ""))
            continue
        lines.append(f"{indent}{f.name}: {yaml.safe_dump(to_dict(default), default_flow_style=True).strip().removesuffix('...').strip()}  # {f.metadata['doc']}")
    return lines
