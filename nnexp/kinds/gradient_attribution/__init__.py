"""Contrastive gradient attribution: gradient x activation at every layer, per position."""

from ...registry import KINDS
from .experiment import GRADIENT_SITES, GradientAttributionExperiment
from .summaries import subject_and_last_profile

KINDS.register("gradient-attribution", GradientAttributionExperiment)

__all__ = ["GRADIENT_SITES", "GradientAttributionExperiment", "subject_and_last_profile"]
