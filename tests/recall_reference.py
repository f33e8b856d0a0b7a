"""An independent reference for the four factual-recall analyses, in plain PyTorch.

Attention knockout, attribute extraction, sublayer knockout and causal tracing, written
from the definitions in the recall spec for the tests alone. It shares no code with
nnexp: module names are typed out per family here, activations are read and edited with
torch forward hooks (not nnsight), one prompt at a time and unpadded (the noise samples of
causal tracing are the only batch: n copies of one prompt). Attention knockout is done
literally, by a custom eager attention function (registered with transformers'
AttentionInterface) that sets the pre-softmax scores of query T-1 to torch.finfo.min;
nnexp's numbers are compared against these.

Every number returned is a python float/int or a float32 (int64 for ids and ranks) CPU tensor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

# family -> module paths: blocks, attn_out and mlp_out (relative to a block), the embedding
# (token embeddings only; Gemma's scaled one), the final norm. The unembedding is lm_head.
FAMILIES = {
    "gpt2": {"blocks": "transformer.h", "attn_out": "attn", "mlp_out": "mlp",
             "embed": "transformer.wte", "norm": "transformer.ln_f"},
    "llama": {"blocks": "model.layers", "attn_out": "self_attn", "mlp_out": "mlp",
              "embed": "model.embed_tokens", "norm": "model.norm"},
    # in Gemma 3 what joins the residual stream is the output of the post-sublayer norms
    "gemma3_text": {"blocks": "model.layers", "attn_out": "post_attention_layernorm",
                    "mlp_out": "post_feedforward_layernorm", "embed": "model.embed_tokens", "norm": "model.norm"},
}
SITES = ("resid_post", "attn_out", "mlp_out")


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _family(hf):
    return FAMILIES[hf.config.model_type]


def _blocks(hf):
    return _get(hf, _family(hf)["blocks"])


def _site_module(hf, site, layer):
    block = _blocks(hf)[layer]
    return block if site == "resid_post" else _get(block, _family(hf)[site])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _device(hf):
    return next(hf.parameters()).device


def _rank(logits, token):
    return 1 + int((logits > logits[token]).sum())


def _prob(logits, token):
    return float(torch.softmax(logits.float(), -1)[token])


@contextmanager
def _hooks(pairs):
    """Register (module, forward_hook) pairs for the duration of the block."""
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run(hf, ids, repeat=1, hooks=()):
    """Last-position logits [repeat, V] (float32, CPU) of `ids` repeated `repeat` times."""
    inputs = torch.tensor([ids] * repeat, device=_device(hf))
    with _hooks(hooks):
        return hf(input_ids=inputs, use_cache=False).logits[:, -1].float().cpu()


# --------------------------------------------------------------------------- common

def subject_span(tokenizer, prompt, subject):
    """[s, e): tokens whose character offsets overlap the first occurrence of `subject`."""
    start = prompt.index(subject)
    end = start + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return hits[0], hits[-1] + 1


def last_logits(hf, ids):
    """Clean last-position logits [V]."""
    return _run(hf, ids)[0]


def window(l, k, n_layers):
    """The k layers centred on l, clipped to [0, n_layers): l-4..l+4 for k=9, l-5..l+4 for k=10."""
    return list(range(max(0, l - k // 2), min(n_layers, l - k // 2 + k)))


# --------------------------------------------------------------------------- 1. attention knockout

_KNOCKOUT = "recall_reference_knockout"
_STATE = {"layers": frozenset(), "keys": []}


def _knockout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        softcap=None, s_aux=None, sliding_window=None, **kwargs):
    """Eager attention [B, H, Tq, Tk] with query T-1's scores to the knocked keys set to finfo.min."""
    n_rep = query.shape[1] // key.shape[1]  # grouped-query attention: repeat the k/v heads
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    n_q, n_k = scores.shape[-2:]
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is None:  # no mask handed over: causal (and sliding window) built here
        q_idx = torch.arange(n_k - n_q, n_k, device=scores.device)[:, None]
        k_idx = torch.arange(n_k, device=scores.device)[None, :]
        allowed = k_idx <= q_idx
        if sliding_window is not None:
            allowed &= k_idx > q_idx - sliding_window
        scores = scores.masked_fill(~allowed, lowest)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :n_k], lowest)
    else:
        scores = scores + attention_mask[..., :n_k]
    if module.layer_idx in _STATE["layers"] and _STATE["keys"]:
        scores[..., n_q - 1, _STATE["keys"]] = lowest  # the knockout itself, after scaling and masking
    if s_aux is not None:  # attention sinks: an extra logit per head that takes probability mass
        sink = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
        weights = torch.softmax(torch.cat([scores, sink], -1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(weights.to(value.dtype), value)  # dropout off: eval only
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(_KNOCKOUT, _knockout_attention)
# Without a registered mask function, transformers hands an unknown implementation no
# mask at all (Gemma 3's sliding windows would be lost); eager's additive mask encodes both.
AttentionMaskInterface.register(_KNOCKOUT, eager_mask)


@contextmanager
def knockout_attention(hf, layers, keys):
    """Switch `hf` to the knockout attention for the block, restoring its own afterwards."""
    original = hf.config._attn_implementation
    _STATE.update(layers=frozenset(layers), keys=list(keys))
    hf.set_attn_implementation(_KNOCKOUT)
    try:
        yield
    finally:
        hf.set_attn_implementation(original)
        _STATE.update(layers=frozenset(), keys=[])


def knockout_prob(hf, ids, attr, layers, keys):
    """p(attr) with query T-1 blocked from `keys` in every layer of `layers`.

    While switched, every layer runs the eager arithmetic above (knocked or not), so an
    edit that knocks nothing would differ from an sdpa model only by float rounding.
    """
    if not layers or not keys:  # nothing to knock out: the model's own attention, the clean run exactly
        return _prob(last_logits(hf, ids), attr)
    with knockout_attention(hf, layers, keys):
        return _prob(last_logits(hf, ids), attr)


# --------------------------------------------------------------------------- 2. attribute extraction

def _collect(hf, ids, position):
    """{site: [L, d]} of the clean run at `position`, plus the last-position logits."""
    n_layers = len(_blocks(hf))
    seen = {site: [None] * n_layers for site in SITES}
    hooks = []
    for site in SITES:
        for layer in range(n_layers):
            def keep(module, args, output, site=site, layer=layer):
                seen[site][layer] = _first(output)[0, position].detach().clone()
            hooks.append((_site_module(hf, site, layer), keep))
    logits = _run(hf, ids, hooks=hooks)[0]
    return {site: torch.stack(vectors) for site, vectors in seen.items()}, logits


@torch.no_grad()
def extraction(hf, ids, position, attr, top_k):
    """Logit-lens ("unembed": lm_head(final_norm(h))) and embedding ("embed": h @ E.T) readouts."""
    if position == "last":
        position = len(ids) - 1
    vectors, _ = _collect(hf, ids, position)
    norm = _get(hf, _family(hf)["norm"])
    matrix = hf.get_input_embeddings().weight
    project = {
        "unembed": lambda h: hf.lm_head(norm(h)),  # the final norm on each vector alone; no logit softcap
        "embed": lambda h: h @ matrix.T,
    }
    result = {}
    for name, fn in project.items():
        result[name] = {}
        for site in SITES:
            logits = fn(vectors[site]).float().cpu()  # [L, V]
            result[name][site] = {
                "rank": torch.tensor([_rank(row, attr) for row in logits], dtype=torch.int64),
                "top_ids": torch.topk(logits, top_k, dim=-1).indices.to(torch.int64),
                "logits": logits,
            }
    return result


def attribute_token_ids(tokenizer, strings):
    """Token ids of each attribute string, with and without a leading space."""
    ids = set()
    for a in strings:
        for text in (" " + a.strip(), a.strip()):
            ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


# --------------------------------------------------------------------------- 3. sublayer knockout

def sublayer_ablation(hf, ids, attr, site, layers, positions, values, with_logits=False):
    """(p(attr), rank) with `site` at `positions` of each layer replaced by zeros or values[layer]
    (and the last position's logits, with_logits=True).

    positions: a list of ints, or "all" / "last"; values: None (zero) or anything indexable by
    layer giving a [d] vector ({layer: tensor}, or sublayer_means' [L, d]).
    """
    assert site in ("mlp_out", "attn_out")
    if positions == "all":
        positions = list(range(len(ids)))
    elif positions == "last":
        positions = [len(ids) - 1]
    hooks = []
    for layer in layers:
        def ablate(module, args, output, layer=layer):
            tensor = _first(output).clone()
            tensor[:, positions] = 0.0 if values is None else values[layer].to(tensor)
            return _replace_first(output, tensor)
        hooks.append((_site_module(hf, site, layer), ablate))
    logits = _run(hf, ids, hooks=hooks)[0]
    if with_logits:
        return _prob(logits, attr), _rank(logits, attr), logits
    return _prob(logits, attr), _rank(logits, attr)


def sublayer_means(hf, ids_list, site):
    """[L, d]: the site's output at each layer averaged over every position of every prompt."""
    n_layers = len(_blocks(hf))
    total, count = torch.zeros(n_layers, hf.config.hidden_size, dtype=torch.float64), 0

    def adder(layer):
        def add(module, args, output):
            total[layer] += _first(output)[0].double().sum(0).cpu()
        return add
    for ids in ids_list:
        _run(hf, ids, hooks=[(_site_module(hf, site, layer), adder(layer)) for layer in range(n_layers)])
        count += len(ids)
    return (total / count).float()


# --------------------------------------------------------------------------- 4. causal tracing

def _embedding(hf):
    return _get(hf, _family(hf)["embed"])


def embedding_std(hf, ids_list, spans):
    """Unbiased std of all embedding-output entries at the subject tokens of every prompt."""
    pieces = []
    for ids, (s, e) in zip(ids_list, spans):
        def keep(module, args, output, s=s, e=e):
            pieces.append(output[0, s:e].detach().float().cpu())
        _run(hf, ids, hooks=[(_embedding(hf), keep)])
    return float(torch.cat(pieces).std())


def causal_noise(n, n_subject_tokens, d, sigma, seed):
    """ROME's noise: the same seeded draw for every fact, float32 on CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, n_subject_tokens, d), generator=g) * sigma


def _noise_hook(span, noise):
    s, e = span

    def add(module, args, output):
        output = output.clone()
        output[:, s:e] = output[:, s:e] + noise.to(output)  # row i gets noise[i]
        return output
    return add


def corrupted_prob(hf, ids, span, attr, noise):
    """Mean p(attr) over the samples, noise[i] added to the embedding output at the span (one batch of n copies)."""
    logits = _run(hf, ids, repeat=noise.shape[0], hooks=[(_embedding(hf), _noise_hook(span, noise))])
    return float(torch.softmax(logits, -1)[:, attr].mean())


def restored_prob(hf, ids, span, attr, noise, site, layers, position):
    """Mean p(attr) of the corrupted runs with `site` at `position` of each of `layers` restored to clean."""
    assert site in SITES
    clean = {}

    def keeper(layer):
        def keep(module, args, output):
            clean[layer] = _first(output)[0, position].detach().clone()
        return keep
    _run(hf, ids, hooks=[(_site_module(hf, site, layer), keeper(layer)) for layer in layers])

    def restorer(layer):
        def restore(module, args, output):
            tensor = _first(output).clone()
            tensor[:, position] = clean[layer]
            return _replace_first(output, tensor)
        return restore
    hooks = [(_embedding(hf), _noise_hook(span, noise))]
    hooks += [(_site_module(hf, site, layer), restorer(layer)) for layer in layers]
    logits = _run(hf, ids, repeat=noise.shape[0], hooks=hooks)
    return float(torch.softmax(logits, -1)[:, attr].mean())
