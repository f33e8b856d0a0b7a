"""Edited runs of one prompt, packed into trace plans.

The factual-recall analyses each turn one fact into a few *base* runs (the clean run;
for causal tracing also the noised runs) and many *variant* runs (one per knocked
window, ablated window or restored (layer, token)). A run is the fact's prompt plus
a list of `RunEdit`s, each saying what to do to one hook point's tensor in that row:

- "copy": take the value of the group's first run (the clean run) at `positions`;
- "add": add `values` at `positions` (noise);
- "set": overwrite with `values` at `positions` (zero or mean ablation);
- "block": block attention from the last position to the keys `positions`.

`pack_runs` splits the variants of many facts into traces of at most `max_rows` rows,
repeating a fact's base runs in every trace that holds some of its variants (the clean
run is the source of every copy). `build_plan` turns one trace's runs into a
`TracePlan` with ONE vectorised edit per (hook point, kind), whatever the number of
rows, so a trace costs one batched forward pass.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..sites import HookPoint
from .plan import AddRows, BlockAttention, CopyRows, SetRows, TracePlan, group_edits, left_pad

EDIT_KINDS = ("copy", "add", "set", "block")


@dataclass
class RunEdit:
    point: HookPoint
    kind: str
    positions: list[int]  # unpadded token positions (key positions for "block")
    values: torch.Tensor | None = None  # [len(positions), features] for "add" and "set"


@dataclass
class Run:
    edits: list[RunEdit] = field(default_factory=list)


@dataclass
class RunGroup:
    """One fact's runs in one trace: `runs[0]` is the clean run every copy reads from."""

    key: object  # the caller's handle on the fact
    ids: list[int]
    answer: int
    foil: int
    runs: list[Run]
    variants: list[int]  # which of the fact's variants runs[n_base:] are


def pack_runs(facts: list[tuple[object, list[int], int, int, list[Run], list[Run]]],
              max_rows: int | None) -> list[list[RunGroup]]:
    """Traces of at most `max_rows` rows from (key, ids, answer, foil, base runs, variant runs)."""
    traces: list[list[RunGroup]] = []
    current: list[RunGroup] = []
    used = 0
    for key, ids, answer, foil, base, variants in facts:
        if max_rows is not None and max_rows < len(base) + 1:
            raise ConfigError(f"max_rows is {max_rows}; this experiment needs at least {len(base) + 1} rows per trace "
                              f"({len(base)} base runs per fact and one edited run)")
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


def build_plan(groups: list[RunGroup], pad_id: int, metric) -> tuple[TracePlan, list[int]]:
    """The trace plan of `groups`, and the first row of each group."""
    sequences, answer, foil, firsts = [], [], [], []
    for group in groups:
        firsts.append(len(sequences))
        sequences += [group.ids] * len(group.runs)
        answer += [group.answer] * len(group.runs)
        foil += [group.foil] * len(group.runs)
    input_ids, attention_mask, offsets = left_pad(sequences, pad_id)
    width = input_ids.shape[1]

    # flat entries per (hook point, kind): rows, positions, sources / values / key masks
    entries: dict = defaultdict(lambda: defaultdict(list))
    for group, first in zip(groups, firsts):
        offset = offsets[first]
        for r, run in enumerate(group.runs):
            row = first + r
            for edit in run.edits:
                if edit.kind not in EDIT_KINDS:
                    raise ValueError(f"unknown edit kind {edit.kind!r}")
                slot = entries[(edit.point, edit.kind)]
                if edit.kind == "block":
                    keys = torch.zeros(width, dtype=torch.bool)
                    keys[[offset + p for p in edit.positions]] = True
                    slot["rows"].append(row)
                    slot["keys"].append(keys)
                    continue
                slot["rows"] += [row] * len(edit.positions)
                slot["positions"] += [offset + p for p in edit.positions]
                if edit.kind == "copy":
                    slot["sources"] += [first] * len(edit.positions)
                else:
                    slot["values"].append(edit.values)
    edits: dict[HookPoint, list] = defaultdict(list)
    for (point, kind), slot in entries.items():
        if kind == "block":
            edits[point].append(BlockAttention(torch.tensor(slot["rows"]), torch.stack(slot["keys"])))
            continue
        rows, positions = torch.tensor(slot["rows"]), torch.tensor(slot["positions"])
        if kind == "copy":
            edits[point].append(CopyRows(rows, torch.tensor(slot["sources"]), positions))
        else:
            edit_type = AddRows if kind == "add" else SetRows
            edits[point].append(edit_type(rows, positions, torch.cat(slot["values"])))
    plan = TracePlan(
        input_ids=input_ids,
        attention_mask=attention_mask,
        edits=group_edits(edits),
        metric=metric,
        answer_ids=torch.tensor(answer),
        foil_ids=torch.tensor(foil),
    )
    return plan, firsts


def window(layer: int, size: int, n_layers: int) -> list[int]:
    """`size` layers centred on `layer`, cut at the model's ends: [l - size//2, l - size//2 + size)
    (size 9: l-4..l+4; size 10: l-5..l+4, as in ROME)."""
    start = layer - size // 2
    return list(range(max(0, start), min(n_layers, start + size)))
