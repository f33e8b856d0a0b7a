"""Activation-patching figures: per-example heatmaps of every site, and averages: per
group of same-length examples (by position), over every example by role (IO, S1, S2,
END...: `nnexp.roles`), and over every example for sites patched at all positions;
the averages over every example carry bootstrap intervals (`nnexp.statistics`)."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go

from ...plotting import group_position_labels, heatmap, shorten, token_label, write_figures
from .summaries import site_estimate

_SITE_TITLES = {
    "resid_pre": "residual stream (block input)",
    "resid_post": "residual stream (block output)",
    "attn_out": "attention output",
    "mlp_out": "MLP output",
    "head_out": "attention head output",
}


def _axis_labels(tensor, dim: str, tokens: list[str]) -> list[str]:
    labels = tensor.labels(dim)
    if dim == "position":
        return [token_label(tokens[p]) if p < len(tokens) else str(p) for p in labels]
    if dim == "head":
        return [f"H{h}" for h in labels]
    return [f"L{layer}" for layer in labels]


def _site_figure(experiment, tensor, site: str, tokens: list[str], about: list[str], estimate=None) -> go.Figure:
    """A heatmap of one site's normalised effects; `about` lines go under the title.
    With `estimate` (`nnexp.statistics.Estimate` of the same cells) the cells carry
    their intervals; a "role" axis is drawn like a position axis."""
    what = _SITE_TITLES.get(site, site)
    dims = tensor.dims
    values = tensor.values
    layers = _axis_labels(tensor, "layer", tokens)
    intervals = {} if estimate is None else {"lower": estimate.lower, "upper": estimate.upper, "n": estimate.n,
                                             "ci": estimate.ci}
    if "role" in dims:
        headline = (f"Patching the {what}, per layer and role" if dims == ("layer", "role")
                    else "Patching each attention head, per role")
        if dims == ("layer", "head", "role"):
            values = values.flatten(0, 1)
            intervals.update({k: intervals[k].reshape(-1, intervals[k].shape[-1]) for k in ("lower", "upper", "n")
                              if k in intervals})
            y_labels = [f"L{layer}H{head}" for layer in tensor.labels("layer") for head in tensor.labels("head")]
        else:
            y_labels = layers
        x_title, y_title = "role (positions aligned across templates)", "layer" if dims == ("layer", "role") else "layer and head"
        x_labels = [str(role) for role in tensor.labels("role")]
    elif dims == ("layer", "position"):
        headline, x_title, y_title = f"Patching the {what}, per layer and position", "position (token)", "layer"
        x_labels, y_labels = _axis_labels(tensor, "position", tokens), layers
    elif dims == ("layer", "head"):
        headline, x_title, y_title = "Patching each attention head (all positions)", "head", "layer"
        x_labels, y_labels = _axis_labels(tensor, "head", tokens), layers
    elif dims == ("layer", "head", "position"):
        headline, x_title, y_title = "Patching each attention head, per position", "position (token)", "layer and head"
        values = values.flatten(0, 1)
        x_labels = _axis_labels(tensor, "position", tokens)
        y_labels = [f"L{layer}H{head}" for layer in tensor.labels("layer") for head in tensor.labels("head")]
    elif dims == ("layer",):
        headline, x_title, y_title = f"Patching the {what} (all positions)", "", "layer"
        values, x_labels, y_labels = values.unsqueeze(1), ["all positions"], layers
    else:
        raise ValueError(f"no patching figure for axes {dims}")
    if dims == ("layer",) and intervals:
        intervals.update({k: intervals[k].reshape(-1, 1) for k in ("lower", "upper", "n")})
    subtitle = "<br>".join(shorten(line) for line in about)
    return heatmap(
        values,
        title=f"{headline}: effect on {experiment.metric}<br><sup>{subtitle}</sup>",
        x_title=x_title,
        y_title=y_title,
        x_labels=x_labels,
        y_labels=y_labels,
        colorbar_title="normalised effect<br>(0 corrupted, 1 clean)",
        **intervals,
    )


def patching_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    """Per-example heatmaps (the first `max_examples` examples) and averages.

    Averages: layer x position maps over each group of examples with the same token
    structure; layer x role maps over all examples (positions aligned by role); and
    layer x head maps (no position axis) over all examples. The averages over all
    examples carry bootstrap intervals.
    """
    run = f"{experiment.name or type(experiment).__name__} · {results.spec['model']['name']}"
    figures = []
    for record in results.records[:max_examples]:
        about = [f"{run} · example {record.index}", f"clean: {record.info.get('clean', '')!r}",
                 f"corrupted: {record.info.get('corrupted', '')!r}"]
        for site in experiment.sites:
            fig = _site_figure(experiment, record[site], site, record.tokens, about)
            figures.append((fig, out_dir / f"example-{record.index:04d}-{site}"))
    for key, records in results.groups().items():
        labels = group_position_labels(records)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-")
        about = [f"{run} · mean over {len(records)} example(s) of group {key}",
                 "[role]: a position whose token differs between the examples; *: no role given"]
        for site in experiment.sites:
            mean = results.stack(site, records).mean("example")
            figures.append((_site_figure(experiment, mean, site, labels, about), out_dir / f"mean-{slug}-{site}"))
    if not results.records:
        return write_figures(figures)
    n = len(results)
    for site in experiment.sites:
        estimate = site_estimate(experiment, results, site)
        interval = f"{100 * experiment.ci:g}% bootstrap intervals over examples in the hover text; x: interval contains 0"
        if "role" in estimate.dims:
            if not estimate.labels("role"):
                continue  # no example names roles: the per-group figures are all there is
            about = [f"{run} · mean over all {n} examples, by role",
                     f"{100 * experiment.ci:g}% bootstrap intervals and n in the hover text; x: interval contains 0"]
            figures.append((_site_figure(experiment, estimate.labelled(), site, [], about, estimate),
                            out_dir / f"mean-roles-{site}"))
        else:
            about = [f"{run} · mean over all {n} examples", interval]
            figures.append((_site_figure(experiment, estimate.labelled(), site, [], about, estimate),
                            out_dir / f"mean-all-{site}"))
    return write_figures(figures)
