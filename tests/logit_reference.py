"""An independent logit lens and direct logit attribution, with plain PyTorch hooks.

Written per family from the Hugging Face source (module names and norm formulas typed
out here, nothing taken from nnexp's architecture table or norm code), one prompt at a
time, no padding. The tests compare nnexp's batched, padded results with these.
"""

from __future__ import annotations

import torch

# family -> (blocks, embed, pos_embed, attention output as added, MLP output as added,
#            output projection, final norm, how the final norm scales)
LAYOUT = {
    "gpt2": ("transformer.h", "transformer.wte", "transformer.wpe", "attn", "mlp", "attn.c_proj", "transformer.ln_f", "layernorm"),
    "llama": ("model.layers", "model.embed_tokens", None, "self_attn", "mlp", "self_attn.o_proj", "model.norm", "rmsnorm"),
    "gemma3_text": ("model.layers", "model.embed_tokens", None, "post_attention_layernorm", "post_feedforward_layernorm",
                    "self_attn.o_proj", "model.norm", "gemma_rmsnorm"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _normalise(kind: str, module, x: torch.Tensor, scale: torch.Tensor | None = None):
    """(x centred or not) / scale * gamma, without beta; and the scale of x itself."""
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    eps = module.variance_epsilon if kind == "rmsnorm" else module.eps  # LlamaRMSNorm vs LayerNorm, Gemma3RMSNorm
    own = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    gamma = module.weight + 1 if kind == "gemma_rmsnorm" else module.weight
    return x / (own if scale is None else scale) * gamma, own


@torch.no_grad()
def reference(hf, family: str, ids: list[int], answer: int, foil: int) -> dict:
    blocks_path, embed, pos_embed, attn_out, mlp_out, proj, final_norm, norm_kind = LAYOUT[family]
    blocks = _get(hf, blocks_path)
    n_layers = len(blocks)
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def out_hook(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            seen[name] = tensor[0, -1].detach().clone()
        return hook

    def in_hook(name):
        def hook(module, args):
            seen[name] = args[0][0, -1].detach().clone()
        return hook

    hooks.append(_get(hf, embed).register_forward_hook(out_hook("embed")))
    if pos_embed:
        hooks.append(_get(hf, pos_embed).register_forward_hook(out_hook("pos_embed")))
    for layer, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(in_hook(f"pre{layer}")))
        hooks.append(_get(block, attn_out).register_forward_hook(out_hook(f"attn{layer}")))
        hooks.append(_get(block, mlp_out).register_forward_hook(out_hook(f"mlp{layer}")))
        hooks.append(_get(block, proj).register_forward_pre_hook(in_hook(f"z{layer}")))
        hooks.append(_get(block, proj).register_forward_hook(out_hook(f"o{layer}")))
    hooks.append(_get(hf, final_norm).register_forward_pre_hook(in_hook("final")))
    try:
        logits = hf(torch.tensor([ids])).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()

    norm = _get(hf, final_norm)
    W_U = hf.lm_head.weight
    direction = W_U[answer] - W_U[foil]
    bias = norm.bias @ direction if getattr(norm, "bias", None) is not None else torch.tensor(0.0)
    if hf.lm_head.bias is not None:
        bias = bias + hf.lm_head.bias[answer] - hf.lm_head.bias[foil]
    _, scale = _normalise(norm_kind, norm, seen["final"])

    def project(vector):
        return float(_normalise(norm_kind, norm, vector, scale)[0] @ direction)

    layers = {"embed": project(seen["embed"])}
    if pos_embed:
        layers["pos_embed"] = project(seen["pos_embed"])
    for layer in range(n_layers):
        layers[f"{layer}_attn_out"] = project(seen[f"attn{layer}"])
        layers[f"{layer}_mlp_out"] = project(seen[f"mlp{layer}"])
    layers["bias"] = float(bias)

    heads = torch.zeros(n_layers, hf.config.num_attention_heads)
    for layer, block in enumerate(blocks):
        o_proj = _get(block, proj)
        n_heads = heads.shape[1]
        z = seen[f"z{layer}"].reshape(n_heads, -1)
        head_dim = z.shape[1]
        for h in range(n_heads):
            columns = slice(h * head_dim, (h + 1) * head_dim)
            # GPT-2's Conv1D stores [in, out]; nn.Linear stores [out, in]
            written = z[h] @ (o_proj.weight[columns] if family == "gpt2" else o_proj.weight[:, columns].T)
            if family == "gemma3_text":  # through the post-attention norm, at its own scale
                post = block.post_attention_layernorm
                _, post_scale = _normalise("gemma_rmsnorm", post, seen[f"o{layer}"])
                written = _normalise("gemma_rmsnorm", post, written, post_scale)[0]
            heads[layer, h] = project(written)

    points = []
    for layer in range(n_layers):
        points += [seen[f"pre{layer}"], seen[f"pre{layer}"] + seen[f"attn{layer}"]]
    points.append(seen["final"])
    stacked = torch.stack(points)
    fresh_logits = hf.lm_head(norm(stacked))
    return {
        "logit_diff": float(logits[answer] - logits[foil]),
        "dla_layers": layers,
        "dla_heads": heads,
        "logit_lens": (fresh_logits[:, answer] - fresh_logits[:, foil]).tolist(),
        "logit_lens_top": fresh_logits.softmax(-1).topk(3, dim=-1).indices.tolist(),
        "logit_lens_linear": [project(p) + float(bias) for p in points],
    }
