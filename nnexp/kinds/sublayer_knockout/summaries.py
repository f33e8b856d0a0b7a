"""Sublayer knockout's view over a dataset of results: the mean relative change per
sublayer, position set and window centre."""

from __future__ import annotations

from ...labelled import LabelledTensor
from ..recall import mean_over_facts


def sublayer_profile(results, name: str = "sublayer_knockout") -> LabelledTensor:
    """Mean over facts of `name` (sublayer x positions x layer), a LabelledTensor."""
    return mean_over_facts(results, name)
