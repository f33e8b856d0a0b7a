"""Sublayer knockout: how much does the attribute need the MLPs or attention of a window?

For each layer l, a window of `window` layers centred on l (default 9: l-4..l+4) has
its MLP outputs (`mlp_out`) or attention outputs (`attn_out`) replaced, at every
position ("all") or at the last position only ("last"), by zeros (`ablation="zero"`)
or by the layer's mean output over the dataset (`ablation="mean"`), and the forward
pass continues from there. Reported: the attribute token's probability and rank, and

    knockout = (p_ablated - p_clean) / p_clean

The mean of a sublayer's output is taken over every token (BOS included) of every fact
of the dataset with single-token targets, whatever `--limit` is, so a limited run and
its continuation use the same means; one left-padded forward pass per batch computes it.

Stored per fact: `sublayer_knockout`, `sublayer_knockout.prob`, `sublayer_knockout.rank`
(sublayer x positions x layer); scalars `p_clean`, `rank_clean`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ...console import note
from ...errors import ConfigError
from ...labelled import LabelledTensor
from ...results import ExampleRecord
from ...sites import check_layers, check_selection, resolve_site
from ...tracing.execute import sum_over_tokens
from ...tracing.plan import left_pad
from ...tracing.runs import Run, RunEdit, window
from ..facts import FactItem, TokenizedFact
from ..recall import CompiledRunsExperiment, RecallExperiment, check_choices, check_window

SUBLAYERS = ("mlp_out", "attn_out")
ABLATIONS = ("zero", "mean")
POSITIONS = ("all", "last")


@dataclass
class SublayerKnockoutExperiment(RecallExperiment):
    """Zero- or mean-ablate MLP or attention outputs over windows of layers.

    Fields (besides `RecallExperiment`'s dataset, only_correct, multi_token, attribute):
        sublayers: "mlp_out" and/or "attn_out".
        ablation: "zero" (default) or "mean" (the layer's mean output over the dataset).
        positions: "all" (every position) and/or "last" (the last position only).
        window: layers ablated together, centred on each layer (default 9).
        layers: window centres (None = every layer).
        prefix_sharing: on by default, as for every kind (`nnexp.tracing.prefix`): a
            last-position ablation computes one token.
    """

    examples_per_trace: ClassVar[int] = 4
    multi_token_hint: ClassVar[str] = "sublayer knockout measures one next token"

    sublayers: tuple[str, ...] = SUBLAYERS
    ablation: str = "zero"
    positions: tuple[str, ...] = POSITIONS
    window: int = 9
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sublayers = check_choices(self.sublayers, SUBLAYERS, "sublayers")
        self.positions = check_choices(self.positions, POSITIONS, "positions")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation is {self.ablation!r}; choose 'zero' or 'mean'")
        self.window = check_window(self.window)
        check_selection(self.layers, "layers")

    def compile(self, model) -> CompiledSublayerKnockout:
        return CompiledSublayerKnockout(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import sublayer_figures

        return sublayer_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


class CompiledSublayerKnockout(CompiledRunsExperiment):
    def __init__(self, experiment: SublayerKnockoutExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        self.centres = sorted(check_layers(experiment.layers, arch))
        self.windows = [window(layer, experiment.window, arch.n_layers) for layer in self.centres]
        self.points = {(site, layer): resolve_site(site, layer, arch)
                       for site in experiment.sublayers for layer in range(arch.n_layers)}
        self.means: dict[tuple[str, int], torch.Tensor] | None = None
        self.mean_count = 0

    def fit(self, items: list[FactItem], batch: int = 16) -> None:
        """Mean-ablation values: each sublayer's mean output per layer over the dataset."""
        if self.experiment.ablation != "mean":
            return
        facts = [item.fact for item in items if item.fact is not None]
        points = [(f"{site}.{layer}", point) for (site, layer), point in sorted(self.points.items(), key=lambda kv: kv[1].order)]
        totals: dict[str, torch.Tensor] = {}
        requests = [left_pad([fact.ids for fact in facts[start : start + batch]], self.pad_id)[:2] + (points,)
                    for start in range(0, len(facts), batch)]
        count = sum(int(mask.sum()) for _, mask, _ in requests)
        for sums in sum_over_tokens(self.model, requests):
            for key, value in sums.items():
                totals[key] = totals.get(key, 0) + value
        self.means = {key: totals[f"{key[0]}.{key[1]}"] / count for key in self.points}
        self.mean_count = count
        note(f"mean ablation: sublayer means over {count} tokens of {len(facts)} facts")

    def runs(self, fact: TokenizedFact) -> tuple[list[Run], list[Run]]:
        if self.experiment.ablation == "mean" and self.means is None:
            raise ConfigError("mean ablation needs the dataset means; call fit(items) before running (nnexp.run does)")
        last = len(fact.ids) - 1
        variants = []
        d = self.model.arch.d_model
        for site in self.experiment.sublayers:
            for where in self.experiment.positions:
                positions = list(range(len(fact.ids))) if where == "all" else [last]
                for layers in self.windows:
                    edits = []
                    for layer in layers:
                        if self.experiment.ablation == "mean":
                            values = self.means[(site, layer)].expand(len(positions), -1)
                        else:
                            values = torch.zeros(len(positions), d)
                        edits.append(RunEdit(self.points[(site, layer)], "set", positions, values))
                    variants.append(Run(edits))
        return [Run()], variants

    def record(self, fact: TokenizedFact, base: torch.Tensor, variants: torch.Tensor) -> ExampleRecord:
        p_clean, rank_clean = float(base[0, 0]), float(base[0, 1])
        shape = (len(self.experiment.sublayers), len(self.experiment.positions), len(self.centres))
        prob = variants[:, 0].reshape(shape)
        rank = variants[:, 1].reshape(shape)
        dims = ("sublayer", "positions", "layer")
        coords = {"sublayer": list(self.experiment.sublayers), "positions": list(self.experiment.positions),
                  "layer": self.centres}
        info = self.info(fact)
        info.update(window=self.experiment.window, ablation=self.experiment.ablation)
        if self.experiment.ablation == "mean":
            info["mean_tokens"] = self.mean_count
        return ExampleRecord(
            index=fact.index,
            tensors={
                "sublayer_knockout": LabelledTensor((prob - p_clean) / p_clean, dims, coords),
                "sublayer_knockout.prob": LabelledTensor(prob.clone(), dims, coords),
                "sublayer_knockout.rank": LabelledTensor(rank.clone(), dims, coords),
            },
            scalars={"p_clean": p_clean, "rank_clean": rank_clean},
            info=info,
        )
