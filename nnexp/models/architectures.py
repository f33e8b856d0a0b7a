"""Where things live inside each supported Hugging Face architecture: the one table.

Everything nnexp knows about a model family is an `ArchSpec` row here: where the
decoder blocks are, which module's output is what attention and the MLP add to the
residual stream, where the head outputs sit before the attention output projection,
the final norm, the embedding and the unembedding. Sites (`nnexp.sites`) are defined
once in terms of these fields, so a new architecture needs a row, not new hook code.

Module paths are relative to the Hugging Face `*ForCausalLM` model; paths inside a
block are relative to the block. An output index of 0 means the module returns a
tuple whose first element is the tensor (attention modules do; in transformers 5.x
decoder blocks return a plain tensor, except GPT-J's).

To add a family, append an `ArchSpec` to `ARCHITECTURES` (or call
`register_architecture` at run time) and run `tests/test_architectures.py`, which
checks every row against a randomly initialised model of that family.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

# How head outputs are laid out in the input of the attention output projection.
# "concat": [..., n_heads * head_dim] with head h in columns h*head_dim:(h+1)*head_dim.
# It is the only layout in the table today; a family that differs must say so here
# rather than be silently sliced wrong.
HEAD_LAYOUTS = ("concat",)


@dataclass(frozen=True)
class ArchSpec:
    """One model family's layout, by module path.

    Attributes:
        model_types: `config.model_type` values this row covers.
        blocks: path of the `ModuleList` of decoder blocks.
        block_output_index: tuple index of the block's hidden states, or None if
            the block returns a tensor.
        attn: attention module, relative to the block.
        attn_out: module whose output is exactly what attention adds to the
            residual stream (after any post-attention norm or dropout).
        attn_out_index: tuple index in that module's output, or None.
        mlp_out: module whose output is exactly what the MLP adds to the residual.
        mlp_out_index: tuple index in that module's output, or None.
        head_proj: the attention output projection, relative to the block; its
            input holds every head's output (see `head_layout`).
        head_layout: one of `HEAD_LAYOUTS`.
        embed: token embedding module.
        pos_embed: learned position embedding module added to the token embedding
            before block 0 (GPT-2's wpe), or None (rotary models).
        final_norm: the norm applied before the unembedding.
        unembed: the unembedding (LM head) module.
        norm: "layernorm" or "rmsnorm".
        parallel_residual: True where attention and MLP both read the block input
            (GPT-J, GPT-NeoX): such blocks have no `resid_mid`.
        post_sublayer_norms: True where attention and MLP outputs pass through an
            extra norm before joining the residual (Gemma 2/3); `attn_out` and
            `mlp_out` then point at those norms.
        attn_function: the name, in nnsight's `.source` of the attention module, of
            its call of the attention function (module, query [b, heads, t, d],
            key and value [b, kv_heads, t, d], attention_mask, scaling=...), whose
            inputs are the `q`, `k`, `v` sites; None where the family makes no such
            call (GPT-J calls its own `_attn`).
    """

    model_types: tuple[str, ...]
    blocks: str
    attn: str
    attn_out: str
    mlp_out: str
    head_proj: str
    embed: str
    final_norm: str
    unembed: str
    norm: str
    block_output_index: int | None = None
    attn_out_index: int | None = 0
    mlp_out_index: int | None = None
    head_layout: str = "concat"
    parallel_residual: bool = False
    post_sublayer_norms: bool = False
    pos_embed: str | None = None
    attn_function: str | None = "attention_interface_1"


_LLAMA_LIKE = dict(
    blocks="model.layers",
    attn="self_attn",
    attn_out="self_attn",
    mlp_out="mlp",
    head_proj="self_attn.o_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    norm="rmsnorm",
)

_GEMMA_POST_NORMS = dict(
    _LLAMA_LIKE,
    # Gemma 2/3 normalise each sublayer's output before adding it to the residual:
    # h = h + post_attention_layernorm(attn(...)); h = h + post_feedforward_layernorm(mlp(...)).
    # What joins the residual stream is therefore the post-norm's output.
    attn_out="post_attention_layernorm",
    attn_out_index=None,
    mlp_out="post_feedforward_layernorm",
    post_sublayer_norms=True,
)

ARCHITECTURES: list[ArchSpec] = [
    ArchSpec(
        model_types=("gpt2",),
        blocks="transformer.h",
        attn="attn",
        attn_out="attn",
        mlp_out="mlp",
        head_proj="attn.c_proj",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        norm="layernorm",
    ),
    ArchSpec(
        model_types=("gptj",),
        blocks="transformer.h",
        block_output_index=0,
        attn="attn",
        attn_out="attn",
        mlp_out="mlp",
        head_proj="attn.out_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        norm="layernorm",
        parallel_residual=True,
        attn_function=None,
    ),
    ArchSpec(
        model_types=("gpt_neox",),
        blocks="gpt_neox.layers",
        attn="attention",
        # The attention output passes through post_attention_dropout before joining
        # the residual; point at the dropout so the site is what is really added.
        attn_out="post_attention_dropout",
        attn_out_index=None,
        mlp_out="post_mlp_dropout",
        head_proj="attention.dense",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        norm="layernorm",
        # GPT-NeoX's use_parallel_residual is read per model (see Architecture).
        parallel_residual=True,
    ),
    ArchSpec(model_types=("llama", "mistral", "qwen2", "qwen3", "gemma"), **_LLAMA_LIKE),
    ArchSpec(model_types=("gemma2", "gemma3_text"), **_GEMMA_POST_NORMS),
]


def register_architecture(spec: ArchSpec) -> None:
    """Add (or replace) a row of the table at run time, for families nnexp lacks."""
    if spec.head_layout not in HEAD_LAYOUTS:
        raise ModelError(
            f"unknown head_layout {spec.head_layout!r}: nnexp can slice heads laid out as "
            f"{', '.join(HEAD_LAYOUTS)}; add the layout to nnexp/models/architectures.py first"
        )
    for model_type in spec.model_types:
        for existing in list(ARCHITECTURES):
            if model_type in existing.model_types:
                ARCHITECTURES.remove(existing)
    ARCHITECTURES.append(spec)


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHITECTURES for t in spec.model_types)


def spec_for(model_type: str, class_name: str = "") -> ArchSpec:
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise ModelError(
        f"unsupported architecture: model_type {model_type!r}"
        + (f" ({class_name})" if class_name else "")
        + " has no row in nnexp's architecture table; add an ArchSpec with the paths of its "
        "blocks, attention output, MLP output, attention output projection, embedding, final "
        "norm and unembedding to ARCHITECTURES in nnexp/models/architectures.py (or call "
        "nnexp.register_architecture). Supported: " + ", ".join(supported_model_types())
    )


def _get_module(root, path: str):
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


class Architecture:
    """An `ArchSpec` resolved against one loaded model: paths plus its dimensions."""

    def __init__(self, hf_model) -> None:
        config = hf_model.config
        self.model_type: str = config.model_type
        self.spec = spec_for(self.model_type, type(hf_model).__name__)
        blocks = _get_module(hf_model, self.spec.blocks)
        self.n_layers: int = len(blocks)
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = config.hidden_size
        # the call whose inputs are the q, k, v sites; GPT-2 with eager attention and
        # reorder_and_upcast_attn computes attention in a method of its own instead
        self.attn_function: str | None = self.spec.attn_function
        if getattr(config, "reorder_and_upcast_attn", False) and config._attn_implementation == "eager":
            self.attn_function = None
        self.parallel_residual: bool = self.spec.parallel_residual and bool(
            getattr(config, "use_parallel_residual", True)
        )
        # The head dimension is read off the output projection rather than the config:
        # configs disagree on the attribute (head_dim, n_embd / n_head, rotary_dim...),
        # the projection's input width does not.
        proj = _get_module(blocks[0], self.spec.head_proj)
        proj_in = proj.in_features if hasattr(proj, "in_features") else proj.weight.shape[0]
        if proj_in % self.n_heads:
            raise ModelError(
                f"{self.model_type}: attention output projection {self.spec.head_proj} takes "
                f"{proj_in} features, not a multiple of {self.n_heads} heads; fix head_proj in "
                "its ArchSpec (nnexp/models/architectures.py)"
            )
        self.head_dim: int = proj_in // self.n_heads
        for path in (self.spec.embed, self.spec.final_norm, self.spec.unembed, self.spec.pos_embed):
            if path is None:
                continue
            self._check_path(hf_model, path)
        for path in (self.spec.attn, self.spec.attn_out, self.spec.mlp_out, self.spec.head_proj):
            self._check_path(blocks[0], path, prefix=f"{self.spec.blocks}.0.")

    def _check_path(self, root, path: str, prefix: str = "") -> None:
        try:
            _get_module(root, path)
        except AttributeError:
            raise ModelError(
                f"{self.model_type}: module {prefix}{path} named in its ArchSpec does not exist "
                "in this model; correct the row in nnexp/models/architectures.py"
            ) from None

    def block(self, layer: int) -> str:
        return f"{self.spec.blocks}.{layer}"

    def describe(self) -> dict:
        return {
            "model_type": self.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "norm": self.spec.norm,
            "parallel_residual": self.parallel_residual,
            "post_sublayer_norms": self.spec.post_sublayer_norms,
        }
