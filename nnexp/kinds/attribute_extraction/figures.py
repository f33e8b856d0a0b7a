"""Attribute-extraction figures: per fact, the attribute's rank per layer (log scale)
per site and projection, with the top tokens in the hover text; on average, the share
of facts whose attribute is among the top tokens and, with attribute words, the
attribute rate."""

from __future__ import annotations

import math
from pathlib import Path

from ...plotting import interval_series, line_plot, token_label, write_figures
from ..recall_figures import SITE_NAMES, experiment_and_model, fact_count, fact_line, layer_labels, legend_right
from .summaries import extraction_estimates, extraction_profile


def extraction_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = experiment_and_model(experiment, results)
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
            fig = line_plot(layer_labels(coords["layer"]), series,
                            title=f"Attribute extraction: rank of the attribute token per layer at the "
                                  f"{position.replace('_', ' ')} token ({token_label(token)!s})<br><sup>{about} · "
                                  f"example {record.index} · unembed = final norm + unembedding, embed = E^T, no norm"
                                  f"<br>{fact_line(record)}</sup>",
                            x_title="layer", y_title="rank of the attribute (1 = top, log scale)")
            # rank 1 at the top; no zero line, which a log axis cannot place
            fig.layout.shapes = ()
            fig.update_yaxes(type="log", range=[math.log10(max(10.0, float(rank.values.max()) * 2)), -0.1])
            legend_right(fig)
            figures.append((fig, out_dir / f"example-{record.index:04d}-rank-{position.replace('_', '-')}"))
    if results.records:
        profile = extraction_profile(results)
        estimates = extraction_estimates(experiment, results)
        coords = profile["coords"]
        measures = [("topk", f"share of facts whose attribute is among the top {experiment.top_k} tokens")]
        if profile["attribute_rate"] is not None:
            measures.append(("attribute_rate", f"mean attribute rate of the top {experiment.top_k} tokens "
                                               f"({profile['n_with_attributes']} facts with attribute words)"))
        for key, what in measures:
            for pi, position in enumerate(coords["position"]):
                series = [interval_series(f"{SITE_NAMES[site]} via {projection}",
                                          estimates[key].sel(position=position, projection=projection, site=site))
                          for projection in coords["projection"] for site in coords["site"]]
                figures.append((
                    legend_right(line_plot(
                        layer_labels(coords["layer"]), series,
                        title=f"Attribute extraction at the {position.replace('_', ' ')} token<br><sup>{about} · "
                              f"{fact_count(experiment, results)} · error bars: {100 * experiment.ci:g}% bootstrap "
                              f"intervals<br>{what}</sup>",
                        x_title="layer", y_title=what.split(" (")[0].replace(" whose", "<br>whose"))),
                    out_dir / f"mean-{key.replace('_', '-')}-{position.replace('_', '-')}",
                ))
    return write_figures(figures)
