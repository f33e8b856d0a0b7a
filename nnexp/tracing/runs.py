"""Edited runs of one prompt, packed into trace plans: the one planner of every kind
whose traces are edited runs (activation patching, attention knockout, sublayer
knockout, causal tracing, and the runs users declare with `nnexp.interventions`).

Each such kind turns one example into a few *base* runs (the clean run; for patching
also the corrupted run; for causal tracing the noised runs) and many *variant* runs
(one per patched cell, knocked window, ablated window or restored (layer, token)). A
run is the example's prompt (or its own token ids, e.g. the corrupted prompt of a
patching pair, of the same length) plus a list of `RunEdit`s, each saying what to do
to one hook point's tensor in that row, optionally restricted to one attention head:

- "copy": take the value of one of the group's base runs (`source`; the first, the
  clean run, by default) at `positions`;
- "add": add `values` at `positions` (noise);
- "set": overwrite with `values` at `positions` (zero or mean ablation);
- "rewrite": replace the vectors at `positions` by `fn(vectors, **params)` (optionally
  with a base run's vectors as `source=`): the declared edits of `nnexp.interventions`;
- "read": return the vectors at `positions` (or their projection on `values`);
- "block": block attention from the last position to the keys `positions`.

A run may also say which base run its metrics compare with (`reference`), where they
read the logits (`metric_offset` from the end) and a set of answer tokens (`answers`).

`pack_runs` splits the variants of many examples into traces of at most `max_rows`
rows, repeating an example's base runs in every trace that holds some of its variants
(the clean run is the source of every copy). `build_plan` turns one trace's runs into a
`TracePlan` with ONE vectorised edit per (hook point, kind), whatever the number of
rows, so a trace costs one batched forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..sites import HookPoint
from .plan import OPERATIONS, TracePlan, group_edits, left_pad
from .prefix import PackedLayout, PrefixSharing


@dataclass
class RunEdit:
    point: HookPoint
    kind: str  # a trace operation (`nnexp.tracing.plan.OPERATIONS`)
    positions: list[int]  # unpadded token positions (key positions for "block")
    values: torch.Tensor | None = None  # [len(positions), features] for "add" and "set"
    head: int | None = None  # restrict the edit to this head's slice (head sites)
    source: int = 0  # "copy", and "rewrite" with `with_source`: which of the group's runs to read from
    fn: object = None  # "rewrite": fn(current, **params[, source=...]) -> new values
    params: dict | None = None  # "rewrite": its parameters (floats or [features] tensors)
    with_source: bool = False  # "rewrite": pass the source run's values as `source=`
    key: str | None = None  # "read": the name its values come back under


@dataclass
class Run:
    edits: list[RunEdit] = field(default_factory=list)
    ids: list[int] | None = None  # the run's own token ids; None: the group's prompt
    reference: int | None = None  # the group's run its metrics compare with (metrics that need one)
    metric_offset: int = 1  # where its metrics read the next-token logits: 1 = the last position
    answers: tuple[int, ...] = ()  # a set of answer tokens (metrics that need one)


@dataclass
class RunGroup:
    """One fact's runs in one trace: `runs[0]` is the clean run every copy reads from."""

    key: object  # the caller's handle on the fact
    ids: list[int]
    answer: int
    foil: int
    runs: list[Run]
    variants: list[int]  # which of the fact's variants runs[n_base:] are


def pack_runs(examples: list[tuple[object, list[int], int, int, list[Run], list[Run]]],
              max_rows: int | None) -> list[list[RunGroup]]:
    """Traces of at most `max_rows` rows from (key, ids, answer, foil, base runs, variant runs)."""
    traces: list[list[RunGroup]] = []
    current: list[RunGroup] = []
    used = 0
    for key, ids, answer, foil, base, variants in examples:
        if max_rows is not None and max_rows < len(base) + 1:
            raise ConfigError(f"max_rows is {max_rows}; this experiment needs at least {len(base) + 1} rows per trace "
                              f"({len(base)} base runs per example and one edited run)")
        per_part = len(variants) if max_rows is None else max_rows - len(base)
        chunks = [list(range(i, min(i + per_part, len(variants)))) for i in range(0, len(variants), max(per_part, 1))]
        for part in chunks or [[]]:
            rows = len(base) + len(part)
            if current and max_rows is not None and used + rows > max_rows:
                traces.append(current)
                current, used = [], 0
            current.append(RunGroup(key, ids, answer, foil, base + [variants[i] for i in part], part))
            used += rows
    if current:
        traces.append(current)
    return traces


# "read" operations come after every edit of their hook point: a read sees what flows on
READ_STEP = 1 << 20


