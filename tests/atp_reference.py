"""An independent attribution-patching implementation: plain PyTorch hooks and
`torch.autograd.grad` on the Hugging Face model, sharing no code with nnexp.

- AtP: one clean forward (activations stored), one corrupted forward with the token
  embeddings made to require gradients, one `autograd.grad` of the corrupted metric;
  estimate = sum over features of (clean - corrupted) x gradient, per head for
  head_out.
- GradDrop, the direct way (Kramar et al. 2024, sec. 3.1.2): for each layer l, the
  corrupted forward again with block l's output replaced by
  input + (output - input).detach(), so that no gradient flows back through what the
  block adds to the residual stream, and AtP computed from that gradient;
  atp_star = sum_l |atp_l| / (L - 1). (nnexp gets the same numbers from one forward
  and one vector-Jacobian product per layer; this is L forward and backward passes.)

Module locations per family come from `tests.reference.FAMILIES` (written for the
tests, not nnexp's architecture table).
"""

from __future__ import annotations

import torch

from tests.reference import FAMILIES


def _module(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _blocks(model):
    return _module(model, FAMILIES[model.config.model_type]["blocks"])


def _location(model, site, layer):
    block = _blocks(model)[layer]
    if site == "resid_pre":
        return block, "in"
    if site == "resid_post":
        return block, "out"
    path, kind = FAMILIES[model.config.model_type][site]
    return _module(block, path), kind


def _first_input(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


def _capture(model, sites, layers, store):
    """Hooks storing each (site, layer) tensor (batch row 0) in `store`; the handles."""
    handles = []
    for site in sites:
        for layer in layers:
            module, kind = _location(model, site, layer)
            if kind == "out":
                def hook(mod, args, output, key=(site, layer)):
                    store[key] = output[0] if isinstance(output, tuple) else output
                handles.append(module.register_forward_hook(hook))
            else:
                def pre_hook(mod, args, kwargs, key=(site, layer)):
                    store[key] = _first_input(args, kwargs)
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return handles


def _drop_block(model, layer):
    """Block `layer`'s output becomes input + (output - input).detach(): same values, no
    gradient through the block's own contribution."""
    def hook(mod, args, kwargs, output):
        x = _first_input(args, kwargs)
        if isinstance(output, tuple):
            return (x + (output[0] - x).detach(),) + tuple(output[1:])
        return x + (output - x).detach()
    return _blocks(model)[layer].register_forward_hook(hook, with_kwargs=True)


def _metric(logits, answer, foil):
    logits = logits[:, -1].float()
    return logits[:, answer] - logits[:, foil]  # logit_diff


def metrics(model, clean, corrupted, answer, foil):
    """(clean, corrupted) logit_diff, plain forwards."""
    with torch.no_grad():
        return tuple(float(_metric(model(input_ids=torch.tensor([ids]), use_cache=False).logits, answer, foil)[0])
                     for ids in (clean, corrupted))


def atp(model, clean, corrupted, answer, foil, sites, drop_layer=None):
    """{(site, layer): [tokens] or [tokens, heads]}: AtP's estimate of every cell, raw
    (metric units), with the gradient through block `drop_layer` dropped when given."""
    layers = range(len(_blocks(model)))
    n_heads = model.config.num_attention_heads
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    clean_store, corrupted_store = {}, {}
    handles = []
    try:
        handles = _capture(model, sites, layers, clean_store)
        with torch.no_grad():
            model(input_ids=torch.tensor([clean]), use_cache=False)
        for h in handles:
            h.remove()
        handles = [] if drop_layer is None else [_drop_block(model, drop_layer)]  # before the capture hooks
        handles += _capture(model, sites, layers, corrupted_store)
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda mod, args, output: output.requires_grad_(True)))
        with torch.enable_grad():
            logits = model(input_ids=torch.tensor([corrupted]), use_cache=False).logits
            keys = list(corrupted_store)
            grads = torch.autograd.grad(_metric(logits, answer, foil).sum(), [corrupted_store[k] for k in keys],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    out = {}
    for key, grad in zip(keys, grads):
        a_corrupted = corrupted_store[key].detach()
        grad = torch.zeros_like(a_corrupted) if grad is None else grad
        product = (clean_store[key][0] - a_corrupted[0]).double() * grad[0].double()
        out[key] = product.reshape(*product.shape[:-1], n_heads, -1).sum(-1) if key[0] == "head_out" else product.sum(-1)
    return out


def atp_star(model, clean, corrupted, answer, foil, sites):
    """{(site, layer): ...}: sum over layers l of |AtP with block l's gradient dropped|, / (L - 1)."""
    n_layers = len(_blocks(model))
    per_layer = [atp(model, clean, corrupted, answer, foil, sites, drop_layer=layer) for layer in range(n_layers)]
    return {key: sum(estimate[key].abs() for estimate in per_layer) / max(n_layers - 1, 1) for key in per_layer[0]}


# -- query, key, value cells and the QK fix ---------------------------------------------
# The attention function is replaced, for the reference's passes, by one written here
# (registered with transformers' AttentionInterface): eager attention computed directly,
# which stores each layer's query, key, value and output and can swap in given values.
# It knows nothing of nnexp's closed forms: the QK fix below recomputes every affected
# row of the pattern from scratch.

REFERENCE_ATTENTION = "atp_reference_attention"


def _allowed(mask, sliding_window, t_q, t_k):
    if mask is None:
        rows, cols = torch.arange(t_q)[:, None], torch.arange(t_k)[None, :]
        allowed = rows >= cols
        if sliding_window is not None:
            allowed = allowed & (rows - cols < sliding_window)
        return allowed
    if mask.dtype == torch.bool:
        return mask[0, 0]
    return mask[0, 0] > torch.finfo(mask.dtype).min / 2


def _scores(query, key, scaling, softcap):
    w = query @ key.transpose(-1, -2) * scaling
    return w if softcap is None else softcap * torch.tanh(w / softcap)


class _Attention:
    """The attention function of the reference passes; `store[layer]` gets its tensors,
    `swap(layer, name, tensor) -> tensor` may replace q, k or v (heads-first, batch 1)."""

    def __init__(self):
        self.store, self.swap = {}, None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                 sliding_window=None, **kwargs):
        layer = module.layer_idx
        if self.swap is not None:
            query, key, value = (self.swap(layer, name, x) for name, x in (("q", query), ("k", key), ("v", value)))
        group = query.shape[1] // key.shape[1]
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        allowed = _allowed(attention_mask, sliding_window, query.shape[2], key.shape[2])
        scores = _scores(query, keys, scaling, softcap).masked_fill(~allowed, float("-inf"))
        pattern = torch.softmax(scores, -1)
        output = pattern @ values  # [batch, heads, t, d]
        self.store[layer] = dict(q=query, k=key, v=value, z=output, allowed=allowed, scaling=scaling,
                                 softcap=softcap)
        return output.transpose(1, 2).contiguous(), pattern


