"""Roles: named positions that line examples of different templates and lengths up.

A position's number means nothing across templates ("After John and Mary went to the
store, Mary gave a bottle of milk to" and "Then, John and Mary had a long argument.
Afterwards Mary said to" put S2 at different positions), so dataset averages are taken
over roles, as the IOI paper and its replications do, and examples of any template
and length average into one figure. A role is a list of positions of one example (a
range of tokens is averaged within the example first).

- Examples whose data names roles by their words (`"roles": {"IO": " John", "S": " Mary"}`,
  as IOI's generator and any user's data record may): a word found once is its role
  ("IO"), a word found several times is numbered in order ("S1", "S2"); the last
  position is "END" (unless a named role is there); the token right after a named
  position is "<role>+1" ("S1+1"), and the rest of the tokens up to the next named
  position one range "<role>+2..<next>-1" ("S1+2..S2-1"). Positions before the first
  named one (a BOS token, "After") are not roles.
- Facts (`info["subject_tokens"]`, the subject's token span): ROME's categories
  (`token_categories`): first / middle / last subject token, first subsequent token,
  further tokens, last token.

`roles_of(record)` gives an example's roles; `align(records, name)` turns a tensor with a
"position" axis into one with a "role" axis (NaN where an example lacks the role),
ready for `nnexp.statistics.bootstrap`, which then averages each role over the
examples that have it.
"""

from __future__ import annotations

import math

import torch

from .labelled import LabelledTensor

END = "END"
FACT_CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
                   "first subsequent token", "further tokens", "last token")


def token_categories(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """Positions of each of ROME's categories for a prompt of `n_tokens` whose subject
    spans [start, end). Categories do not overlap: a one-token subject is its first
    token (and also its last), the last token is only "last token", and positions
    before the subject (a BOS token) belong to none."""
    start, end = subject
    last = n_tokens - 1
    subject_positions = [p for p in range(start, end) if p != last]
    after = [p for p in range(end, last)]
    return {
        "first subject token": subject_positions[:1],
        "middle subject tokens": subject_positions[1:-1],
        "last subject token": subject_positions[-1:],
        "first subsequent token": after[:1],
        "further tokens": after[1:],
        "last token": [last],
    }


def named_positions(tokens: list[str], words: dict[str, str]) -> dict[int, str]:
    """Position -> role for each token that is a role's word (compared without
    surrounding spaces): a word found once keeps its role's name ("IO"), one found
    several times is numbered in order ("S1", "S2")."""
    out: dict[int, str] = {}
    for role, word in words.items():
        positions = [p for p, token in enumerate(tokens) if token.strip() and token.strip() == word.strip()]
        for k, position in enumerate(positions):
            out[position] = role if len(positions) == 1 else f"{role}{k + 1}"
    return out


def word_roles(tokens: list[str], words: dict[str, str]) -> dict[str, list[int]]:
    """The roles of a prompt whose roles are named by their words (see the module
    docstring), in position order."""
    if not tokens:
        return {}
    anchors = named_positions(tokens, words)
    last = len(tokens) - 1
    anchors.setdefault(last, END)
    marks = sorted(anchors)
    roles: dict[str, list[int]] = {}
    for k, position in enumerate(marks):
        name = anchors[position]
        roles[name] = [position]
        if k + 1 < len(marks):
            following = marks[k + 1]
            between = list(range(position + 1, following))
            if between:
                roles[f"{name}+1"] = between[:1]
            if len(between) > 1:
                roles[f"{name}+2..{anchors[following]}-1"] = between[1:]
    return roles


def fact_roles(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """ROME's categories of a fact prompt that are not empty."""
    return {name: positions for name, positions in token_categories(n_tokens, subject).items() if positions}


def roles_of(record) -> dict[str, list[int]]:
    """{role: positions} of a stored example (`ExampleRecord`): facts by their subject
    span, prompts with named roles by their words; {} when neither is known."""
    info = record.info
    tokens = list(info.get("tokens") or [])
    if info.get("subject_tokens") is not None and tokens:
        return fact_roles(len(tokens), tuple(info["subject_tokens"]))
    if info.get("roles"):
        return word_roles(tokens, info["roles"])
    return {}


def role_order(role_maps: list[dict[str, list[int]]], lengths: list[int]) -> list[str]:
    """Every role of the examples, ordered by where it sits on average (its first
    position as a share of the prompt), so a figure reads left to right."""
    where: dict[str, list[float]] = {}
    for roles, length in zip(role_maps, lengths):
        for name, positions in roles.items():
            where.setdefault(name, []).append(positions[0] / max(1, length - 1))
    fixed = {name: k for k, name in enumerate(FACT_CATEGORIES)}
    return sorted(where, key=lambda name: (fixed.get(name, -1), sum(where[name]) / len(where[name])))


def align(records, name: str, role_maps: list[dict[str, list[int]]] | None = None) -> LabelledTensor:
    """The tensor `name` of each record with its "position" axis replaced by a "role"
    axis: each role's positions averaged within the example (positions the tensor does
    not hold are skipped), NaN where an example lacks the role. Returns a
    LabelledTensor with an "example" axis first."""
    records = list(records)
    role_maps = [roles_of(r) for r in records] if role_maps is None else role_maps
    order = role_order(role_maps, [len(r.tokens) for r in records])
    first = records[0][name]
    axis = first.axis("position")
    rows = []
    for record, roles in zip(records, role_maps):
        tensor = record[name]
        labels = tensor.labels("position")
        values = tensor.values.double()
        shape = list(values.shape)
        shape[axis] = 1
        columns = []
        for role in order:
            held = [labels.index(p) for p in roles.get(role, []) if p in labels]
            columns.append(values.index_select(axis, torch.tensor(held)).mean(axis, keepdim=True) if held
                           else torch.full(shape, math.nan, dtype=torch.float64))
        rows.append(torch.cat(columns, axis) if columns else values.narrow(axis, 0, 0))
    dims = tuple("role" if d == "position" else d for d in first.dims)
    coords = {k: v for k, v in first.coords.items() if k != "position"}
    coords["role"] = order
    coords["example"] = [r.index for r in records]
    return LabelledTensor(torch.stack(rows), ("example",) + dims, coords)
