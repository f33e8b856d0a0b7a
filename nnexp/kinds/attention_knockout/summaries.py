"""Attention knockout's view over a dataset of results: the mean relative change per
source set and window centre."""

from __future__ import annotations

from ...labelled import LabelledTensor
from ...statistics import Estimate, estimate_of
from ..recall import fact_records, mean_over_facts

KIND = "attention_knockout"


def knockout_profile(results, name: str = "knockout") -> LabelledTensor:
    """Mean over facts of `name` (e.g. source x layer), a LabelledTensor."""
    return mean_over_facts(results, name)


def knockout_estimate(experiment, results, name: str = "knockout") -> Estimate:
    """The mean relative change per source set and window centre, with bootstrap
    intervals over facts."""
    return estimate_of(fact_records(results), name, experiment)


def summary_rows(experiment, results) -> list[dict]:
    return knockout_estimate(experiment, results).rows(KIND, "relative change in p(attribute)")
