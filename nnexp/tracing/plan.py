"""A trace plan: everything one batched forward pass must do, as plain data.

Experiments never write trace code. They compile what they want into a `TracePlan`:

* the rows of one batch (token ids, left-padded, with attention mask and positions);
* for each hook point the forward pass reaches (in the order it reaches them), the
  edits to apply to that tensor, vectorised over rows: copy another row's activation
  (`CopyRows`, patching and restoring), add to it (`AddRows`, noise), overwrite it
  (`SetRows`, ablation), or block attention edges (`BlockAttention`, knockout);
* the metric(s) to compute from the last-position logits of every row.

`nnexp.tracing.execute.run_plan` runs a plan as ONE nnsight trace. Because a plan is
tensors and small dataclasses, it can be built, inspected and tested without a
model, and the same plan can travel to a remote executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..registry import Registry
from ..sites import HookPoint

# The edits a trace applies to a hook point's tensor, vectorised over rows, by the name
# a run's `RunEdit.kind` gives (`nnexp.tracing.runs`). Each class builds itself from the
# flat entries the planner gathers for one hook point (`from_entries`).
EDITS: Registry = Registry("edit")


def register_edit(name: str, description: str):
    """Class decorator: register an edit class under `name`."""

    def decorator(cls):
        EDITS.register(name, cls, description=description)
        return cls

    return decorator


@register_edit("copy", "copy another row's activation at the same positions (patching, restoring), optionally one head's slice")
@dataclass
class CopyRows:
    """Copy activations from source rows into target rows, entry by entry.

    Entry i copies `x[source_rows[i], positions[i]]` into `x[target_rows[i], positions[i]]`,
    restricted to head `heads[i]`'s slice of the last dimension when `heads` is given.
    This is activation patching: the source is the clean run, the target a copy of
    the corrupted run, at the same hook point of the same forward pass.
    """

    target_rows: torch.Tensor
    source_rows: torch.Tensor
    positions: torch.Tensor
    heads: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, point: HookPoint) -> None:
        if self.heads is None:
            x[self.target_rows, self.positions] = x[self.source_rows, self.positions]
            return
        # Head h of a "concat" layout owns columns h*d:(h+1)*d. Index columns rather
        # than viewing [.., heads, d], which needs a contiguous tensor.
        head_dim = x.shape[-1] // point.n_heads
        columns = self.heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=x.device)
        rows_t = self.target_rows.unsqueeze(1)
        rows_s = self.source_rows.unsqueeze(1)
        positions = self.positions.unsqueeze(1)
        x[rows_t, positions, columns] = x[rows_s, positions, columns]

    @classmethod
    def from_entries(cls, entries: dict) -> CopyRows:
        heads = torch.tensor(entries["heads"]) if entries.get("heads") else None
        return cls(torch.tensor(entries["rows"]), torch.tensor(entries["sources"]), torch.tensor(entries["positions"]),
                   heads)

    def to(self, device) -> CopyRows:
        return CopyRows(
            self.target_rows.to(device),
            self.source_rows.to(device),
            self.positions.to(device),
            None if self.heads is None else self.heads.to(device),
        )


@register_edit("add", "add given vectors at positions (noise, steering)")
@dataclass
class AddRows:
    """Add `values[i]` to `x[rows[i], positions[i]]` (e.g. noise on the subject's embeddings)."""

    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor  # [entries, features]

    def apply(self, x: torch.Tensor, point: HookPoint) -> None:
        x[self.rows, self.positions] += self.values.to(x.dtype)

    @classmethod
    def from_entries(cls, entries: dict) -> AddRows:
        return cls(torch.tensor(entries["rows"]), torch.tensor(entries["positions"]), torch.cat(entries["values"]))

    def to(self, device) -> AddRows:
        return AddRows(self.rows.to(device), self.positions.to(device), self.values.to(device))


@register_edit("set", "overwrite positions with given vectors (zero or mean ablation)")
@dataclass
class SetRows:
    """Overwrite `x[rows[i], positions[i]]` with `values[i]` (zero or mean ablation)."""

    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor  # [entries, features]

    def apply(self, x: torch.Tensor, point: HookPoint) -> None:
        x[self.rows, self.positions] = self.values.to(x.dtype)

    @classmethod
    def from_entries(cls, entries: dict) -> SetRows:
        return cls(torch.tensor(entries["rows"]), torch.tensor(entries["positions"]), torch.cat(entries["values"]))

    def to(self, device) -> SetRows:
        return SetRows(self.rows.to(device), self.positions.to(device), self.values.to(device))


@register_edit("block", "block attention from the last position to given key positions (knockout)")
@dataclass
class BlockAttention:
    """Block attention from the last position to `keys[i]` in row `rows[i]`.

    Applied to the attention mask an attention module receives (an "attention_mask"
    hook point), so each row gets its own edges and every other row is untouched.
    The mask is edited in its own form: an additive float mask (eager attention)
    gets the dtype's minimum at the blocked (last query, key) pairs, so those
    pre-softmax scores become the minimum; a boolean mask (SDPA) gets False there,
    which SDPA turns into -inf. Either way the blocked keys get exactly zero weight.
    Where the model passes no mask (SDPA without padding relies on `is_causal`),
    the causal mask is built first.
    """

    rows: torch.Tensor
    keys: torch.Tensor  # [entries, tokens] bool, padded coordinates

    def edit_mask(self, mask: torch.Tensor | None, rows: int, tokens: int, device) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None, None]
        # never edit in place: every layer shares the mask the model built
        mask = mask.expand(rows, *mask.shape[1:]).clone() if mask.shape[0] == 1 else mask.clone()
        blocked = torch.zeros(rows, mask.shape[-1], dtype=torch.bool, device=mask.device)
        blocked[self.rows, : self.keys.shape[1]] = self.keys
        last = mask[:, :, -1, :]
        if mask.dtype == torch.bool:
            mask[:, :, -1, :] = last & ~blocked[:, None, :]
        else:
            mask[:, :, -1, :] = last.masked_fill(blocked[:, None, :], torch.finfo(mask.dtype).min)
        return mask

    @classmethod
    def from_entries(cls, entries: dict) -> BlockAttention:
        return cls(torch.tensor(entries["rows"]), torch.stack(entries["keys"]))

    def to(self, device) -> BlockAttention:
        return BlockAttention(self.rows.to(device), self.keys.to(device))


