"""Activation patching: clean activations copied into the corrupted run, cell by cell."""

from ...registry import KINDS
from .experiment import PatchingExperiment

KINDS.register("patching", PatchingExperiment)

__all__ = ["PatchingExperiment"]
