"""Intervention figures, for any declared runs: per example (the first 16) and averaged
over examples, each grid metric drawn by its axes (one axis: a line; two: a heatmap of
the two and a line per value of the first over the second), and the single runs'
metrics side by side."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import torch

from ...plotting import heatmap, interval_series, line_plot, shorten, write_figures
from .summaries import grid_estimate, grid_names, scalar_estimates, stackable


def _file(name: str) -> str:
    """A tensor's name as part of a file name (no dots: the suffix is the file type)."""
    return name.replace(".", "-")


def _measure(name: str) -> str:
    """What a stored tensor measures, for an axis: "logit_diff", "change in logit_diff"."""
    parts = name.split(".")
    return f"change in {parts[1]}" if parts[-1] == "change" else parts[1]


def _title(name: str, reference: str | None) -> str:
    """A figure's title for the tensor `name` ("steered.logit_diff.change")."""
    parts = name.split(".")
    if parts[-1] == "change":
        return f"Runs '{parts[0]}': change in {parts[1]} from the run '{reference}'"
    return f"Runs '{parts[0]}': {parts[1]}"


def _labels(values: list) -> list[str]:
    return [f"{v:g}" if isinstance(v, float) else str(v) for v in values]


def _grid_figures(tensor, title: str, value_title: str, path: Path, estimate=None) -> list:
    """A grid's figures; with `estimate` (its mean's bootstrap intervals), error bars on
    the lines and intervals in the heatmap's hover text."""
    if tensor.values.dim() == 1:
        dim = tensor.dims[0]
        series = ({"name": value_title, "values": tensor.values.tolist()} if estimate is None
                  else interval_series(value_title, estimate))
        return [(line_plot(_labels(tensor.labels(dim)), [series], title=title, x_title=dim, y_title=value_title), path)]
    if tensor.values.dim() != 2:
        return []  # three or more axes: no generic picture; the tensor is in the results
    rows, columns = tensor.dims
    row_labels, column_labels = _labels(tensor.labels(rows)), _labels(tensor.labels(columns))
    if estimate is None:
        series = [{"name": f"{rows} {label}", "values": tensor.values[i].tolist()} for i, label in enumerate(row_labels)]
        intervals = {}
    else:
        series = [interval_series(f"{rows} {label}", estimate.sel(**{rows: value}))
                  for label, value in zip(row_labels, estimate.labels(rows))]
        intervals = {"lower": estimate.lower, "upper": estimate.upper, "n": estimate.n, "ci": estimate.ci}
    finite = tensor.values[torch.isfinite(tensor.values)]
    # a signed measure (a change, a logit difference) is centred at 0: white is "no change"
    signed = bool(finite.numel()) and bool((finite < 0).any()) and bool((finite > 0).any())
    return [
        (heatmap(tensor.values, title=title, x_title=columns, y_title=rows, x_labels=column_labels,
                 y_labels=row_labels, colorbar_title=value_title, zmid=0.0 if signed else None, **intervals),
         path.with_name(path.name + "-heatmap")),
        (line_plot(column_labels, series, title=title, x_title=columns, y_title=value_title),
         path.with_name(path.name + "-lines")),
    ]


def _runs_bar(scalars: dict[str, float], metric: str, title: str, path: Path, estimates=None):
    """A bar per run; with `estimates` ({scalar name: Estimate}), error bars of their intervals."""
    names = [name.rsplit(".", 1)[0] for name in scalars if name.endswith(f".{metric}")]
    values = [scalars[f"{name}.{metric}"] for name in names]
    if not names:
        return []
    error = None
    if estimates:
        cells = [estimates[f"{name}.{metric}"] for name in names]
        error = {"type": "data", "symmetric": False, "array": [float(e.upper - e.mean) for e in cells],
                 "arrayminus": [float(e.mean - e.lower) for e in cells]}
    fig = go.Figure(go.Bar(x=names, y=values, error_y=error, hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(title={"text": title, "font": {"size": 16}}, xaxis={"title": {"text": "run"}},
                      yaxis={"title": {"text": metric}}, template="plotly_white", width=760, height=480,
                      margin={"t": 130})
    return [(fig, path)]


def _about(experiment, results) -> str:
    model = results.spec.get("model", {}).get("name", "")
    return f"{experiment.name or type(experiment).__name__} on {model}"


def intervention_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    figures = []
    about = _about(experiment, results)
    records = list(results.records)
    if not records:
        return []
    grids = grid_names(experiment, records)
    reference = getattr(experiment, "reference", None)
    for record in records[:max_examples]:
        prompt = shorten(record.info.get("prompt", ""))
        for name in grids:
            figures += _grid_figures(record[name], f"{_title(name, reference)}<br><sup>{about} · example "
                                     f"{record.index}: {prompt}</sup>", _measure(name),
                                     out_dir / f"example-{record.index:04d}-{_file(name)}")
        for metric in experiment.metrics:
            figures += _runs_bar(record.scalars, metric,
                                 f"{metric} per run<br><sup>{about} · example {record.index}: {prompt}</sup>",
                                 out_dir / f"example-{record.index:04d}-runs-{metric}")
    n = len(records)
    intervals = f"error bars: {100 * experiment.ci:g}% bootstrap intervals over examples" if n > 1 else ""
    # one bootstrap per grid and scalar gives both the mean drawn and its interval (shown
    # from two examples on)
    for name in grids:
        if not stackable(records, name):
            continue  # examples of different shapes have no mean figure
        estimate = grid_estimate(experiment, results, name)
        figures += _grid_figures(estimate.labelled("mean"), f"{_title(name, reference)}, mean over {n} examples"
                                 f"<br><sup>{about} · {intervals}</sup>", f"mean {_measure(name)}",
                                 out_dir / f"mean-{_file(name)}", estimate if n > 1 else None)
    estimates = scalar_estimates(experiment, results)
    scalars = {name: float(estimate.mean) for name, estimate in estimates.items()}
    for metric in experiment.metrics:
        figures += _runs_bar(scalars, metric, f"{metric} per run, mean over {n} examples<br><sup>{about} · "
                             f"{intervals}</sup>", out_dir / f"mean-runs-{metric}", estimates if n > 1 else None)
    return write_figures(figures)
