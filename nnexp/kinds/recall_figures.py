"""What the figures of the four factual-recall kinds share: their subtitles (the
experiment and model, the fact, the count of facts), layer labels, site names, and a
legend placed clear of the subtitle. Each kind's figures are in its own package."""

from __future__ import annotations

from ..plotting import shorten

SITE_NAMES = {"resid_post": "residual stream (block output)", "mlp_out": "MLP output", "attn_out": "attention output"}


def experiment_and_model(experiment, results) -> str:
    """"<experiment> · <model>", the start of every subtitle."""
    model = results.spec["model"]["name"]
    return f"{experiment.name or type(experiment).__name__} · {model}"


def fact_line(record) -> str:
    """A fact's prompt and its attribute token, for its own figures."""
    info = record.info
    prompt = shorten(info["prompt"], 80)
    return f"{prompt!r} → attribute {info['attribute_token']!r} ({info['attribute']})"


def fact_count(experiment, results) -> str:
    """How many facts an average is over (of how many, and which)."""
    n = len(results.records)
    total = results.spec.get("data", {}).get("n_examples")
    text = f"n = {n} facts" + (f" of {total}" if total and total != n else "")
    return text + (" the model predicts correctly" if getattr(experiment, "only_correct", False) else "")


def legend_right(fig):
    """Many series: a vertical legend right of the plot, clear of the subtitle."""
    fig.update_layout(legend={"orientation": "v", "yanchor": "top", "y": 1.0, "xanchor": "left", "x": 1.02},
                      width=fig.layout.width + 260)
    return fig


def layer_labels(layers) -> list[str]:
    return [f"L{layer}" for layer in layers]
