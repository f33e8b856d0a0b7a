"""Views over a dataset of recall results: the averages the papers plot.

- `knockout_profile`: the mean relative change per source set and window centre;
- `sublayer_profile`: the same for sublayer knockout;
- `extraction_profile`: per layer, the share of facts whose attribute is the top token
  and the mean attribute rate;
- `token_categories` and `average_indirect_effect`: causal tracing's average over facts
  by token category, as in ROME's Figure 2: first / middle / last subject token, first
  subsequent token, further tokens, last token.
"""

from __future__ import annotations

import math

import torch

from ..errors import DataError
from ..labelled import LabelledTensor

CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")


def _records(results) -> list:
    records = list(results)
    if not records:
        raise DataError(f"{getattr(results, 'path', 'the results')} hold no examples")
    return records


def knockout_profile(results, name: str = "knockout"):
    """Mean over facts of `name` (e.g. source x layer), a LabelledTensor."""
    records = _records(results)
    first = records[0][name]
    return LabelledTensor(torch.stack([r[name].values for r in records]).mean(0), first.dims, first.coords)


sublayer_profile = knockout_profile


def extraction_profile(results) -> dict:
    """{"top1": share of facts whose attribute ranks first, "topk": ... among the top
    k (the run's top_k), "attribute_rate": the mean rate or None}, each position x
    projection x site x layer."""
    records = _records(results)
    ranks = torch.stack([r["rank"].values for r in records])
    rates = [r["attribute_rate"].values for r in records if "attribute_rate" in r.tensors]
    return {
        "dims": records[0]["rank"].dims,
        "coords": records[0]["rank"].coords,
        "top1": (ranks == 1).float().mean(0),
        "topk": (ranks <= records[0].info["top_k"]).float().mean(0),
        "attribute_rate": torch.stack(rates).mean(0) if rates else None,
        "n": len(records),
        "n_with_attributes": len(rates),
    }


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
    records = _records(results)
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
