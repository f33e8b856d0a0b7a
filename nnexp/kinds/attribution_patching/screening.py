"""The screening trace of attribution patching: AtP and AtP*'s GradDrop estimates of
every cell of one prompt pair, from one forward pass of [clean, corrupted] and
backward passes from the corrupted row's metric.

AtP (Nanda 2022; Syed et al. 2023) estimates the effect of patching the clean value of
an activation a into the corrupted run at one cell n by the first-order term

    atp(n) = (a_clean(n) - a_corrupted(n)) . dM/da(n)   (gradient at the corrupted run)

where a cell is a (layer, position) of a residual or sublayer site, or a (layer,
head, position) of `head_out` (the head's slice of the output projection's input).

GradDrop (Kramar et al. 2024, sec. 3.1.2) recomputes the same term L times, the l-th
time with the gradient that flows back through layer l's contribution to the
residual stream (block l's output minus its input: attention plus MLP) set to zero,
and scores a cell by the mean magnitude:

    atp_star(n) = 1/(L-1) * sum_l |atp_l(n)|

Dropping layer l's contribution is computed without L forward passes: writing r_l =
resid_post_l - resid_pre_l, the chain rule splits the gradient at any cell n upstream
of r_l into the part through r_l and the rest,

    dM/da(n) = [dM/da(n) with r_l held fixed] + J_{r_l,n}^T dM/dr_l,

and dM/dr_l = dM/d resid_post_l. So the GradDrop-l gradient is the plain gradient
minus one vector-Jacobian product, `autograd.grad([resid_post_l, resid_pre_l], cells,
[g_l, -g_l])`, a backward pass through blocks 0..l only. Cells at or after
resid_post_l keep the plain gradient (no path through r_l).

Query, key and value cells (sites `q`, `k`, `v`: the attention function's inputs, per
head and position; k and v per key/value head) get the same plain AtP term, the
gradient flowing through the whole attention softmax. AtP*'s QK fix (Kramar et al.
2024, sec. 3.1.1) replaces it for query and key cells by the change of the attention
pattern computed exactly, linearised only in the pattern. With A the corrupted run's
pattern of head h, recomputed from the q and k read at the call (A = softmax(cap(
scaling * q k^T) + mask), `cap` the family's logit softcap if any), and

    dM/dA(t, s) = dM/dz_h(t) . v(s)   (z_h: the head's output, the head_out site; v of
                                        h's key/value head, corrupted run),

- a query cell (h, t): A'(t, :) = softmax(cap(scaling * q_clean(t) . K_corr^T) + mask(t, :)),
  qk(h, t) = sum_s (A'(t, s) - A(t, s)) dM/dA(t, s);
- a key cell (kv head g, s): for every query head h reading g and every row t, the row
  with column s's logit alone recomputed from k_clean(s) (closed form: with delta the
  logit's change and r = 1 + A(t, s) (e^delta - 1), A'(t, s') = A(t, s') / r for s' != s
  and A'(t, s) = A(t, s) e^delta / r), qk(g, s) = sum over h and t of
  sum_s' (A'(t, s') - A(t, s')) dM/dA(t, s').

Values need no fix (the output is linear in v given the pattern). The fix costs no
extra forward: A comes from the q and k read, dM/dA from the head_out gradient and v
(computed in float64). Combined with GradDrop as the paper does: AtP* of a query or key
cell is 1/(L-1) * sum_l |qk_l|, qk_l computed with the GradDrop-l gradient at head_out
(the same vector-Jacobian products). The signed QK-fixed estimate with the plain
gradient is returned too ("atp_qk").

The body runs wherever the model is (here or on an NDIF server), like every body in
`nnexp.tracing.execute`: parameters are frozen for the pass, so the backward passes
compute activation gradients only, and only the estimates (one number per cell) and
the two metrics leave the trace.
"""

from __future__ import annotations

from functools import partial

import torch

from ...errors import ModelError
from ...metrics import get_metric
from ...tracing.execute import _checked, _inputs, _operation_tensor, heads_to_features, operation_call
from ...tracing.jobs import TraceJob, hf_module


def screening_job(model, ids_clean, ids_corrupted, cells, block_points, metric_name, answer, foil,
                  graddrop: bool, attention=()) -> TraceJob:
    """One pair's screening trace: rows [clean, corrupted] (equal lengths, no padding).

    `cells`: (key, hook point) of every site x layer to estimate, in forward order;
    `block_points`: (resid_pre, resid_post) hook points of every block, for GradDrop;
    `attention`: per layer whose query or key cells get the QK fix, (layer, {"q", "k",
    "v", "z": hook point} (z: head_out), {"q" or "k": the cell key}).
    """
    input_ids = torch.tensor([ids_clean, ids_corrupted])
    body = partial(screening_body, embed=model.arch.spec.embed, cells=cells, block_points=block_points,
                   metric=get_metric(metric_name).fn, answer=torch.tensor([answer]), foil=torch.tensor([foil]),
                   graddrop=graddrop, tokens=len(ids_clean), attention=list(attention))
    return TraceJob(_inputs(input_ids, torch.ones_like(input_ids)), body, grad=True)


