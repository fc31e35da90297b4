"""Tables and figure data of the thesis (Tables 6.1-6.6, Figs 6.8-6.9) from experiment results.

The notebooks in ``notebooks/`` are thin: they call these functions and draw
with matplotlib.  Everything here works on plain Python and numpy (no pandas)
and reads the files :mod:`highres3d.experiments` writes::

    <experiment>/results.csv            one row per run, split, subject and class
    <experiment>/results.<i>of<n>.csv   the same, one file per cluster shard
    <experiment>/runs/<run>/metrics.csv the logged scalars of each run

How the thesis computed its tables (Kaliyugarsan 2019, section 6.3), and so
how these functions do: the value of a cell is the mean over *subjects* of the
foreground (tumour-core) Dice of one split; with ``--repeats`` the subjects of
all repeats are pooled.  The splits are ``training``, ``validation`` and
``inference``; the last is what the thesis calls *test*.  A metric that is
undefined for a subject (``nan``: e.g. Dice when neither the prediction nor
the truth has a foreground voxel) is left out of the mean and the count ``n``
says how many values were used; a failed segmentation of a present tumour has
Dice 0 and does count, as in the thesis.
"""
from __future__ import annotations

import csv
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from highres3d.experiments import SCRATCH, read_results

#: The result splits in table order, and the names the thesis gives them.
SPLITS: tuple[str, ...] = ("training", "validation", "inference")
SPLIT_TITLES: dict[str, str] = {"training": "training", "validation": "validation", "inference": "test"}

#: Table 6.1 of the thesis: NiftyNet checkpoint scalars per layer group (Adam slots excluded).
THESIS_TABLE_6_1: dict[str, int] = {
    "conv_0": 964, "res_1": 42_060, "res_2": 153_132, "res_3": 610_380, "conv_1": 5_602, "conv_2": 174,
    "total": 812_312,
}

_INT_COLUMNS = ("subset_size", "repeat", "seed", "class", "iterations", "best_iteration")
_FLOAT_COLUMNS = ("dice", "jaccard", "hd95_mm", "hausdorff_mm", "time_to_best_s", "wall_time_s")

# The commands that produce each kind of experiment folder, for the message shown when it is missing.
PRODUCED_BY = {
    "freeze-levels": "`highres3d demo` (writes demo_output/brats_experiment), or at full scale "
                     "`highres3d experiment freeze-levels --config brats_freeze2.yaml --data-root BRATS_DIR` "
                     "(writes runs/freeze-levels_brats_hgg)",
    "dataset-size": "`highres3d experiment dataset-size --config brats_freeze2.yaml --data-root BRATS_DIR` "
                    "(writes runs/dataset-size_brats_hgg; the grid needs dataset.split.subset_sizes)",
    "transfer-methods": "`highres3d experiment transfer-methods --config demo/transfer_methods.yaml --repeats 3` "
                        "(writes runs/transfer-methods_<dataset.name>)",
}


class ResultsNotFound(FileNotFoundError):
    """An experiment folder has no ``results*.csv`` (the experiment has not run yet)."""


# --------------------------------------------------------------------------- reading


@dataclass
class Experiment:
    """The result rows of one experiment folder, with typed values.

    Attributes:
        folder: the experiment folder.
        rows: one dict per ``results.csv`` row; numbers are ``int``/``float``
            (``nan`` where the file has none), ``freeze`` is ``None`` for a
            model trained from scratch, ``subset`` is ``""`` or ``S1``..``S4``,
            and ``model`` (added) is ``scratch`` or ``freeze<k>``.
    """

    folder: Path
    rows: list[dict[str, Any]]

    @property
    def runs(self) -> list[str]:
        """Run names in the order they appear in the results."""
        return _unique(row["run"] for row in self.rows)

    @property
    def models(self) -> list[str]:
        """Model names (``scratch``, ``freeze1`` ...) in table order."""
        return model_order({row["model"] for row in self.rows})

    @property
    def subsets(self) -> list[str]:
        """Training subsets present (``S1`` ...), in order; empty for a freeze-level experiment."""
        return sorted({row["subset"] for row in self.rows if row["subset"]}, key=_subset_key)

    def loss_curves(self, subset: Optional[str] = None) -> dict[str, Curves]:
        """:func:`loss_curves` of the runs whose rows :func:`metric_values` would pick for ``subset``."""
        wanted = {row["run"] for row in _rows_of_subset(self.rows, subset)}
        return {run: c for run, c in loss_curves(self.folder).items() if run in wanted}

    def report_dir(self) -> Path:
        """``<experiment>/report``, created, where the notebooks save their tables and figures."""
        path = self.folder / "report"
        path.mkdir(exist_ok=True)
        return path


