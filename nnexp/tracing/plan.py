"""A trace plan: everything one batched forward pass must do, as plain data.

Experiments never write trace code. They compile what they want into a `TracePlan`:

* the rows of one batch (token ids, left-padded, with attention mask and positions);
* for each hook point the forward pass reaches (in the order it reaches them), the
  operations to apply to that tensor, vectorised over rows: copy another row's
  activation (`CopyRows`, patching and restoring), add to it (`AddRows`, noise),
  overwrite it (`SetRows`, ablation), replace it by a function of itself and its
  parameters (`RewriteRows`: the declared edits of `nnexp.interventions`), read it
  (`ReadRows`), or block attention edges (`BlockAttention`, knockout);
* the metric(s) to compute from the next-token logits of every row (at its last
  position, or a given distance from its end), with what they compare against (a
  reference row, a set of answer tokens).

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

# The operations a trace applies to a hook point's tensor, vectorised over rows, by the
# name a run's `RunEdit.kind` gives (`nnexp.tracing.runs`). Each class builds itself from
# the flat entries the planner gathers for one hook point (`from_entries`). These are the
# trace's machinery; what users declare are the edits of `nnexp.interventions`, which
# lower to these.
OPERATIONS: Registry = Registry("trace operation")


def register_operation(name: str, description: str):
    """Class decorator: register a trace operation class under `name`."""

    def decorator(cls):
        OPERATIONS.register(name, cls, description=description)
        return cls

    return decorator


@register_operation("copy", "copy another row's activation at the same positions (patching, restoring), optionally one head's slice")
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
    source_positions: torch.Tensor | None = None  # where the source's values sit; None: `positions`

    def apply(self, x: torch.Tensor, point: HookPoint) -> None:
        sources = self.positions if self.source_positions is None else self.source_positions
        x[_selection(x, point, self.target_rows, self.positions, self.heads)] = \
            x[_selection(x, point, self.source_rows, sources, self.heads)]

    @classmethod
    def from_entries(cls, entries: dict) -> CopyRows:
        heads = torch.tensor(entries["heads"]) if entries.get("heads") else None
        return cls(torch.tensor(entries["rows"]), torch.tensor(entries["sources"]), torch.tensor(entries["positions"]),
                   heads, _positions(entries))

    def to(self, device) -> CopyRows:
        return CopyRows(
            self.target_rows.to(device),
            self.source_rows.to(device),
            self.positions.to(device),
            None if self.heads is None else self.heads.to(device),
            _to(self.source_positions, device),
        )


@register_operation("add", "add given vectors at positions (noise, steering)")
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


@register_operation("set", "overwrite positions with given vectors (zero or mean ablation)")
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


def _selection(x: torch.Tensor, point: HookPoint, rows: torch.Tensor, positions: torch.Tensor,
               heads: torch.Tensor | None) -> tuple:
    """The advanced index of entries (rows[i], positions[i]) of `x`, restricted to head
    heads[i]'s columns when `heads` is given: x[index] is [entries, features]. Head h of
    a "concat" layout owns columns h*d:(h+1)*d; columns are indexed rather than viewing
    [..., heads, d], which needs a contiguous tensor."""
    if heads is None:
        return rows, positions
    head_dim = x.shape[-1] // point.n_heads
    columns = heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=x.device)
    return rows.unsqueeze(1), positions.unsqueeze(1), columns


def _positions(entries: dict) -> torch.Tensor | None:
    """The source positions of a copy's or a rewrite's entries, when they differ from
    their targets' (a packed plan, `nnexp.tracing.prefix`)."""
    sources, targets = entries.get("source_positions"), entries.get("positions")
    return torch.tensor(sources) if sources and sources != targets else None


def _stack_params(params: list[dict]) -> dict[str, torch.Tensor]:
    """Per-entry parameters (one dict per entry) as one tensor per name, [entries, ...]."""
    if not params or not params[0]:
        return {}
    return {name: torch.stack([torch.as_tensor(p[name], dtype=torch.float32) for p in params])
            for name in params[0]}


