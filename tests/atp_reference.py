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
