"""How sure is a number: bootstrap confidence intervals over examples.

Every dataset-level number nnexp shows is a mean over examples, and every mean comes
with a percentile bootstrap interval: the examples are resampled with replacement
(examples, never cells: the cells of one example are not independent), the mean is
taken in each resample, and the interval is the central `ci` share of those means.

    indices = resample_indices(n, n_boot, seed)         # [n_boot, n], seeded numpy Generator
    lower, upper = percentile_interval(values, indices, ci)
    estimate = bootstrap(values, ci=0.95, n_boot=1000)   # NaN cells excluded, per cell

The resample indices are drawn exactly as `scipy.stats.bootstrap` draws them (one
`Generator.integers(0, n, (n_resamples, n))` call), and the interval is the same
linear-interpolated percentile, so for a cell without missing values nnexp's interval
equals `scipy.stats.bootstrap(..., method="percentile", rng=np.random.default_rng(seed))`
(tests/test_statistics.py checks it). nnexp does not call scipy for it because scipy
resamples one statistic at a time, while a patching map has thousands of cells: here a
resample is a count of each example's draws, and every cell's resampled means are one
matrix product.

A cell may be missing (NaN) for some examples (a role a template lacks, an example
whose normalised effect is undefined); it is averaged over the examples that have it,
its `n` says how many, and its interval resamples those examples only.

`ci`, `n_boot` are parameters of every experiment (`--set ci=0.9 --set n_boot=5000`);
they change summaries and figures, never stored numbers, so they are not part of a
run's identity (`nnexp.store.identity`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ConfigError, DataError
from .labelled import LabelledTensor

DEFAULT_CI = 0.95
DEFAULT_N_BOOT = 1000
MIN_N_BOOT = 100
DEFAULT_SEED = 0
# Experiment fields that change how results are summarised, not what is computed: left
# out of the run's identity.
STATISTICS_PARAMS = ("ci", "n_boot")
SUMMARY_COLUMNS = ("kind", "measure", "role", "layer", "head", "mean", "lower", "upper", "n")


def check_settings(ci: float, n_boot: int) -> None:
    if not 0 < ci < 1:
        raise ConfigError(f"ci is {ci!r}; give the interval's coverage as a share between 0 and 1, e.g. 0.95")
    if n_boot < MIN_N_BOOT:
        raise ConfigError(f"n_boot is {n_boot!r}; give at least {MIN_N_BOOT} bootstrap resamples (1000 is the default)")


def resample_indices(n: int, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> np.ndarray:
    """[n_boot, n] indices of examples drawn with replacement from a seeded numpy
    Generator (the same draw as scipy.stats.bootstrap's with that Generator)."""
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def resampled_means(values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """[n_boot, cells]: the mean of each cell of `values` [n, cells] in each resample of
    `indices` [n_boot, n], as a product of draw counts and values (no [n_boot, n, cells]
    array)."""
    n_boot, n = indices.shape
    counts = np.bincount((indices + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    return counts.reshape(n_boot, n).astype(np.float64) @ values / n


def percentile_interval(values, indices: np.ndarray, ci: float = DEFAULT_CI) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) per cell: the (1-ci)/2 and (1+ci)/2 percentiles (linear
    interpolation, numpy's default) of the cell's mean over the resamples `indices`.
    `values` is [n, ...] without missing values."""
    values = np.asarray(values, dtype=np.float64)
    flat = values.reshape(values.shape[0], -1)
    means = resampled_means(flat, indices)
    lower, upper = np.percentile(means, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2], axis=0)
    return lower.reshape(values.shape[1:]), upper.reshape(values.shape[1:])


@dataclass
class Estimate:
    """Means over examples with their bootstrap intervals, per cell of a labelled grid.

    `mean`, `lower`, `upper` (float) and `n` (examples with a value) have the cell
    shape `dims`; a cell no example has is NaN with n = 0."""

    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    n: np.ndarray
    dims: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    ci: float = DEFAULT_CI

    def labels(self, dim: str) -> list:
        return list(self.coords.get(dim, range(self.mean.shape[self.dims.index(dim)])))

    def labelled(self, what: str = "mean") -> LabelledTensor:
        """`mean`, `lower`, `upper` or `n` as a LabelledTensor."""
        return LabelledTensor(torch.as_tensor(np.asarray(getattr(self, what), dtype=np.float64)), self.dims,
                              dict(self.coords))

    def sel(self, **selection) -> Estimate:
        """Select by label along named axes, like `LabelledTensor.sel`."""
        arrays = [self.mean, self.lower, self.upper, self.n]
        dims, coords = list(self.dims), dict(self.coords)
        for dim, label in selection.items():
            labels = self.labels(dim) if dim in dims else []
            if label not in labels:
                raise KeyError(f"{label!r} is not a label of axis {dim!r}: {labels}")
            axis, at = dims.index(dim), labels.index(label)
            arrays = [np.take(a, at, axis=axis) for a in arrays]
            dims.remove(dim)
            coords.pop(dim, None)
        return Estimate(*arrays, tuple(dims), coords, self.ci)

    @property
    def contains_zero(self) -> np.ndarray:
        """Cells whose interval contains 0 (or that have no interval)."""
        with np.errstate(invalid="ignore"):
            return ~((self.lower > 0) | (self.upper < 0))

    def rows(self, kind: str, measure: str, role: str | None = None) -> list[dict]:
        """One tidy row per cell (`SUMMARY_COLUMNS`): "layer" and "head" axes go to
        their columns, any other axes (role, component, category...) to "role"."""
        out = []
        for cell in np.ndindex(*self.mean.shape):
            row = {"kind": kind, "measure": measure, "role": role, "layer": None, "head": None}
            others = []
            for dim, k in zip(self.dims, cell):
                label = self.labels(dim)[k]
                if dim in ("layer", "head"):
                    row[dim] = label
                else:
                    others.append((dim, label))
            if others:
                named = [str(label) if len(others) == 1 else f"{dim}={label}" for dim, label in others]
                row["role"] = ", ".join(([role] if role else []) + named)
            row.update(mean=float(self.mean[cell]), lower=float(self.lower[cell]), upper=float(self.upper[cell]),
                       n=int(self.n[cell]))
            out.append(row)
        return out


def bootstrap(values, dims: tuple[str, ...] = (), coords: dict | None = None, *, ci: float = DEFAULT_CI,
              n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> Estimate:
    """The mean over the first (example) axis of `values` [n, ...] and its percentile
    bootstrap interval, per cell. A NaN is a missing value: each cell is averaged and
    resampled over the examples that have it (cells missing in the same examples share
    one draw of resample indices, seeded by `seed`)."""
    check_settings(ci, n_boot)
    if isinstance(values, LabelledTensor):
        if values.dims[0] != "example":
            raise ValueError(f"bootstrap needs an 'example' axis first; the axes are {values.dims}")
        dims, coords = values.dims[1:], {k: v for k, v in values.coords.items() if k != "example"}
        values = values.values
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 0 or values.shape[0] == 0:
        raise ValueError("bootstrap needs at least one example")
    shape = values.shape[1:]
    dims = tuple(dims) if dims else tuple(f"axis{k}" for k in range(len(shape)))
    flat = values.reshape(values.shape[0], -1)
    present = ~np.isnan(flat)
    mean = np.full(flat.shape[1], np.nan)
    lower, upper = mean.copy(), mean.copy()
    n = present.sum(0)
    if not flat.shape[1]:  # no cells (e.g. no role in any example)
        return Estimate(mean.reshape(shape), lower.reshape(shape), upper.reshape(shape), n.reshape(shape), dims,
                        dict(coords or {}), ci)
    # one draw per pattern of which examples have the cell (usually one or a few patterns)
    patterns, which = np.unique(present.T, axis=0, return_inverse=True)
    for k, pattern in enumerate(patterns):
        columns = np.flatnonzero(which.ravel() == k)
        rows = np.flatnonzero(pattern)
        if not len(rows):
            continue
        subset = flat[np.ix_(rows, columns)]
        mean[columns] = subset.mean(0)
        lower[columns], upper[columns] = percentile_interval(subset, resample_indices(len(rows), n_boot, seed), ci)
    return Estimate(mean.reshape(shape), lower.reshape(shape), upper.reshape(shape), n.reshape(shape), dims,
                    dict(coords or {}), ci)


def stack_records(records, name: str) -> LabelledTensor:
    """The tensor `name` of every record with an "example" axis first (equal shapes)."""
    first = records[0][name]
    shapes = {tuple(r[name].values.shape) for r in records}
    if len(shapes) > 1:
        raise DataError(f"{name!r} has different shapes across examples ({sorted(shapes)}); average examples with "
                        "the same shape, or by role (nnexp.roles)")
    values = torch.stack([r[name].values.double() for r in records])
    return LabelledTensor(values, ("example",) + first.dims, dict(first.coords))


def settings(experiment) -> dict:
    """The bootstrap settings of an experiment (its ci and n_boot fields)."""
    return {"ci": getattr(experiment, "ci", DEFAULT_CI), "n_boot": getattr(experiment, "n_boot", DEFAULT_N_BOOT)}


def estimate_of(records, name: str, experiment) -> Estimate:
    """`bootstrap` of the tensor `name` over `records`, under the experiment's settings."""
    return bootstrap(stack_records(records, name), **settings(experiment))


def summary_frame(rows: list[dict]):
    """The tidy table of summary rows (`SUMMARY_COLUMNS`), a pandas DataFrame."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    return frame.astype({"layer": "Int64", "head": "Int64", "n": "Int64"}) if len(frame) else frame


def summary_csv(rows: list[dict]) -> str:
    """The summary rows as CSV text, the columns of `SUMMARY_COLUMNS` (an empty field
    where a row has no layer, head or role); what pandas reads back as `summary_frame`.
    Written without pandas, so that finishing a run does not import it."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: "" if row.get(key) is None else row[key] for key in SUMMARY_COLUMNS} for row in rows)
    return buffer.getvalue()


def format_interval(mean: float, lower: float, upper: float, n: int) -> str:
    """"0.982 [0.951, 1.000], n=24"."""
    return f"{mean:.3f} [{lower:.3f}, {upper:.3f}], n={n}"


def _layer_runs(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs, start = [], None
    layers = sorted(layers)
    for k, layer in enumerate(layers):
        if start is None:
            start = layer
        if k + 1 == len(layers) or layers[k + 1] != layer + 1:
            runs.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(runs)


def top_findings(rows: list[dict], limit: int = 5) -> list[str]:
    """A few lines for the end of a run (summary rows, in the kind's order of measures):
    per measure, its cell of largest |mean| over cells of more than one example, and
    the layers at which that role (and head) has an interval that excludes 0."""
    by_measure: dict[str, list[dict]] = {}
    for row in rows:
        if row["n"] > 1 and row["mean"] == row["mean"]:  # not NaN
            by_measure.setdefault(row["measure"], []).append(row)
    lines = []
    for measure, group in list(by_measure.items())[:limit]:
        best = max(group, key=lambda row: abs(row["mean"]))
        where = [] if best["role"] is None else [str(best["role"])]
        where += [f"{dim} {best[dim]}" for dim in ("layer", "head") if best[dim] is not None]
        line = (f"largest {measure}: {', '.join(where) or 'overall'}, "
                f"{format_interval(best['mean'], best['lower'], best['upper'], best['n'])}")
        same = [row for row in group if row["layer"] is not None and row["role"] == best["role"]
                and row["head"] == best["head"]]
        excluding = [row["layer"] for row in same if row["lower"] > 0 or row["upper"] < 0]
        if len(same) > 1 and excluding:
            line += f"; its interval excludes 0 at layers {_layer_runs(excluding)}"
        lines.append(line)
    return lines


# -- rank correlation ---------------------------------------------------------------------


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of `values` (ascending), tied values sharing the mean of their ranks:
    the ranking Spearman's correlation uses (`scipy.stats.rankdata`'s default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences: Pearson's correlation
    of their average ranks (ties share a rank), as `scipy.stats.spearmanr`. NaN when
    fewer than two values, or when either sequence is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of equal length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = average_ranks(x) - (len(x) + 1) / 2, average_ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")
