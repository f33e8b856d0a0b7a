"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations").

Which positions does the last position read the attribute from, and in which layers?
For each layer l, attention from the last position to a set of source positions is
blocked in a window of `window` layers centred on l (default 9: l-4..l+4), and the
change in the probability of the attribute token is measured:

    knockout = (p_knocked - p_clean) / p_clean        # -0.4: the probability fell by 40%

Source sets: "subject" (the subject's tokens), "non_subject" (every other position
before the last, BOS included), "last" (the last position itself).

Blocking sets the pre-softmax scores of exactly those (last query, key) pairs to the
dtype's minimum, in every head, by editing the attention mask each knocked layer's
attention module receives (`nnexp.tracing.plan.BlockAttention`). Each row of the batch
carries its own mask, so one trace holds the clean run and every (source set, layer)
knockout of several facts. Works with eager and SDPA attention; other attention
implementations (flash attention) do not take an editable mask and are refused.

Stored per fact: `knockout` (source x layer, the relative change), `knockout.prob`
(the knocked runs' probability); scalars `p_clean`, `rank_clean`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ...errors import ConfigError
from ...labelled import LabelledTensor
from ...results import ExampleRecord
from ...sites import attention_mask_point, check_layers, check_selection
from ...tracing.runs import Run, RunEdit, window
from ..facts import TokenizedFact
from ..recall import CompiledRunsExperiment, RecallExperiment, check_choices, check_window

SOURCES = ("subject", "non_subject", "last")
MASKED_ATTENTION = ("eager", "sdpa")


def source_positions(fact: TokenizedFact, source: str) -> list[int]:
    """The key positions of a source set in the unpadded prompt."""
    last = len(fact.ids) - 1
    start, end = fact.subject
    if source == "subject":
        return list(range(start, end))
    if source == "non_subject":
        return [p for p in range(last) if not start <= p < end]
    return [last]


@dataclass
class AttentionKnockoutExperiment(RecallExperiment):
    """Block attention from the last position to a set of positions, window by window.

    Fields (besides `RecallExperiment`'s dataset, only_correct, multi_token, attribute):
        window: layers knocked out together, centred on each layer (default 9).
        sources: source sets to block: "subject", "non_subject", "last".
        layers: window centres (None = every layer).
    """

    examples_per_trace: ClassVar[int] = 4
    multi_token_hint: ClassVar[str] = "knockout measures one next token"

    window: int = 9
    sources: tuple[str, ...] = SOURCES
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.window = check_window(self.window)
        self.sources = check_choices(self.sources, SOURCES, "sources")
        check_selection(self.layers, "layers")

    def compile(self, model) -> CompiledAttentionKnockout:
        return CompiledAttentionKnockout(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import knockout_figures

        return knockout_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


class CompiledAttentionKnockout(CompiledRunsExperiment):
    def __init__(self, experiment: AttentionKnockoutExperiment, model) -> None:
        super().__init__(experiment, model)
        implementation = getattr(model.hf.config, "_attn_implementation", None)
        if implementation not in MASKED_ATTENTION:
            raise ConfigError(
                f"attention knockout edits the attention mask, which {implementation!r} attention does not take; "
                "load the model with attn_implementation='eager' or 'sdpa'"
            )
        arch = model.arch
        self.centres = sorted(check_layers(experiment.layers, arch))
        self.windows = [window(layer, experiment.window, arch.n_layers) for layer in self.centres]
        self.mask_points = [attention_mask_point(layer, arch) for layer in range(arch.n_layers)]

    def runs(self, fact: TokenizedFact) -> tuple[list[Run], list[Run]]:
        variants = []
        for source in self.experiment.sources:
            keys = source_positions(fact, source)
            for layers in self.windows:
                # an empty source set (e.g. no non-subject token) blocks nothing: the clean run
                edits = [RunEdit(self.mask_points[layer], "block", keys) for layer in layers] if keys else []
                variants.append(Run(edits))
        return [Run()], variants

    def record(self, fact: TokenizedFact, base: torch.Tensor, variants: torch.Tensor) -> ExampleRecord:
        p_clean, rank_clean = float(base[0, 0]), float(base[0, 1])
        shape = (len(self.experiment.sources), len(self.centres))
        prob = variants[:, 0].reshape(shape)
        dims = ("source", "layer")
        coords = {"source": list(self.experiment.sources), "layer": self.centres}
        info = self.info(fact)
        info["window"] = self.experiment.window
        info["source_positions"] = {source: source_positions(fact, source) for source in self.experiment.sources}
        return ExampleRecord(
            index=fact.index,
            tensors={
                "knockout": LabelledTensor((prob - p_clean) / p_clean, dims, coords),
                "knockout.prob": LabelledTensor(prob.clone(), dims, coords),
            },
            scalars={"p_clean": p_clean, "rank_clean": rank_clean},
            info=info,
        )
