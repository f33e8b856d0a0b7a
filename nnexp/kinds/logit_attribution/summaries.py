"""Logit attribution's view over a dataset of results: the logit lens per residual
stream point, direct logit attribution per component and per head, and the logit
difference itself, each averaged over prompts with a bootstrap interval
(`nnexp.statistics`). Every prompt has the same points, components and heads, so no
alignment is needed."""

from __future__ import annotations

import numpy as np

from ...statistics import Estimate, bootstrap, estimate_of, settings

KIND = "logit_attribution"
# tensor -> measure name in the summary table
MEASURES = {
    "logit_lens": "logit lens",
    "logit_lens_linear": "logit lens (linearised norm)",
    "dla_layers": "DLA per layer",
    "dla_heads": "DLA per head",
}


def estimates(experiment, results) -> dict[str, Estimate]:
    """{tensor name: its mean over prompts with intervals}, for the run's analyses."""
    records = list(results)
    return {name: estimate_of(records, name, experiment) for name in MEASURES if name in records[0].tensors}


def logit_diff_estimate(experiment, results) -> Estimate:
    """The mean logit difference (answer - foil) over prompts, with its interval."""
    values = np.array([record.scalars["logit_diff"] for record in results])
    return bootstrap(values, **settings(experiment))


def summary_rows(experiment, results) -> list[dict]:
    rows = logit_diff_estimate(experiment, results).rows(KIND, "logit difference")
    for name, estimate in estimates(experiment, results).items():
        rows += estimate.rows(KIND, MEASURES[name])
    return rows
