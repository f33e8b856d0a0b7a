"""Attribute extraction's view over a dataset of results: per layer, the share of facts
whose attribute is the top token (or among the top k), and the mean attribute rate."""

from __future__ import annotations

import torch

from ..recall import fact_records


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
