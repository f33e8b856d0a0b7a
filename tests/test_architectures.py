"""Every row of the architecture table, checked on a random model of its family.

For each family: the resolved dimensions are right, and patching every site (resid
stream, attention, MLP, heads) matches the plain-hook reference, which locates the
modules by its own hard-coded names.
"""

from __future__ import annotations

import pytest

from experiments.ioi import ioi_pair
from nnexp import ArchSpec, ModelError, PatchingExperiment, register_architecture, wrap_model
from nnexp.models.architectures import ARCHITECTURES
from tests import reference
from tests.conftest import FAMILIES, make_gpt2_tokenizer, tiny_model
from tests.test_patching_reference import check_against_reference

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_patching_matches_plain_hooks(family):
    model = tiny_model(family)
    arch = model.arch
    config = model.hf.config
    assert arch.n_layers == 3
    assert arch.n_heads == 4
    assert arch.n_kv_heads == getattr(config, "num_key_value_heads", 4)
    expected_head_dim = getattr(config, "head_dim", None) or config.hidden_size // 4
    assert arch.head_dim == expected_head_dim
    experiment = PatchingExperiment(sites=SITES, positions=[1, 5, -1])
    records, _ = check_against_reference(model, experiment, [ioi_pair("store", "John", "Mary", io_first=True)])
    assert records[0]["head_out.patched"].values.std() > 0


def test_every_table_row_is_tested():
    covered = set(FAMILIES)
    for spec in ARCHITECTURES:
        for model_type in spec.model_types:
            assert model_type in covered, f"{model_type} has no test model in tests/conftest.py"


def test_unknown_architecture_says_what_to_add():
    import transformers as T

    config = T.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                         word_embed_proj_dim=64, vocab_size=50257)
    hf = T.OPTForCausalLM(config).eval()
    with pytest.raises(ModelError) as error:
        wrap_model(hf, make_gpt2_tokenizer(), "tiny-opt", {"kind": "test"})
    message = str(error.value)
    assert "'opt'" in message and "ArchSpec" in message and "architectures.py" in message
    assert "\n" not in message


def test_register_architecture_adds_a_family():
    """A user-registered row works like a built-in one (OPT: the MLP is fc1/fc2 in the block)."""
    import torch
    import transformers as T

    register_architecture(
        ArchSpec(
            model_types=("opt",),
            blocks="model.decoder.layers",
            attn="self_attn",
            attn_out="self_attn",
            mlp_out="fc2",
            head_proj="self_attn.out_proj",
            embed="model.decoder.embed_tokens",
            final_norm="model.decoder.final_layer_norm",
            unembed="lm_head",
            norm="layernorm",
        )
    )
    try:
        torch.manual_seed(0)
        config = T.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                             word_embed_proj_dim=64, vocab_size=50257)
        hf = T.OPTForCausalLM(config).eval()
        tok = make_gpt2_tokenizer()
        model = wrap_model(hf, tok, "tiny-opt", {"kind": "test"})
        reference.FAMILIES["opt"] = {
            "blocks": "model.decoder.layers",
            "attn_out": ("self_attn", "out"),
            "mlp_out": ("fc2", "out"),
            "head_out": ("self_attn.out_proj", "in"),
        }
        check_against_reference(model, PatchingExperiment(sites=SITES, positions=[2, -1]),
                                [ioi_pair("park", "Tom", "James", io_first=True)])
    finally:
        ARCHITECTURES[:] = [spec for spec in ARCHITECTURES if "opt" not in spec.model_types]
        reference.FAMILIES.pop("opt", None)
