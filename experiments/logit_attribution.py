"""Logit attribution on IOI: which layers and heads write the answer, and from where
the answer can be read off (the analysis of TransformerLens' IOI walkthrough).

    nnexp run logit-lens            # accumulated residual -> logit(IO) - logit(S), two read-outs, top tokens
    nnexp run dla-layers            # the final residual split into embeddings, attention and MLP outputs
    nnexp run dla-heads             # each head's direct contribution, layer x head
    nnexp run logit-attribution     # all three from the same trace
    nnexp run dla-heads --data prompts.jsonl   # {"prompt" (or "clean"), "answer", "foil"} per line

The built-in data are the walkthrough's 8 prompts (4 templates x 2 name orders);
`--set dataset=generated --set n_examples=N` uses the seeded IOI generator instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp.kinds.logit_attribution import ANALYSES, LogitAttributionExperiment
from nnexp.prompts import Prompt

from .ioi import builtin_pairs, check_builtin


@dataclass
class _IOILogitAttribution(LogitAttributionExperiment):
    # Built-in data: "classic" (TransformerLens' 8 prompts) or "generated" (seeded, all templates).
    dataset: str = "classic"
    n_examples: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_builtin(self.dataset, self.n_examples)

    def default_examples(self) -> list[Prompt]:
        return [Prompt.from_pair(pair) for pair in builtin_pairs(self.dataset, self.n_examples, self.seed)]


@dataclass
class LogitLens(_IOILogitAttribution):
    name = "logit-lens"
    description = "logit lens: the answer-minus-foil logit difference read off the residual stream after every sublayer"
    analyses: tuple[str, ...] = ("logit_lens",)


@dataclass
class DLALayers(_IOILogitAttribution):
    name = "dla-layers"
    description = "direct logit attribution per layer: embeddings, each attention output and each MLP output"
    analyses: tuple[str, ...] = ("dla_layers",)


@dataclass
class DLAHeads(_IOILogitAttribution):
    name = "dla-heads"
    description = "direct logit attribution per attention head, layer x head"
    analyses: tuple[str, ...] = ("dla_heads",)


@dataclass
class LogitAttribution(_IOILogitAttribution):
    name = "logit-attribution"
    description = "logit lens, per-layer and per-head direct logit attribution, all from one trace"
    analyses: tuple[str, ...] = ANALYSES
