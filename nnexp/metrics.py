"""Metrics: one number per run, computed inside the trace from last-position logits.

A metric takes the logits at the last position, [rows, vocab], and the answer and
foil token ids, [rows], and returns [rows]. Only that vector leaves the trace, so a
sweep of thousands of patched runs ships a few kilobytes, not the logits.

Add one with `@register_metric("name", "what it measures")` (it goes into the
`METRICS` registry, `nnexp.registry.Registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

from .registry import Registry


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, description: str, replace: bool = False):
    """Decorator: register `fn(logits, answer, foil) -> [rows]` as metric `name`."""

    def decorator(fn):
        METRICS.register(name, Metric(name, description, fn), description=description, replace=replace)
        return fn

    return decorator


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def _pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@register_metric("logit_diff", "logit(answer) - logit(foil) at the last position")
def logit_diff(logits, answer, foil):
    return _pick(logits, answer) - _pick(logits, foil)


@register_metric("logit", "logit(answer) at the last position")
def logit(logits, answer, foil):
    return _pick(logits, answer)


@register_metric("log_prob", "log p(answer) at the last position")
def log_prob(logits, answer, foil):
    return _pick(torch.log_softmax(logits, dim=-1), answer)


@register_metric("prob", "p(answer) at the last position")
def prob(logits, answer, foil):
    return _pick(torch.softmax(logits, dim=-1), answer)


@register_metric("prob_diff", "p(answer) - p(foil) at the last position")
def prob_diff(logits, answer, foil):
    probs = torch.softmax(logits, dim=-1)
    return _pick(probs, answer) - _pick(probs, foil)


@register_metric("rank", "rank of the answer among all next tokens at the last position (1 = top)")
def rank(logits, answer, foil):
    return (logits > _pick(logits, answer).unsqueeze(-1)).sum(-1).to(logits.dtype) + 1


# Inseq's names for the contrastive metrics (Yin and Neubig 2022), so that gradient
# attribution can be asked for exactly as in Inseq's `attributed_fn`.
@register_metric("contrast_prob_diff", "p(answer) - p(foil) at the last position (Inseq's name for prob_diff)")
def contrast_prob_diff(logits, answer, foil):
    return prob_diff(logits, answer, foil)


@register_metric("contrast_logits_diff", "logit(answer) - logit(foil) at the last position (Inseq's name for logit_diff)")
def contrast_logits_diff(logits, answer, foil):
    return logit_diff(logits, answer, foil)
