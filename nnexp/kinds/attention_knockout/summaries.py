"""Attention knockout's view over a dataset of results: the mean relative change per
source set and window centre."""

from __future__ import annotations

from ...labelled import LabelledTensor
from ..recall import mean_over_facts


def knockout_profile(results, name: str = "knockout") -> LabelledTensor:
    """Mean over facts of `name` (e.g. source x layer), a LabelledTensor."""
    return mean_over_facts(results, name)
