"""Metrics: one number per run, computed inside the trace from next-token logits.

A metric takes the logits at the metric position (the last position unless an
experiment says otherwise), [rows, vocab], and the answer and foil token ids, [rows],
and returns [rows]. Only that vector leaves the trace, so a sweep of thousands of
patched runs ships a few kilobytes, not the logits.

A metric may need more than (logits, answer, foil); it says so with `needs`, and
receives each as a keyword argument:

- "reference": [rows, vocab], the logits of each row's reference row (another run of
  the same example, e.g. the clean run) at the same position: KL divergence, the
  change in log-probability, top-1 agreement;
- "answers": [rows, k], a set of answer token ids per row, -1 where a row has fewer.

`needs` also names "answer" and "foil" when the metric reads them, so that an
experiment whose examples have no foil is refused before anything runs.

Add one with `@register_metric("name", "what it measures", needs=(...))` (it goes into
the `METRICS` registry, `nnexp.registry.Registry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

from .errors import ConfigError
from .registry import Registry


NEEDS = ("answer", "foil", "reference", "answers")


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    fn: Callable[..., torch.Tensor]
    needs: tuple[str, ...] = ("answer", "foil")


METRICS: Registry[Metric] = Registry("metric")


def register_metric(name: str, description: str, replace: bool = False, needs: tuple[str, ...] = ("answer", "foil")):
    """Decorator: register `fn(logits, answer, foil, **needed) -> [rows]` as metric
    `name`; `needs` lists what it reads besides the logits (see the module docstring)."""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"metric {name!r} needs {unknown}, which nnexp does not provide; choose from {NEEDS}")

    def decorator(fn):
        METRICS.register(name, Metric(name, description, fn, tuple(needs)), description=description,
                         replace=replace)
        return fn

    return decorator


def get_metric(name: str) -> Metric:
    return METRICS.get(name)


def check_metric(name: str, provided: tuple[str, ...], what: str, fix: str) -> Metric:
    """The metric `name`, if everything it needs is among what `what` provides; else one
    line naming what is missing and `fix`."""
    metric = get_metric(name)
    missing = [need for need in metric.needs if need not in provided]
    if missing:
        raise ConfigError(f"metric {name!r} needs {' and '.join(missing)}, which {what} does not have; {fix}")
    return metric


def _pick(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@register_metric("logit_diff", "logit(answer) - logit(foil) at the last position")
def logit_diff(logits, answer, foil):
    return _pick(logits, answer) - _pick(logits, foil)


@register_metric("logit", "logit(answer) at the last position", needs=("answer",))
def logit(logits, answer, foil):
    return _pick(logits, answer)


@register_metric("log_prob", "log p(answer) at the last position", needs=("answer",))
def log_prob(logits, answer, foil):
    return _pick(torch.log_softmax(logits, dim=-1), answer)


@register_metric("prob", "p(answer) at the last position", needs=("answer",))
def prob(logits, answer, foil):
    return _pick(torch.softmax(logits, dim=-1), answer)


@register_metric("prob_diff", "p(answer) - p(foil) at the last position")
def prob_diff(logits, answer, foil):
    probs = torch.softmax(logits, dim=-1)
    return _pick(probs, answer) - _pick(probs, foil)


@register_metric("rank", "rank of the answer among all next tokens at the last position (1 = top)",
                 needs=("answer",))
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


# -- metrics over the whole next-token distribution, against a reference row --------------


@register_metric("kl", "KL(reference || run): KL divergence of the run's next-token distribution from its "
                       "reference run's (e.g. the clean run), in nats", needs=("reference",))
def kl(logits, answer, foil, reference):
    log_p = torch.log_softmax(reference, dim=-1)
    log_q = torch.log_softmax(logits, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@register_metric("log_prob_change", "log p(answer) in the run minus log p(answer) in its reference run",
                 needs=("answer", "reference"))
def log_prob_change(logits, answer, foil, reference):
    return log_prob(logits, answer, foil) - log_prob(reference, answer, foil)


@register_metric("top1_agreement", "1 if the run's top next token is its reference run's top next token, else 0",
                 needs=("reference",))
def top1_agreement(logits, answer, foil, reference):
    return (logits.argmax(-1) == reference.argmax(-1)).to(logits.dtype)


@register_metric("top10_overlap", "share of the reference run's 10 most likely next tokens that are among the "
                                  "run's 10 most likely", needs=("reference",))
def top10_overlap(logits, answer, foil, reference):
    k = min(10, logits.shape[-1])
    mine = logits.topk(k, dim=-1).indices
    theirs = reference.topk(k, dim=-1).indices
    return (mine.unsqueeze(-1) == theirs.unsqueeze(-2)).any(-1).sum(-1).to(logits.dtype) / k


@register_metric("answer_set_prob", "summed probability of the example's set of answer tokens (\"answers\")",
                 needs=("answers",))
def answer_set_prob(logits, answer, foil, answers):
    probs = torch.softmax(logits, dim=-1)
    picked = probs.gather(-1, answers.clamp(min=0))
    return (picked * (answers >= 0).to(probs.dtype)).sum(-1)
