"""Sublayer knockout (Geva et al. 2023): MLP or attention outputs zero- or mean-ablated
window by window, and the attribute's probability measured."""

from ...registry import KINDS
from .experiment import SublayerKnockoutExperiment
from .summaries import sublayer_profile

KINDS.register("sublayer-knockout", SublayerKnockoutExperiment)

__all__ = ["SublayerKnockoutExperiment", "sublayer_profile"]
