"""Activation patching: the `PatchingExperiment` kind and its compilation to trace plans.

For each example the batch holds the clean run, the corrupted run, and one copy of
the corrupted run per cell of the sweep, a cell being (site, layer, position) or
(site, layer, head[, position]). In each copy the clean activation at that cell
replaces the corrupted one (the convention of nnsight's IOI tutorial: denoising, clean
into corrupted). All of it is ONE forward pass: the clean row's activation is read at
the same hook point of the same pass and copied into the patched rows before the
model moves on.

Per cell the result is the metric of the patched run and the normalised effect

    effect = (patched - corrupted) / (clean - corrupted)

which is 0 where patching changes nothing and 1 where it restores the clean metric.

Shared prefix: where clean and corrupted prompts begin with the same tokens, every
activation at those positions is identical in the two runs (attention is causal), so
patching a cell that lies entirely in the shared prefix is exactly a no-op. Such
cells are not run; their patched value is the corrupted run's metric (effect 0).
Set `skip_shared_prefix=False` to run them anyway.

Positions: "each" patches every position separately (a layer x position map), "all"
patches every position at once (one value per layer or per head), a list of integers
patches those positions separately (negative counts from the end). Head sites use
`head_positions`, other sites `positions`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ...console import note
from ...contract import ChunkPlan, CompiledExperiment, expect_rows
from ...data import PromptPair, TokenizedPair, example_location, load_prompt_pairs, tokenize_pair
from ...errors import ConfigError
from ...experiment import Experiment
from ...labelled import LabelledTensor
from ...metrics import check_metric
from ...results import ExampleRecord
from ...sites import check_heads, check_layers, check_selection, check_site, is_per_head, resolve_site
from ...tracing.execute import plan_job
from ...tracing.memory import rows_for_budget
from ...tracing.plan import TracePlan
from ...tracing.prefix import prefix_sharing
from ...tracing.runs import Run, RunEdit, build_plan, pack_runs


def _check_positions(value: str | tuple[int, ...], field_name: str) -> str | tuple[int, ...]:
    if value in ("each", "all"):
        return value
    if isinstance(value, tuple) and value:
        if len(set(value)) != len(value):
            raise ConfigError(f"{field_name} {list(value)} name a position twice; list each position once")
        return value
    raise ConfigError(
        f"{field_name} must be 'each', 'all' or a non-empty list of integer positions, got {value!r}"
    )


@dataclass
class PatchingExperiment(Experiment):
    """Patch clean activations into the corrupted run, one cell at a time.

    Fields:
        sites: which activations to patch (see `nnexp.sites.SITES`).
        positions: "each", "all" or a list of positions, for non-head sites.
        head_positions: the same, for head sites.
        layers: layers to sweep (None = all; negative counts from the end).
        heads: heads to sweep for head sites (None = all).
        metric: a metric from `nnexp.metrics` (default logit(answer) - logit(foil)).
        skip_shared_prefix: do not run cells wholly inside the tokens that clean and
            corrupted share at the start (exact no-ops under causal attention).
    """

    sites: tuple[str, ...] = ("resid_post",)
    positions: str | tuple[int, ...] = "each"
    head_positions: str | tuple[int, ...] = "all"
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    metric: str = "logit_diff"
    skip_shared_prefix: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sites:
            raise ConfigError("sites is empty; name at least one site to patch")
        for site in self.sites:
            check_site(site)
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"sites {list(self.sites)} name a site twice; list each site once")
        check_selection(self.layers, "layers")
        check_selection(self.heads, "heads")
        self.positions = _check_positions(self.positions, "positions")
        self.head_positions = _check_positions(self.head_positions, "head_positions")
        check_metric(self.metric, ("answer", "foil"), "a patching experiment",
                     "choose a metric of the answer and foil (nnexp list), or write an InterventionExperiment")

    def read_data_file(self, path: str) -> list[PromptPair]:
        return load_prompt_pairs(path)

    def compile(self, model) -> CompiledPatching:
        return CompiledPatching(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import patching_figures

        return patching_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


@dataclass
class _Cell:
    """One patched run: which site, where in the result tensor, what to copy."""

    site: str
    key: tuple[int, ...]  # index into the site's result tensor
    layer: int
    positions: list[int]  # token positions (unpadded) patched in this run
    head: int | None
    needs_run: bool = True  # False: inside the shared prefix, equal to the corrupted run


@dataclass
class _Item:
    """A tokenised example with its sweep laid out as cells."""

    pair: TokenizedPair
    cells: list[_Cell]
    axes: dict[str, tuple[tuple[str, ...], dict[str, list]]]  # site -> (dims, coords)

    @property
    def index(self) -> int:
        return self.pair.index

    @property
    def run_cells(self) -> list[int]:
        return [i for i, cell in enumerate(self.cells) if cell.needs_run]


class CompiledPatching(CompiledExperiment):
    """A `PatchingExperiment` bound to a model: validated, and able to plan and decode examples.

    Each example is planned through the one planner of edited runs (`nnexp.tracing.runs`):
    base runs [clean, corrupted], and one variant per cell that needs running, the
    corrupted prompt with the clean run's activation copied in at the cell."""

    def __init__(self, experiment: PatchingExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        self.layers = check_layers(None if experiment.layers is None else list(experiment.layers), arch)
        self.heads = check_heads(None if experiment.heads is None else list(experiment.heads), arch)
        # per head site its heads: k and v have the key/value heads (fewer with grouped-query
        # attention), so all of them when no heads are named, else the named ones, checked
        self.site_heads = {site: check_heads(None if experiment.heads is None else list(experiment.heads), arch, site)
                           for site in experiment.sites if is_per_head(site)}
        self.points = {
            (site, layer): resolve_site(site, layer, arch) for site in experiment.sites for layer in self.layers
        }

    def rows_for_budget(self, items: list[_Item], budget: int) -> int:
        """The rows one trace may hold so that its activations peak under `budget` bytes
        on every device (measured at the longest example's length)."""
        tokens = max(item.pair.n_tokens for item in items)
        return rows_for_budget(self.model, budget, tokens, minimum=3,
                               what="a patching trace (clean, corrupted and one patched run)")

    # -- preparing examples ---------------------------------------------------

    def prepare(self, example: PromptPair, index: int) -> _Item:
        pair = tokenize_pair(self.model.tokenizer, example, index)
        cells: list[_Cell] = []
        axes = {}
        n = pair.n_tokens
        shared = next((p for p, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b), n)
        if not self.experiment.skip_shared_prefix:
            shared = 0
        for site in self.experiment.sites:
            is_head = is_per_head(site)
            spec = self.experiment.head_positions if is_head else self.experiment.positions
            if spec == "all":
                groups = [list(range(n))]
                position_labels = None
            else:
                where = example_location(example, index)
                chosen = list(range(n)) if spec == "each" else [self._position(p, n, where) for p in spec]
                groups = [[p] for p in chosen]
                position_labels = chosen
            dims: tuple[str, ...] = ("layer", "head") if is_head else ("layer",)
            coords: dict[str, list] = {"layer": list(self.layers)}
            if is_head:
                coords["head"] = list(self.site_heads[site])
            if position_labels is not None:
                dims += ("position",)
                coords["position"] = position_labels
            axes[site] = (dims, coords)
            for li, layer in enumerate(self.layers):
                for hi, head in enumerate(self.site_heads[site] if is_head else [None]):
                    for pi, positions in enumerate(groups):
                        key = (li,) + ((hi,) if is_head else ()) + ((pi,) if position_labels is not None else ())
                        cells.append(_Cell(site, key, layer, positions, head, needs_run=max(positions) >= shared))
        return _Item(pair, cells, axes)

    @staticmethod
    def _position(p: int, n: int, where: str) -> int:
        if not -n <= p < n:
            raise ConfigError(
                f"position {p} is out of range for {where}, which has {n} tokens "
                f"(0-{n - 1}; negative positions count from the end)"
            )
        return p % n

    # -- planning and decoding ---------------------------------------------------------

    def _runs(self, item: _Item) -> tuple[list[Run], list[Run]]:
        """[clean, corrupted], and one patched run per cell that needs running."""
        pair = item.pair
        variants = []
        for cell_id in item.run_cells:
            cell = item.cells[cell_id]
            edit = RunEdit(self.points[(cell.site, cell.layer)], "copy", cell.positions, head=cell.head)
            variants.append(Run([edit], ids=pair.corrupted_ids))
        return [Run(ids=pair.clean_ids), Run(ids=pair.corrupted_ids)], variants

    def trace_plans(self, items: list[_Item], row_limit: int | None) -> tuple[list[TracePlan], list]:
        """The trace plans of `items` under `row_limit` rows, and the layout: per trace,
        per example in it, [example index, first row, the cells its patched rows hold]."""
        if row_limit is not None and row_limit < 3:
            raise ConfigError(f"max_rows is {row_limit}; a trace needs at least 3 rows (clean, corrupted, one "
                              "patched run)")
        examples = []
        for item in items:
            base, variants = self._runs(item)
            examples.append((item.index, item.pair.clean_ids, item.pair.answer_id, item.pair.foil_id, base, variants))
        cells = {item.index: item.run_cells for item in items}
        sharing = prefix_sharing(self.model, self.experiment.prefix_sharing,
                                 max(item.pair.n_tokens for item in items))
        plans, layout = [], []
        for trace in pack_runs(examples, row_limit):
            plan, firsts = build_plan(trace, self.pad_id, self.experiment.metric, sharing)
            plans.append(plan)
            layout.append([[group.key, first, [cells[group.key][v] for v in group.variants]]
                           for group, first in zip(trace, firsts)])
        return plans, layout

    def plan(self, items: list[_Item], row_limit: int | None) -> ChunkPlan:
        """The sweeps of `items` in as few traces as `row_limit` allows."""
        plans, layout = self.trace_plans(items, row_limit)
        return ChunkPlan([plan_job(plan) for plan in plans], layout, row_limit, [item.index for item in items])

    def decode(self, items: list[_Item], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        plan.check_values(values)
        clean, corrupted = {}, {}
        patched: dict[int, dict[int, float]] = defaultdict(dict)  # example -> cell -> metric
        for rows, trace, value in zip(plan.rows, plan.layout, values):
            metric = expect_rows(value, rows, "a patching trace")[:, 0].tolist()
            for index, first, cell_ids in trace:
                clean.setdefault(index, metric[first])
                corrupted.setdefault(index, metric[first + 1])
                for offset, cell_id in enumerate(cell_ids):
                    patched[index][cell_id] = metric[first + 2 + offset]
        return [self._record(item, clean[item.index], corrupted[item.index], patched[item.index]) for item in items]

    def _record(self, item: _Item, clean: float, corrupted: float, patched: dict[int, float]) -> ExampleRecord:
        denominator = clean - corrupted
        if abs(denominator) < 1e-6:
            note(
                f"example {item.pair.index}: clean and corrupted {self.experiment.metric} are equal "
                f"({clean:.4g}); its normalised effect is undefined (NaN); raw patched values are kept"
            )
        tensors = {}
        for site, (dims, coords) in item.axes.items():
            shape = tuple(len(coords[d]) for d in dims)
            raw = torch.full(shape, math.nan, dtype=torch.float32)
            for cell_id, cell in enumerate(item.cells):
                if cell.site == site:
                    # a cell in the shared prefix was not run: it equals the corrupted run
                    raw[cell.key] = patched[cell_id] if cell.needs_run else corrupted
            effect = (raw - corrupted) / denominator if abs(denominator) >= 1e-6 else torch.full(shape, math.nan)
            tensors[site] = LabelledTensor(effect.float(), dims, coords)
            tensors[f"{site}.patched"] = LabelledTensor(raw, dims, coords)
        return ExampleRecord(
            index=item.pair.index,
            tensors=tensors,
            scalars={"clean": clean, "corrupted": corrupted},
            info=item.pair.info(),
        )
