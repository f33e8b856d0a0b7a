"""Causal-tracing figures: per fact, ROME's heatmaps (tokens x layers, subject tokens
marked with *), one per restored site; on average, categories of tokens x layers."""

from __future__ import annotations

from pathlib import Path

from ...plotting import heatmap, token_label, write_figures
from ..recall_figures import SITE_NAMES, experiment_and_model, fact_count, fact_line, layer_labels
from .summaries import indirect_effect_estimate


def causal_tracing_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = (f"{experiment_and_model(experiment, results)} · {experiment.samples} noise samples · "
             f"window {experiment.window} for MLP and attention")
    figures = []
    for record in results.records[:max_examples]:
        start, end = record.info["subject_tokens"]
        tokens = [f"{token_label(t)}*" if start <= i < end else token_label(t) for i, t in enumerate(record.info["tokens"])]
        for site in record.info["restore"]:
            tensor = record[site]
            figures.append((
                heatmap(tensor.values.T, title=f"Causal tracing: restoring the {SITE_NAMES[site]} after noising the subject"
                        f"<br><sup>{about} · example {record.index} · p clean {record.scalars['p_clean']:.3f}, "
                        f"noised {record.scalars['p_corrupted']:.3f} · subject tokens marked *<br>{fact_line(record)}</sup>",
                        x_title="layer" + ("" if site == "resid_post" else f" (centre of a {experiment.window}-layer window)"),
                        y_title="token", x_labels=layer_labels(tensor.coords["layer"]), y_labels=tokens,
                        colorbar_title=f"indirect effect<br>p({record.info['attribute_token'].strip()})", zmid=None),
                out_dir / f"example-{record.index:04d}-{site.replace('_', '-')}",
            ))
    if results.records:
        for site in results.records[0].info["restore"]:
            average = indirect_effect_estimate(experiment, results, site)
            labels = [f"{name} (n={int(count)})" for name, count in zip(average.labels("role"), average.n[:, 0])]
            figures.append((
                heatmap(average.mean, title=f"Causal tracing: average indirect effect of the {SITE_NAMES[site]}"
                        f"<br><sup>{about} · {fact_count(experiment, results)}<br>{100 * experiment.ci:g}% "
                        "bootstrap intervals over facts in the hover text; x: interval contains 0</sup>",
                        x_title="layer" + ("" if site == "resid_post" else f" (centre of a {experiment.window}-layer window)"),
                        y_title="token category", x_labels=layer_labels(average.labels("layer")),
                        y_labels=labels, colorbar_title="average<br>indirect effect", zmid=None,
                        lower=average.lower, upper=average.upper, n=average.n, ci=average.ci),
                out_dir / f"mean-{site.replace('_', '-')}",
            ))
    return write_figures(figures)
