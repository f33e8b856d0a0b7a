"""Prefix sharing: each edited run computes only the tokens where it differs from a base run.

With causal attention, a run is identical to another run at every position before the
first position where their tokens or their edits differ, in every layer. A trace then
needs to compute an edited run only from that position `t` on, its tokens attending to
the other run's tokens before `t`. `prefix_tree` finds, for every run of one example,
the run it shares the longest prefix with (its *parent*, always one of the example's
base runs) and that prefix's length; `PackedLayout` lays an example's runs out as packed
sequences: its base runs (each, too, from where it departs from an earlier base run),
then every other run's tokens from its `t` on, with an explicit attention mask built
from the original positions ("tree attention") and the original position ids. A run
whose only edit is at its last position (knockout, last-position ablation) is then one
token; a patched cell at position p costs the tokens from p on.

This is a pure transformation of the planner's coordinates: every (run, position) maps
to (pack, packed index), so the plan stays plain data and runs as ONE forward pass of
one trace, here or on a server. The metrics read each run's next-token logits at its
metric position's packed index (from the final norm's output, through the unembedding).

Which copies are no-ops is decided exactly: copying run s's activation at position p
into a run that equals its parent q before p changes nothing when s and q agree before
p + 1 (both start from the same tokens and edits), which is how a patched cell in the
clean and corrupted prompts' shared prefix costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError

# Tokens per packed sequence (at least four times an example's base runs): attention
# over a pack costs its length squared, so packs stay short enough for attention to
# remain a small part of the forward pass.
PACK_TOKENS = 256

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class PrefixSharing:
    """What a packed plan needs of the model: where the final norm and the unembedding
    are (the metrics read the final norm's output at each run's metric position), and
    the attention mask's dtype: bool (SDPA), or a float dtype for an additive mask
    (eager attention)."""

    final_norm: str
    unembed: str
    mask_dtype: torch.dtype = torch.float32
    pack_tokens: int = PACK_TOKENS


def prefix_sharing(model, enabled: bool, longest: int) -> PrefixSharing | None:
    """The prefix sharing of traces on `model` when `enabled` (None when not), or a
    one-line refusal naming why the model cannot take it and the off switch. `longest`
    is the longest run's tokens."""
    if not enabled:
        return None
    config = model.hf.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"prefix sharing needs eager or sdpa attention, and {config.model_type} runs "
                          f"{implementation!r} attention, which ignores nnexp's packed attention mask; set "
                          "prefix_sharing=False (--no-prefix-sharing)")
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and longest > window:
        raise ConfigError(f"prefix sharing cannot encode {config.model_type}'s sliding attention window "
                          f"({window} tokens) for prompts of {longest} tokens; set prefix_sharing=False "
                          "(--no-prefix-sharing)")
    spec = model.arch.spec
    # SDPA takes a boolean mask whatever the model's dtype; eager attention adds the mask
    # to its scores, so it gets the additive form in the model's dtype
    dtype = model.hf.dtype if model.hf.dtype.is_floating_point else torch.float32
    return PrefixSharing(spec.final_norm, spec.unembed, torch.bool if implementation == "sdpa" else dtype)


# -- which run each run shares its prefix with ------------------------------------------------------


