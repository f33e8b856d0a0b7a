"""Figures of logit attribution, like TransformerLens' IOI walkthrough draws them.

- logit lens: a line per read-out (final norm applied afresh; linearised) over the
  sublayer points 0_pre, 0_mid, 1_pre, ..., final_post, with the top tokens in the
  hover text, and a table of the top-k tokens at each point;
- per-layer DLA: a line over embed, 0_attn_out, 0_mlp_out, ..., bias;
- per-head DLA: a layer x head heatmap on a diverging scale centred at 0.

Each is drawn for the first `max_examples` prompts and as a mean over all prompts
(the mean's line plots show each prompt as a faint line beneath it, and the mean's
bootstrap interval as error bars; the mean heatmap has the intervals in its hover
text and marks the heads whose interval contains 0).
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from ...plotting import heatmap, interval_series, line_plot, token_label, write_figures
from ...statistics import estimate_of

Y_TITLE = "logit difference (answer − foil)"


def _run_label(experiment, results) -> str:
    return f"{experiment.name or type(experiment).__name__} · {results.spec['model']['name']}"


def _prompt_line(record) -> str:
    prompt = record.info.get("prompt", "")
    prompt = prompt if len(prompt) <= 90 else prompt[:89] + "…"
    return (f"{prompt!r} → answer {record.info.get('answer')!r} vs foil {record.info.get('foil')!r} · "
            f"logit difference {record.scalars['logit_diff']:.3f}")


def _lens_hover(record, k: int = 3) -> list[str]:
    top = record.info.get("logit_lens_top_tokens") or []
    probs = record["logit_lens_top_probs"].values.tolist()
    return [", ".join(f"{token_label(t)} {p:.2f}" for t, p in zip(tokens[:k], ps[:k])) for tokens, ps in zip(top, probs)]


def _mean(records, name: str) -> list[float]:
    return (sum(r[name].values.float() for r in records) / len(records)).tolist()


def _mean_series(experiment, records, name: str, label: str, hover=None) -> dict:
    """The mean of `name` over `records`: with its bootstrap intervals when there are
    several prompts (and an experiment to say the settings)."""
    if experiment is None or len(records) < 2:
        return {"name": label, "values": _mean(records, name), "hover": hover}
    return {**interval_series(label, estimate_of(records, name, experiment)), "hover": hover}


def _each_prompt(records, name: str, label: str) -> list[dict]:
    """Faint lines for each prompt under a mean (none for a single prompt)."""
    if len(records) < 2:
        return []
    return [{"name": label, "values": r[name].values.tolist(), "faint": True, "legend": i == 0}
            for i, r in enumerate(records)]


def _lens_figure(title: str, records, about: str, experiment=None) -> go.Figure:
    points = records[0]["logit_lens"].labels("point")
    hover = _lens_hover(records[0]) if len(records) == 1 else None
    series = _each_prompt(records, "logit_lens", "each prompt (final norm afresh)") + [
        _mean_series(experiment, records, "logit_lens", "final norm applied afresh (logit lens)",
                     ["top: " + h for h in hover] if hover else None),
        _mean_series(experiment, records, "logit_lens_linear", "final norm linearised (cached final scale)"),
    ]
    return line_plot(points, series, title=f"{title}<br><sup>{about}</sup>",
                     x_title="residual stream point (L_pre: block L input; L_mid: after its attention)", y_title=Y_TITLE)


def _top_tokens_table(record, about: str) -> go.Figure:
    points = record["logit_lens"].labels("point")
    top = record.info.get("logit_lens_top_tokens") or []
    probs = record["logit_lens_top_probs"].values.tolist()
    k = len(top[0]) if top else 0
    columns = [points] + [[f"{token_label(top[p][r])} ({probs[p][r]:.2f})" for p in range(len(points))] for r in range(k)]
    fig = go.Figure(go.Table(
        header={"values": ["point"] + [f"top {r + 1}" for r in range(k)], "align": "left"},
        cells={"values": columns, "align": "left"},
    ))
    fig.update_layout(title={"text": f"Logit lens: top {k} next tokens at the last position<br><sup>{about}</sup>"},
                      width=max(900, 140 + 120 * k), height=min(2400, 220 + 28 * len(points)), margin={"t": 110})
    return fig


def _layers_figure(title: str, records, about: str, experiment=None) -> go.Figure:
    labels = records[0]["dla_layers"].labels("component")
    series = _each_prompt(records, "dla_layers", "each prompt") + [
        _mean_series(experiment, records, "dla_layers",
                     "direct logit attribution" + (" (mean)" if len(records) > 1 else ""))
    ]
    return line_plot(labels, series, title=f"{title}<br><sup>{about}</sup>", x_title="component", y_title=Y_TITLE)


def _heads_figure(title: str, values, about: str, estimate=None) -> go.Figure:
    layers, heads = values.shape
    intervals = {} if estimate is None else {"lower": estimate.lower, "upper": estimate.upper, "n": estimate.n,
                                             "ci": estimate.ci}
    return heatmap(values, title=f"{title}<br><sup>{about}</sup>", x_title="head", y_title="layer",
                   x_labels=[f"H{h}" for h in range(heads)], y_labels=[f"L{layer}" for layer in range(layers)],
                   colorbar_title="direct logit<br>attribution", zmid=0.0, **intervals)


def logit_attribution_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    run = _run_label(experiment, results)
    analyses = experiment.analyses
    records = results.records
    figures = []
    for record in records[:max_examples]:
        about = f"{run} · example {record.index}<br>{_prompt_line(record)}"
        stem = f"example-{record.index:04d}"
        if "logit_lens" in analyses:
            figures.append((_lens_figure("Logit lens: the answer read off the residual stream", [record], about),
                            out_dir / f"{stem}-logit-lens"))
            figures.append((_top_tokens_table(record, about), out_dir / f"{stem}-logit-lens-top-tokens"))
        if "dla_layers" in analyses:
            figures.append((_layers_figure("Direct logit attribution per layer", [record], about), out_dir / f"{stem}-dla-layers"))
        if "dla_heads" in analyses:
            figures.append((_heads_figure("Direct logit attribution per head", record["dla_heads"].values, about),
                            out_dir / f"{stem}-dla-heads"))
    if records:
        mean_logit = sum(r.scalars["logit_diff"] for r in records) / len(records)
        about = f"{run} · mean over {len(records)} prompts · mean logit difference {mean_logit:.3f}"
        if len(records) > 1:
            about += f"<br>{100 * experiment.ci:g}% bootstrap intervals over prompts (error bars; hover text)"
        if "logit_lens" in analyses:
            figures.append((_lens_figure("Logit lens (mean over prompts)", records, about, experiment),
                            out_dir / "mean-logit-lens"))
        if "dla_layers" in analyses:
            figures.append((_layers_figure("Direct logit attribution per layer (mean over prompts)", records, about,
                                           experiment), out_dir / "mean-dla-layers"))
        if "dla_heads" in analyses:
            mean = results.stack("dla_heads").mean("example").values
            estimate = estimate_of(records, "dla_heads", experiment) if len(records) > 1 else None
            figures.append((_heads_figure("Direct logit attribution per head (mean over prompts)", mean, about,
                                          estimate), out_dir / "mean-dla-heads"))
    return write_figures(figures)
