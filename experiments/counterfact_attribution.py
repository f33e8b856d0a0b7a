"""Contrastive gradient attribution over CounterFact: where is a fact located?

Inseq's "locating factual knowledge in GPT-2" study (Yin and Neubig 2022): for every
fact, gradient x activation of p(true) - p(false) at every layer's MLP output, every
position, from one forward and one backward pass per batch of facts.

    nnexp run counterfact-attribution                               # built-in 105 facts, MLP outputs
    nnexp run counterfact-attribution --metric contrast_logits_diff --site attn_out
    nnexp run counterfact-attribution --set only_correct=true       # facts the model gets right
    nnexp run counterfact-attribution --dataset hub --set multi_token=skip --limit 1000
    nnexp run counterfact-attribution --data facts.jsonl            # prompt, subject, target_true, target_false
    nnexp run counterfact-attribution --model gpt2-xl-folder --device cuda --load-in-8bit --dtype float16
"""

from __future__ import annotations

from dataclasses import dataclass

from nnexp.kinds.gradient_attribution import GradientAttributionExperiment


@dataclass
class CounterFactAttribution(GradientAttributionExperiment):
    name = "counterfact-attribution"
    description = "contrastive gradient x activation at every layer and position over CounterFact facts"
