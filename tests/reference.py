"""An independent activation-patching implementation with plain PyTorch hooks.

Written for the tests and sharing no code with nnexp: its own module names per
family (not nnexp's architecture table), its own hooks (torch forward hooks, not
nnsight), its own metric arithmetic, and one forward pass per (site, layer) with one
row per patched cell. nnexp's numbers are compared against these.
"""

from __future__ import annotations

import torch

# Where each site's tensor lives, written out per family for the tests alone.
# kind "out": output of the module (tuple element 0 when it returns a tuple);
# kind "in": first input of the module (pre-hook).
FAMILIES = {
    "gpt2": {
        "blocks": "transformer.h",
        "attn_out": ("attn", "out"),
        "mlp_out": ("mlp", "out"),
        "head_out": ("attn.c_proj", "in"),
    },
    "gptj": {
        "blocks": "transformer.h",
        "attn_out": ("attn", "out"),
        "mlp_out": ("mlp", "out"),
        "head_out": ("attn.out_proj", "in"),
    },
    "gpt_neox": {
        "blocks": "gpt_neox.layers",
        # the dropout after attention is the identity in eval mode, so the attention
        # module's own output is what joins the residual stream
        "attn_out": ("attention", "out"),
        "mlp_out": ("mlp", "out"),
        "head_out": ("attention.dense", "in"),
    },
    "llama": {
        "blocks": "model.layers",
        "attn_out": ("self_attn", "out"),
        "mlp_out": ("mlp", "out"),
        "head_out": ("self_attn.o_proj", "in"),
    },
    "gemma3_text": {
        "blocks": "model.layers",
        "attn_out": ("post_attention_layernorm", "out"),
        "mlp_out": ("post_feedforward_layernorm", "out"),
        "head_out": ("self_attn.o_proj", "in"),
    },
}
FAMILIES["mistral"] = FAMILIES["qwen2"] = FAMILIES["qwen3"] = FAMILIES["gemma"] = FAMILIES["llama"]
FAMILIES["gemma2"] = FAMILIES["gemma3_text"]


def _module(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _location(model, site, layer):
    family = FAMILIES[model.config.model_type]
    block = _module(model, family["blocks"])[layer]
    if site == "resid_pre":
        return block, "in"
    if site == "resid_post":
        return block, "out"
    path, kind = family[site]
    return _module(block, path), kind


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _hook(module, kind, fn):
    """Register `fn(tensor) -> None` (in-place edit/read) on a module's output or first input."""
    if kind == "out":
        def hook(mod, args, output):
            fn(_first(output))
            return output
        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        if args:
            fn(args[0])
        else:
            fn(next(iter(kwargs.values())))
        return None
    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def metric_values(logits_last, answer, foil, metric="logit_diff"):
    logits_last = logits_last.float()
    if metric == "logit_diff":
        return logits_last[:, answer] - logits_last[:, foil]
    if metric == "logit":
        return logits_last[:, answer]
    if metric == "answer_over_mean":  # the README's example of a user's metric
        return logits_last[:, answer] - logits_last.mean(-1)
    probs = torch.softmax(logits_last, dim=-1)
    if metric == "prob":
        return probs[:, answer]
    if metric == "prob_diff":
        return probs[:, answer] - probs[:, foil]
    if metric == "log_prob":
        return torch.log(probs[:, answer])
    raise ValueError(metric)


@torch.no_grad()
def _forward_last_logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits[:, -1]


@torch.no_grad()
def clean_cache(model, clean_ids, sites, layers):
    """Clean activations at every (site, layer): [tokens, width] tensors."""
    cache, handles = {}, []
    for site in sites:
        for layer in layers:
            module, kind = _location(model, site, layer)

            def store(t, key=(site, layer)):
                cache[key] = t[0].detach().clone()

            handles.append(_hook(module, kind, store))
    try:
        _forward_last_logits(model, clean_ids)
    finally:
        for h in handles:
            h.remove()
    return cache


@torch.no_grad()
def patching_sweep(model, clean, corrupted, answer, foil, sites, layers, heads=None,
                   positions="each", head_positions="all", metric="logit_diff"):
    """Reference results: {"clean", "corrupted", site: patched metric tensor}.

    Shapes follow nnexp's conventions: [layer, position] for "each"/lists, [layer] for
    "all"; heads add a head axis after layer.
    """
    clean_ids = torch.tensor([clean])
    corrupted_ids = torch.tensor([corrupted])
    n_tokens = clean_ids.shape[1]
    n_heads = model.config.num_attention_heads
    heads = list(range(n_heads)) if heads is None else heads
    cache = clean_cache(model, clean_ids, sites, layers)
    out = {
        "clean": float(metric_values(_forward_last_logits(model, clean_ids), answer, foil, metric)[0]),
        "corrupted": float(metric_values(_forward_last_logits(model, corrupted_ids), answer, foil, metric)[0]),
    }
    for site in sites:
        spec = head_positions if site == "head_out" else positions
        if spec == "all":
            groups = [list(range(n_tokens))]
        elif spec == "each":
            groups = [[p] for p in range(n_tokens)]
        else:
            groups = [[p % n_tokens] for p in spec]
        per_layer = []
        for layer in layers:
            module, kind = _location(model, site, layer)
            # one row per (head, position group), in that order
            cells = [(h, g) for h in (heads if site == "head_out" else [None]) for g in groups]
            clean_value = cache[(site, layer)]

            def patch(t, cells=cells, clean_value=clean_value):
                for row, (head, group) in enumerate(cells):
                    for p in group:
                        if head is None:
                            t[row, p] = clean_value[p]
                        else:
                            d = t.shape[-1] // n_heads
                            t[row, p, head * d:(head + 1) * d] = clean_value[p, head * d:(head + 1) * d]

            handle = _hook(module, kind, patch)
            try:
                logits = _forward_last_logits(model, corrupted_ids.repeat(len(cells), 1))
            finally:
                handle.remove()
            values = metric_values(logits, answer, foil, metric)
            shape = ((len(heads),) if site == "head_out" else ()) + ((len(groups),) if spec != "all" else ())
            per_layer.append(values.reshape(shape) if shape else values.reshape(()))
        out[site] = torch.stack(per_layer)
    return out