def _same_value(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and bool(torch.equal(a, b))


def same_edit(a, b) -> bool:
    """Whether two `RunEdit`s do the same thing (the same object, or equal fields)."""
    if a is b:
        return True
    if (a.point, a.kind, list(a.positions), a.head, a.source, a.with_source, a.key) != \
            (b.point, b.kind, list(b.positions), b.head, b.source, b.with_source, b.key) or a.fn is not b.fn:
        return False
    if not _same_value(a.values, b.values):
        return False
    pa, pb = a.params or {}, b.params or {}
    return pa.keys() == pb.keys() and all(_same_value(pa[k], pb[k]) for k in pa)


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class PrefixTree:
    """For each run of one example: `parents[r]` (a base run, or None for a run computed
    in full) and `starts[r]`, the first position where run r may differ from its parent
    (r equals it at every earlier position, in every layer)."""

    def __init__(self, ids: list[list[int]], runs: list, n_base: int) -> None:
        self.parents: list[int | None] = []
        self.starts: list[int] = []
        for r, run in enumerate(runs):
            candidates = range(r) if r < n_base else range(n_base)
            best, start = None, 0
            for q in candidates:  # on a tie, the later base run: the closer relative (a noised run, say)
                t = self._shared(ids, runs, r, q)
                if t > 0 and t >= start:
                    best, start = q, t
            self.parents.append(best)
            self.starts.append(start)

    def agree(self, x: int, y: int) -> float:
        """How many leading positions runs x and y (already placed) are known to agree on."""
        if x == y:
            return math.inf
        depth_x = self._path(x)
        least, node = math.inf, y
        while node is not None and node not in depth_x:
            least = min(least, self.starts[node])
            node = self.parents[node]
        if node is None:
            return 0
        return min(least, depth_x[node])

    def _path(self, x: int) -> dict[int, float]:
        """Each ancestor of x (x included) -> the least start on the way up to it."""
        out, least, node = {}, math.inf, x
        while node is not None:
            out[node] = least
            least = min(least, self.starts[node])
            node = self.parents[node]
        return out

    def _shared(self, ids, runs, r: int, q: int) -> int:
        """The prefix run r is sure to share with run q; 0 when q's edits are not all r's."""
        run, parent = runs[r], runs[q]
        own = [e for e in run.edits if e.kind != "read"]
        theirs = [e for e in parent.edits if e.kind != "read"]
        extra = list(own)
        for edit in theirs:
            match = next((i for i, e in enumerate(extra) if same_edit(e, edit)), None)
            if match is None:
                return 0
            extra.pop(match)
        t = _first_difference(ids[r], ids[q])
        for edit in extra:
            if edit.kind == "block":  # edits the attention of the last position only
                first = len(ids[r]) - 1
            elif edit.kind == "copy" and edit.source < len(self.starts):
                # a copy where the source agrees with the parent is a no-op
                agree = self.agree(edit.source, q)
                first = min((p for p in edit.positions if p >= agree), default=math.inf)
            else:
                first = min(edit.positions, default=math.inf)
            t = min(t, first)
        return int(t)


# -- packed sequences ----------------------------------------------------------------------------


class PackedLayout:
    """Runs of one trace laid out as packed sequences, one or more per example.

    Every pack of an example holds its base runs (then some of its other runs), each
    run r as a segment of its tokens from `starts[r]` on. `coordinate(row, p, pack)`
    is where position p of a row lives in that pack: its own segment when p >= its
    start, else (recursively) its parent's. A row's edits that change activations apply
    in every pack holding it (base runs are repeated, and computed alike, in each of
    their example's packs); its reads and metrics come from its primary pack."""

    def __init__(self, group_ids: list[list[list[int]]], group_runs: list[list], group_bases: list[int],
                 pad_id: int, sharing: PrefixSharing) -> None:
        self.ids: list[list[int]] = []
        self.parents: list[int | None] = []
        self.starts: list[int] = []
        self.packs_of: list[list[int]] = []  # row -> the packs holding it, its primary first
        self.index: list[dict[int, int]] = []  # pack -> {row: where its segment begins}
        segments: list[list[tuple[int, list[int], int]]] = []  # pack -> (row, tokens, first position)
        for ids, runs, n_base in zip(group_ids, group_runs, group_bases):
            first = len(self.ids)
            tree = PrefixTree(ids, runs, n_base)
            self.ids += ids
            self.parents += [None if p is None else first + p for p in tree.parents]
            self.starts += tree.starts
            self.packs_of += [[] for _ in runs]
            lengths = [len(ids[r]) - tree.starts[r] for r in range(len(runs))]
            base_tokens = sum(lengths[:n_base])
            cap = max(sharing.pack_tokens, 4 * base_tokens)
            variants = list(range(n_base, len(runs)))
            # as few packs as the cap allows, filled evenly (packs are right-padded to the longest)
            total = sum(lengths[n_base:])
            n_packs = max(1, math.ceil(total / (cap - base_tokens)))
            cap = base_tokens + math.ceil(total / n_packs)
            while True:
                pack = len(segments)
                members = list(range(n_base))
                used = base_tokens
                while variants and (used + lengths[variants[0]] <= cap or len(members) == n_base):
                    used += lengths[variants[0]]
                    members.append(variants.pop(0))
                self._add_pack(segments, pack, [first + r for r in members])
                if not variants:
                    break
        self.width = max((sum(len(self.ids[r]) - self.starts[r] for r in self.index[k]) for k in range(len(segments))),
                         default=1) or 1
        n = len(segments)
        self.input_ids = torch.full((n, self.width), pad_id, dtype=torch.long)
        self.position_ids = torch.zeros((n, self.width), dtype=torch.long)
        allowed = torch.zeros((n, self.width, self.width), dtype=torch.bool)
        for k in range(n):
            for row, begin in self.index[k].items():
                t, tokens = self.starts[row], self.ids[row]
                length = len(tokens) - t
                if length == 0:
                    continue
                self.input_ids[k, begin : begin + length] = torch.tensor(tokens[t:])
                self.position_ids[k, begin : begin + length] = torch.arange(t, len(tokens))
                keys = torch.tensor([self.coordinate(row, p, k) for p in range(len(tokens))])
                queries = torch.arange(begin, begin + length)
                visible = torch.arange(len(tokens))[None, :] <= torch.arange(t, len(tokens))[:, None]
                allowed[k, queries[:, None], keys[None, :]] = visible
            used = sum(len(self.ids[r]) - self.starts[r] for r in self.index[k])
            padding = torch.arange(used, self.width)
            allowed[k, padding, padding] = True  # padding attends to itself: no empty softmax
        if sharing.mask_dtype == torch.bool:
            self.attention_mask = allowed[:, None]
        else:
            mask = torch.zeros(allowed.shape, dtype=sharing.mask_dtype)
            self.attention_mask = mask.masked_fill(~allowed, torch.finfo(sharing.mask_dtype).min)[:, None]

    def _add_pack(self, segments: list, pack: int, rows: list[int]) -> None:
        begin = 0
        where = {}
        for row in rows:
            where[row] = begin
            begin += len(self.ids[row]) - self.starts[row]
            self.packs_of[row].append(pack)
        self.index.append(where)
        segments.append(rows)

    @property
    def tokens(self) -> int:
        """Real (unpadded) tokens over every pack: what the forward pass computes."""
        return sum(len(self.ids[r]) - self.starts[r] for k in range(len(self.index)) for r in self.index[k])

    def coordinate(self, row: int, p: int, pack: int) -> int:
        while p < self.starts[row]:
            row = self.parents[row]
        return self.index[pack][row] + p - self.starts[row]

    def places(self, row: int, p: int, changes: bool) -> list[tuple[int, int]]:
        """(pack, packed index) of an entry at position p of `row`: for an edit that
        changes activations, in every pack holding the row, and none before its start
        (there it equals its parent, which carries the edit if it has it); for a read,
        in its primary pack, wherever the position lives."""
        if changes:
            if p < self.starts[row]:
                return []
            return [(k, self.coordinate(row, p, k)) for k in self.packs_of[row]]
        k = self.packs_of[row][0]
        return [(k, self.coordinate(row, p, k))]

    def source_place(self, source: int, p: int, pack: int) -> tuple[int, int]:
        """Where a copy in `pack` reads position p of run `source`."""
        return pack, self.coordinate(source, p, pack)
