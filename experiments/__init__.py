"""The ready-made experiments, by the name `nnexp run` knows them.

Add a new one by defining its class in a module here and listing it below.
"""

from .counterfact_attribution import CounterFactAttribution
from .factual_recall import AttentionKnockout, AttributeExtraction, CausalTracing, SublayerKnockout
from .ioi_patching import IOIPatching
from .logit_attribution import DLAHeads, DLALayers, LogitAttribution, LogitLens

EXPERIMENTS = {cls.name: cls for cls in (IOIPatching, LogitLens, DLALayers, DLAHeads, LogitAttribution,
                                           CounterFactAttribution, AttentionKnockout, AttributeExtraction,
                                           SublayerKnockout, CausalTracing)}
