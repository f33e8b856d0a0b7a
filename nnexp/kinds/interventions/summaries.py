"""Dataset views of an intervention experiment: each measured tensor and scalar averaged
over examples."""

from __future__ import annotations

import torch

from ...errors import DataError
from ...labelled import LabelledTensor


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
