"""Attribution patching's view over a dataset: how well each variant's estimates agree
with exact patching (recall of the exact top-k, rank correlation, the largest false
negative in the random sample), and the mean estimate per layer x head of `head_out`,
each a mean over examples with a bootstrap interval (`nnexp.statistics`)."""

from __future__ import annotations

import numpy as np
import torch

from ...labelled import LabelledTensor
from ...statistics import Estimate, bootstrap, settings
from .experiment import false_negative

KIND = "attribution_patching"


def agreement_measures(experiment) -> list[str]:
    names = []
    for variant in experiment.variants:
        names += [f"recall_{variant}", f"spearman_{variant}", f"false_negative_{variant}"]
    return names + ["spearman_signed_atp"]


def _measure(record, name: str) -> float:
    """A scalar of the record, or for false_negative_{variant} the |exact effect| of the
    largest false negative in its sample (0 when none was missed or nothing sampled)."""
    if name.startswith("false_negative_"):
        found = false_negative(record, name.removeprefix("false_negative_"))
        return abs(found["exact"]) if found else 0.0
    return record.scalars[name]


def agreement_estimate(experiment, results) -> Estimate:
    """[measure]: each agreement measure's mean over examples, with its interval."""
    names = agreement_measures(experiment)
    values = np.array([[_measure(record, name) for name in names] for record in results], dtype=np.float64)
    return bootstrap(values, ("measure",), {"measure": names}, **settings(experiment))


def head_totals(record, variant: str) -> LabelledTensor:
    """`head_out`'s estimate per layer x head, summed over positions: the estimate of
    patching the head at every position at once (the estimates are first-order, so they add)."""
    tensor = record[f"head_out.{variant}"]
    return LabelledTensor(tensor.values.sum(-1), ("layer", "head"),
                          {"layer": tensor.labels("layer"), "head": tensor.labels("head")})


def head_estimate(experiment, results, variant: str) -> Estimate:
    records = list(results)
    values = torch.stack([head_totals(r, variant).values.double() for r in records])
    first = head_totals(records[0], variant)
    return bootstrap(values, first.dims, dict(first.coords), **settings(experiment))


def summary_rows(experiment, results) -> list[dict]:
    rows = agreement_estimate(experiment, results).rows(KIND, "agreement with exact patching")
    if "head_out" in experiment.sites:
        for variant in experiment.variants:
            rows += head_estimate(experiment, results, variant).rows(KIND, f"{variant} estimate (head_out, all "
                                                                            "positions)")
    return rows
