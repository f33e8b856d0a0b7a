"""Attribute extraction (Geva et al. 2023): hidden states and sublayer outputs projected
to the vocabulary, layer by layer, and the attribute token's rank there."""

from ...registry import KINDS
from .experiment import AttributeExtractionExperiment
from .summaries import extraction_profile

KINDS.register("attribute-extraction", AttributeExtractionExperiment)

__all__ = ["AttributeExtractionExperiment", "extraction_profile"]