def screening_body(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens, attention=()) -> dict:
    """{"atp": {key: [tokens] or [tokens, heads]}, "atp_star": {...} (with GradDrop),
    "atp_qk": {key: [tokens, heads]} (query and key cells), "metric": [clean, corrupted]},
    on the CPU, float32."""
    # parameters frozen here as on a server (see gradient_body): no weight gradients
    flags = [(p, p.requires_grad) for p in hf_module(nn).parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return _screen(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens, attention)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _screen(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens, attention) -> dict:
    nn.get(embed).output.requires_grad_(True)
    # every hook point once, in forward order: the cells', the QK fix's (q, k, v, head_out of
    # its layers) and (for GradDrop) each block's input and output; a point read twice would
    # be waited for twice, and one call's inputs (q, k, v) are read once
    wanted = list(cells)
    for layer, points, _ in attention:
        wanted += [(f"__{name}.{layer}", point) for name, point in points.items()]
    if graddrop:
        for layer, (pre, post) in enumerate(block_points):
            wanted += [(f"__pre.{layer}", pre), (f"__post.{layer}", post)]
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][1].order, i))
    tensors, seen, calls = {}, {}, {}
    for i in order:
        key, point = wanted[i]
        if point in seen:
            tensors[key] = tensors[seen[point]]
            continue
        if point.io == "operation_input":  # [2, heads, tokens, d], as the call gets it
            call = (point.module, point.operation)
            if call not in calls:
                calls[call] = operation_call(nn, point).inputs
            tensors[key] = _operation_tensor(calls[call][0], point, 2, tokens)
        else:
            envoy = nn.get(point.module)
            value = envoy.output if point.io == "output" else envoy.input
            tensors[key] = _checked(value if point.index is None else value[point.index], point, 2, tokens)
        seen[point] = key
    logits = nn.output.logits[:, -1, :].float()
    values = metric(logits, answer.to(logits.device).expand(2), foil.to(logits.device).expand(2))
    points = dict(cells)
    for layer, extra, _ in attention:
        points.update({f"__{name}.{layer}": point for name, point in extra.items()})
    keys = [key for key, _ in cells]
    # what gradients are taken of: the cells, and head_out of the QK fix's layers
    targets = keys + [f"__z.{layer}" for layer, _, _ in attention]
    inputs = [tensors[key] for key in targets]
    if graddrop:
        posts = [tensors[f"__post.{layer}"] for layer in range(len(block_points))]
        grads = torch.autograd.grad(values[1], inputs + posts, retain_graph=True, allow_unused=True)
        grads, post_grads = list(grads[: len(inputs)]), grads[len(inputs):]
    else:
        grads = list(torch.autograd.grad(values[1], inputs, allow_unused=True))
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    # products and sums in float32, or the activations' dtype when wider
    dtype = torch.promote_types(inputs[0].dtype, torch.float32)
    # clean - corrupted, [tokens, features] (q, k, v as [tokens, heads * d])
    diffs = [_features((x[0:1] - x[1:2]).detach(), points[key])[0].to(dtype) for key, x in zip(keys, inputs)]

    def corrupted_grad(i, dropped=None):
        grad = grads[i] if dropped is None else grads[i] - dropped
        return _features(grad[1:2], points[targets[i]])[0]

    out = {"atp": {key: _per_cell(d * corrupted_grad(i).to(dtype), points[key])
                   for i, (key, d) in enumerate(zip(keys, diffs))},
           "metric": values.detach().float().cpu()}
    z_index = {layer: len(keys) + j for j, (layer, _, _) in enumerate(attention)}
    if attention:
        out["atp_qk"] = {}
        for layer, _, fixed in attention:
            out["atp_qk"].update(_qk_fix(tensors, layer, fixed, corrupted_grad(z_index[layer]), calls, points))
    if graddrop:
        total = {key: torch.zeros_like(out["atp"][key]) for key in keys}
        for layer, (pre, post) in enumerate(block_points):
            # the gradient targets upstream of r_layer: before the block's output in forward order
            upstream = [i for i, key in enumerate(targets) if points[key].order < post.order]
            dropped = [None] * len(targets)
            g = post_grads[layer]
            if upstream and g is not None:
                through = torch.autograd.grad([tensors[f"__post.{layer}"], tensors[f"__pre.{layer}"]],
                                              [inputs[i] for i in upstream], [g, -g],
                                              retain_graph=True, allow_unused=True)
                for i, vjp in zip(upstream, through):
                    dropped[i] = vjp
            fixed_here = {}
            for qk_layer, _, fixed in attention:
                fixed_here.update(_qk_fix(tensors, qk_layer, fixed, corrupted_grad(z_index[qk_layer],
                                                                                   dropped[z_index[qk_layer]]),
                                          calls, points))
            for i, key in enumerate(keys):
                estimate = fixed_here[key] if key in fixed_here else \
                    _per_cell(diffs[i] * corrupted_grad(i, dropped[i]).to(dtype), points[key])
                total[key] += estimate.abs()
        scale = max(len(block_points) - 1, 1)
        out["atp_star"] = {key: (value / scale).float() for key, value in total.items()}
    out["atp"] = {key: value.float() for key, value in out["atp"].items()}
    return out


