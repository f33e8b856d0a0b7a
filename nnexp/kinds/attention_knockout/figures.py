"""Attention-knockout figures: per fact (the first 16) and on average, the % change of
the attribute's probability per window centre, one line per source set."""

from __future__ import annotations

from pathlib import Path

from ...plotting import interval_series, line_plot, write_figures
from ..recall_figures import experiment_and_model, fact_count, fact_line, layer_labels
from .summaries import knockout_estimate


def knockout_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = (f"{experiment_and_model(experiment, results)} · the last position cannot attend to each source "
             f"in a window of {experiment.window} layers")
    figures = []
    title = "Attention knockout: change in the attribute's probability"
    for record in results.records[:max_examples]:
        tensor = record["knockout"]
        series = [{"name": source.replace("_", "-"), "values": (100 * tensor.values[i]).tolist()}
                  for i, source in enumerate(tensor.coords["source"])]
        figures.append((
            line_plot(layer_labels(tensor.coords["layer"]), series,
                      title=f"{title}<br><sup>{about} · example {record.index} · "
                            f"p = {record.scalars['p_clean']:.3f}<br>{fact_line(record)}</sup>",
                      x_title="centre of the knocked-out window (layer)", y_title="% change in probability"),
            out_dir / f"example-{record.index:04d}-knockout",
        ))
    if results.records:
        mean = knockout_estimate(experiment, results)
        series = [interval_series(source.replace("_", "-"), mean.sel(source=source), scale=100)
                  for source in mean.coords["source"]]
        figures.append((
            line_plot(layer_labels(mean.coords["layer"]), series,
                      title=f"{title}, mean over facts<br><sup>{about} · {fact_count(experiment, results)} · "
                            f"error bars: {100 * experiment.ci:g}% bootstrap intervals</sup>",
                      x_title="centre of the knocked-out window (layer)", y_title="mean % change in probability"),
            out_dir / "mean-knockout",
        ))
    return write_figures(figures)
