"""Transfer learning for HighResNet3D: load weights by name, then freeze layer groups.

Loading (:func:`load_weights`) copies every weight of a source model into the
target by its path (``res_2_0/conv_1/kernel``), checking shapes, and returns a
:class:`TransferReport`:

* a different class count re-initialises the classifier group ``conv_2``;
* a different input channel count (T1+T2 source, four-modality target) copies
  the matching input channels of the ``conv_0`` kernel and fills the others
  with the mean of the source channels (``channel_init="mean"``) or zeros;
* any other shape difference keeps the target's value and is reported.

Freezing (:func:`freeze`) takes the number of leading groups (``2`` freezes
``conv_0`` and ``res_1``: the thesis' "Model 2"), a list of group names, or a
NiftyNet ``vars_to_freeze`` regex used verbatim (matched, as in NiftyNet,
against the variable names ``HighRes3DNet/res_1_0/conv_0/w`` ...; see
:func:`highres3d.models.niftynet_variable_name`).

What happens to the batch normalisation of frozen groups is explicit:

``bn_policy="niftynet"`` (default; what the thesis ran)
    only the kernels and BN ``gamma``/``beta`` are excluded from the optimiser.
    The BN layers stay in training mode: they normalise with the statistics of
    the current batch and keep updating their moving mean and variance.
``bn_policy="keras"``
    the BN layers of frozen groups are set ``trainable = False``, which in
    Keras 3 also runs them in inference mode: they normalise with the stored
    moving statistics, which stay fixed (the usual Keras fine-tuning recipe).

Freezing changes which variables are trainable, so compile the model after
calling :func:`freeze` (a compiled train function and a built optimiser keep
the variable list they were created with).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from highres3d.errors import ConfigError, DataError

#: File names looked up, in this order, when the source is a run folder.
RUN_FOLDER_MODEL_NAMES: tuple[str, ...] = ("best.keras", "model.keras")
BN_POLICIES: tuple[str, ...] = ("niftynet", "keras")
CHANNEL_INIT_RULES: tuple[str, ...] = ("mean", "zeros")
_CLASSIFIER_GROUP = "conv_2"
_INPUT_KERNEL = "conv_0/conv/kernel"
_INITIALIZER_ATTRIBUTES = {
    "kernel": "kernel_initializer",
    "gamma": "gamma_initializer",
    "beta": "beta_initializer",
    "moving_mean": "moving_mean_initializer",
    "moving_variance": "moving_variance_initializer",
    "alpha": "alpha_initializer",
}


# --------------------------------------------------------------------------- sources


def resolve_source(source: str | Path) -> Path:
    """The model file a source path designates.

    A ``.keras`` file is returned as is; a run folder gives its ``best.keras``,
    else its ``model.keras``; ``preset:NAME`` gives the preset's checked model
    (:mod:`highres3d.presets`).  Only ``.keras`` files are accepted because they
    carry the architecture with the weights: a bare ``.weights.h5`` file stores
    weights by layer position, which cannot be matched to another model safely.

    Raises:
        DataError: if the path does not exist, the folder holds neither file, or
            the file type is not supported.
    """
    from highres3d import presets

    if presets.is_preset(source):
        return presets.get_preset(str(source)).verify()
    path = Path(source).expanduser()
    if path.is_dir():
        for name in RUN_FOLDER_MODEL_NAMES:
            candidate = path / name
            if candidate.is_file():
                return candidate
        raise DataError(
            f"{path}: run folder without a model; expected one of {', '.join(RUN_FOLDER_MODEL_NAMES)} in it."
        )
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected a .keras file or a run folder).")
    if path.name.endswith(".keras"):
        return path
    hint = (
        " A .weights.h5 file holds no architecture; load it into the model it was saved from and save that "
        "model with model.save('model.keras')."
        if path.name.endswith(".weights.h5")
        else " Legacy .h5 files and TensorFlow checkpoints are not read."
    )
    raise DataError(f"{path}: unsupported model file; use a .keras model or a run folder.{hint}")


def load_model(source: str | Path) -> Any:
    """Loads a ``.keras`` model (or a run folder's best/last model) without compiling it."""
    import importlib

    import keras

    # The package's layers, losses and metrics register themselves for deserialisation on import.
    for module in ("highres3d.models", "highres3d.losses", "highres3d.metrics"):
        importlib.import_module(module)

    path = resolve_source(source)
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as err:  # Keras raises many types for a corrupt or foreign file
        raise DataError(f"{path}: cannot load the model: {err}") from err


def read_source_weights(source: Any) -> dict[str, np.ndarray]:
    """The weights of a source by weight path.

    Args:
        source: a Keras model, a ``.keras`` file or a run folder.

    Raises:
        DataError: for an unreadable or unsupported source.
    """
    from highres3d.models import named_weights

    model = source if hasattr(source, "weights") and hasattr(source, "layers") else load_model(source)
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in named_weights(model).items()}


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class TransferReport:
    """What :func:`load_weights` did with every weight of the target.

    Attributes:
        source: description of the source.
        copied: weight paths copied unchanged.
        adapted: ``(path, detail)`` for weights copied in part (input channels).
        reinitialised: ``(path, reason)`` for weights freshly initialised.
        skipped_shape: ``(path, source shape, target shape)``: kept the target's value.
        missing: target weights absent from the source (kept the target's value).
        unused: source weights with no counterpart in the target.
    """

    source: str
    copied: list[str] = dataclasses.field(default_factory=list)
    adapted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    reinitialised: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unused: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_target_weights(self) -> int:
        return len(self.copied) + len(self.adapted) + len(self.reinitialised) + len(self.skipped_shape) + len(self.missing)

    def summary(self) -> str:
        """A short multi-line report, one line per category with its weights."""
        lines = [
            f"Transfer from {self.source}: {len(self.copied)} of {self.num_target_weights} weights copied, "
            f"{len(self.adapted)} adapted, {len(self.reinitialised)} re-initialised, "
            f"{len(self.skipped_shape)} skipped for shape, {len(self.missing)} missing"
            + (f", {len(self.unused)} source weights unused" if self.unused else "")
        ]
        for path, detail in self.adapted:
            lines.append(f"  adapted        {path}: {detail}")
        for path, reason in self.reinitialised:
            lines.append(f"  re-initialised {path}: {reason}")
        for path, src, dst in self.skipped_shape:
            lines.append(f"  skipped        {path}: source shape {src} != target shape {dst}")
        for path in self.missing:
            lines.append(f"  missing        {path}: not in the source")
        for path in self.unused:
            lines.append(f"  unused         {path}: not in the target")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _initial_value(layer: Any, variable: Any) -> np.ndarray:
    attribute = _INITIALIZER_ATTRIBUTES.get(variable.name)
    initializer = getattr(layer, attribute, None) if attribute else None
    if initializer is None:
        raise ValueError(f"No initializer known for {variable.path}")
    return np.asarray(initializer(tuple(variable.shape), dtype=variable.dtype))


