"""Views of a gradient attribution run across its examples."""

from __future__ import annotations

import torch

from ...errors import DataError


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