@register_operation("rewrite", "replace the selected vectors by fn(vectors, **parameters[, source=vectors of "
                               "other rows]) (the declared edits: add, set, scale, project out, interpolate, "
                               "a user's function)")
@dataclass
class RewriteRows:
    """Replace `x[rows[i], positions[i]]` (head `heads[i]`'s slice when given) by
    `fn(current, **params)`, all entries at once.

    `current` is [entries, features] in float32; each parameter is a tensor with one
    row per entry ([entries] or [entries, features]); with `sources`, the same
    positions of those rows arrive as `source=` (interpolation between two runs). The
    result is cast back to the activation's dtype. `fn` must be a plain function of
    tensors: it runs wherever the model does, on the activation's device."""

    fn: object
    rows: torch.Tensor
    positions: torch.Tensor
    heads: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    params: dict = field(default_factory=dict)
    source_positions: torch.Tensor | None = None  # where the sources' values sit; None: `positions`

    def apply(self, x: torch.Tensor, point: HookPoint) -> None:
        index = _selection(x, point, self.rows, self.positions, self.heads)
        kwargs = {name: value.to(x.device) for name, value in self.params.items()}
        if self.sources is not None:
            where = self.positions if self.source_positions is None else self.source_positions
            kwargs["source"] = x[_selection(x, point, self.sources, where, self.heads)].float()
        x[index] = self.fn(x[index].float(), **kwargs).to(x.dtype)

    @classmethod
    def from_entries(cls, entries: dict) -> RewriteRows:
        heads = torch.tensor(entries["heads"]) if entries.get("heads") else None
        sources = torch.tensor(entries["sources"]) if entries.get("sources") else None
        return cls(entries["fn"], torch.tensor(entries["rows"]), torch.tensor(entries["positions"]), heads, sources,
                   _stack_params(entries["params"]), _positions(entries) if sources is not None else None)

    def to(self, device) -> RewriteRows:
        return RewriteRows(self.fn, self.rows.to(device), self.positions.to(device), _to(self.heads, device),
                           _to(self.sources, device), {name: value.to(device) for name, value in self.params.items()},
                           _to(self.source_positions, device))


@register_operation("read", "read the selected vectors (or their projection on a direction) and return them")
@dataclass
class ReadRows:
    """Return `x[rows[i], positions[i]]` (head `heads[i]`'s slice when given), in float32
    on the CPU: [entries, features], or [entries] projected on `directions[i]`
    ([entries, features]) so that only one number per entry leaves the trace (a probe).
    `key` names the read in what the trace returns."""

    key: str
    rows: torch.Tensor
    positions: torch.Tensor
    heads: torch.Tensor | None = None
    directions: torch.Tensor | None = None

    def apply(self, x: torch.Tensor, point: HookPoint) -> torch.Tensor:
        value = x[_selection(x, point, self.rows, self.positions, self.heads)].detach().float()
        if self.directions is not None:
            value = (value * self.directions).sum(-1)
        return value.cpu().clone()

    @classmethod
    def from_entries(cls, entries: dict) -> ReadRows:
        heads = torch.tensor(entries["heads"]) if entries.get("heads") else None
        directions = torch.stack(entries["directions"]).float() if entries.get("directions") else None
        return cls(entries["key"], torch.tensor(entries["rows"]), torch.tensor(entries["positions"]), heads,
                   directions)

    def to(self, device) -> ReadRows:
        return ReadRows(self.key, self.rows.to(device), self.positions.to(device), _to(self.heads, device),
                        _to(self.directions, device))