def _unique(values: Iterable) -> list:
    seen: dict = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


def _number(text: Any, kind: type) -> Any:
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "nan", "none")):
        return math.nan
    value = float(text)
    return int(value) if kind is int and math.isfinite(value) else value


def parse_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Types one ``results.csv`` row (strings as :class:`csv.DictReader` gives them).

    Missing or empty numbers become ``nan``; ``freeze`` becomes ``None``
    (scratch) or an ``int``; a ``model`` key is added: the ``method`` of a
    transfer-methods run, else ``scratch``/``freeze<k>``.
    """
    out: dict[str, Any] = dict(row)
    for column in _INT_COLUMNS:
        if column in out:
            out[column] = _number(out[column], int)
    for column in _FLOAT_COLUMNS:
        if column in out:
            out[column] = _number(out[column], float)
    freeze = out.get("freeze")
    out["freeze"] = None if freeze in (None, "", "None") else int(float(freeze))
    out["subset"] = out.get("subset") or ""
    out["model"] = out.get("method") or (SCRATCH if out["freeze"] is None else f"freeze{out['freeze']}")
    return out


def resolve_results(folder: str | Path) -> Path:
    """The experiment folder a notebook means by ``folder``.

    A relative path is tried in the current folder, then in its parent: a
    notebook opened from ``notebooks/`` runs there, while ``highres3d demo``
    run in the repository root writes ``demo_output/`` next to ``notebooks/``.
    """
    folder = Path(folder).expanduser()
    if folder.is_absolute() or folder.exists():
        return folder
    parent = Path("..") / folder
    return parent if parent.exists() else folder


def load_experiment(folder: str | Path) -> Experiment:
    """Reads every ``results*.csv`` of an experiment folder (all shards).

    Raises:
        ResultsNotFound: when the folder does not exist or holds no results yet.
    """
    folder = resolve_results(folder)
    if not folder.is_dir():
        raise ResultsNotFound(f"{folder}: no such experiment folder")
    raw = read_results(folder)
    if not raw:
        raise ResultsNotFound(f"{folder}: no results*.csv rows yet (has the experiment run?)")
    return Experiment(folder, [parse_row(row) for row in raw])


def open_experiment(folder: str | Path, kind: str = "freeze-levels") -> Optional[Experiment]:
    """:func:`load_experiment`, or ``None`` after printing which command produces the results.

    For notebooks, which should stop quietly rather than fail when the
    experiment has not been run.  ``kind`` is ``freeze-levels`` or ``dataset-size``.
    """
    try:
        return load_experiment(folder)
    except ResultsNotFound as err:
        print(f"No experiment results: {err}.\n"
              f"Produce them with: {PRODUCED_BY[kind]}\n"
              "then rerun this notebook (set HIGHRES3D_RESULTS to the experiment folder if it is elsewhere).")
        return None


def model_order(models: Iterable[str]) -> list[str]:
    """``scratch`` first, then ``freeze1``, ``freeze2`` ... by level, then any other name."""
    return sorted(set(models), key=_model_key)


def _model_key(name: str) -> tuple[int, str]:
    if name == SCRATCH:
        return (-1, name)
    digits = name[len("freeze"):] if name.startswith("freeze") else ""
    return (int(digits), name) if digits.isdigit() else (99, name)


def _subset_key(name: str) -> tuple[int, str]:
    digits = name[1:]
    return (int(digits), name) if digits.isdigit() else (99, name)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """Mean ± sample standard deviation of the finite values of one table cell.

    ``sd`` is ``nan`` when fewer than two values exist; ``missing`` counts
    the values left out because they were ``nan`` or infinite; ``digits`` is
    how many decimals :meth:`format` shows.
    """

    mean: float
    sd: float
    n: int
    missing: int = 0
    digits: int = field(default=3, compare=False)

    @classmethod
    def of(cls, values: Iterable[float], digits: int = 3) -> Summary:
        array = np.asarray(list(values), dtype=float)
        finite = array[np.isfinite(array)]
        missing = int(array.size - finite.size)
        if finite.size == 0:
            return cls(math.nan, math.nan, 0, missing, digits)
        sd = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        return cls(float(finite.mean()), sd, int(finite.size), missing, digits)

    def format(self, digits: Optional[int] = None) -> str:
        """``mean ± sd``; the mean alone for a single value; ``–`` for none."""
        digits = self.digits if digits is None else digits
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"

    def __str__(self) -> str:
        return self.format()


def _single_class(rows: Sequence[Mapping[str, Any]], cls: Optional[int]) -> list[Mapping[str, Any]]:
    if cls is not None:
        return [row for row in rows if row.get("class") == cls]
    classes = {row.get("class") for row in rows}
    if len(classes) > 1:
        raise ValueError(f"the results hold classes {sorted(classes)}; pass cls= to choose one")
    return list(rows)


def metric_values(
    rows: Iterable[Mapping[str, Any]],
    metric: str = "dice",
    *,
    split: str = "inference",
    subset: Optional[str] = None,
    cls: Optional[int] = None,
) -> dict[str, np.ndarray]:
    """Per-subject values of ``metric`` per model (repeats pooled), models in table order.

    The data of a box plot (Fig 6.9).  ``subset`` selects one training subset
    (``S1`` ...; ``None`` = the rows without a subset, i.e. the freeze-level
    experiment, or all rows when every row has one); ``cls`` one foreground
    class (needed only when the results hold several).
    """
    chosen = _single_class([r for r in _rows_of_subset(rows, subset) if r["split"] == split], cls)
    out: dict[str, list[float]] = {}
    for row in chosen:
        out.setdefault(row["model"], []).append(float(row[metric]))
    return {model: np.asarray(out[model], dtype=float) for model in model_order(out)}


def _rows_of_subset(rows: Iterable[Mapping[str, Any]], subset: Optional[str]) -> list[Mapping[str, Any]]:
    rows = list(rows)
    if subset is not None:
        return [r for r in rows if r["subset"] == subset]
    without = [r for r in rows if not r["subset"]]
    return without if without else rows


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A small table that prints as text and renders as HTML in a notebook."""

    title: str
    header: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, column: str) -> Any:
        """The value in the row whose first cell is ``row``, under ``column``.

        ``column`` is a header or a header without its ``(n=...)`` suffix
        (``table.cell("scratch", "test")``).
        """
        names = [h if h == column else h.split(" (", 1)[0] for h in self.header]
        index = names.index(column)
        for line in self.rows:
            if str(line[0]) == row:
                return line[index]
        raise KeyError(row)

    def _strings(self) -> list[list[str]]:
        return [[_format_value(v) for v in line] for line in self.rows]

    def _numeric_columns(self) -> list[bool]:
        return [bool(self.rows) and all(_is_number(line[i]) for line in self.rows) for i in range(len(self.header))]

    def to_text(self) -> str:
        body = self._strings()
        widths = [max(len(line[i]) for line in [self.header, *body]) for i in range(len(self.header))]
        numeric = self._numeric_columns()

        def fmt(line: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)).rstrip()

        lines = [self.title, fmt(self.header), "  ".join("-" * w for w in widths)] + [fmt(l) for l in body]
        return "\n".join(lines + self.notes)

    def to_markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join("---:" if right else "---" for right in self._numeric_columns()) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in self._strings()]
        return "\n".join(lines + ([""] + self.notes if self.notes else [])) + "\n"

    def to_csv(self, path: str | Path) -> Path:
        """Writes the table (formatted cells) to a CSV file."""
        path = Path(path)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.header)
            writer.writerows(self._strings())
        return path

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in line) + "</tr>" for line in self._strings())
        notes = "".join(f"<br><small>{esc(n)}</small>" for n in self.notes)
        return f"<b>{esc(self.title)}</b><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"

    def __str__(self) -> str:
        return self.to_text()

    __repr__ = __str__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number, Summary)) and not isinstance(value, bool)


