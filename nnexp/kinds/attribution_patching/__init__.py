"""Attribution patching (AtP, AtP*'s GradDrop): every cell estimated from gradients,
the top cells and a random sample verified by exact activation patching."""

from ...registry import KINDS
from .experiment import ATP_SITES, AttributionPatchingExperiment

KINDS.register("attribution-patching", AttributionPatchingExperiment)

__all__ = ["ATP_SITES", "AttributionPatchingExperiment"]
