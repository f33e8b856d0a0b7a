"""Dataset views of an intervention experiment: each measured tensor and scalar averaged
over examples."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import DataError
from ...labelled import LabelledTensor
from ...statistics import Estimate, bootstrap, estimate_of, settings

KIND = "interventions"


def mean_over_examples(results, name: str) -> LabelledTensor:
    """The mean over examples of the tensor `name` (e.g. "steered.logit_diff"), with its
    axes; every example's tensor must have the same shape (grids do)."""
    records = list(results)
    if not records:
        raise DataError(f"{getattr(results, 'path', 'the results')} hold no examples")
    first = records[0][name]
    shapes = {tuple(record[name].values.shape) for record in records}
    if len(shapes) > 1:
        raise DataError(f"{name!r} has different shapes across examples ({sorted(shapes)}); average examples "
                        "with the same shape (e.g. reads over positions of prompts of one length)")
    return LabelledTensor(torch.stack([record[name].values for record in records]).float().mean(0), first.dims,
                          first.coords)


def mean_scalars(results) -> dict[str, float]:
    """The mean over examples of every scalar (e.g. "clean.logit_diff")."""
    records = list(results)
    names = sorted({name for record in records for name in record.scalars})
    return {name: float(torch.tensor([r.scalars[name] for r in records if name in r.scalars]).mean())
            for name in names}


def grid_estimate(experiment, results, name: str) -> Estimate:
    """`mean_over_examples` with bootstrap intervals over examples."""
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
        if all(name in r.tensors for r in records) and len({tuple(r[name].values.shape) for r in records}) == 1:
            rows += grid_estimate(experiment, results, name).rows(KIND, name)
    return rows
