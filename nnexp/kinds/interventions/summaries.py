"""Dataset views of an intervention experiment: each measured grid and scalar averaged
over examples, with its bootstrap interval."""

from __future__ import annotations

import numpy as np

from ...statistics import Estimate, bootstrap, estimate_of, settings

KIND = "interventions"


def stackable(records, name: str) -> bool:
    """Whether every record holds the tensor `name` in one shape, so that its examples
    average (a metric grid does; reads over prompts of different lengths do not)."""
    return all(name in r.tensors for r in records) and len({tuple(r[name].values.shape) for r in records}) == 1


def grid_estimate(experiment, results, name: str) -> Estimate:
    """The mean over examples of the tensor `name` (e.g. "steered.logit_diff"), with its
    bootstrap interval, per cell (`stackable` records)."""
    return estimate_of(list(results), name, experiment)


def scalar_estimates(experiment, results) -> dict[str, Estimate]:
    """Every scalar's mean over the examples that have it, with its interval."""
    records = list(results)
    names = sorted({name for record in records for name in record.scalars})
    return {name: bootstrap(np.array([r.scalars.get(name, np.nan) for r in records], dtype=np.float64),
                            **settings(experiment)) for name in names}


def grid_names(experiment, records) -> list[str]:
    """The metric grids of the records ("steered.logit_diff", "steered.logit_diff.change"),
    not the reads (activations, which have no summary)."""
    return [name for name in records[0].tensors if name.count(".") in (1, 2)
            and name.split(".")[1] in experiment.metrics]


def summary_rows(experiment, results) -> list[dict]:
    """Every scalar, and every metric grid whose examples share a shape (others have no mean)."""
    rows = []
    for name, estimate in scalar_estimates(experiment, results).items():
        rows += estimate.rows(KIND, name)
    records = list(results)
    for name in grid_names(experiment, records):
        if stackable(records, name):
            rows += grid_estimate(experiment, results, name).rows(KIND, name)
    return rows
