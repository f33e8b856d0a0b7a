"""Dissecting factual recall over CounterFact facts (Geva et al. 2023; Meng et al. 2022).

    nnexp run attention-knockout --set only_correct=true       # where the last position reads the attribute from
    nnexp run attribute-extraction --set only_correct=true     # which states already name the attribute
    nnexp run sublayer-knockout --set ablation=mean            # which MLPs / attention windows it needs
    nnexp run causal-tracing --set samples=10                  # which states restore it after noising the subject
    nnexp run causal-tracing --model gemma3-270m --data facts.jsonl --set restore=mlp_out,attn_out
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp.kinds.attention_knockout import AttentionKnockoutExperiment
from nnexp.kinds.attribute_extraction import AttributeExtractionExperiment
from nnexp.kinds.causal_tracing import CausalTracingExperiment
from nnexp.kinds.sublayer_knockout import SublayerKnockoutExperiment


@dataclass
class AttentionKnockout(AttentionKnockoutExperiment):
    name = "attention-knockout"
    description = "block attention from the last position to the subject / other tokens / itself, window by window"


@dataclass
class AttributeExtraction(AttributeExtractionExperiment):
    name = "attribute-extraction"
    description = "project hidden states and sublayer outputs to the vocabulary: rank of the attribute per layer"


@dataclass
class SublayerKnockout(SublayerKnockoutExperiment):
    name = "sublayer-knockout"
    description = "zero- or mean-ablate MLP or attention outputs over windows of layers"


@dataclass
class CausalTracing(CausalTracingExperiment):
    name = "causal-tracing"
    description = "noise the subject, restore each (layer, token) state: indirect effects as in ROME"
