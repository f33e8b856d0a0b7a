"""Dissecting factual recall: attention knockout, attribute extraction, sublayer
knockout (Geva et al. 2023) and causal tracing (Meng et al. 2022), on any supported
architecture, each compiled into as few batched traces as memory allows."""

from .causal_tracing import CausalTracingExperiment
from .extraction import AttributeExtractionExperiment
from .knockout import AttentionKnockoutExperiment
from .sublayer import SublayerKnockoutExperiment

__all__ = [
    "AttentionKnockoutExperiment",
    "AttributeExtractionExperiment",
    "CausalTracingExperiment",
    "SublayerKnockoutExperiment",
]
