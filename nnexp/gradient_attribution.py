"""Contrastive gradient attribution: gradient x activation at every layer, per position.

For a prompt whose next token should be the true attribute (" Paris") rather than a
false one (" Rome"), the `GradientAttributionExperiment` kind computes, for every
layer L and position t, the gradient of a metric with respect to a site's output
(the MLP output by default) times that output: Inseq's
`layer_gradient_x_activation` with `attributed_fn=metric`, as in Inseq's
"locating factual knowledge in GPT-2" study (Yin and Neubig 2022). All layers come
from ONE forward and ONE backward pass per batch of examples; the parameters are
frozen, so the backward computes activation gradients only.

Metrics (`nnexp list` shows all): `contrast_prob_diff` = p(true) - p(false) (the
default), `contrast_logits_diff` = logit(true) - logit(false), `prob` and `logit`
of the true target.

Stored per example (`layer` x `position`, positions are the prompt's tokens):

- `attribution`: the raw attribution, sum over the hidden dimension of
  gradient x activation. Signed; summing over positions and layers does NOT give the
  metric (gradient x activation is a first-order, per-site estimate).
- `attribution_norm`: Inseq's default aggregation of the same tensor: the L2 norm
  over the hidden dimension, then divided by its sum over the positions (each
  layer's row sums to 1; the sign is lost).
- `attribution_hidden` (`layer` x `position` x `hidden`, only with `keep_hidden`): the
  tensor before any aggregation, as Inseq's `target_attributions`.

Targets must be single tokens. Inseq attributes a multi-token target one
generation step at a time; nnexp rejects it instead (`multi_token="error"`, the
default) or drops such facts with a count (`multi_token="skip"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .errors import ConfigError, DataError
from .kinds.facts import CompiledFactExperiment, FactExperiment, FactItem, TokenizedFact
from .labelled import LabelledTensor
from .metrics import get_metric
from .results import ExampleRecord
from .sites import check_layers, resolve_site
from .tracing.execute import gradients_x_activation
from .tracing.memory import rows_for_budget, tightest
from .tracing.plan import left_pad, row_batches

GRADIENT_SITES = ("mlp_out", "attn_out", "resid_pre", "resid_post")


@dataclass
class GradientAttributionExperiment(FactExperiment):
    """Gradient x activation of a (contrastive) metric at one site of every layer.

    Fields (besides `FactExperiment`'s dataset, only_correct, multi_token):
        site: "mlp_out" (default), "attn_out", "resid_pre" or "resid_post".
        metric: "contrast_prob_diff" (default), "contrast_logits_diff", "prob", "logit",
            or any registered metric of (logits, true, false).
        layers: layers to attribute (negative counts from the end); None = all.
        keep_hidden: also store the attributions per hidden unit (large).
    """

    # one row per fact: 16 short prompts make a small forward and backward pass
    examples_per_trace: ClassVar[int] = 16
    multi_token_hint: ClassVar[str] = ("Inseq would attribute such a target one generation step at a time; nnexp "
                                       "attributes single next tokens only")

    site: str = "mlp_out"
    metric: str = "contrast_prob_diff"
    layers: tuple | None = None
    keep_hidden: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.site not in GRADIENT_SITES:
            raise ConfigError(f"site {self.site!r} is not supported for gradient attribution; choose one of {', '.join(GRADIENT_SITES)}")
        get_metric(self.metric)  # unknown metric -> clear error
        if self.layers is not None:
            self.layers = tuple(self.layers)

    def compile(self, model) -> CompiledGradientAttribution:
        return CompiledGradientAttribution(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .gradient_figures import gradient_attribution_figures

        return gradient_attribution_figures(self, results, out_dir)


class CompiledGradientAttribution(CompiledFactExperiment):
    """A `GradientAttributionExperiment` bound to a model."""

    def __init__(self, experiment: GradientAttributionExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        # one site per layer, so layer order is the forward order nnsight requires
        self.layers = sorted(check_layers(experiment.layers, arch))
        self.points = [(f"{experiment.site}.{layer}", resolve_site(experiment.site, layer, arch)) for layer in self.layers]
        self.rows_per_trace: int | None = None

    def set_memory_budget(self, items: list[FactItem], budget: int) -> int:
        """Size batches so that one trace (forward, autograd graph, backward) peaks under
        `budget` bytes on every device (measured; see `nnexp.tracing.memory`)."""
        tokens = max(len(item.fact.ids) for item in items)
        d = self.model.arch.d_model
        width = torch.finfo(self.model.dtype).bits // 8
        # beyond the plain forward and backward: the gradient at every site (all returned
        # at once), one site's float32 product and activation at a time, what is kept
        per_row = len(self.points) * tokens * (d * width + 8) + 2 * 4 * tokens * d
        if self.experiment.keep_hidden:
            per_row += len(self.points) * tokens * d * 4
        self.rows_per_trace = rows_for_budget(self.model, budget, tokens, grad=True, kept_per_row=per_row,
                                              what="gradient attribution of one fact")
        return self.rows_per_trace

    # -- running -----------------------------------------------------------------

    def run(self, items: list[FactItem], max_rows: int | None = None) -> list[ExampleRecord]:
        """One forward + backward trace per batch of at most `max_rows` facts (and at
        most what the memory budget allows)."""
        batches = [[item.fact for item in batch] for batch in row_batches(items, tightest(max_rows, self.rows_per_trace))]
        padded = [left_pad([fact.ids for fact in facts], self.pad_id) for facts in batches]
        requests = [(input_ids, mask, self.points, self.experiment.metric,
                     torch.tensor([fact.true_id for fact in facts]), torch.tensor([fact.false_id for fact in facts]))
                    for facts, (input_ids, mask, _) in zip(batches, padded)]
        outs = gradients_x_activation(self.model, requests, keep_hidden=self.experiment.keep_hidden)
        return [record for facts, (_, _, offsets), out in zip(batches, padded, outs)
                for record in self._records(facts, offsets, out)]

    def _records(self, facts: list[TokenizedFact], offsets: list[int], out: dict) -> list[ExampleRecord]:
        logits, probs = out["pair_logits"], out["pair_probs"]  # [rows, 2]: true, false
        records = []
        for row, fact in enumerate(facts):
            start = offsets[row]
            coords = {"layer": self.layers, "position": list(range(len(fact.ids)))}
            raw = out["raw"][:, row, start:]
            l2 = out["l2"][:, row, start:]
            total = l2.sum(-1, keepdim=True)
            tensors = {
                "attribution": LabelledTensor(raw.clone(), ("layer", "position"), coords),
                "attribution_norm": LabelledTensor(torch.where(total > 0, l2 / total, torch.zeros_like(l2)),
                                                   ("layer", "position"), coords),
            }
            if "hidden" in out:
                tensors["attribution_hidden"] = LabelledTensor(out["hidden"][:, row, start:].clone(),
                                                               ("layer", "position", "hidden"), coords)
            top = int(out["top"][row])
            scalars = {
                "metric": float(out["metric"][row]),
                "p_true": float(probs[row, 0]),
                "p_false": float(probs[row, 1]),
                "logit_true": float(logits[row, 0]),
                "logit_false": float(logits[row, 1]),
                "correct": float(top == fact.true_id),
            }
            info = fact.info()
            info["predicted"] = self.model.tokenizer.decode([top])
            info["site"] = self.experiment.site
            info["metric"] = self.experiment.metric
            records.append(ExampleRecord(index=fact.index, tensors=tensors, scalars=scalars, info=info))
        return records


# -- views across examples -------------------------------------------------------------


def subject_and_last_profile(results, name: str = "attribution") -> dict:
    """Mean attribution per layer at the last subject token and at the last token,
    over every stored example (prompts of any length).

    Returns {"layers": [...], "last_subject_token": [L], "last_token": [L], "n": N}.
    """
    records = list(results)
    if not records:
        raise DataError(f"{results.path} holds no examples")
    subject, last = [], []
    for record in records:
        values = record[name].values
        end = record.info["subject_tokens"][1]
        subject.append(values[:, end - 1])
        last.append(values[:, -1])
    return {
        "layers": list(records[0][name].coords["layer"]),
        "last_subject_token": torch.stack(subject).mean(0),
        "last_token": torch.stack(last).mean(0),
        "n": len(records),
    }
