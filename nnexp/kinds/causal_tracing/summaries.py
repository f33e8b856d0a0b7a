"""Causal tracing's view over a dataset of results: the average over facts by token
category, as in ROME's Figure 2: first / middle / last subject token, first subsequent
token, further tokens, last token (the fact roles of `nnexp.roles`), with bootstrap
intervals over facts (`nnexp.statistics`)."""

from __future__ import annotations

import math

import torch

from ...roles import FACT_CATEGORIES, token_categories
from ...statistics import Estimate, bootstrap, settings
from ..recall import fact_records

# the categories are the fact roles of `nnexp.roles` (defined there, for every kind)
CATEGORIES = FACT_CATEGORIES
KIND = "causal_tracing"


def _by_category(records, site: str, dtype=torch.float32) -> torch.Tensor:
    """[facts, 6, layers]: each fact's indirect effect averaged within each category
    (NaN where the fact has none of it)."""
    rows = []
    for record in records:
        tensor = record[site].values.to(dtype)  # layer x position
        categories = token_categories(tensor.shape[1], tuple(record.info["subject_tokens"]))
        rows.append(torch.stack([
            tensor[:, positions].mean(-1) if positions else torch.full((tensor.shape[0],), math.nan, dtype=dtype)
            for positions in categories.values()
        ]))
    return torch.stack(rows)


def indirect_effect_estimate(experiment, results, site: str) -> Estimate:
    """The indirect effect of `site` by token category ("role") and layer, averaged over
    the facts that have the category, with bootstrap intervals over facts."""
    records = fact_records(results)
    return bootstrap(_by_category(records, site, torch.float64), ("role", "layer"),
                     {"role": list(CATEGORIES), "layer": list(records[0][site].coords["layer"])},
                     **settings(experiment))


def summary_rows(experiment, results) -> list[dict]:
    rows = []
    for site in fact_records(results)[0].info["restore"]:
        rows += indirect_effect_estimate(experiment, results, site).rows(KIND, f"indirect effect ({site})")
    return rows


def average_indirect_effect(results, site: str) -> dict:
    """Causal tracing: the indirect effect averaged by token category, then over facts
    (facts without a category, e.g. no token between subject and last, are left out
    of that category's mean). Returns {"categories", "layers", "values" [6, layers],
    "counts" [6]}."""
    records = fact_records(results)
    stacked = _by_category(records, site)  # facts x 6 x layers
    return {
        "categories": list(CATEGORIES),
        "layers": list(records[0][site].coords["layer"]),
        "values": torch.nanmean(stacked, 0),
        "counts": (~stacked[:, :, 0].isnan()).sum(0).tolist(),
        "n": len(records),
    }
