"""Figures of the factual-recall analyses: titles, axis labels, token labels.

- attention knockout: per fact (the first 16) and on average, the % change of the
  attribute's probability per window centre, one line per source set;
- sublayer knockout: the same per sublayer and position set;
- attribute extraction: per fact, the attribute's rank per layer (log scale) per site
  and projection, with the top tokens in the hover text; on average, the share of facts
  whose attribute is the top token and, with attribute words, the attribute rate;
- causal tracing: per fact, ROME's heatmaps (tokens x layers, subject tokens marked
  with *), one per restored site; on average, categories of tokens x layers.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..plotting import heatmap, line_plot, shorten, token_label, write_figures
from .summaries import average_indirect_effect, extraction_profile, knockout_profile

SITE_NAMES = {"resid_post": "residual stream (block output)", "mlp_out": "MLP output", "attn_out": "attention output"}


def _about(experiment, results) -> str:
    model = results.spec["model"]["name"]
    return f"{experiment.name or type(experiment).__name__} · {model}"


def _fact_line(record) -> str:
    info = record.info
    prompt = shorten(info["prompt"], 80)
    return f"{prompt!r} → attribute {info['attribute_token']!r} ({info['attribute']})"


def _count(experiment, results) -> str:
    n = len(results.records)
    total = results.spec.get("data", {}).get("n_examples")
    text = f"n = {n} facts" + (f" of {total}" if total and total != n else "")
    return text + (" the model predicts correctly" if getattr(experiment, "only_correct", False) else "")


def _legend_right(fig):
    """Many series: a vertical legend right of the plot, clear of the subtitle."""
    fig.update_layout(legend={"orientation": "v", "yanchor": "top", "y": 1.0, "xanchor": "left", "x": 1.02},
                      width=fig.layout.width + 260)
    return fig


def _layer_labels(layers) -> list[str]:
    return [f"L{layer}" for layer in layers]


def knockout_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = (f"{_about(experiment, results)} · the last position cannot attend to each source "
             f"in a window of {experiment.window} layers")
    figures = []
    title = "Attention knockout: change in the attribute's probability"
    for record in results.records[:max_examples]:
        tensor = record["knockout"]
        series = [{"name": source.replace("_", "-"), "values": (100 * tensor.values[i]).tolist()}
                  for i, source in enumerate(tensor.coords["source"])]
        figures.append((
            line_plot(_layer_labels(tensor.coords["layer"]), series,
                      title=f"{title}<br><sup>{about} · example {record.index} · "
                            f"p = {record.scalars['p_clean']:.3f}<br>{_fact_line(record)}</sup>",
                      x_title="centre of the knocked-out window (layer)", y_title="% change in probability"),
            out_dir / f"example-{record.index:04d}-knockout",
        ))
    if results.records:
        mean = knockout_profile(results)
        series = [{"name": source.replace("_", "-"), "values": (100 * mean.values[i]).tolist()}
                  for i, source in enumerate(mean.coords["source"])]
        figures.append((
            line_plot(_layer_labels(mean.coords["layer"]), series,
                      title=f"{title}, mean over facts<br><sup>{about} · {_count(experiment, results)}</sup>",
                      x_title="centre of the knocked-out window (layer)", y_title="mean % change in probability"),
            out_dir / "mean-knockout",
        ))
    return write_figures(figures)


def sublayer_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = f"{_about(experiment, results)} · {experiment.ablation} ablation · window {experiment.window} layers"

    def series(values, coords):
        return [{"name": f"{SITE_NAMES[sub]}, {where} positions", "values": (100 * values[i, j]).tolist()}
                for i, sub in enumerate(coords["sublayer"]) for j, where in enumerate(coords["positions"])]

    figures = []
    title = "Sublayer knockout: change in the attribute's probability"
    for record in results.records[:max_examples]:
        tensor = record["sublayer_knockout"]
        figures.append((
            _legend_right(line_plot(_layer_labels(tensor.coords["layer"]), series(tensor.values, tensor.coords),
                      title=f"{title}<br><sup>{about} · example {record.index} · p = {record.scalars['p_clean']:.3f}"
                            f"<br>{_fact_line(record)}</sup>",
                      x_title="centre of the ablated window (layer)", y_title="% change in probability")),
            out_dir / f"example-{record.index:04d}-sublayer-knockout",
        ))
    if results.records:
        mean = knockout_profile(results, "sublayer_knockout")
        figures.append((
            _legend_right(line_plot(_layer_labels(mean.coords["layer"]), series(mean.values, mean.coords),
                      title=f"{title}, mean over facts<br><sup>{about} · {_count(experiment, results)}</sup>",
                      x_title="centre of the ablated window (layer)", y_title="mean % change in probability")),
            out_dir / "mean-sublayer-knockout",
        ))
    return write_figures(figures)


def extraction_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = _about(experiment, results)
    figures = []
    for record in results.records[:max_examples]:
        rank = record["rank"]
        coords = rank.coords
        for pi, position in enumerate(coords["position"]):
            series = []
            for ji, projection in enumerate(coords["projection"]):
                for si, site in enumerate(coords["site"]):
                    tops = record.info["top_tokens"][pi][ji][si]
                    series.append({"name": f"{SITE_NAMES[site]} via {projection}",
                                   "values": rank.values[pi, ji, si].tolist(),
                                   "hover": ["top: " + " ".join(token_label(t) for t in layer_tops[:5]) for layer_tops in tops]})
            token = record.info["tokens"][record.info["positions"][position]]
            fig = line_plot(_layer_labels(coords["layer"]), series,
                            title=f"Attribute extraction: rank of the attribute token per layer at the "
                                  f"{position.replace('_', ' ')} token ({token_label(token)!s})<br><sup>{about} · "
                                  f"example {record.index} · unembed = final norm + unembedding, embed = E^T, no norm"
                                  f"<br>{_fact_line(record)}</sup>",
                            x_title="layer", y_title="rank of the attribute (1 = top, log scale)")
            # rank 1 at the top; no zero line, which a log axis cannot place
            fig.layout.shapes = ()
            fig.update_yaxes(type="log", range=[math.log10(max(10.0, float(rank.values.max()) * 2)), -0.1])
            _legend_right(fig)
            figures.append((fig, out_dir / f"example-{record.index:04d}-rank-{position.replace('_', '-')}"))
    if results.records:
        profile = extraction_profile(results)
        coords = profile["coords"]
        measures = [("topk", f"share of facts whose attribute is among the top {experiment.top_k} tokens")]
        if profile["attribute_rate"] is not None:
            measures.append(("attribute_rate", f"mean attribute rate of the top {experiment.top_k} tokens "
                                               f"({profile['n_with_attributes']} facts with attribute words)"))
        for key, what in measures:
            for pi, position in enumerate(coords["position"]):
                series = [{"name": f"{SITE_NAMES[site]} via {projection}", "values": profile[key][pi, ji, si].tolist()}
                          for ji, projection in enumerate(coords["projection"]) for si, site in enumerate(coords["site"])]
                figures.append((
                    _legend_right(line_plot(
                        _layer_labels(coords["layer"]), series,
                        title=f"Attribute extraction at the {position.replace('_', ' ')} token<br><sup>{about} · "
                              f"{_count(experiment, results)}<br>{what}</sup>",
                        x_title="layer", y_title=what.split(" (")[0].replace(" whose", "<br>whose"))),
                    out_dir / f"mean-{key.replace('_', '-')}-{position.replace('_', '-')}",
                ))
    return write_figures(figures)


def causal_tracing_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = (f"{_about(experiment, results)} · {experiment.samples} noise samples · "
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
                        f"noised {record.scalars['p_corrupted']:.3f} · subject tokens marked *<br>{_fact_line(record)}</sup>",
                        x_title="layer" + ("" if site == "resid_post" else f" (centre of a {experiment.window}-layer window)"),
                        y_title="token", x_labels=_layer_labels(tensor.coords["layer"]), y_labels=tokens,
                        colorbar_title=f"indirect effect<br>p({record.info['attribute_token'].strip()})", zmid=None),
                out_dir / f"example-{record.index:04d}-{site.replace('_', '-')}",
            ))
    if results.records:
        for site in results.records[0].info["restore"]:
            average = average_indirect_effect(results, site)
            labels = [f"{name} (n={count})" for name, count in zip(average["categories"], average["counts"])]
            figures.append((
                heatmap(average["values"], title=f"Causal tracing: average indirect effect of the {SITE_NAMES[site]}"
                        f"<br><sup>{about} · {_count(experiment, results)}</sup>",
                        x_title="layer" + ("" if site == "resid_post" else f" (centre of a {experiment.window}-layer window)"),
                        y_title="token category", x_labels=_layer_labels(average["layers"]),
                        y_labels=labels, colorbar_title="average<br>indirect effect", zmid=None),
                out_dir / f"mean-{site.replace('_', '-')}",
            ))
    return write_figures(figures)
