"""Causal tracing (Meng et al. 2022): the subject noised, clean states restored one
(layer, token) at a time, and the true target's probability measured."""

from ...registry import KINDS
from .experiment import CausalTracingExperiment
from .summaries import average_indirect_effect, token_categories

KINDS.register("causal-tracing", CausalTracingExperiment)

__all__ = ["CausalTracingExperiment", "average_indirect_effect", "token_categories"]
