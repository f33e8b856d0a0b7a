"""Parity with TransformerLens 4.x on the same weights.

TransformerLens' `TransformerBridge` wraps an already-loaded Hugging Face model (no
download). Settings: `enable_compatibility_mode(fold_ln=True,
center_writing_weights=False, center_unembed=False, fold_value_biases=False)`.

- fold_ln folds the final norm's weight into W_U and its bias into b_U, so the
  walkthrough's own read-out, `cache.logit_attrs(stack, answer, foil)` (centre,
  divide by the cached final scale, dot with W_U[answer] - W_U[foil]), is the direct
  logit attribution with the norm's weight included; b_U[answer] - b_U[foil] is then
  nnexp's `bias` component. This is nnexp's linearised final norm, term for term.
- Centring the writing weights or the unembedding would change the cached attention
  and MLP outputs (each centred) without changing any logit difference, and folding
  value biases would move GPT-2's value bias out of the heads into the attention
  bias; both are turned off so that every cached tensor is the model's own.
- The bridge runs eager attention; the HF copy it wraps is loaded with eager too.
"""

from __future__ import annotations

import copy

import pytest
import torch

from nnexp.kinds.logit_attribution import LogitAttributionExperiment
from nnexp.prompts import Prompt
from nnexp_experiments.ioi import classic_ioi
from tests.helpers import nnexp_records, randomise_norms_and_biases

transformer_lens = pytest.importorskip("transformer_lens", reason="pip install -e '.[test]' installs TransformerLens")

PROMPTS = [Prompt.from_pair(pair) for pair in classic_ioi()]  # the walkthrough's 8 prompts


def transformer_lens_values(folder, hf, tokenizer, prompts: list[Prompt]) -> list[dict]:
    from transformer_lens.model_bridge import TransformerBridge

    hf.config._attn_implementation = "eager"
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt.prompt).input_ids])
        answer = tokenizer(prompt.prompt + prompt.answer).input_ids[-1]
        foil = tokenizer(prompt.prompt + prompt.foil).input_ids[-1]
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(ids)
            bias = float(bridge.b_U[answer] - bridge.b_U[foil]) if bridge.b_U is not None else 0.0
            layers, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            heads = cache.stack_head_results(layer=-1, pos_slice=-1)
            accumulated, points = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
            fresh = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, apply_ln=True)
            directions = bridge.tokens_to_residual_directions(torch.tensor([answer, foil]))
            out.append({
                "logit_diff": float(logits[0, -1, answer] - logits[0, -1, foil]),
                "layer_labels": labels + ["bias"],
                "dla_layers": torch.cat([cache.logit_attrs(layers, answer, foil, pos_slice=-1)[:, 0], torch.tensor([bias])]),
                "dla_heads": cache.logit_attrs(heads, answer, foil, pos_slice=-1)[:, 0],
                "points": points,
                "logit_lens_linear": cache.logit_attrs(accumulated, answer, foil, pos_slice=-1)[:, 0] + bias,
                "logit_lens": fresh[:, 0] @ (directions[0] - directions[1]) + bias,
            })
    return out


def assert_parity(records, references, n_heads):
    for record, ref in zip(records, references):
        assert record.scalars["logit_diff"] == pytest.approx(ref["logit_diff"], abs=1e-4)
        assert record["dla_layers"].labels("component") == ref["layer_labels"]
        assert torch.allclose(record["dla_layers"].values, ref["dla_layers"], atol=1e-4)
        assert torch.allclose(record["dla_heads"].values.flatten(), ref["dla_heads"], atol=1e-4)
        assert record["logit_lens"].labels("point") == ref["points"]
        assert torch.allclose(record["logit_lens_linear"].values, ref["logit_lens_linear"], atol=1e-4)
        assert torch.allclose(record["logit_lens"].values, ref["logit_lens"], atol=1e-4)
        assert record["dla_heads"].shape[1] == n_heads


def test_random_gpt2_matches_transformer_lens(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_model

    model = randomise_norms_and_biases(tiny_model("gpt2"))
    model.hf.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    # TransformerLens folds weights in place: it gets its own copy of the same weights
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    references = transformer_lens_values(tmp_path, hf, model.tokenizer, PROMPTS)
    records = nnexp_records(model, LogitAttributionExperiment(), PROMPTS)  # one padded trace
    assert any(abs(float(ref["dla_layers"][-1])) > 1e-3 for ref in references)  # the bias term is exercised
    assert_parity(records, references, n_heads=4)


@pytest.mark.slow
def test_smollm2_matches_transformer_lens(smollm2):
    from nnexp.models.aliases import alias_folder

    folder = alias_folder("smollm2-135m")
    hf = copy.deepcopy(smollm2.hf)
    references = transformer_lens_values(folder, hf, smollm2.tokenizer, PROMPTS)
    records = nnexp_records(smollm2, LogitAttributionExperiment(), PROMPTS)
    assert_parity(records, references, n_heads=9)