def _features(x: torch.Tensor, point) -> torch.Tensor:
    """A tensor read at `point` as [rows, tokens, features] (q, k, v: heads into features)."""
    return heads_to_features(x) if point.io == "operation_input" else x


def _per_cell(product: torch.Tensor, point) -> torch.Tensor:
    """[tokens, features] -> [tokens] summed over features, or [tokens, heads] per head."""
    if point.n_heads:
        return product.reshape(*product.shape[:-1], point.n_heads, -1).sum(-1).detach().cpu()
    return product.sum(-1).detach().cpu()


def _qk_fix(tensors, layer, fixed, grad_z, calls, points) -> dict:
    """The QK-fixed estimates of layer `layer`'s query and key cells named in `fixed`
    ({"q" or "k": cell key}) from the head_out gradient `grad_z` ([tokens, heads * d],
    corrupted row): {key: [tokens, heads] (q) or [tokens, kv heads] (k)}, float32."""
    dtype = torch.float64
    q, k, v = (tensors[f"__{name}.{layer}"].detach().to(dtype) for name in ("q", "k", "v"))
    n_heads, n_kv, tokens, head_dim = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    group = n_heads // n_kv
    point = points[f"__q.{layer}"]
    args, kwargs = calls[(point.module, point.operation)]
    scaling = kwargs.get("scaling")
    scaling = head_dim ** -0.5 if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    allowed, bias = _pattern_mask(mask, kwargs.get("sliding_window"), tokens, q.device, dtype)

    def logits(queries, keys):  # [heads, t, d] x [heads, s, d] -> [heads, t, s]
        w = queries @ keys.transpose(-1, -2) * scaling
        return w if softcap is None else softcap * torch.tanh(w / softcap)

    q_clean, q_corrupted = q[0], q[1]
    k_clean, k_corrupted = (x.repeat_interleave(group, 0) for x in (k[0], k[1]))  # per query head
    v_corrupted = v[1].repeat_interleave(group, 0)
    grad = grad_z.detach().to(dtype).reshape(tokens, n_heads, head_dim).transpose(0, 1)
    d_pattern = grad @ v_corrupted.transpose(-1, -2)  # dM/dA, [heads, t, s]
    scores = logits(q_corrupted, k_corrupted)
    pattern = torch.softmax(scores + bias, -1)
    out = {}
    if "q" in fixed:
        patched = torch.softmax(logits(q_clean, k_corrupted) + bias, -1)
        out[fixed["q"]] = ((patched - pattern) * d_pattern).sum(-1).T.float().cpu()  # [t, heads]
    if "k" in fixed:
        # key s clean: row t's logit at column s moves by delta; the rest of the row is rescaled
        delta = torch.where(allowed, logits(q_corrupted, k_clean) - scores, 0.0)
        grow = torch.expm1(delta)
        ratio = 1 + pattern * grow  # Z' / Z
        row_sum = (pattern * d_pattern).sum(-1, keepdim=True)
        change = (1 / ratio - 1) * row_sum + pattern * grow / ratio * d_pattern  # [heads, t, s]
        out[fixed["k"]] = change.sum(1).reshape(n_kv, group, tokens).sum(1).T.float().cpu()  # [s, kv heads]
    return out


def _pattern_mask(mask, sliding_window, tokens, device, dtype):
    """(allowed [1 or heads, t, s] bool, additive bias) of the corrupted row (row 1): the
    mask the call got, or causal (and the sliding window) when it got none (SDPA)."""
    if mask is None:
        t = torch.arange(tokens, device=device)
        allowed = t[:, None] >= t[None, :]
        if sliding_window is not None:
            allowed &= t[:, None] - t[None, :] < sliding_window
        allowed = allowed.unsqueeze(0)
    elif mask.dtype == torch.bool:
        allowed = mask[-1, :, :, -tokens:].to(device)
    else:
        floor = torch.finfo(mask.dtype).min / 2
        row = mask[-1, :, :, -tokens:].to(device)
        allowed = row > floor
        if not bool(allowed.any(-1).all()):
            raise ModelError("the attention mask blocks a whole row; the QK fix needs a causal mask")
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return allowed, bias