def _with_reference_attention(model):
    from transformers import AttentionInterface

    attention = _Attention()
    AttentionInterface.register(REFERENCE_ATTENTION, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REFERENCE_ATTENTION)
    return attention, previous


def attention_estimates(model, clean, corrupted, answer, foil, drop_layer=None):
    """{(name, layer): [tokens, heads]} for name in q, k, v (AtP through the softmax) and
    q_fix, k_fix (the QK fix, each affected row recomputed); k, v, k_fix per kv head."""
    attention, previous = _with_reference_attention(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handles = []
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([clean]), use_cache=False, logits_to_keep=1)
        clean_store = {layer: {n: x.clone() for n, x in entry.items() if torch.is_tensor(x)}
                       for layer, entry in attention.store.items()}
        handles = [] if drop_layer is None else [_drop_block(model, drop_layer)]
        handles.append(model.get_input_embeddings().register_forward_hook(
            lambda mod, args, output: output.requires_grad_(True)))
        with torch.enable_grad():
            # (the metric reads the last position only: its logits alone)
            logits = model(input_ids=torch.tensor([corrupted]), use_cache=False, logits_to_keep=1).logits
            store = attention.store
            layers = sorted(store)
            wrt = [store[layer][n] for layer in layers for n in ("q", "k", "v", "z")]
            grads = torch.autograd.grad(_metric(logits, answer, foil).sum(), wrt, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.set_attn_implementation(previous)
    out = {}
    for i, layer in enumerate(layers):
        entry = store[layer]
        g = {n: grads[4 * i + j] for j, n in enumerate(("q", "k", "v", "z"))}
        for n in ("q", "k", "v"):
            grad = torch.zeros_like(entry[n]) if g[n] is None else g[n]
            # [1, heads, t, d] -> per head and position, summed over d -> [t, heads]
            out[(n, layer)] = ((clean_store[layer][n] - entry[n].detach()).double() * grad.double()).sum(-1)[0].T
        out[("q_fix", layer)], out[("k_fix", layer)] = _qk_fix_direct(
            clean_store[layer], entry, torch.zeros_like(entry["z"]) if g["z"] is None else g["z"])
    return out


def _qk_fix_direct(clean, corrupted, grad_z):
    """Kramar et al.'s QK fix, row by row: the pattern row recomputed exactly with the
    clean query (or with the clean key at one position), dotted with dM/dA = dM/dz . v."""
    q, k, v = (corrupted[n].detach().double()[0] for n in ("q", "k", "v"))
    q_clean, k_clean = clean["q"].double()[0], clean["k"].double()[0]
    heads, kv, t = q.shape[0], k.shape[0], q.shape[1]
    group = heads // kv
    allowed, scaling, softcap = corrupted["allowed"], corrupted["scaling"], corrupted["softcap"]

    q_fix, k_fix = torch.zeros(t, heads, dtype=torch.float64), torch.zeros(t, kv, dtype=torch.float64)
    blocked = ~allowed  # [t, s]
    for h in range(heads):
        g = h // group
        d_pattern = grad_z.double()[0, h] @ v[g].T  # dM/dA, [t, s]
        base = torch.softmax(_scores(q[h], k[g], scaling, softcap).masked_fill(blocked, float("-inf")), -1)
        # every row with the clean query
        fixed = torch.softmax(_scores(q_clean[h], k[g], scaling, softcap).masked_fill(blocked, float("-inf")), -1)
        q_fix[:, h] = ((fixed - base) * d_pattern).sum(-1)
        # every row t, with t copies of the keys, copy s with key s clean: [t, s (clean key), s']
        keys = k[g].expand(t, t, -1).clone()
        keys[torch.arange(t), torch.arange(t)] = k_clean[g]
        scores = torch.stack([_scores(q[h, row_t][None], keys, scaling, softcap)[:, 0] for row_t in range(t)])
        moved = torch.softmax(scores.masked_fill(blocked[:, None, :], float("-inf")), -1)
        k_fix[:, g] += ((moved - base[:, None, :]) * d_pattern[:, None, :]).sum((0, 2))
    return q_fix, k_fix


def attention_star(model, clean, corrupted, answer, foil):
    """AtP* of the q, k, v cells the direct way: per layer l the estimates with block l's
    gradient dropped (L forward and backward passes), sum_l |.| / (L - 1); for q and k the
    QK-fixed estimate, for v plain AtP."""
    n_layers = len(_blocks(model))
    per_layer = [attention_estimates(model, clean, corrupted, answer, foil, drop_layer=layer)
                 for layer in range(n_layers)]
    total = {}
    for site, name in (("q", "q_fix"), ("k", "k_fix"), ("v", "v")):
        for layer in range(n_layers):
            total[(site, layer)] = sum(e[(name, layer)].abs() for e in per_layer) / max(n_layers - 1, 1)
    return total


def patched_attention_metric(model, clean, corrupted, answer, foil, site, layer, head, position):
    """logit_diff of the corrupted prompt with the clean run's `site` (q, k or v) of
    `head` (a kv head for k and v) at `position` in `layer` put in."""
    attention, previous = _with_reference_attention(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([clean]), use_cache=False, logits_to_keep=1)
            source = attention.store[layer][site].clone()

            def swap(at, name, x):
                if at != layer or name != site:
                    return x
                x = x.clone()
                x[:, head, position] = source[:, head, position]
                return x

            attention.swap = swap
            logits = model(input_ids=torch.tensor([corrupted]), use_cache=False, logits_to_keep=1).logits
    finally:
        model.set_attn_implementation(previous)
    return float(_metric(logits, answer, foil)[0])