@dataclass
class TracePlan:
    """One batched forward pass and its edits.

    Attributes:
        input_ids: [rows, tokens], left-padded.
        attention_mask: [rows, tokens], 0 on padding.
        edits: (hook point, edits) pairs sorted in forward order.
        metric: name of the metric in `nnexp.metrics`, or a tuple of names (the trace
            then returns [rows, metrics]).
        answer_ids, foil_ids: [rows] token ids the metric compares.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    edits: list[tuple[HookPoint, list]] = field(default_factory=list)
    metric: str | tuple[str, ...] = "logit_diff"
    answer_ids: torch.Tensor | None = None
    foil_ids: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor | None:
        """Positions counted from each row's first real token (None without padding)."""
        if bool(self.attention_mask.all()):
            return None
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Left-pad token id lists into [rows, width]; also return each row's pad offset."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = []
    for row, seq in enumerate(sequences):
        offset = width - len(seq)
        ids[row, offset:] = torch.tensor(seq, dtype=torch.long)
        mask[row, offset:] = 1
        offsets.append(offset)
    return ids, mask, offsets


def row_batches(items: list, max_rows: int | None = None, limit: int | None = None) -> list[list]:
    """`items` in consecutive batches of at most `max_rows` (the user's bound) and at most
    `limit` (e.g. what a memory budget allows); one batch when neither is given."""
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows is {max_rows}; a trace needs at least 1 row")
    size = min([len(items)] + [x for x in (max_rows, limit) if x is not None])
    return [items[start : start + size] for start in range(0, len(items), size)] if items else []


def group_edits(entries: dict[HookPoint, list]) -> list[tuple[HookPoint, list]]:
    """Hook points in the order the forward pass computes them."""
    return sorted(entries.items(), key=lambda item: item[0].order)
