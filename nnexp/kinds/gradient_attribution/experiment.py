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

from ...contract import ChunkPlan, expect_rows
from ...errors import ConfigError
from ...labelled import LabelledTensor
from ...metrics import check_metric
from ...results import ExampleRecord
from ...sites import check_layers, check_selection, resolve_site
from ...tracing import memory
from ...tracing.execute import gradient_job
from ...tracing.plan import left_pad, row_batches
from ..facts import CompiledFactExperiment, FactExperiment, FactItem, TokenizedFact

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
    layers: tuple[int, ...] | None = None
    keep_hidden: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.site not in GRADIENT_SITES:
            raise ConfigError(f"site {self.site!r} is not supported for gradient attribution; choose one of {', '.join(GRADIENT_SITES)}")
        check_metric(self.metric, ("answer", "foil"), "a gradient attribution experiment",
                     "choose a metric of the answer and foil (nnexp list), or write an InterventionExperiment")
        check_selection(self.layers, "layers")

    def compile(self, model) -> CompiledGradientAttribution:
        return CompiledGradientAttribution(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import gradient_attribution_figures

        return gradient_attribution_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


class CompiledGradientAttribution(CompiledFactExperiment):
    """A `GradientAttributionExperiment` bound to a model.

    Each trace (one forward and one backward pass) holds a batch of facts, one row each
    (`row_batches`); a plan's layout is, per trace, the examples its rows hold and each
    row's left-pad offset: {"examples": [...], "offsets": [...]}."""

    def __init__(self, experiment: GradientAttributionExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        # one site per layer, so layer order is the forward order nnsight requires
        self.layers = sorted(check_layers(experiment.layers, arch))
        self.points = [(f"{experiment.site}.{layer}", resolve_site(experiment.site, layer, arch)) for layer in self.layers]

    def rows_for_budget(self, items: list[FactItem], budget: int) -> int:
        """The facts one trace (forward, autograd graph, backward) may hold to peak under
        `budget` bytes on every device (measured; see `nnexp.tracing.memory`)."""
        tokens = max(len(item.fact.ids) for item in items)
        d = self.model.arch.d_model
        width = torch.finfo(self.model.dtype).bits // 8
        # beyond the plain forward and backward: the gradient at every site (all returned
        # at once), one site's float32 product and activation at a time, what is kept
        per_row = len(self.points) * tokens * (d * width + 8) + 2 * 4 * tokens * d
        if self.experiment.keep_hidden:
            per_row += len(self.points) * tokens * d * 4
        return memory.rows_for_budget(self.model, budget, tokens, grad=True, kept_per_row=per_row,
                                      what="gradient attribution of one fact")

    # -- planning and decoding ------------------------------------------------------

    def plan(self, items: list[FactItem], row_limit: int | None) -> ChunkPlan:
        """One forward + backward trace per batch of at most `row_limit` facts (all of
        `items` when None)."""
        jobs, layout = [], []
        for batch in row_batches(items, row_limit):
            facts = [item.fact for item in batch]
            input_ids, attention_mask, offsets = left_pad([fact.ids for fact in facts], self.pad_id)
            jobs.append(gradient_job(self.model, input_ids, attention_mask, self.points, self.experiment.metric,
                                     torch.tensor([fact.true_id for fact in facts]),
                                     torch.tensor([fact.false_id for fact in facts]),
                                     keep_hidden=self.experiment.keep_hidden))
            layout.append({"examples": [item.index for item in batch], "offsets": offsets})
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    def decode(self, items: list[FactItem], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        """Each trace's attributions and target logits -> one record per fact, in item order."""
        plan.check_values(values)
        by_index = {item.index: item for item in items}
        records = []
        for job, out in zip(plan.layout, values):
            facts = [by_index[index].fact for index in job["examples"]]
            self._check_rows(out, len(facts))
            records += self._records(facts, job["offsets"], out)
        return records

    def _check_rows(self, out: dict, rows: int) -> None:
        """Every value of a trace has one row per fact it was planned with, or decoding stops."""
        per_point = ("raw", "l2", "hidden") if self.experiment.keep_hidden else ("raw", "l2")  # [points, rows, ...]
        for name in per_point:
            expect_rows(out[name], rows, f"the attribution {name!r}", dim=1)
        for name in ("metric", "pair_logits", "pair_probs", "top"):
            expect_rows(out[name], rows, f"the {name!r} of the trace")

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

