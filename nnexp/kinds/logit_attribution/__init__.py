"""Logit attribution: the logit lens and direct logit attribution (DLA), from one trace."""

from ...registry import KINDS
from .experiment import ANALYSES, LogitAttributionExperiment

KINDS.register("logit-attribution", LogitAttributionExperiment)

__all__ = ["ANALYSES", "LogitAttributionExperiment"]
