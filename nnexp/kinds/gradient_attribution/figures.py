"""Figures of gradient attribution.

- per example (the first `max_examples`): a layers x tokens heatmap of the raw
  attribution (diverging, centred at 0) and one of Inseq's aggregation (L2 norm over
  the hidden dimension, normalised over positions), subject tokens in bold;
- over the dataset: the mean attribution per layer at the last subject token and at
  the last token, both measures, with the number of examples.
"""

from __future__ import annotations

from pathlib import Path

from ...plotting import heatmap, interval_series, line_plot, shorten, token_label, write_figures
from .summaries import profile_estimate

MEASURES = {
    "attribution": ("gradient x activation, summed over the hidden dimension", "grad × act<br>(sum over hidden)"),
    "attribution_norm": ("gradient x activation, L2 norm over the hidden dimension, normalised over positions (Inseq)",
                         "grad × act<br>(L2, normalised)"),
}


def _about(experiment, results) -> str:
    model = results.spec["model"]["name"]
    return f"{experiment.name or type(experiment).__name__} · {model} · {experiment.site} · metric {experiment.metric}"


def _fact_line(record) -> str:
    info = record.info
    prompt = shorten(info["prompt"], 80)
    return (f"{prompt!r} → {info['target_true']!r} vs {info['target_false']!r} · "
            f"p {record.scalars['p_true']:.3f} vs {record.scalars['p_false']:.3f} · predicted {info.get('predicted')!r}")


def _token_labels(record) -> list[str]:
    start, end = record.info["subject_tokens"]
    labels = [f"{i}:{token_label(t)}" for i, t in enumerate(record.info["tokens"])]
    return [f"<b>{label}</b>" if start <= i < end else label for i, label in enumerate(labels)]


def gradient_attribution_figures(experiment, results, out_dir: Path, max_examples: int = 16) -> list[Path]:
    about = _about(experiment, results)
    figures = []
    for record in results.records[:max_examples]:
        for name, (what, colorbar) in MEASURES.items():
            tensor = record[name]
            figures.append((
                heatmap(tensor.values, title=f"Gradient attribution per layer and token: {what}"
                        f"<br><sup>{about} · example {record.index} · subject tokens in bold<br>{_fact_line(record)}</sup>",
                        x_title="token", y_title="layer", x_labels=_token_labels(record),
                        y_labels=[f"L{layer}" for layer in tensor.coords["layer"]], colorbar_title=colorbar,
                        zmid=0.0 if name == "attribution" else None),
                out_dir / f"example-{record.index:04d}-{name.replace('_', '-')}",
            ))
    if results.records:
        total = results.spec.get("data", {}).get("n_examples")
        selected = " (facts the model predicts correctly)" if getattr(experiment, "only_correct", False) else ""
        for name, (what, _) in MEASURES.items():
            profile = profile_estimate(experiment, results, name)
            n = len(results)
            count = f"n = {n} facts" + (f" of {total}" if total and total != n else "") + selected
            series = [interval_series(role, profile.sel(role=role)) for role in profile.labels("role")]
            figures.append((
                line_plot([f"L{layer}" for layer in profile.labels("layer")], series,
                          title=f"Mean gradient attribution per layer at the last subject token and the last token"
                                f"<br><sup>{about} · {count} · error bars: {100 * experiment.ci:g}% bootstrap "
                                f"intervals<br>{what}</sup>",
                          x_title="layer", y_title="mean attribution"),
                out_dir / f"mean-{name.replace('_', '-')}-by-layer",
            ))
    return write_figures(figures)
