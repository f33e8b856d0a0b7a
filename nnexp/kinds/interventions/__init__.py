"""User-declared interventions: runs of each example written with `nnexp.interventions`."""

from ...registry import KINDS
from .examples import InterventionExample, load_intervention_examples
from .experiment import InterventionExperiment, ModelShape
from .summaries import mean_over_examples, mean_scalars

KINDS.register("interventions", InterventionExperiment)

__all__ = ["InterventionExample", "InterventionExperiment", "ModelShape", "load_intervention_examples",
           "mean_over_examples", "mean_scalars"]
