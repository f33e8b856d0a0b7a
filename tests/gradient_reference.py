"""An independent gradient x activation, with plain PyTorch hooks and autograd.

Module names are typed out per family from the Hugging Face source (nothing taken from
nnexp's architecture table); one prompt at a time, no padding, parameters left as
Hugging Face leaves them (requiring gradients). The tests compare nnexp's batched,
padded, single-trace results with this.
"""

from __future__ import annotations

import torch

# family -> (blocks, attention output as added, MLP output as added)
LAYOUT = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "gemma3_text": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def metric_value(name: str, logits: torch.Tensor, true: int, false: int) -> torch.Tensor:
    if name == "contrast_prob_diff":
        probs = torch.softmax(logits, -1)
        return probs[true] - probs[false]
    if name == "contrast_logits_diff":
        return logits[true] - logits[false]
    if name == "prob":
        return torch.softmax(logits, -1)[true]
    if name == "logit":
        return logits[true]
    raise ValueError(name)


def reference(hf, family: str, ids: list[int], true: int, false: int, site: str, metric: str) -> torch.Tensor:
    """Gradient x activation [layers, positions, hidden] of `metric` at `site`."""
    blocks_path, attn_out, mlp_out = LAYOUT[family]
    blocks = _get(hf, blocks_path)
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(blocks):
        def keep(output, layer=layer):
            tensor = output[0] if isinstance(output, tuple) else output
            seen[layer] = tensor
        if site == "resid_pre":
            hooks.append(block.register_forward_pre_hook(lambda m, args, keep=keep: keep(args[0])))
        else:
            module = {"resid_post": block, "attn_out": _get(block, attn_out), "mlp_out": _get(block, mlp_out)}[site]
            hooks.append(module.register_forward_hook(lambda m, args, out, keep=keep: keep(out)))
    try:
        with torch.enable_grad():
            logits = hf(torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            value = metric_value(metric, logits, true, false)
            layers = sorted(seen)
            grads = torch.autograd.grad(value, [seen[layer] for layer in layers])
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([(g * seen[layer]).detach()[0].float() for layer, g in zip(layers, grads)])
