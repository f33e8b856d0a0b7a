"""The catalogue of ready-made experiments, installed as the package `nnexp_experiments`.

It is a plugin of nnexp like any other (the entry point `nnexp.plugins: experiments`
in pyproject.toml): nnexp imports it only to resolve an experiment's name, and the
library works without it. It is installed under a name of its own, not `experiments`,
so that a research project's own `experiments/` folder on `sys.path` cannot hide it.

Add a new one by defining its class in a module here and registering it below.
"""

from nnexp.experiment import register_experiment

from .activation_addition import ActivationAddition
from .counterfact_attribution import CounterFactAttribution
from .factual_recall import AttentionKnockout, AttributeExtraction, CausalTracing, SublayerKnockout
from .ioi_attribution_patching import IOIAttributionPatching
from .ioi_patching import IOIPatching
from .logit_attribution import DLAHeads, DLALayers, LogitAttribution, LogitLens

for _cls in (IOIPatching, LogitLens, DLALayers, DLAHeads, LogitAttribution, CounterFactAttribution,
             AttentionKnockout, AttributeExtraction, SublayerKnockout, CausalTracing, ActivationAddition,
             IOIAttributionPatching):
    register_experiment(_cls)

