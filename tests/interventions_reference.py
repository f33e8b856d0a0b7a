"""An independent reference for declared interventions, in plain PyTorch.

Written for the tests alone from the definitions in the README's intervention table; it
shares no code with nnexp. Module names are typed out per family here; activations are
read and edited with torch forward (pre-)hooks, not nnsight; every run is ONE unpadded
prompt per forward pass (no batch, no left padding, no vectorised edits); metrics are
written out from their definitions. nnexp's batched traces are compared against it.

An edit here is (site, layer, positions, head, fn) with fn(x) -> new x on the selected
[n, features] vectors (a head's slice when head is given), applied in the order given.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

# family -> (blocks, attention output module, MLP output module, attention output projection)
FAMILIES = {
    "gpt2": ("transformer.h", "attn", "mlp", "attn.c_proj"),
    "llama": ("model.layers", "self_attn", "mlp", "self_attn.o_proj"),
    # what Gemma 3 adds to the residual stream is the output of its post-sublayer norms
    "gemma3_text": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj"),
}


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _site(hf, site, layer):
    """(module, "input" or "output") of a site."""
    blocks, attn, mlp, proj = FAMILIES[hf.config.model_type]
    block = _get(hf, blocks)[layer]
    return {
        "resid_pre": (block, "input"),
        "resid_post": (block, "output"),
        "attn_out": (_get(block, attn), "output"),
        "mlp_out": (_get(block, mlp), "output"),
        "head_out": (_get(block, proj), "input"),
    }[site]


def n_heads(hf):
    return hf.config.num_attention_heads if hasattr(hf.config, "num_attention_heads") else hf.config.n_head


def _edit_tensor(x, edits, hf):
    """Apply (positions, head, fn) edits to x [1, tokens, features] in place, in order."""
    for positions, head, fn in edits:
        if head is None:
            x[0, positions] = fn(x[0, positions].float()).to(x.dtype)
        else:
            d = x.shape[-1] // n_heads(hf)
            x[0, positions, head * d : (head + 1) * d] = fn(x[0, positions, head * d : (head + 1) * d].float()).to(x.dtype)


def _hook(module, io, fn):
    """fn(tensor) edits the module's first input or its (first) output in place."""
    if io == "input":
        def pre(mod, args, kwargs):
            if args:
                fn(args[0])
            else:
                fn(kwargs["hidden_states"])
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, output):
        fn(output[0] if isinstance(output, tuple) else output)
    return module.register_forward_hook(post)


def run(hf, ids, edits=(), reads=(), logits_position=-1):
    """One unpadded forward pass of `ids` with `edits` [(site, layer, positions, head,
    fn)] applied; returns (the next-token logits at `logits_position`, float32, and
    {name: the value read}) for reads [(name, site, layer, positions, head)] taken
    after the edits at their site."""
    by_place = {}
    for site, layer, positions, head, fn in edits:
        by_place.setdefault((site, layer), []).append((positions, head, fn))
    read_by_place = {}
    for name, site, layer, positions, head in reads:
        read_by_place.setdefault((site, layer), []).append((name, positions, head))
    saved = {}
    with ExitStack() as stack:
        for place in set(by_place) | set(read_by_place):
            module, io = _site(hf, *place)

            def fn(x, place=place):
                _edit_tensor(x, by_place.get(place, []), hf)
                for name, positions, head in read_by_place.get(place, []):
                    value = x[0, positions].detach().float().clone()
                    if head is not None:
                        d = x.shape[-1] // n_heads(hf)
                        value = value[:, head * d : (head + 1) * d]
                    saved[name] = value

            handle = _hook(module, io, fn)
            stack.callback(handle.remove)
        with torch.no_grad():
            logits = hf(torch.tensor([ids]), use_cache=False).logits[0, logits_position].float()
    return logits, saved


def activation(hf, ids, site, layer, position):
    """The site's activation at `position` of an unedited run of `ids`."""
    _, saved = run(hf, ids, reads=[("x", site, layer, [position % len(ids)], None)])
    return saved["x"][0]


def site_mean(hf, ids_list, site, layer):
    """The site's mean over every token of every prompt."""
    total, count = 0, 0
    for ids in ids_list:
        _, saved = run(hf, ids, reads=[("x", site, layer, list(range(len(ids))), None)])
        total = total + saved["x"].sum(0)
        count += len(ids)
    return total / count


# -- metrics, from their definitions ---------------------------------------------------------


def logit_diff(logits, answer, foil):
    return float(logits[answer] - logits[foil])


def kl(reference, logits):
    p = torch.softmax(reference.double(), -1)
    return float((p * (torch.log(p) - torch.log_softmax(logits.double(), -1))).sum())


def log_prob_change(reference, logits, answer):
    return float(torch.log_softmax(logits.double(), -1)[answer] - torch.log_softmax(reference.double(), -1)[answer])


def top1_agreement(reference, logits):
    return float(int(logits.argmax()) == int(reference.argmax()))


def top10_overlap(reference, logits):
    mine = set(logits.topk(10).indices.tolist())
    theirs = set(reference.topk(10).indices.tolist())
    return len(mine & theirs) / 10


def answer_set_prob(logits, answers):
    return float(torch.softmax(logits.double(), -1)[list(answers)].sum())