def _format_value(value: Any) -> str:
    if isinstance(value, Summary):
        return value.format()
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return str(value)


def dice_table(
    rows: Iterable[Mapping[str, Any]],
    *,
    metric: str = "dice",
    subset: Optional[str] = None,
    cls: Optional[int] = None,
    splits: Sequence[str] = SPLITS,
    title: Optional[str] = None,
) -> Table:
    """Tables 6.2-6.6: mean ± sd of the per-subject ``metric`` per model and split.

    One row per model (``scratch``, ``freeze1`` ...), one column per split
    (titled training / validation / test with the number ``n`` of values per
    cell: subjects × repeats), each cell a :class:`Summary` of the subjects of
    that split, repeats pooled.
    ``subset`` chooses one training subset (``S1`` ...) of a dataset-size
    experiment; see :func:`metric_values`.
    """
    rows = _single_class(_rows_of_subset(rows, subset), cls)
    models = model_order({r["model"] for r in rows})
    present = [s for s in splits if any(r["split"] == s for r in rows)]
    lines = []
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        lines.append([model] + [Summary.of(float(r[metric]) for r in mine if r["split"] == split) for split in present])
    header = ["model"]
    for i, split in enumerate(present, 1):
        counts = sorted({line[i].n for line in lines})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        header.append(f"{SPLIT_TITLES.get(split, split)} (n={n})")
    missing = sum(cell.missing for line in lines for cell in line[1:])
    notes = [f"{missing} undefined value(s) ({metric} = nan) left out of the means"] if missing else []
    if title is None:
        title = f"{metric} per subject, mean ± sd" + (f" — training subset {subset}" if subset else "")
    return Table(title, header, lines, notes)


