"""User-declared interventions: runs of each example written with `nnexp.interventions`."""

from ...registry import KINDS
from .examples import InterventionExample, load_intervention_examples
from .experiment import InterventionExperiment, ModelShape
from .summaries import grid_estimate, scalar_estimates

KINDS.register("interventions", InterventionExperiment)

__all__ = ["InterventionExample", "InterventionExperiment", "ModelShape", "load_intervention_examples",
           "grid_estimate", "scalar_estimates"]
