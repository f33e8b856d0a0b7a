"""Attribute extraction's view over a dataset of results: per layer, the share of facts
whose attribute is the top token (or among the top k), and the mean attribute rate."""

from __future__ import annotations

import torch

from ...statistics import Estimate, bootstrap, settings
from ..recall import fact_records

KIND = "attribute_extraction"


def extraction_profile(results) -> dict:
    """{"top1": share of facts whose attribute ranks first, "topk": ... among the top
    k (the run's top_k), "attribute_rate": the mean rate or None}, each position x
    projection x site x layer."""
    records = fact_records(results)
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


def extraction_estimates(experiment, results) -> dict[str, Estimate]:
    """{"top1", "topk", "attribute_rate" (when facts have attribute words)}: the share of
    facts (or the mean rate) per position x projection x site x layer, with bootstrap
    intervals over facts."""
    records = fact_records(results)
    first = records[0]["rank"]
    dims, coords = first.dims, dict(first.coords)
    ranks = torch.stack([r["rank"].values for r in records]).double()
    out = {"top1": bootstrap((ranks == 1).double(), dims, coords, **settings(experiment)),
           "topk": bootstrap((ranks <= records[0].info["top_k"]).double(), dims, coords, **settings(experiment))}
    rates = [r["attribute_rate"].values.double() for r in records if "attribute_rate" in r.tensors]
    if rates:
        out["attribute_rate"] = bootstrap(torch.stack(rates), dims, coords, **settings(experiment))
    return out


def summary_rows(experiment, results) -> list[dict]:
    names = {"top1": "share of facts with the attribute on top",
             "topk": f"share of facts with the attribute in the top {experiment.top_k}",
             "attribute_rate": "attribute rate"}
    rows = []
    for key, estimate in extraction_estimates(experiment, results).items():
        rows += estimate.rows(KIND, names[key])
    return rows
