"""Causal tracing's view over a dataset of results: the average over facts by token
category, as in ROME's Figure 2: first / middle / last subject token, first subsequent
token, further tokens, last token."""

from __future__ import annotations

import math

import torch

from ..recall import fact_records

CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")


def token_categories(n_tokens: int, subject: tuple[int, int]) -> dict[str, list[int]]:
    """Positions of each category. Categories do not overlap: a one-token subject is
    its first token (and also its last), the last token is only "last token", and
    positions before the subject belong to none."""
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


def average_indirect_effect(results, site: str) -> dict:
    """Causal tracing: the indirect effect averaged by token category, then over facts
    (facts without a category, e.g. no token between subject and last, are left out
    of that category's mean). Returns {"categories", "layers", "values" [6, layers],
    "counts" [6]}."""
    records = fact_records(results)
    rows = []
    for record in records:
        tensor = record[site].values  # layer x position
        categories = token_categories(tensor.shape[1], tuple(record.info["subject_tokens"]))
        rows.append(torch.stack([
            tensor[:, positions].mean(-1) if positions else torch.full((tensor.shape[0],), math.nan)
            for positions in categories.values()
        ]))
    stacked = torch.stack(rows)  # facts x 6 x layers
    return {
        "categories": list(CATEGORIES),
        "layers": list(records[0][site].coords["layer"]),
        "values": torch.nanmean(stacked, 0),
        "counts": (~stacked[:, :, 0].isnan()).sum(0).tolist(),
        "n": len(records),
    }