def _adapt_input_kernel(source: np.ndarray, target_shape: tuple[int, ...], rule: str) -> tuple[np.ndarray, str]:
    source_channels, target_channels = source.shape[3], target_shape[3]
    shared = min(source_channels, target_channels)
    kernel = np.empty(target_shape, dtype=source.dtype)
    kernel[:, :, :, :shared, :] = source[:, :, :, :shared, :]
    if target_channels > shared:
        fill = source.mean(axis=3, keepdims=True) if rule == "mean" else np.zeros_like(source[:, :, :, :1, :])
        kernel[:, :, :, shared:, :] = fill
    detail = f"input channels {source_channels} -> {target_channels}: copied channels 0..{shared - 1}"
    if target_channels > shared:
        fill_text = "mean of the source channels" if rule == "mean" else "zeros"
        detail += f", channels {shared}..{target_channels - 1} = {fill_text}"
    return kernel, detail


INFLATE_MODES: tuple[str, ...] = ("center", "average", "scaled")


def inflation_weights(mode: str, depth: int, alpha: Sequence[float] | None = None, sigma: float = 1.0) -> np.ndarray:
    """The weights α_t of the ``depth`` slices of an inflated kernel (they sum to 1).

    Args:
        mode: ``"center"`` (1 on the middle slice), ``"average"`` (1/depth
            each) or ``"scaled"`` (``alpha`` normalised, or a Gaussian of
            standard deviation ``sigma`` slices centred on the middle slice).
        depth: the kernel size along the new axis.
        alpha: ``scaled``: one weight per slice; ignored for 1-slice kernels.
        sigma: ``scaled`` without ``alpha``.

    Raises:
        ConfigError: for an unknown mode or an ``alpha`` of another length.
    """
    if mode not in INFLATE_MODES:
        raise ConfigError(f"transfer.inflate: expected one of {', '.join(INFLATE_MODES)}, got {mode!r}")
    t = np.arange(depth) - depth // 2
    if mode == "center" or depth == 1:
        weights = (t == 0).astype(np.float64)
    elif mode == "average":
        weights = np.ones(depth)
    elif alpha is not None:
        if len(alpha) != depth:
            raise ConfigError(f"transfer.inflate_alpha: expected {depth} weights (the kernel size), got {len(alpha)}")
        weights = np.asarray(alpha, dtype=np.float64)
    else:
        weights = np.exp(-0.5 * (t / float(sigma)) ** 2)
    return weights / weights.sum()


