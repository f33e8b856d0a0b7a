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

The body runs wherever the model is (here or on an NDIF server), like every body in
`nnexp.tracing.execute`: parameters are frozen for the pass, so the backward passes
compute activation gradients only, and only the estimates (one number per cell) and
the two metrics leave the trace.
"""

from __future__ import annotations

from functools import partial

import torch

from ...metrics import get_metric
from ...tracing.execute import _checked, _inputs
from ...tracing.jobs import TraceJob, hf_module


def screening_job(model, ids_clean, ids_corrupted, cells, block_points, metric_name, answer, foil,
                  graddrop: bool) -> TraceJob:
    """One pair's screening trace: rows [clean, corrupted] (equal lengths, no padding).

    `cells`: (key, hook point) of every site x layer to estimate, in forward order;
    `block_points`: (resid_pre, resid_post) hook points of every block, for GradDrop."""
    input_ids = torch.tensor([ids_clean, ids_corrupted])
    body = partial(screening_body, embed=model.arch.spec.embed, cells=cells, block_points=block_points,
                   metric=get_metric(metric_name).fn, answer=torch.tensor([answer]), foil=torch.tensor([foil]),
                   graddrop=graddrop, tokens=len(ids_clean))
    return TraceJob(_inputs(input_ids, torch.ones_like(input_ids)), body, grad=True)


def screening_body(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens) -> dict:
    """{"atp": {key: [tokens] or [tokens, heads]}, "atp_star": {...} (with GradDrop),
    "metric": [clean, corrupted]}, on the CPU, float32."""
    # parameters frozen here as on a server (see gradient_body): no weight gradients
    flags = [(p, p.requires_grad) for p in hf_module(nn).parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return _screen(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _screen(nn, embed, cells, block_points, metric, answer, foil, graddrop, tokens) -> dict:
    nn.get(embed).output.requires_grad_(True)
    # every hook point once, in forward order: the cells' and (for GradDrop) each block's
    # input and output; a point read twice would be waited for twice
    wanted = list(cells)
    if graddrop:
        for layer, (pre, post) in enumerate(block_points):
            wanted += [(f"__pre.{layer}", pre), (f"__post.{layer}", post)]
    order = sorted(range(len(wanted)), key=lambda i: (wanted[i][1].order, i))
    tensors, seen = {}, {}
    for i in order:
        key, point = wanted[i]
        if point in seen:
            tensors[key] = tensors[seen[point]]
            continue
        envoy = nn.get(point.module)
        value = envoy.output if point.io == "output" else envoy.input
        tensors[key] = _checked(value if point.index is None else value[point.index], point, 2, tokens)
        seen[point] = key
    logits = nn.output.logits[:, -1, :].float()
    values = metric(logits, answer.to(logits.device).expand(2), foil.to(logits.device).expand(2))
    keys = [key for key, _ in cells]
    inputs = [tensors[key] for key in keys]
    if graddrop:
        posts = [tensors[f"__post.{layer}"] for layer in range(len(block_points))]
        grads = torch.autograd.grad(values[1], inputs + posts, retain_graph=True, allow_unused=True)
        grads, post_grads = list(grads[: len(inputs)]), grads[len(inputs):]
    else:
        grads = list(torch.autograd.grad(values[1], inputs, allow_unused=True))
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    points = dict(cells)
    # products and sums in float32, or the activations' dtype when wider
    dtype = torch.promote_types(inputs[0].dtype, torch.float32)
    diffs = [(x[0] - x[1]).detach().to(dtype) for x in inputs]  # clean - corrupted, [tokens, features]
    out = {"atp": {key: _per_cell(d * g[1].to(dtype), points[key]) for key, d, g in zip(keys, diffs, grads)},
           "metric": values.detach().float().cpu()}
    if graddrop:
        total = {key: torch.zeros_like(out["atp"][key]) for key in keys}
        for layer, (pre, post) in enumerate(block_points):
            # the cells upstream of r_layer: before the block's output in forward order
            upstream = [i for i, key in enumerate(keys) if points[key].order < post.order]
            dropped = [None] * len(keys)
            g = post_grads[layer]
            if upstream and g is not None:
                through = torch.autograd.grad([tensors[f"__post.{layer}"], tensors[f"__pre.{layer}"]],
                                              [inputs[i] for i in upstream], [g, -g],
                                              retain_graph=True, allow_unused=True)
                for i, vjp in zip(upstream, through):
                    dropped[i] = vjp
            for i, key in enumerate(keys):
                grad = grads[i][1] if dropped[i] is None else grads[i][1] - dropped[i][1]
                total[key] += _per_cell(diffs[i] * grad.to(dtype), points[key]).abs()
        scale = max(len(block_points) - 1, 1)
        out["atp_star"] = {key: (value / scale).float() for key, value in total.items()}
    out["atp"] = {key: value.float() for key, value in out["atp"].items()}
    return out


def _per_cell(product: torch.Tensor, point) -> torch.Tensor:
    """[tokens, features] -> [tokens] summed over features, or [tokens, heads] per head."""
    if point.n_heads:
        return product.reshape(*product.shape[:-1], point.n_heads, -1).sum(-1).detach().cpu()
    return product.sum(-1).detach().cpu()
