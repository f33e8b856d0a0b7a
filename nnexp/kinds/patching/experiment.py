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
from ...data import PromptPair, TokenizedPair, load_prompt_pairs, tokenize_pair
from ...errors import ConfigError
from ...experiment import Experiment
from ...labelled import LabelledTensor
from ...metrics import get_metric
from ...results import ExampleRecord
from ...sites import HEAD_SITES, check_heads, check_layers, check_site, resolve_site
from ...tracing.execute import run_plans
from ...tracing.memory import rows_for_budget, tightest
from ...tracing.plan import CopyRows, TracePlan, group_edits, left_pad


def _check_positions(value, field_name: str):
    if value in ("each", "all"):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, int) and not isinstance(p, bool) for p in value):
        if len(set(value)) != len(value):
            raise ConfigError(f"{field_name} {list(value)} name a position twice; list each position once")
        return list(value)
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

    sites: tuple = ("resid_post",)
    positions: object = "each"
    head_positions: object = "all"
    layers: tuple | None = None
    heads: tuple | None = None
    metric: str = "logit_diff"
    skip_shared_prefix: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sites, str):
            self.sites = (self.sites,)
        if not self.sites:
            raise ConfigError("sites is empty; name at least one site to patch")
        for site in self.sites:
            check_site(site)
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"sites {list(self.sites)} name a site twice; list each site once")
        self.sites = tuple(self.sites)
        self.positions = _check_positions(self.positions, "positions")
        self.head_positions = _check_positions(self.head_positions, "head_positions")
        get_metric(self.metric)

    def read_data_file(self, path: str) -> list[PromptPair]:
        return load_prompt_pairs(path)

    def compile(self, model) -> CompiledPatching:
        return CompiledPatching(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import patching_figures

        return patching_figures(self, results, out_dir)


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


class CompiledPatching:
    """A `PatchingExperiment` bound to a model: validated, and able to run examples."""

    def __init__(self, experiment: PatchingExperiment, model) -> None:
        self.experiment = experiment
        self.model = model
        arch = model.arch
        self.layers = check_layers(None if experiment.layers is None else list(experiment.layers), arch)
        self.heads = check_heads(None if experiment.heads is None else list(experiment.heads), arch)
        self.points = {
            (site, layer): resolve_site(site, layer, arch) for site in experiment.sites for layer in self.layers
        }
        self.pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        self.rows_per_trace: int | None = None  # set by a memory budget

    def set_memory_budget(self, items: list[_Item], budget: int) -> int:
        """Cap the rows per trace so that a trace's activations peak under `budget`
        bytes on every device (measured at the longest example's length)."""
        tokens = max(item.pair.n_tokens for item in items)
        self.rows_per_trace = rows_for_budget(self.model, budget, tokens, minimum=3,
                                              what="a patching trace (clean, corrupted and one patched run)")
        return self.rows_per_trace

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
            is_head = site in HEAD_SITES
            spec = self.experiment.head_positions if is_head else self.experiment.positions
            if spec == "all":
                groups = [list(range(n))]
                position_labels = None
            else:
                chosen = list(range(n)) if spec == "each" else [self._position(p, n, index) for p in spec]
                groups = [[p] for p in chosen]
                position_labels = chosen
            dims: tuple[str, ...] = ("layer", "head") if is_head else ("layer",)
            coords: dict[str, list] = {"layer": list(self.layers)}
            if is_head:
                coords["head"] = list(self.heads)
            if position_labels is not None:
                dims += ("position",)
                coords["position"] = position_labels
            axes[site] = (dims, coords)
            for li, layer in enumerate(self.layers):
                for hi, head in enumerate(self.heads if is_head else [None]):
                    for pi, positions in enumerate(groups):
                        key = (li,) + ((hi,) if is_head else ()) + ((pi,) if position_labels is not None else ())
                        cells.append(_Cell(site, key, layer, positions, head, needs_run=max(positions) >= shared))
        return _Item(pair, cells, axes)

    @staticmethod
    def _position(p: int, n: int, index: int) -> int:
        if not -n <= p < n:
            raise ConfigError(
                f"position {p} is out of range for example {index}, which has {n} tokens "
                f"(0-{n - 1}; negative positions count from the end)"
            )
        return p % n

    # -- running ----------------------------------------------------------------

    def plans(self, items: list[_Item], max_rows: int | None = None) -> list[tuple[list, TracePlan]]:
        """The trace plans for `items`: as few as `max_rows` allows, each with its layout
        (which cells of which example each row group holds)."""
        return [(trace, self._plan(trace)) for trace in _pack(items, tightest(max_rows, self.rows_per_trace))]

    def run(self, items: list[_Item], max_rows: int | None = None) -> list[ExampleRecord]:
        """Run the sweeps of `items`, packed into as few traces as `max_rows` allows."""
        clean = {}
        corrupted = {}
        patched: dict[int, dict[int, float]] = defaultdict(dict)  # example -> cell -> metric
        laid_out = self.plans(items, max_rows)
        for (trace, _), values in zip(laid_out, run_plans(self.model, [plan for _, plan in laid_out])):
            row = 0
            for item, cell_ids in trace:
                clean.setdefault(item.pair.index, float(values[row]))
                corrupted.setdefault(item.pair.index, float(values[row + 1]))
                for offset, cell_id in enumerate(cell_ids):
                    patched[item.pair.index][cell_id] = float(values[row + 2 + offset])
                row += 2 + len(cell_ids)
        return [
            self._record(item, clean[item.pair.index], corrupted[item.pair.index], patched[item.pair.index])
            for item in items
        ]

    def _plan(self, trace: list[tuple[_Item, list[int]]]) -> TracePlan:
        sequences, answer, foil = [], [], []
        owners = []  # (item, first row)
        for item, cell_ids in trace:
            owners.append((item, len(sequences)))
            sequences += [item.pair.clean_ids, item.pair.corrupted_ids] + [item.pair.corrupted_ids] * len(cell_ids)
            answer += [item.pair.answer_id] * (2 + len(cell_ids))
            foil += [item.pair.foil_id] * (2 + len(cell_ids))
        input_ids, attention_mask, offsets = left_pad(sequences, self.pad_id)

        # Gather every copy as flat (target row, source row, position, head) entries per
        # hook point, so each point gets one vectorised edit for the whole batch.
        entries: dict = defaultdict(lambda: ([], [], [], []))
        for (item, first), (_, cell_ids) in zip(owners, trace):
            offset = offsets[first]
            for k, cell_id in enumerate(cell_ids):
                cell = item.cells[cell_id]
                target, source, positions, heads = entries[(cell.site, cell.layer)]
                for p in cell.positions:
                    target.append(first + 2 + k)
                    source.append(first)
                    positions.append(offset + p)
                    heads.append(cell.head)
        edits = {}
        for (site, layer), (target, source, positions, heads) in entries.items():
            point = self.points[(site, layer)]
            edits[point] = [
                CopyRows(
                    torch.tensor(target),
                    torch.tensor(source),
                    torch.tensor(positions),
                    torch.tensor(heads) if site in HEAD_SITES else None,
                )
            ]
        return TracePlan(
            input_ids=input_ids,
            attention_mask=attention_mask,
            edits=group_edits(edits),
            metric=self.experiment.metric,
            answer_ids=torch.tensor(answer),
            foil_ids=torch.tensor(foil),
        )

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


def _pack(items: list[_Item], max_rows: int | None) -> list[list[tuple[_Item, list[int]]]]:
    """Split the items' cells into traces of at most `max_rows` rows.

    Every part of an example carries that example's clean and corrupted rows (the
    patch sources), so an example split across traces costs two extra rows per part.
    """
    if max_rows is not None and max_rows < 3:
        raise ConfigError(f"max_rows is {max_rows}; a trace needs at least 3 rows (clean, corrupted, one patched run)")
    traces: list[list[tuple[_Item, list[int]]]] = []
    current: list[tuple[_Item, list[int]]] = []
    used = 0
    for item in items:
        cell_ids = item.run_cells
        per_part = max(1, len(cell_ids)) if max_rows is None else max_rows - 2
        parts = [cell_ids[i : i + per_part] for i in range(0, len(cell_ids), per_part)] or [[]]
        for part in parts:
            rows = 2 + len(part)
            if current and max_rows is not None and used + rows > max_rows:
                traces.append(current)
                current, used = [], 0
            current.append((item, part))
            used += rows
    if current:
        traces.append(current)
    return traces

