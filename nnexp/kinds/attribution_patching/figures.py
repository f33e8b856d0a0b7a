"""Attribution-patching figures: estimate vs exact effect of every verified cell (one
scatter per variant, every example), and layer x head heatmaps of the head_out
estimates (summed over positions), the heads with a top-k cell verified marked (per
example also those only the random sample reached)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import plotly.graph_objects as go

from ...plotting import heatmap, shorten, write_figures
from .experiment import FIELDS
from .summaries import head_estimate, head_totals

VARIANT_TITLES = {"atp": "AtP", "atp_star": "AtP* (GradDrop)"}


def _about(experiment, results) -> str:
    return f"{experiment.name or type(experiment).__name__} · {results.spec['model']['name']} · metric {experiment.metric}"


def _scatter(experiment, results, variant: str) -> go.Figure:
    column = {name: i for i, name in enumerate(FIELDS)}
    fig = go.Figure()
    for sampled, label, symbol in ((0.0, "top-k by |estimate|", "circle"), (1.0, "random sample", "x")):
        xs, ys, text = [], [], []
        for record in results:
            table = record["verified"].values
            for row in table[table[:, column["sampled"]] == sampled].tolist():
                site = experiment.sites[int(row[column["site"]])]
                head = "" if row[column["head"]] < 0 else f"H{int(row[column['head']])}"
                index = (int(row[column["layer"]]),) + (() if not head else (int(row[column["head"]]),))
                index = _index(record[f"{site}.exact"], index + (int(row[column["position"]]),))
                xs.append(float(record[f"{site}.{variant}"].values[index]))
                ys.append(float(record[f"{site}.exact"].values[index]))
                text.append(f"example {record.index} · {site} L{int(row[column['layer']])}{head} "
                            f"pos {int(row[column['position']])}")
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=label, text=text, marker={"symbol": symbol},
                                 hovertemplate="%{text}<br>estimate %{x:.3f}<br>exact %{y:.3f}<extra></extra>"))
    n = len(results)
    recall = sum(r.scalars[f"recall_{variant}"] for r in results) / n
    rho = sum(r.scalars[f"spearman_{variant}"] for r in results) / n
    fig.update_layout(
        title={"text": f"{VARIANT_TITLES[variant]} estimate vs exact patching effect of each verified cell"
                       f"<br><sup>{shorten(_about(experiment, results))} · {n} examples · mean recall@{experiment.top_k}"
                       f" {recall:.2f} · mean Spearman (|estimate|, |exact|) {rho:.2f}</sup>"},
        xaxis={"title": {"text": f"{VARIANT_TITLES[variant]} estimate (normalised: 0 corrupted, 1 clean)"}},
        yaxis={"title": {"text": "exact patching effect (normalised)"}},
        template="plotly_white", width=820, height=620, margin={"t": 110},
    )
    return fig


def _index(tensor, labels: tuple[int, ...]) -> tuple[int, ...]:
    """The tensor index of a cell given by its labels (layer[, head], position)."""
    return tuple(tensor.labels(dim).index(label) for dim, label in zip(tensor.dims, labels))


def _verified_heads(record, experiment, sampled: bool) -> set[tuple[int, int]]:
    """(layer, head) of head_out's verified cells in `record`: those verified as a top-k
    cell (sampled False), or from the random sample (sampled True)."""
    column = {name: i for i, name in enumerate(FIELDS)}
    site = experiment.sites.index("head_out")
    table = record["verified"].values
    keep = (table[:, column["site"]] == site) & (table[:, column["sampled"]] == float(sampled))
    return {(int(row[column["layer"]]), int(row[column["head"]])) for row in table[keep].tolist()}


def _head_figure(values, layers, heads, marks, title, colorbar) -> go.Figure:
    """A layer x head heatmap; `marks`: (label, marker symbol, {(layer, head)}) drawn over it."""
    fig = heatmap(values, title=title, x_title="head", y_title="layer", x_labels=[f"H{h}" for h in heads],
                  y_labels=[f"L{layer}" for layer in layers], colorbar_title=colorbar)
    for label, symbol, cells in marks:
        points = [(heads.index(h), layers.index(layer)) for layer, h in sorted(cells) if layer in layers and h in heads]
        fig.add_trace(go.Scatter(x=[x for x, _ in points], y=[y for _, y in points], mode="markers",
                                 hoverinfo="skip", name=label,
                                 marker={"symbol": symbol, "size": 12 if symbol == "circle-open" else 7,
                                         "color": "black"}))
    return fig


def attribution_patching_figures(experiment, results, out_dir: Path, max_examples: int = 8) -> list[Path]:
    figures = []
    if not results.records:
        return write_figures(figures)
    about = shorten(_about(experiment, results))
    for variant in experiment.variants:
        figures.append((_scatter(experiment, results, variant), out_dir / f"scatter-{variant.replace('_', '-')}"))
    if "head_out" in experiment.sites:
        for variant in experiment.variants:
            name = VARIANT_TITLES[variant]
            for record in results.records[:max_examples]:
                totals = head_totals(record, variant)
                title = (f"{name} estimate per attention head (summed over positions)<br><sup>{about} · example "
                         f"{record.index} · {shorten(record.info.get('clean', ''), 70)!r}</sup>")
                top = _verified_heads(record, experiment, sampled=False)
                marks = [("o: a top-k cell of this head verified exactly", "circle-open", top),
                          ("x: only sampled cells verified", "x-thin-open",
                           _verified_heads(record, experiment, sampled=True) - top)]
                figures.append((_head_figure(totals.values, totals.labels("layer"), totals.labels("head"), marks,
                                             title, "estimate<br>(normalised)"),
                                out_dir / f"example-{record.index:04d}-heads-{variant.replace('_', '-')}"))
            estimate = head_estimate(experiment, results, variant)
            counts = Counter(cell for r in results for cell in _verified_heads(r, experiment, sampled=False))
            usual = {cell for cell, count in counts.items() if count >= len(results) / 2}
            title = (f"Mean {name} estimate per attention head (summed over positions)<br><sup>{about} · mean over "
                     f"{len(results)} examples</sup>")
            marks = [("o: a top-k cell of this head verified in at least half the examples", "circle-open", usual)]
            figures.append((_head_figure(estimate.labelled().values, estimate.labels("layer"), estimate.labels("head"),
                                         marks, title, "mean estimate<br>(normalised)"),
                            out_dir / f"mean-heads-{variant.replace('_', '-')}"))
    return write_figures(figures)