def _to(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


@register_operation("block", "block attention from the last position to given key positions (knockout)")
@dataclass
class BlockAttention:
    """Block attention from the last position (or, with `queries`, from the query
    index `queries[i]`) to the keys `keys[i]` in row `rows[i]`.

    Applied to the attention mask an attention module receives (an "attention_mask"
    hook point), so each row gets its own edges and every other row is untouched.
    The mask is edited in its own form: an additive float mask (eager attention)
    gets the dtype's minimum at the blocked (query, key) pairs, so those
    pre-softmax scores become the minimum; a boolean mask (SDPA) gets False there,
    which SDPA turns into -inf. Either way the blocked keys get exactly zero weight.
    Where the model passes no mask (SDPA without padding relies on `is_causal`),
    the causal mask is built first. `queries` is how a packed plan
    (`nnexp.tracing.prefix`) names the packed index of a run's last position.
    """

    rows: torch.Tensor
    keys: torch.Tensor  # [entries, tokens] bool, padded coordinates
    queries: torch.Tensor | None = None  # [entries]; None: the last position

    def edit_mask(self, mask: torch.Tensor | None, rows: int, tokens: int, device) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()[None, None]
        # never edit in place: every layer shares the mask the model built
        mask = mask.expand(rows, *mask.shape[1:]).clone() if mask.shape[0] == 1 else mask.clone()
        queries = torch.full_like(self.rows, mask.shape[-2] - 1) if self.queries is None else self.queries
        blocked = torch.zeros(len(self.rows), mask.shape[-1], dtype=torch.bool, device=mask.device)
        blocked[:, : self.keys.shape[1]] = self.keys
        current = mask[self.rows, :, queries, :]  # [entries, mask heads, keys]
        if mask.dtype == torch.bool:
            mask[self.rows, :, queries, :] = current & ~blocked[:, None, :]
        else:
            mask[self.rows, :, queries, :] = current.masked_fill(blocked[:, None, :], torch.finfo(mask.dtype).min)
        return mask

    @classmethod
    def from_entries(cls, entries: dict) -> BlockAttention:
        queries = torch.tensor(entries["queries"]) if entries.get("queries") else None
        return cls(torch.tensor(entries["rows"]), torch.stack(entries["keys"]), queries)

    def to(self, device) -> BlockAttention:
        return BlockAttention(self.rows.to(device), self.keys.to(device), _to(self.queries, device))


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
        metric_offsets: [rows], where each row's metrics read the next-token logits:
            1 = its last position, 2 = the one before... (None: the last, for all).
        reference_rows: [rows], the row each row's metrics compare with (a metric that
            needs a reference, e.g. KL divergence to the clean run); None: none.
        answer_sets: [rows, k] token ids, -1 for none (metrics over a set of answers).
        positions: explicit position ids, [rows, tokens] (packed plans); None: counted
            from each row's first real token.
        metric_index: [runs, 2], the (row, token) whose next-token logits each run's
            metrics read (packed plans, `nnexp.tracing.prefix`: the rows are packed
            sequences, the attention mask is [rows, 1, tokens, tokens]); None: each row
            is one run, read at its last position or `metric_offsets`.
        readout: (final norm, unembedding) module paths through which a packed plan's
            metrics compute the logits at `metric_index`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    edits: list[tuple[HookPoint, list]] = field(default_factory=list)
    metric: str | tuple[str, ...] = "logit_diff"
    answer_ids: torch.Tensor | None = None
    foil_ids: torch.Tensor | None = None
    metric_offsets: torch.Tensor | None = None
    reference_rows: torch.Tensor | None = None
    answer_sets: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    metric_index: torch.Tensor | None = None
    readout: tuple[str, str] | None = None

    @property
    def reads(self) -> list[str]:
        """The keys of the plan's reads, in the order the trace meets them."""
        return [op.key for _, ops in self.edits for op in ops if isinstance(op, ReadRows)]

    @property
    def n_rows(self) -> int:
        """The runs the plan computes (one metric row each)."""
        return self.input_ids.shape[0] if self.metric_index is None else self.metric_index.shape[0]

    @property
    def position_ids(self) -> torch.Tensor | None:
        """Positions counted from each row's first real token (None without padding), or
        the plan's explicit ones."""
        if self.positions is not None:
            return self.positions
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
