"""Activation-patching figures: per-example heatmaps of every site, and averages."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go

from ...plotting import group_position_labels, heatmap, shorten, token_label, write_figures

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


def _site_figure(experiment, tensor, site: str, tokens: list[str], about: list[str]) -> go.Figure:
    """A heatmap of one site's normalised effects; `about` lines go under the title."""
    what = _SITE_TITLES.get(site, site)
    dims = tensor.dims
    values = tensor.values
    layers = _axis_labels(tensor, "layer", tokens)
    if dims == ("layer", "position"):
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
    subtitle = "<br>".join(shorten(line) for line in about)
    return heatmap(
        values,
        title=f"{headline}: effect on {experiment.metric}<br><sup>{subtitle}</sup>",
        x_title=x_title,
        y_title=y_title,
        x_labels=x_labels,
        y_labels=y_labels,
        colorbar_title="normalised effect<br>(0 corrupted, 1 clean)",
    )


def patching_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    """Per-example heatmaps (the first `max_examples` examples) and averages.

    Averages: layer x position maps over each group of examples with the same token
    structure, and layer x head maps (no position axis) over all examples.
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
    for site in experiment.sites:
        if results.records and "position" not in results.records[0][site].dims:
            mean = results.stack(site).mean("example")
            about = [f"{run} · mean over all {len(results)} examples"]
            figures.append((_site_figure(experiment, mean, site, [], about), out_dir / f"mean-all-{site}"))
    return write_figures(figures)