def inflate_kernel(kernel: np.ndarray, mode: str, *, axis: int = 2, depth: int | None = None,
                   alpha: Sequence[float] | None = None, sigma: float = 1.0) -> np.ndarray:
    """A 2D kernel ``(k, k, c_in, c_out)`` inflated into a 3D kernel ``(k, k, k, c_in, c_out)``.

    Slice ``t`` of the new axis is ``α_t · W`` (:func:`inflation_weights`):
    ``center`` reproduces the 2D network on every slice, ``average`` (I3D)
    reproduces it on volumes that are constant along ``axis``.

    Args:
        kernel: the 2D kernel; its two spatial axes are the volume's in-plane
            axes in ascending order (as :class:`~highres3d.models.ToSlices` lays them out).
        mode: ``"center"``, ``"average"`` or ``"scaled"``.
        axis: the spatial axis (0, 1, 2) of the new kernel axis: the 2D network's slice axis.
        depth: the kernel size along ``axis`` (default: the 2D kernel's size).
        alpha: ``scaled``: the slices' weights.
        sigma: ``scaled`` without ``alpha``: the Gaussian's standard deviation in slices.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"expected a 2D kernel (k, k, c_in, c_out), got shape {kernel.shape}")
    weights = inflation_weights(mode, depth or kernel.shape[0], alpha, sigma)
    return np.stack([w * kernel.astype(np.float64) for w in weights], axis=axis).astype(kernel.dtype)


def load_weights(
    model: Any,
    source: Any,
    *,
    channel_init: str = "mean",
    inflate: str | None = None,
    inflate_alpha: Sequence[float] | None = None,
    inflate_sigma: float = 1.0,
    echo: Callable[[str], None] | None = print,
) -> TransferReport:
    """Copies the weights of ``source`` into ``model`` by weight path.

    Args:
        model: the target :class:`~highres3d.models.HighResNet3D` (built).
        source: a Keras model, a ``.keras`` file, or a run folder
            (``best.keras`` is used if present, else ``model.keras``).
        channel_init: how to fill ``conv_0`` input channels the source lacks:
            ``"mean"`` (the mean of the source channels' kernels) or ``"zeros"``.
        inflate: for a 2D source (``dims=2``) and a 3D target: how each 2D
            kernel becomes 3D along the source's ``slice_axis``
            (:func:`inflate_kernel`); BatchNorm and PReLU parameters copy unchanged.
        inflate_alpha: ``inflate="scaled"``: the slices' weights.
        inflate_sigma: ``inflate="scaled"`` without ``inflate_alpha``.
        echo: where the report goes (``None``: nowhere).

    Returns:
        The :class:`TransferReport`.

    Raises:
        ConfigError: for an unknown ``channel_init``.
        DataError: for an unreadable source, or one sharing no weight with the target.
    """
    from highres3d.models import layer_group, named_layers, named_weights

    if channel_init not in CHANNEL_INIT_RULES:
        raise ConfigError(f"channel_init must be one of {', '.join(CHANNEL_INIT_RULES)}, got {channel_init!r}")
    if inflate is not None and inflate not in INFLATE_MODES:
        raise ConfigError(f"transfer.inflate: expected one of {', '.join(INFLATE_MODES)}, got {inflate!r}")
    is_model = hasattr(source, "weights") and hasattr(source, "layers")
    source_model = source if is_model else load_model(source)
    source_weights = read_source_weights(source_model)
    source_axis = int(getattr(source_model, "slice_axis", 2))
    label = f"model {source.name!r}" if is_model else str(resolve_source(source))
    report = TransferReport(source=label)
    layers = named_layers(model)
    target_weights = named_weights(model)
    if not set(source_weights) & set(target_weights):
        raise DataError(f"{report.source}: shares no weight name with the target model; is it a HighResNet3D?")

    for path, variable in target_weights.items():
        target_shape = tuple(int(d) for d in variable.shape)
        if path not in source_weights:
            report.missing.append(path)
            continue
        value = source_weights[path]
        inflated = ""
        if value.ndim + 1 == len(target_shape) and variable.name == "kernel":
            if inflate is None:
                raise DataError(
                    f"{report.source}: a 2D network (kernel {path} has shape {tuple(value.shape)}) cannot initialise "
                    "a 3D one as it is; set transfer.inflate to center, average or scaled"
                )
            value = inflate_kernel(value, inflate, axis=source_axis, depth=target_shape[source_axis],
                                   alpha=inflate_alpha, sigma=inflate_sigma)
            inflated = f"2D kernel inflated ({inflate}) along axis {source_axis}"
        elif value.ndim + 1 == len(target_shape) and value.size == int(np.prod(target_shape)):
            value = value.reshape(target_shape)  # PReLU slopes: one more shared spatial axis
        if tuple(value.shape) == target_shape:
            variable.assign(value.astype(variable.dtype, copy=False))
            if inflated:
                report.adapted.append((path, inflated))
            else:
                report.copied.append(path)
        elif path == _INPUT_KERNEL and value.ndim == 5 and value.shape[:3] + value.shape[4:] == target_shape[:3] + target_shape[4:]:
            kernel, detail = _adapt_input_kernel(value, target_shape, channel_init)
            variable.assign(kernel.astype(variable.dtype, copy=False))
            report.adapted.append((path, f"{inflated}; {detail}" if inflated else detail))
        elif layer_group(path) == _CLASSIFIER_GROUP:
            layer = layers[path.rsplit("/", 1)[0]]
            variable.assign(_initial_value(layer, variable))
            report.reinitialised.append((path, f"classifier shape {tuple(value.shape)} -> {target_shape}"))
        else:
            report.skipped_shape.append((path, tuple(value.shape), target_shape))
    report.unused = sorted(set(source_weights) - set(target_weights))
    if echo is not None:
        echo(report.summary())
    return report


# --------------------------------------------------------------------------- freezing


@dataclasses.dataclass
class FreezeReport:
    """The outcome of :func:`freeze`.

    Attributes:
        spec: the freeze specification as given.
        bn_policy: ``"niftynet"`` or ``"keras"``.
        frozen: weight paths excluded from training (kernels, gamma, beta, alpha).
        frozen_groups: groups whose parameters are all frozen.
        partial_groups: groups with only some parameters frozen.
        frozen_parameters: number of scalars frozen.
        total_parameters: number of trainable-kind scalars of the model.
    """

    spec: Any
    bn_policy: str
    frozen: list[str]
    frozen_groups: list[str]
    partial_groups: list[str]
    frozen_parameters: int
    total_parameters: int

    def summary(self) -> str:
        groups = ", ".join(self.frozen_groups) or "none"
        text = (
            f"Froze {len(self.frozen)} variables ({self.frozen_parameters:,} of {self.total_parameters:,} parameters); "
            f"frozen groups: {groups}"
        )
        if self.partial_groups:
            text += f"; partly frozen: {', '.join(self.partial_groups)}"
        if self.frozen:
            text += (
                "; BN of frozen layers keeps using batch statistics and updating its moving averages (niftynet policy)"
                if self.bn_policy == "niftynet"
                else "; BN of frozen layers runs in inference mode with fixed statistics (keras policy)"
            )
        return text + "."

    def __str__(self) -> str:
        return self.summary()


def _parameter_weights(model: Any) -> dict[str, Any]:
    from highres3d.models import is_state_variable, layer_group, named_weights

    return {p: v for p, v in named_weights(model).items() if not is_state_variable(p) and layer_group(p) is not None}


def _groups_from_spec(spec: Any) -> list[str] | None:
    from highres3d.models import GROUPS

    if isinstance(spec, bool):
        raise ConfigError(f"freeze: expected a number of groups, group names or a regex, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        k = int(spec)
        if not 0 <= k <= len(GROUPS):
            raise ConfigError(f"freeze: the number of leading groups must be in 0..{len(GROUPS)}, got {k}")
        return list(GROUPS[:k])
    if isinstance(spec, str) and spec.strip().isdigit():
        return _groups_from_spec(int(spec.strip()))
    if isinstance(spec, str) and spec in GROUPS:
        return [spec]
    if spec == "all_but_last":
        return list(GROUPS[:-1])
    if isinstance(spec, (list, tuple, set, frozenset)):
        names = [str(s) for s in spec]
        unknown = [n for n in names if n not in GROUPS]
        if unknown:
            import difflib

            hints = {n: difflib.get_close_matches(n, GROUPS, n=1) for n in unknown}
            hint = "; ".join(f"{n!r} (did you mean {h[0]!r}?)" if h else repr(n) for n, h in hints.items())
            raise ConfigError(f"freeze: unknown group name(s) {hint}; groups are {', '.join(GROUPS)}")
        return names
    return None


def select_frozen(model: Any, spec: Any) -> list[str]:
    """The parameter weight paths a freeze specification selects (nothing is changed).

    Args:
        model: a :class:`~highres3d.models.HighResNet3D`.
        spec: ``None`` (nothing), a number ``k`` of leading groups,
            ``"all_but_last"`` (every group but the classifier ``conv_2``), a
            group name, a list of group names, or a NiftyNet ``vars_to_freeze`` regex.

    Raises:
        ConfigError: for an invalid specification or regex.
    """
    from highres3d.models import layer_group, niftynet_variable_name

    parameters = _parameter_weights(model)
    if spec is None:
        return []
    groups = _groups_from_spec(spec)
    if groups is not None:
        return [p for p in parameters if layer_group(p) in groups]
    if not isinstance(spec, str):
        raise ConfigError(f"freeze: expected a number of groups, group names or a regex, got {spec!r}")
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise ConfigError(f"freeze: invalid regular expression {spec!r}: {err}") from err
    activation = getattr(model, "activation", "leaky_relu")
    selected = []
    for path in parameters:
        name = niftynet_variable_name(path, activation)
        # TF1 variable names carried a ':0' suffix; accept regexes written either way.
        if pattern.search(name) or pattern.search(f"{name}:0"):
            selected.append(path)
    return selected


def unfreeze(model: Any) -> None:
    """Makes every layer and parameter of ``model`` trainable again (BN back in training mode)."""
    from highres3d.models import named_layers

    # Keras does not propagate `trainable = True` to sub-layers of a layer that is
    # already trainable, so every level is set explicitly.
    model.trainable = True
    for layer in [*model.layers, *named_layers(model).values()]:
        layer.trainable = True
    for variable in _parameter_weights(model).values():
        variable.trainable = True


def freeze(model: Any, spec: Any, *, bn_policy: str = "niftynet") -> FreezeReport:
    """Freezes layer groups of a HighResNet3D for fine-tuning.

    Any earlier freezing is undone first, so calls do not accumulate.

    Args:
        model: a :class:`~highres3d.models.HighResNet3D`.
        spec: ``k`` (freeze the first ``k`` of conv_0, res_1, res_2, res_3,
            conv_1, conv_2; ``0`` or ``None`` freezes nothing), ``"all_but_last"``
            (everything except ``conv_2``), a group name or list of group names, or a NiftyNet ``vars_to_freeze`` regex such as
            ``^((?!HighRes3DNet\\/(res_2|res_3|conv_1|conv_2)).)*$`` (freezes
            conv_0 and res_1), matched against NiftyNet variable names.
        bn_policy: ``"niftynet"``: exclude the frozen kernels and BN gamma/beta
            from training but keep the BN layers in training mode, so they
            normalise with batch statistics and update their moving averages;
            ``"keras"``: set the frozen BN layers ``trainable = False``, which
            runs them in inference mode with fixed moving statistics.

    Returns:
        A :class:`FreezeReport`; compile the model afterwards.

    Raises:
        ConfigError: for an invalid spec or policy, or when the spec would
            freeze every parameter (nothing left to optimise).
    """
    from highres3d.models import GROUPS, layer_group, named_layers

    if bn_policy not in BN_POLICIES:
        raise ConfigError(f"bn_policy must be one of {', '.join(BN_POLICIES)}, got {bn_policy!r}")
    selected = select_frozen(model, spec)
    parameters = _parameter_weights(model)
    if selected and len(selected) == len(parameters):
        raise ConfigError(
            f"freeze: {spec!r} freezes every trainable variable, leaving nothing to optimise "
            "(NiftyNet failed here with 'No variables to optimize'); freeze fewer groups."
        )
    unfreeze(model)
    layers = named_layers(model)
    import keras

    for path in selected:
        layer_path = path.rsplit("/", 1)[0]
        layer = layers[layer_path]
        if bn_policy == "keras" and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        else:
            parameters[path].trainable = False

    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        warnings.warn(
            "freeze(): the model's optimizer is already built with the previous variable list; "
            "call model.compile(...) again (with a new optimizer) before training.",
            stacklevel=2,
        )

    def size(p: str) -> int:
        return int(np.prod(parameters[p].shape))

    selected_set = set(selected)
    frozen_groups, partial_groups = [], []
    for group in GROUPS:
        members = [p for p in parameters if layer_group(p) == group]
        hit = [p for p in members if p in selected_set]
        if hit and len(hit) == len(members):
            frozen_groups.append(group)
        elif hit:
            partial_groups.append(group)
    report = FreezeReport(
        spec=spec,
        bn_policy=bn_policy,
        frozen=list(selected),
        frozen_groups=frozen_groups,
        partial_groups=partial_groups,
        frozen_parameters=sum(size(p) for p in selected),
        total_parameters=sum(size(p) for p in parameters),
    )
    return report


def frozen_weight_paths(model: Any) -> list[str]:
    """Parameter weight paths of ``model`` that training currently leaves unchanged."""
    trainable = {id(v) for v in model.trainable_weights}
    return [p for p, v in _parameter_weights(model).items() if id(v) not in trainable]


# --------------------------------------------------------------------------- Mean-Var re-initialisation


@dataclasses.dataclass
class MeanVarReport:
    """What :func:`mean_var_reinit` did.

    Attributes:
        groups: the groups re-initialised.
        redrawn: ``(path, mean, std)`` of every parameter tensor redrawn from
            N(mean, std²) with the pretrained tensor's statistics.
        reset: BatchNorm weight paths set to identity (γ 1, β 0, mean 0, variance 1).
    """

    groups: list[str]
    redrawn: list[tuple[str, float, float]] = dataclasses.field(default_factory=list)
    reset: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        return (f"Mean-Var re-initialised {', '.join(self.groups) or 'no groups'}: {len(self.redrawn)} tensors redrawn "
                f"from their pretrained mean and variance, {len(self.reset)} BatchNorm weights reset to identity.")

    def __str__(self) -> str:
        return self.summary()


_BN_IDENTITY = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}


def transfusion_groups(keep: int) -> list[str]:
    """The groups Transfusion re-initialises when it keeps the first ``keep`` groups' weights.

    Args:
        keep: pretrained groups copied (0-5); the rest are Mean-Var re-initialised.

    Raises:
        ConfigError: for ``keep`` outside 0..5.
    """
    from highres3d.models import GROUPS

    if isinstance(keep, bool) or not 0 <= int(keep) < len(GROUPS):
        raise ConfigError(f"transfer.transfusion: expected the number of copied groups between 0 and {len(GROUPS) - 1}, got {keep!r}")
    return list(GROUPS[int(keep):])


def mean_var_reinit(model: Any, groups: Sequence[str], *, source: Any = None, seed: int = 0,
                    echo: Callable[[str], None] | None = print) -> MeanVarReport:
    """Mean-Var re-initialisation (Raghu et al. 2019, "Transfusion") of some layer groups.

    Each parameter tensor of the chosen groups (convolution kernels, PReLU
    slopes) is redrawn i.i.d. from a normal with the mean and variance of the
    pretrained tensor of the same path; BatchNorm is reset to identity
    (γ = 1, β = 0, moving mean 0, moving variance 1).  Everything else is left
    as it is.  The statistics are scalars per tensor, so they are defined even
    where the source's tensor has another shape (a classifier with another
    class count).

    Args:
        model: the target :class:`~highres3d.models.HighResNet3D`.
        groups: the group names to re-initialise.
        source: where the pretrained statistics come from: a model, ``.keras``
            file or run folder, or ``None`` for ``model``'s own current weights
            (e.g. right after :func:`load_weights`).
        seed: seed of the draws.
        echo: where the summary goes (``None``: nowhere).

    Returns:
        A :class:`MeanVarReport`.

    Raises:
        ConfigError: for an unknown group name.
        DataError: for an unreadable source.
    """
    from highres3d.models import GROUPS, layer_group, named_weights

    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ConfigError(f"transfer.mean_var: unknown layer group(s) {unknown}; groups are {', '.join(GROUPS)}")
    chosen = [g for g in GROUPS if g in set(groups)]
    weights = named_weights(model)
    statistics = read_source_weights(source) if source is not None else {p: np.asarray(v) for p, v in weights.items()}
    rng = np.random.default_rng(seed)
    report = MeanVarReport(groups=chosen)
    for path, variable in weights.items():
        if layer_group(path) not in chosen:
            continue
        name = path.rsplit("/", 1)[-1]
        is_bn = path.rsplit("/", 2)[-2].startswith("bn")
        if is_bn and name in _BN_IDENTITY:
            variable.assign(np.full(tuple(variable.shape), _BN_IDENTITY[name], dtype=variable.dtype))
            report.reset.append(path)
            continue
        if path not in statistics:
            raise DataError(f"{path}: no pretrained tensor to take the Mean-Var statistics from")
        pretrained = np.asarray(statistics[path], dtype=np.float64)
        mean, std = float(pretrained.mean()), float(pretrained.std())
        variable.assign(rng.normal(mean, std, size=tuple(variable.shape)).astype(variable.dtype))
        report.redrawn.append((path, mean, std))
    if echo is not None:
        echo(report.summary())
    return report


# --------------------------------------------------------------------------- discriminative learning rates


def learning_rate_multipliers(
    multipliers: Mapping[str, float] | None = None,
    decay: float | None = None,
) -> dict[str, float]:
    """The learning-rate multiplier of every layer group (discriminative fine-tuning).

    Howard & Ruder (2018, ULMFiT) train lower layers with smaller rates:
    ``lr_g = lr / decay**d`` with ``d`` the number of groups between ``g`` and
    the classifier ``conv_2`` (``conv_2``: 1, ``conv_1``: 1/2.6, ... ``conv_0``:
    1/2.6**5 for ``decay=2.6``).  Explicit multipliers are the alternative;
    groups they leave out train at the base rate.

    Args:
        multipliers: a multiplier per group name (``training.lr_multipliers``).
        decay: the decay factor from the top (``training.lr_decay``).

    Returns:
        ``{group: multiplier}`` for all six groups, in network order.

    Raises:
        ConfigError: for both arguments at once, an unknown group or a
            multiplier that is not positive.
    """
    from highres3d.models import GROUPS

    multipliers = dict(multipliers or {})
    if multipliers and decay is not None:
        raise ConfigError("lr_multipliers and lr_decay: give one of them, not both")
    unknown = [g for g in multipliers if g not in GROUPS]
    if unknown:
        raise ConfigError(f"lr_multipliers: unknown layer group(s) {unknown}; groups are {', '.join(GROUPS)}")
    bad = [g for g, m in multipliers.items() if not float(m) > 0]
    if bad or (decay is not None and not float(decay) > 0):
        raise ConfigError("lr_multipliers / lr_decay: expected positive values")
    if decay is not None:
        top = len(GROUPS) - 1
        return {g: float(decay) ** -(top - i) for i, g in enumerate(GROUPS)}
    return {g: float(multipliers.get(g, 1.0)) for g in GROUPS}


__all__: Sequence[str] = (
    "BN_POLICIES",
    "CHANNEL_INIT_RULES",
    "RUN_FOLDER_MODEL_NAMES",
    "INFLATE_MODES",
    "FreezeReport",
    "MeanVarReport",
    "TransferReport",
    "freeze",
    "frozen_weight_paths",
    "inflate_kernel",
    "inflation_weights",
    "load_model",
    "learning_rate_multipliers",
    "load_weights",
    "mean_var_reinit",
    "read_source_weights",
    "resolve_source",
    "select_frozen",
    "transfusion_groups",
    "unfreeze",
)
