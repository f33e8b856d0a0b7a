"""Views of a gradient attribution run across its examples."""

from __future__ import annotations

import torch

from ...errors import DataError
from ...statistics import Estimate, bootstrap, settings

KIND = "gradient_attribution"
MEASURES = ("attribution", "attribution_norm")


def subject_and_last_profile(results, name: str = "attribution") -> dict:
    """Mean attribution per layer at the last subject token and at the last token,
    over every stored example (prompts of any length).

    Returns {"layers": [...], "last_subject_token": [L], "last_token": [L], "n": N}.
    """
    records = list(results)
    if not records:
        raise DataError(f"{results.path} holds no examples")
    subject, last = [], []
    for record in records:
        values = record[name].values
        end = record.info["subject_tokens"][1]
        subject.append(values[:, end - 1])
        last.append(values[:, -1])
    return {
        "layers": list(records[0][name].coords["layer"]),
        "last_subject_token": torch.stack(subject).mean(0),
        "last_token": torch.stack(last).mean(0),
        "n": len(records),
    }


def profile_estimate(experiment, results, name: str = "attribution") -> Estimate:
    """`subject_and_last_profile` with bootstrap intervals over examples: dims (role,
    layer), roles "last subject token" and "last token"."""
    profile = subject_and_last_profile(results, name)
    records = list(results)
    values = torch.stack([torch.stack([r[name].values[:, r.info["subject_tokens"][1] - 1], r[name].values[:, -1]])
                          for r in records]).double()
    return bootstrap(values, ("role", "layer"), {"role": ["last subject token", "last token"],
                                                 "layer": profile["layers"]}, **settings(experiment))


def summary_rows(experiment, results) -> list[dict]:
    rows = []
    for name in MEASURES:
        if name in list(results)[0].tensors:
            rows += profile_estimate(experiment, results, name).rows(KIND, f"{name} ({experiment.site})")
    return rows
