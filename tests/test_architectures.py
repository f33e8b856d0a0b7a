"""Every row of the architecture table, checked on a random model of its family.

For each family: the resolved dimensions are right, and patching every site (resid
stream, attention, MLP, heads) matches the plain-hook reference, which locates the
modules by its own hard-coded names.
"""

from __future__ import annotations

import pytest

from nnexp import ArchSpec, ModelError, PatchingExperiment, register_architecture, wrap_model
from nnexp.models.architectures import ARCHITECTURES
from nnexp_experiments.ioi import ioi_pair
from tests import reference
from tests.helpers import FAMILIES, check_against_reference, make_gpt2_tokenizer, tiny_model

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
    """A user-registered row works like a built-in one (OLMo 2: post-norms, no pre-norms)."""
    import torch
    import transformers as T

    register_architecture(
        ArchSpec(
            model_types=("olmo2",),
            blocks="model.layers",
            attn="self_attn",
            attn_out="post_attention_layernorm",
            attn_out_index=None,
            mlp_out="post_feedforward_layernorm",
            head_proj="self_attn.o_proj",
            embed="model.embed_tokens",
            final_norm="model.norm",
            unembed="lm_head",
            norm="rmsnorm",
            post_sublayer_norms=True,
        )
    )
    try:
        torch.manual_seed(0)
        config = T.Olmo2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                               vocab_size=50257)
        model = wrap_model(T.Olmo2ForCausalLM(config).eval(), make_gpt2_tokenizer(), "tiny-olmo2", {"kind": "test"})
        reference.FAMILIES["olmo2"] = reference.FAMILIES["gemma3_text"]
        check_against_reference(model, PatchingExperiment(sites=SITES, positions=[2, -1]),
                                [ioi_pair("park", "Tom", "James", io_first=True)])
    finally:
        ARCHITECTURES[:] = [spec for spec in ARCHITECTURES if "olmo2" not in spec.model_types]
        reference.FAMILIES.pop("olmo2", None)


def test_a_site_with_the_wrong_layout_is_refused_not_misread():
    """OPT flattens [batch, tokens] before its MLP; pointing mlp_out at fc2 must fail loudly."""
    import transformers as T

    register_architecture(
        ArchSpec(model_types=("opt",), blocks="model.decoder.layers", attn="self_attn", attn_out="self_attn",
                 mlp_out="fc2", head_proj="self_attn.out_proj", embed="model.decoder.embed_tokens",
                 final_norm="model.decoder.final_layer_norm", unembed="lm_head", norm="layernorm")
    )
    try:
        config = T.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                             word_embed_proj_dim=64, vocab_size=50257)
        model = wrap_model(T.OPTForCausalLM(config).eval(), make_gpt2_tokenizer(), "tiny-opt", {"kind": "test"})
        experiment = PatchingExperiment(sites=("mlp_out",), positions=[-1])
        compiled = experiment.compile(model)
        item = compiled.prepare(ioi_pair("park", "Tom", "James", io_first=True), 0)
        with pytest.raises(ModelError) as error:
            compiled.run([item])
        assert "model.decoder.layers.0.fc2 output has shape" in str(error.value)
        assert "[batch, tokens, features]" in str(error.value)
    finally:
        ARCHITECTURES[:] = [spec for spec in ARCHITECTURES if "opt" not in spec.model_types]