def build_plan(groups: list[RunGroup], pad_id: int, metric,
               sharing: PrefixSharing | None = None) -> tuple[TracePlan, list[int]]:
    """The trace plan of `groups`, and the first row of each group. With `sharing`
    (`nnexp.tracing.prefix`), the runs are packed so that each computes only the tokens
    where it departs from a base run; without, each row is a left-padded run in full."""
    sequences, answer, foil, firsts, runs, bases = [], [], [], [], [], []
    for group in groups:
        firsts.append(len(sequences))
        sequences += [group.ids if run.ids is None else run.ids for run in group.runs]
        answer += [group.answer] * len(group.runs)
        foil += [group.foil] * len(group.runs)
        runs += group.runs
        bases.append(len(group.runs) - len(group.variants))
    layout = _PaddedLayout(sequences, pad_id)
    if sharing is not None:
        packed = PackedLayout([sequences[f : f + len(g.runs)] for g, f in zip(groups, firsts)],
                              [g.runs for g in groups], bases, pad_id, sharing)
        # packing pays when runs share prefixes; where they share none (every edit at the
        # first position), the rows in full are the cheaper trace
        if packed.input_ids.numel() < layout.input_ids.numel():
            layout = packed
        else:
            sharing = None
    width = layout.input_ids.shape[1]

    # flat entries per (hook point, operation, per head or not, function, step): rows,
    # positions, sources / heads / values / parameters / key masks, in the layout's
    # coordinates (a left-padded row, or a pack and a packed index). The step is the
    # edit's place among its run's edits at that hook point, so that edits of one run at
    # one hook point apply in the order they were declared.
    entries: dict = defaultdict(lambda: defaultdict(list))
    for group, first in zip(groups, firsts):
        for r, run in enumerate(group.runs):
            row = first + r
            steps: dict = defaultdict(int)
            for edit in run.edits:
                OPERATIONS.get(edit.kind)  # an unknown operation fails here, naming the known ones
                source = first + edit.source
                if (edit.kind == "copy" or edit.with_source) and len(sequences[source]) != len(sequences[row]):
                    raise ValueError("a run that reads another run's activations must have as many tokens as it")
                step = READ_STEP if edit.kind == "read" else steps[edit.point]
                steps[edit.point] += edit.kind != "read"
                slot = entries[(edit.point, edit.kind, edit.head is not None, edit.fn, edit.key, step)]
                if edit.kind == "block":
                    last = len(sequences[row]) - 1
                    for pack, query in layout.places(row, last, True):
                        keys = torch.zeros(width, dtype=torch.bool)
                        keys[[layout.coordinate(row, p, pack) for p in edit.positions]] = True
                        slot["rows"].append(pack)
                        slot["keys"].append(keys)
                        slot["queries"].append(query)
                    continue
                changes = edit.kind != "read"
                for i, p in enumerate(edit.positions):
                    for pack, index in layout.places(row, p, changes):
                        slot["rows"].append(pack)
                        slot["positions"].append(index)
                        if edit.head is not None:
                            slot["heads"].append(edit.head)
                        if edit.kind == "copy" or edit.with_source:
                            source_row, source_index = layout.source_place(source, p, pack)
                            slot["sources"].append(source_row)
                            slot["source_positions"].append(source_index)
                        if edit.kind == "rewrite":
                            slot["params"].append(edit.params or {})
                        elif edit.kind == "read" and edit.values is not None:  # a probe direction per position
                            slot["directions"].append(edit.values[i])
                        elif edit.kind in ("add", "set"):
                            slot["values"].append(edit.values[i : i + 1])
                if edit.kind == "rewrite":
                    slot["fn"] = edit.fn
                elif edit.kind == "read":
                    slot["key"] = edit.key
    edits: dict[HookPoint, list] = defaultdict(list)
    for (point, kind, _, _, _, _step), slot in sorted(entries.items(), key=lambda entry: entry[0][5]):
        if kind != "read" and not slot["rows"]:
            continue  # every entry fell in shared prefixes: nothing to change
        edits[point].append(OPERATIONS.get(kind).from_entries(slot))
    plan = TracePlan(
        input_ids=layout.input_ids,
        attention_mask=layout.attention_mask,
        edits=group_edits(edits),
        metric=metric,
        answer_ids=torch.tensor(answer),
        foil_ids=torch.tensor(foil),
    )
    if any(run.reference is not None for run in runs):
        plan.reference_rows = torch.tensor([first + (run.reference if run.reference is not None else r)
                                            for group, first in zip(groups, firsts)
                                            for r, run in enumerate(group.runs)])
    if sharing is not None:
        plan.positions = layout.position_ids
        plan.readout = (sharing.final_norm, sharing.unembed)
        plan.metric_index = torch.tensor([layout.places(row, len(sequences[row]) - run.metric_offset, False)[0]
                                          for row, run in enumerate(runs)])
    elif any(run.metric_offset != 1 for run in runs):
        plan.metric_offsets = torch.tensor([run.metric_offset for run in runs])
    if any(run.answers for run in runs):
        k = max(len(run.answers) for run in runs)
        plan.answer_sets = torch.tensor([list(run.answers) + [-1] * (k - len(run.answers)) for run in runs])
    return plan, firsts


class _PaddedLayout:
    """Every run a row of its own, left-padded: position p of row r is (r, pad + p)."""

    def __init__(self, sequences: list[list[int]], pad_id: int) -> None:
        self.input_ids, self.attention_mask, self.offsets = left_pad(sequences, pad_id)

    def coordinate(self, row: int, p: int, pack: int) -> int:
        return self.offsets[row] + p

    def places(self, row: int, p: int, changes: bool) -> list[tuple[int, int]]:
        return [(row, self.offsets[row] + p)]

    def source_place(self, source: int, p: int, pack: int) -> tuple[int, int]:
        return source, self.offsets[source] + p


def window(layer: int, size: int, n_layers: int) -> list[int]:
    """`size` layers centred on `layer`, cut at the model's ends: [l - size//2, l - size//2 + size)
    (size 9: l-4..l+4; size 10: l-5..l+4, as in ROME)."""
    start = layer - size // 2
    return list(range(max(0, start), min(n_layers, start + size)))
