"""Attribution patching: every cell estimated at once, the ones that matter patched exactly.

The `AttributionPatchingExperiment` kind takes the data of activation patching (clean
and corrupted prompt pairs, the IOI set built in) and, for every cell of its sites
(every layer x position, every layer x head x position for `head_out`):

1. **Screens** (`select`, a preparatory pass): one trace per pair, rows [clean,
   corrupted], one forward pass and one backward pass from the corrupted row's metric
   give AtP's estimate of every cell at once; with `graddrop`, one more partial
   backward pass per layer gives AtP*'s GradDrop score (`screening.py` says exactly
   what is computed). All of a chunk's screening traces go in one request.
2. **Verifies** (`plan` / `decode`): the `top_k` cells by |estimate| (of AtP, and of
   AtP* with GradDrop: the union) and a seeded random `sample` of the other cells are
   patched exactly, as activation patching patches them (`nnexp.kinds.patching`: the
   clean activation copied into the corrupted run at one cell, through the same
   planner, in batched traces), so "exact" is the number activation patching reports
   for that cell.

Normalisation is activation patching's: effect = (patched - corrupted) / (clean -
corrupted), so an estimate is atp / (clean - corrupted) (AtP*, a magnitude, is divided
by |clean - corrupted|). Cells wholly inside the prefix that clean and corrupted share
are exact no-ops (their estimate is exactly 0 too) and are neither ranked nor verified.

Stored per example:

- `{site}.atp`, `{site}.atp_star` (with GradDrop): the estimate of every cell,
  [layer, position] or [layer, head, position];
- `{site}.exact`: the exact effect of the verified cells, NaN elsewhere, and
  `{site}.exact.patched` the metric of their patched runs (as activation patching's
  `{site}.patched`);
- `verified`: one row per verified cell, [cell, field]: site (index into `sites`),
  layer, head (-1: none), position, sampled (1: from the random sample, 0: a top-k
  cell), rank_atp, rank_atp_star (1 = largest |estimate| among every ranked cell),
  rank_exact (1 = largest |exact| among the verified cells);
- scalars: clean, corrupted (metrics of the verification trace), n_cells (cells
  ranked), n_verified, and per variant v in (atp, atp_star):
  `recall_{v}`: of the top_k verified cells by |exact|, the share that are among v's
  top_k by |estimate| (over the verified cells: a cell outside them is unknown);
  `spearman_{v}`: Spearman's correlation of |estimate| and |exact| over the verified
  cells (`spearman_signed_atp`: of the signed AtP estimate and the exact effect);
  the largest false negative in the sample, the sampled cell outside v's top_k with
  the largest |exact|: `false_negative_exact_rank_{v}` its rank by |exact| among the
  verified cells and `false_negative_rank_{v}` its rank by v's estimate (NaN when the
  sample is empty); `false_negative(record, variant)` gives its cell and exact effect.

Sites `q`, `k`, `v` (per head; k and v per key/value head) are screened by plain AtP
(`{site}.atp`); AtP* of `q` and `k` cells is the QK fix with GradDrop, and
`{q,k}.atp_qk` stores the signed QK-fixed estimate with the plain gradient (not
ranked; `screening.py` says exactly what is computed). They are verified by exact
patching of the call's input like every cell.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ...console import note
from ...contract import ChunkPlan, CompiledExperiment, expect_rows
from ...data import PromptPair, load_prompt_pairs
from ...errors import ConfigError
from ...experiment import Experiment
from ...labelled import LabelledTensor
from ...metrics import check_metric
from ...results import ExampleRecord
from ...sites import check_selection, check_site, resolve_site
from ...statistics import spearman
from ...tracing import memory
from ...tracing.execute import plan_job
from ...tracing.runs import Run, RunEdit, build_plan, pack_runs
from ..patching.experiment import PatchingExperiment
from .screening import screening_job

ATP_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "q", "k", "v")
FIELDS = ("site", "layer", "head", "position", "sampled", "rank_atp", "rank_atp_star", "rank_exact")


@dataclass
class AttributionPatchingExperiment(Experiment):
    """Estimate every cell's patching effect with AtP (and AtP*'s GradDrop), then patch
    the top cells and a random sample exactly.

    Fields:
        sites: any of resid_pre, resid_post, attn_out, mlp_out, head_out, q, k, v;
            every layer x position (x head) of each is estimated.
        layers, heads: the layers (and heads of the per-head sites) to estimate (None =
            all; for k and v, heads are key/value heads, so named heads must exist there).
        metric: a metric of the answer and foil (default logit(answer) - logit(foil)).
        graddrop: also compute AtP*'s GradDrop score (one partial backward pass per layer).
        top_k: cells verified by exact patching per variant, by |estimate|.
        sample: further cells verified, drawn at random from the rest (seeded).
        sample_seed: the seed of that draw (with the example's index).
    """

    examples_per_trace: ClassVar[int] = 1

    sites: tuple[str, ...] = ("resid_post", "attn_out", "mlp_out", "head_out")
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    metric: str = "logit_diff"
    graddrop: bool = True
    top_k: int = 50
    sample: int = 50
    sample_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sites:
            raise ConfigError("sites is empty; name at least one site to estimate")
        for site in self.sites:
            check_site(site)
            if site not in ATP_SITES:
                raise ConfigError(f"site {site!r} is not supported by attribution patching; choose among "
                                  f"{', '.join(ATP_SITES)}")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"sites {list(self.sites)} name a site twice; list each site once")
        check_selection(self.layers, "layers")
        check_selection(self.heads, "heads")
        if self.top_k < 0 or self.sample < 0:
            raise ConfigError(f"top_k is {self.top_k} and sample is {self.sample}; both count cells to verify and "
                              "must be 0 or more")
        check_metric(self.metric, ("answer", "foil"), "an attribution patching experiment",
                     "choose a metric of the answer and foil (nnexp list)")

    @property
    def variants(self) -> tuple[str, ...]:
        return ("atp", "atp_star") if self.graddrop else ("atp",)

    def read_data_file(self, path: str) -> list[PromptPair]:
        return load_prompt_pairs(path)

    def compile(self, model) -> CompiledAttributionPatching:
        return CompiledAttributionPatching(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import attribution_patching_figures

        return attribution_patching_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


@dataclass
class _Item:
    """A prepared pair (activation patching's item: its cells and axes), and once
    screened its raw estimates: variant -> site -> tensor (the site's axes)."""

    patch: object
    estimates: dict | None = None
    screened: list[float] = field(default_factory=list)  # the screening trace's [clean, corrupted] metric

    @property
    def index(self) -> int:
        return self.patch.index


@dataclass
class _Selection:
    """The cells of one example that are verified, and why."""

    ranked: list[int]  # every cell outside the shared prefix
    top: dict[str, list[int]]  # variant -> its top_k cells by |estimate|
    sampled: list[int]
    verified: list[int]  # sorted: the union of the tops and the sample


class CompiledAttributionPatching(CompiledExperiment):
    """An `AttributionPatchingExperiment` bound to a model. Its cells, their hook points
    and the exact patching of them are activation patching's (`CompiledPatching`, every
    position of every site patched separately)."""

    def __init__(self, experiment: AttributionPatchingExperiment, model) -> None:
        super().__init__(experiment, model)
        self.patching = PatchingExperiment(sites=experiment.sites, positions="each", head_positions="each",
                                           layers=experiment.layers, heads=experiment.heads,
                                           metric=experiment.metric).compile(model)
        arch = model.arch
        self.layers, self.heads = self.patching.layers, self.patching.heads
        points = [(f"{site}.{layer}", resolve_site(site, layer, arch)) for site in experiment.sites
                  for layer in self.layers]
        self.cell_points = sorted(points, key=lambda entry: entry[1].order)
        self.block_points = [(resolve_site("resid_pre", layer, arch), resolve_site("resid_post", layer, arch))
                             for layer in range(arch.n_layers)]
        # the QK fix's layers: their q, k, v and head_out hook points, and which cells it fixes
        fixed = [site for site in ("q", "k") if site in experiment.sites]
        self.attention = [(layer, {name: resolve_site(site, layer, arch) for name, site in
                                   (("q", "q"), ("k", "k"), ("v", "v"), ("z", "head_out"))},
                           {site: f"{site}.{layer}" for site in fixed}) for layer in self.layers] if fixed else []

    # -- preparing and screening -------------------------------------------------------

    def prepare(self, example: PromptPair, index: int) -> _Item:
        return _Item(self.patching.prepare(example, index))

    def select(self, items: list[_Item], batch: int) -> list[_Item]:
        """Screen every item not yet screened: one trace per pair, `batch` pairs per request."""
        todo = [item for item in items if item.estimates is None]
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            jobs = [screening_job(self.model, item.patch.pair.clean_ids, item.patch.pair.corrupted_ids,
                                  self.cell_points, self.block_points, self.experiment.metric,
                                  item.patch.pair.answer_id, item.patch.pair.foil_id, self.experiment.graddrop,
                                  self.attention)
                    for item in chunk]
            for item, out in zip(chunk, self.model.executor.run(jobs)):
                item.estimates = {variant: self._site_tensors(out[variant]) for variant in self.experiment.variants}
                if "atp_qk" in out:
                    item.estimates["atp_qk"] = self._site_tensors(out["atp_qk"])
                item.screened = out["metric"].tolist()
        return items

    def _site_tensors(self, values: dict) -> dict[str, torch.Tensor]:
        """Per site, the estimates laid out as the site's axes: [layer, position] or
        [layer, head, position], for the experiment's layers and heads."""
        out = {}
        for site in self.experiment.sites:
            if f"{site}.{self.layers[0]}" not in values:
                continue  # atp_qk: query and key sites only
            stacked = torch.stack([values[f"{site}.{layer}"] for layer in self.layers]).float()
            if stacked.dim() == 3:  # [layer, position, head] -> [layer, head, position]
                stacked = stacked.permute(0, 2, 1)[:, self.patching.site_heads[site]]
            out[site] = stacked
        return out

    def _estimate(self, item: _Item, variant: str, cell_id: int) -> float:
        cell = item.patch.cells[cell_id]
        return float(item.estimates[variant][cell.site][cell.key])

    def selection(self, item: _Item) -> _Selection:
        """The verified cells of `item`: a pure function of its estimates and the
        experiment's top_k, sample and sample_seed (so planning it again gives the same cells)."""
        ranked = item.patch.run_cells
        top = {}
        for variant in self.experiment.variants:
            order = sorted(ranked, key=lambda c: (-abs(self._estimate(item, variant, c)), c))
            top[variant] = order[: self.experiment.top_k]
        chosen = set().union(*top.values())
        rest = [c for c in ranked if c not in chosen]
        rng = np.random.default_rng([self.experiment.sample_seed, item.index])
        picks = rng.choice(len(rest), size=min(self.experiment.sample, len(rest)), replace=False) if rest else []
        sampled = sorted(rest[int(i)] for i in picks)
        return _Selection(ranked, top, sampled, sorted(chosen | set(sampled)))

    # -- memory ---------------------------------------------------------------------

    def rows_for_budget(self, items: list[_Item], budget: int) -> int:
        """Rows per verification trace (activation patching's sizing). The screening
        traces hold two rows each; refuse a budget below what they need."""
        tokens = max(item.patch.pair.n_tokens for item in items)
        d = self.model.arch.d_model
        # beyond the forward and backward: each cell point's activation and gradient, kept
        # together while the GradDrop passes run
        kept = len(self.cell_points) * tokens * d * 4 * 2
        memory.rows_for_budget(self.model, budget, tokens, grad=True, kept_per_row=kept, minimum=2,
                               what="attribution patching's screening trace (clean and corrupted, with backward)")
        return self.patching.rows_for_budget([item.patch for item in items], budget)

    # -- planning and decoding ---------------------------------------------------------

    def plan(self, items: list[_Item], row_limit: int | None) -> ChunkPlan:
        """Exact patching of each item's verified cells, in as few traces as `row_limit`
        allows. The layout: per trace, per example, [index, first row, cell ids]."""
        if row_limit is not None and row_limit < 3:
            raise ConfigError(f"max_rows is {row_limit}; a trace needs at least 3 rows (clean, corrupted, one "
                              "patched run)")
        examples, cells = [], {}
        for item in items:
            if item.estimates is None:
                raise RuntimeError("an item was planned before it was screened")  # nnexp bug: select screens
            pair = item.patch.pair
            cells[item.index] = self.selection(item).verified
            variants = []
            for cell_id in cells[item.index]:
                cell = item.patch.cells[cell_id]
                edit = RunEdit(self.patching.points[(cell.site, cell.layer)], "copy", cell.positions, head=cell.head)
                variants.append(Run([edit], ids=pair.corrupted_ids))
            base = [Run(ids=pair.clean_ids), Run(ids=pair.corrupted_ids)]
            examples.append((item.index, pair.clean_ids, pair.answer_id, pair.foil_id, base, variants))
        jobs, layout = [], []
        for trace in pack_runs(examples, row_limit):
            trace_plan, firsts = build_plan(trace, self.pad_id, self.experiment.metric)
            jobs.append(plan_job(trace_plan))
            layout.append([[group.key, first, [cells[group.key][v] for v in group.variants]]
                           for group, first in zip(trace, firsts)])
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    def decode(self, items: list[_Item], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        plan.check_values(values)
        clean, corrupted = {}, {}
        patched: dict[int, dict[int, float]] = defaultdict(dict)
        for rows, trace, value in zip(plan.rows, plan.layout, values):
            metric = expect_rows(value, rows, "a verification trace")[:, 0].tolist()
            for index, first, cell_ids in trace:
                clean.setdefault(index, metric[first])
                corrupted.setdefault(index, metric[first + 1])
                for offset, cell_id in enumerate(cell_ids):
                    patched[index][cell_id] = metric[first + 2 + offset]
        return [self._record(item, clean[item.index], corrupted[item.index], patched[item.index]) for item in items]

    def _record(self, item: _Item, clean: float, corrupted: float, patched: dict[int, float]) -> ExampleRecord:
        experiment = self.experiment
        denominator = clean - corrupted
        if abs(denominator) < 1e-6:
            note(f"example {item.index}: clean and corrupted {experiment.metric} are equal ({clean:.4g}); its "
                 "normalised estimates and effects are undefined (NaN)")
            denominator = math.nan
        scale = {"atp": denominator, "atp_star": abs(denominator)}
        tensors = {}
        for site, (dims, coords) in item.patch.axes.items():
            for variant in experiment.variants:
                tensors[f"{site}.{variant}"] = LabelledTensor(item.estimates[variant][site] / scale[variant], dims,
                                                              coords)
            if site in item.estimates.get("atp_qk", {}):
                tensors[f"{site}.atp_qk"] = LabelledTensor(item.estimates["atp_qk"][site] / denominator, dims, coords)
            raw = torch.full(item.estimates["atp"][site].shape, math.nan)
            for cell_id, value in patched.items():
                cell = item.patch.cells[cell_id]
                if cell.site == site:
                    raw[cell.key] = value
            tensors[f"{site}.exact"] = LabelledTensor((raw - corrupted) / denominator, dims, coords)
            tensors[f"{site}.exact.patched"] = LabelledTensor(raw, dims, coords)
        chosen = self.selection(item)
        table, scalars = self._verification(item, chosen, patched, corrupted, denominator, scale)
        tensors["verified"] = LabelledTensor(table, ("cell", "field"), {"field": list(FIELDS)})
        scalars.update(clean=clean, corrupted=corrupted, screened_clean=item.screened[0],
                       screened_corrupted=item.screened[1])
        info = item.patch.pair.info()
        info["sites"] = list(experiment.sites)
        return ExampleRecord(index=item.index, tensors=tensors, scalars=scalars, info=info)

    def _verification(self, item, chosen: _Selection, patched, corrupted, denominator, scale):
        """The verified-cell table and the per-variant summaries of one example."""
        experiment = self.experiment
        sites = list(experiment.sites)
        estimates = {v: {c: self._estimate(item, v, c) / scale[v] for c in chosen.ranked} for v in experiment.variants}
        ranks = {v: {c: r + 1 for r, c in enumerate(sorted(chosen.ranked, key=lambda c: (-abs(estimates[v][c]), c)))}
                 for v in experiment.variants}
        exact = {c: (patched[c] - corrupted) / denominator for c in chosen.verified}
        by_exact = sorted(chosen.verified, key=lambda c: (-abs(exact[c]), c))
        exact_rank = {c: r + 1 for r, c in enumerate(by_exact)}
        rows = []
        for c in chosen.verified:
            cell = item.patch.cells[c]
            rows.append([sites.index(cell.site), cell.layer, -1 if cell.head is None else cell.head, cell.positions[0],
                         float(c in chosen.sampled), ranks["atp"][c], ranks.get("atp_star", {}).get(c, math.nan),
                         exact_rank[c]])
        table = torch.tensor(rows, dtype=torch.float64).reshape(-1, len(FIELDS))
        scalars = {"n_cells": float(len(chosen.ranked)), "n_verified": float(len(chosen.verified))}
        k = min(experiment.top_k, len(chosen.verified))
        exact_top = set(by_exact[:k])
        magnitudes = [abs(exact[c]) for c in chosen.verified]
        for variant in experiment.variants:
            top = set(chosen.top[variant])
            scalars[f"recall_{variant}"] = len(exact_top & top) / k if k else math.nan
            scalars[f"spearman_{variant}"] = spearman([abs(estimates[variant][c]) for c in chosen.verified],
                                                      magnitudes) if chosen.verified else math.nan
            missed = [c for c in chosen.sampled if c not in top]
            worst = max(missed, key=lambda c: (abs(exact[c]), -c)) if missed else None
            # by ranks, which float rounding does not move (the effect itself is in the tensors:
            # `false_negative`)
            scalars[f"false_negative_rank_{variant}"] = float(ranks[variant][worst]) if worst is not None else math.nan
            scalars[f"false_negative_exact_rank_{variant}"] = (float(exact_rank[worst]) if worst is not None
                                                               else math.nan)
        scalars["spearman_signed_atp"] = (spearman([estimates["atp"][c] for c in chosen.verified],
                                                   [exact[c] for c in chosen.verified])
                                          if chosen.verified else math.nan)
        return table, scalars


def false_negative(record: ExampleRecord, variant: str) -> dict | None:
    """The largest false negative of `variant` in `record`'s random sample: the sampled
    cell outside the variant's top_k with the largest |exact effect|, as {"site", "layer",
    "head", "position", "exact", "estimate", "rank"}; None when the sample is empty."""
    rank = record.scalars.get(f"false_negative_exact_rank_{variant}", math.nan)
    if math.isnan(rank):
        return None
    column = {name: i for i, name in enumerate(FIELDS)}
    table = record["verified"].values
    row = table[table[:, column["rank_exact"]] == rank][0].tolist()
    site = record.info["sites"][int(row[column["site"]])]
    head = None if row[column["head"]] < 0 else int(row[column["head"]])
    labels = (int(row[column["layer"]]),) + (() if head is None else (head,)) + (int(row[column["position"]]),)
    exact = record[f"{site}.exact"]
    index = tuple(exact.labels(dim).index(label) for dim, label in zip(exact.dims, labels))
    return {"site": site, "layer": labels[0], "head": head, "position": labels[-1],
            "exact": float(exact.values[index]), "estimate": float(record[f"{site}.{variant}"].values[index]),
            "rank": int(row[column[f"rank_{variant}"]])}
