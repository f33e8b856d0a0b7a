"""Attention knockout (Geva et al. 2023): attention from the last position to a set of
positions blocked window by window, and the attribute's probability measured."""

from ...registry import KINDS
from .experiment import AttentionKnockoutExperiment
from .summaries import knockout_profile

KINDS.register("attention-knockout", AttentionKnockoutExperiment)

__all__ = ["AttentionKnockoutExperiment", "knockout_profile"]