def experiment_tables(rows: Iterable[Mapping[str, Any]], metric: str = "dice") -> list[Table]:
    """Every :func:`dice_table` of an experiment's results: one per training subset and foreground class.

    ``rows`` may be raw ``results.csv`` rows (as :func:`highres3d.experiments.read_results`
    returns them) or parsed ones.  ``highres3d experiment`` and the demo print these.
    """
    parsed = [row if "model" in row else parse_row(row) for row in rows]
    subsets = sorted({r["subset"] for r in parsed if r["subset"]}, key=_subset_key) or [None]
    classes = sorted({r["class"] for r in parsed})
    tables = []
    for subset in subsets:
        for cls in classes:
            title = f"{metric} per subject, mean ± sd" + (f" — training subset {subset}" if subset else "")
            title += f" — class {cls}" if len(classes) > 1 else ""
            tables.append(dice_table(parsed, metric=metric, subset=subset, cls=cls, title=title))
    return tables


def per_run(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per run (the run-level columns of its first result row), in results order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(row["run"], row)
    return [dict(r) for r in out.values()]


def best_iteration_table(rows: Iterable[Mapping[str, Any]], *, subset: Optional[str] = None,
                         title: Optional[str] = None) -> Table:
    """Iterations and time to the best checkpoint per model (mean ± sd over repeats).

    Columns: iterations trained, best iteration (chosen by whole-volume
    validation Dice), seconds to reach it, total training seconds, and the
    number of runs.  ``subset`` as in :func:`dice_table`; ``"all"`` keeps every
    subset in separate rows (``S1 scratch`` ...).
    """
    runs = per_run(rows)
    if subset == "all":
        keys = sorted({(r["subset"], r["model"]) for r in runs},
                      key=lambda k: (_subset_key(k[0]) if k[0] else (-1, ""), _model_key(k[1])))
    else:
        runs = _rows_of_subset(runs, subset)
        keys = [(None, m) for m in model_order({r["model"] for r in runs})]
    lines = []
    for sub, model in keys:
        mine = [r for r in runs if r["model"] == model and (sub is None or r["subset"] == sub)]
        name = f"{sub} {model}" if sub else model
        lines.append([name] + [Summary.of((r[c] for r in mine), digits)
                               for c, digits in (("iterations", 0), ("best_iteration", 0), ("time_to_best_s", 1),
                                                 ("wall_time_s", 1))] + [len(mine)])
    if title is None:
        title = "iterations and time to the best checkpoint (mean ± sd over runs)" + (
            f" — training subset {subset}" if subset and subset != "all" else "")
    return Table(title, ["model", "iterations", "best iteration", "time to best (s)", "training time (s)", "runs"], lines)


@dataclass(frozen=True)
class SizeCurve:
    """Dice against training-set size for one model (dataset-size experiment)."""

    model: str
    subsets: list[str]
    sizes: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    n: np.ndarray


def _by_size(rows: Sequence[Mapping[str, Any]], column: str) -> dict[str, SizeCurve]:
    out = {}
    for model in model_order({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        subsets = sorted({r["subset"] for r in mine}, key=_subset_key)
        stats = [Summary.of(float(r[column]) for r in mine if r["subset"] == s) for s in subsets]
        sizes = [max(int(r["subset_size"]) for r in mine if r["subset"] == s) for s in subsets]
        out[model] = SizeCurve(model, subsets, np.asarray(sizes, dtype=int), np.asarray([s.mean for s in stats]),
                               np.asarray([s.sd for s in stats]), np.asarray([s.n for s in stats], dtype=int))
    return out


def dice_by_size(rows: Iterable[Mapping[str, Any]], *, split: str = "inference", metric: str = "dice",
                 cls: Optional[int] = None) -> dict[str, SizeCurve]:
    """Per model, mean ± sd of the per-subject ``metric`` of one split for each training subset S1, S2 ...

    ``sizes`` are the number of training subjects of each subset (the
    ``subset_size`` column); rows without a subset are ignored.  Subjects of
    all repeats are pooled, as in :func:`dice_table`.
    """
    return _by_size(_single_class([r for r in rows if r["subset"] and r["split"] == split], cls), metric)


def runs_by_size(rows: Iterable[Mapping[str, Any]], column: str = "best_iteration") -> dict[str, SizeCurve]:
    """Per model, mean ± sd over runs (repeats) of a run-level ``column`` for each training subset.

    For ``iterations``, ``best_iteration``, ``time_to_best_s`` and
    ``wall_time_s``: one value per run, whatever the number of subjects.
    """
    return _by_size([r for r in per_run(rows) if r["subset"]], column)


# --------------------------------------------------------------------------- loss curves


@dataclass(frozen=True)
class Series:
    """One logged scalar of a run: iterations and values."""

    iteration: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.iteration.size)


@dataclass
class Curves:
    """The logged scalars of one run (``runs/<run>/metrics.csv``), by column name.

    ``curves["loss"]``, ``curves["val_loss"]``, ``curves["val_window_dice"]``,
    ``curves["val_volume_dice"]``, ``curves["wall_time"]`` ... each a
    :class:`Series`; a column the run never logged gives an empty one.
    """

    run: str
    series: dict[str, Series]

    def __getitem__(self, name: str) -> Series:
        return self.series.get(name, Series(np.zeros(0, dtype=int), np.zeros(0)))

    def __contains__(self, name: str) -> bool:
        return len(self[name]) > 0


def read_curves(metrics_csv: str | Path, run: Optional[str] = None) -> Curves:
    """Reads one run's ``metrics.csv`` into :class:`Curves`."""
    from highres3d.training.run import MetricsLog

    log = MetricsLog(Path(metrics_csv))
    columns = _unique(k for row in log.rows for k in row if k != "iteration")
    series = {}
    for name in columns:
        pairs = log.column(name)
        series[name] = Series(np.asarray([p[0] for p in pairs], dtype=int), np.asarray([p[1] for p in pairs], dtype=float))
    return Curves(run or Path(metrics_csv).parent.name, series)


def loss_curves(folder: str | Path) -> dict[str, Curves]:
    """The :class:`Curves` of every run of an experiment folder (``runs/*/metrics.csv``), by run name.

    Runs are ordered as in ``results.csv`` when it lists them, then by name.
    """
    folder = Path(folder)
    found = {p.parent.name: p for p in sorted(folder.glob("runs/*/metrics.csv"))}
    order = [r["run"] for r in per_run(read_results(folder))] if folder.is_dir() else []
    names = [n for n in order if n in found] + sorted(n for n in found if n not in order)
    return {name: read_curves(found[name], name) for name in names}


# --------------------------------------------------------------------------- transfer methods


@dataclass(frozen=True)
class MeanCurve:
    """A logged scalar of one method: mean ± sd over its runs at each iteration all of them logged."""

    method: str
    iteration: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    runs: int


def _runs_by_model(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in per_run(rows):
        out.setdefault(row["model"], []).append(row["run"])
    return out


def _method_order(models: Iterable[str]) -> list[str]:
    from highres3d.experiments import TRANSFER_METHODS

    order = {m: i for i, m in enumerate(TRANSFER_METHODS)}
    return sorted(set(models), key=lambda m: (order.get(m, len(order)), m))


def method_curves(exp: Experiment, column: str = "val_volume_dice") -> dict[str, MeanCurve]:
    """Per method, mean ± sd over its runs (repeats) of one logged scalar against the iteration.

    Args:
        exp: a transfer-methods experiment.
        column: a ``metrics.csv`` column; whole-volume validation Dice by default.
    """
    curves = loss_curves(exp.folder)
    out = {}
    for method, runs in _runs_by_model(exp.rows).items():
        series = [curves[r][column] for r in runs if r in curves and column in curves[r]]
        if not series:
            continue
        common = sorted(set.intersection(*(set(s.iteration.tolist()) for s in series)))
        values = np.asarray([[dict(zip(s.iteration.tolist(), s.value.tolist()))[i] for i in common] for s in series])
        sd = values.std(axis=0, ddof=1) if len(series) > 1 else np.full(len(common), math.nan)
        out[method] = MeanCurve(method, np.asarray(common, dtype=int), values.mean(axis=0), sd, len(series))
    return {m: out[m] for m in _method_order(out)}


def iterations_to_reach(series: Series, threshold: float) -> float:
    """The first logged iteration whose value is at least ``threshold`` (``nan`` if never)."""
    hits = series.iteration[series.value >= threshold]
    return float(hits[0]) if hits.size else math.nan


def scratch_best_validation_dice(exp: Experiment, subset: Optional[str] = None) -> float:
    """The best whole-volume validation Dice of the scratch runs, averaged over them (``nan`` without any).

    ``subset`` chooses the scratch runs of one training subset, as in :func:`dice_table`.
    """
    curves = loss_curves(exp.folder)
    runs = _runs_by_model(_rows_of_subset(exp.rows, subset)).get(SCRATCH, [])
    best = [float(np.max(curves[r]["val_volume_dice"].value)) for r in runs
            if r in curves and "val_volume_dice" in curves[r]]
    return float(np.mean(best)) if best else math.nan


def transfer_methods_table(exp: Experiment, *, cls: Optional[int] = None, fraction: float = 0.9,
                           title: Optional[str] = None, subset: Optional[str] = None) -> Table:
    """The transfer-methods comparison: one row per method, statistics over its runs (seeds).

    Columns: test Dice (each run's mean over the test subjects, then mean ± sd
    over runs), the best-checkpoint iteration, and the iterations to reach
    ``fraction`` (90 %) of the scratch model's best whole-volume validation
    Dice (Transfusion's measure: transfer mostly speeds convergence up); a run
    that never reaches it is left out of that mean and counted in a note.

    Args:
        exp: a transfer-methods experiment (:func:`load_experiment`).
        cls: the foreground class when the results hold several.
        fraction: of the scratch model's best validation Dice (mean over scratch runs).
        title: the table title.
        subset: one training subset (``S1`` ...) as in :func:`dice_table`, or
            ``"all"``: a row per training set and method (smallest set first,
            the whole training split last), with a ``training subjects`` column;
            each training set is measured against its own scratch runs.
    """
    rows = _single_class(exp.rows, cls)
    if subset == "all":
        groups = [(s, [r for r in rows if r["subset"] == s]) for s in exp.subsets]
        groups += [("", [r for r in rows if not r["subset"]])]
        groups = [(s, g) for s, g in groups if g]
    else:
        groups = [(subset, _rows_of_subset(rows, subset))]
    curves = loss_curves(exp.folder)
    lines, notes, never_total = [], [], 0
    for name, group in groups:
        runs = _runs_by_model(group)
        best = scratch_best_validation_dice(Experiment(exp.folder, group))
        threshold = fraction * best
        for method in _method_order(runs):
            test = [Summary.of(float(r["dice"]) for r in group if r["run"] == run and r["split"] == "inference").mean
                    for run in runs[method]]
            best_iteration = [next(r["best_iteration"] for r in group if r["run"] == run) for run in runs[method]]
            reach = [iterations_to_reach(curves[run]["val_volume_dice"], threshold) if run in curves else math.nan
                     for run in runs[method]]
            never_total += sum(math.isnan(v) for v in reach) if math.isfinite(threshold) else 0
            line = [method, Summary.of(test), Summary.of(best_iteration, 0), Summary.of(reach, 0), len(runs[method])]
            if subset == "all":
                line.insert(1, next(int(r["subset_size"]) for r in group if r["run"] == runs[method][0]))
            lines.append(line)
        where = f" ({name or 'whole training split'})" if subset == "all" else ""
        if math.isfinite(threshold):
            notes.append(f"threshold{where}: {fraction:.0%} of scratch's best validation Dice ({best:.3f}) = {threshold:.3f}")
        else:
            notes.append(f"no scratch run{where}: the iterations to {fraction:.0%} of scratch's best validation Dice "
                         "are undefined")
    if never_total:
        notes.append(f"{never_total} run(s) never reached it (left out of that column)")
    header = ["method", "test Dice", "best iteration", f"iterations to {fraction:.0%} of scratch", "runs"]
    if subset == "all":
        header.insert(1, "training subjects")
    return Table(title or "transfer methods: test Dice and convergence (mean ± sd over seeds)", header, lines, notes)


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """TensorBoard's smoothing: a debiased exponential moving average (``weight`` in [0, 1)).

    The thesis plotted its loss curves (Fig 6.8) from TensorBoard with this
    smoothing; ``weight = 0`` returns the values unchanged.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"weight must be in [0, 1), got {weight}")
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    average, steps = 0.0, 0
    for i, value in enumerate(values):
        steps += 1
        average = weight * average + (1 - weight) * value
        # Dividing by 1 - weight^t removes the bias towards the zero start.
        out[i] = average / (1 - weight ** steps)
    return out


# --------------------------------------------------------------------------- Table 6.1


def parameters_table(model: Any) -> Table:
    """Table 6.1: per layer group trainable, frozen, non-trainable and NiftyNet-checkpoint counts.

    Adds the thesis' figure per group (:data:`THESIS_TABLE_6_1`) next to the
    checkpoint count this model implies; they agree for ``HighResNet3D(2, 2)``.
    ``BN statistics`` says how the group's batch normalisation behaves in
    training: ``batch`` (batch statistics, moving averages updated) or
    ``fixed`` (inference mode, e.g. frozen with the ``keras`` BN policy).
    """
    from highres3d.models import parameter_table

    lines = []
    for r in parameter_table(model):
        lines.append([r.group, r.trainable, r.frozen, r.non_trainable, r.niftynet_checkpoint, r.bn_statistics,
                      THESIS_TABLE_6_1.get(r.group, math.nan)])
    return Table("Table 6.1: parameters per layer group",
                 ["group", "trainable", "frozen", "non-trainable", "NiftyNet checkpoint", "BN statistics",
                  "thesis Table 6.1"], lines,
                 ["trainable/frozen: convolution kernels, BN gamma/beta (and PReLU slopes); non-trainable: BN "
                  "moving mean and variance.",
                  "NiftyNet checkpoint: all of these, plus TF1's zero-debias copy and local_step of every moving "
                  "statistic, plus Adam's beta1/beta2_power under conv_0; this is what the thesis counted."])


def frozen_by_level(model: Any, levels: Sequence[int] = (1, 2, 3, 4, 5)) -> Table:
    """Cumulative parameters frozen at each freeze level (the first ``k`` layer groups).

    Freezes ``model`` itself level by level and unfreezes it again before
    returning, so the model is left fully trainable.
    """
    from highres3d.models import GROUPS
    from highres3d.transfer import freeze, unfreeze

    lines = []
    try:
        for level in levels:
            report = freeze(model, level)
            lines.append([f"L{level}", ", ".join(GROUPS[:level]), report.frozen_parameters,
                          report.total_parameters - report.frozen_parameters])
    finally:
        unfreeze(model)
    return Table("Parameters frozen per freeze level (cumulative)",
                 ["level", "frozen groups", "frozen", "still trainable"], lines)
