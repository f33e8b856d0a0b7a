"""Sublayer-knockout figures: per fact (the first 16) and on average, the % change of
the attribute's probability per window centre, one line per sublayer and position set."""

from __future__ import annotations

from pathlib import Path

from ...plotting import interval_series, line_plot, write_figures
from ..recall_figures import SITE_NAMES, experiment_and_model, fact_count, fact_line, layer_labels, legend_right
from .summaries import sublayer_estimate


def sublayer_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = (f"{experiment_and_model(experiment, results)} · {experiment.ablation} ablation · "
             f"window {experiment.window} layers")

    def series(values, coords):
        return [{"name": f"{SITE_NAMES[sub]}, {where} positions", "values": (100 * values[i, j]).tolist()}
                for i, sub in enumerate(coords["sublayer"]) for j, where in enumerate(coords["positions"])]

    figures = []
    title = "Sublayer knockout: change in the attribute's probability"
    for record in results.records[:max_examples]:
        tensor = record["sublayer_knockout"]
        figures.append((
            legend_right(line_plot(layer_labels(tensor.coords["layer"]), series(tensor.values, tensor.coords),
                      title=f"{title}<br><sup>{about} · example {record.index} · p = {record.scalars['p_clean']:.3f}"
                            f"<br>{fact_line(record)}</sup>",
                      x_title="centre of the ablated window (layer)", y_title="% change in probability")),
            out_dir / f"example-{record.index:04d}-sublayer-knockout",
        ))
    if results.records:
        mean = sublayer_estimate(experiment, results)
        with_intervals = [interval_series(f"{SITE_NAMES[sub]}, {where} positions",
                                          mean.sel(sublayer=sub, positions=where), scale=100)
                          for sub in mean.coords["sublayer"] for where in mean.coords["positions"]]
        figures.append((
            legend_right(line_plot(layer_labels(mean.coords["layer"]), with_intervals,
                      title=f"{title}, mean over facts<br><sup>{about} · {fact_count(experiment, results)} · "
                            f"error bars: {100 * experiment.ci:g}% bootstrap intervals</sup>",
                      x_title="centre of the ablated window (layer)", y_title="mean % change in probability")),
            out_dir / "mean-sublayer-knockout",
        ))
    return write_figures(figures)
