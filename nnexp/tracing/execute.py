"""Run traces: the only trace code in nnexp.

`run_plan` runs a `TracePlan` (patching, knockout, ablation, causal tracing); `read_last_position` reads activations at
the last position for logit attribution; `gradient_x_activation` runs a forward and a
backward pass for gradient attribution.

nnsight 0.8 runs the body of `with model.trace(...)` as ordinary Python in a worker
interleaved with the real forward pass: reading `envoy.output` waits until that
module has run and returns the live tensor, which can be edited in place before the
model continues. The bodies below walk the plan's hook points in forward order
(nnsight requires that order within one invoke), applies each point's edits to the
whole batch, and finally reduces the last-position logits to one metric per row.
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from ..metrics import get_metric
from ..sites import HookPoint
from .plan import TracePlan


def run_plan(model, plan: TracePlan) -> torch.Tensor:
    """Execute `plan` on `model` (an `nnexp.models.Model`); return the metric per row,
    on CPU: [rows], or [rows, metrics] when `plan.metric` is a tuple of names."""
    names = (plan.metric,) if isinstance(plan.metric, str) else tuple(plan.metric)
    metrics = [get_metric(name).fn for name in names]
    device = model.device
    nn = model.nn
    edits = [(point, [edit.to(device) for edit in point_edits]) for point, point_edits in plan.edits]
    answer = plan.answer_ids.to(device)
    foil = plan.foil_ids.to(device)
    inputs = {"attention_mask": plan.attention_mask.to(device)}
    expected = tuple(plan.input_ids.shape)
    position_ids = plan.position_ids
    if position_ids is not None:
        inputs["position_ids"] = position_ids.to(device)

    with torch.no_grad():
        with nn.trace(plan.input_ids.to(device), **inputs, use_cache=False, logits_to_keep=1):
            for point, point_edits in edits:
                envoy = nn.get(point.module)
                if point.io == "attention_mask":
                    args, kwargs = envoy.inputs
                    if "attention_mask" not in kwargs:
                        raise ModelError(
                            f"{point.module} receives no attention_mask keyword, so nnexp cannot block its attention "
                            "edges; attention knockout needs a Hugging Face attention module called with "
                            "attention_mask=... (eager or SDPA attention)"
                        )
                    mask = kwargs["attention_mask"]
                    for edit in point_edits:
                        mask = edit.edit_mask(mask, expected[0], expected[1], device)
                    envoy.inputs = (args, {**kwargs, "attention_mask": mask})
                    continue
                value = envoy.output if point.io == "output" else envoy.input
                tensor = value if point.index is None else value[point.index]
                if tuple(tensor.shape[:2]) != expected:
                    raise ModelError(
                        f"{point.module} {point.io} has shape {list(tensor.shape)}, not [{expected[0]} rows, "
                        f"{expected[1]} tokens, ...]; nnexp patches tensors laid out [batch, tokens, features], "
                        "so point this site's ArchSpec entry at a module whose tensor has that layout"
                    )
                for edit in point_edits:
                    edit.apply(tensor, point)
            logits = nn.output.logits[:, -1, :].float()
            values = torch.stack([metric(logits, answer, foil) for metric in metrics], -1).cpu().save()
    return values[:, 0] if isinstance(plan.metric, str) else values


def read_last_position(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    points: list[tuple[str, HookPoint]],
    positions: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One forward pass over a left-padded batch, reading each hook point at the last
    position (where every row's last real token sits), or at `positions`.

    `points` must be in forward order. `positions` ([rows, P], padded coordinates)
    reads P positions per row instead. Returns {key: [rows or 1, ...features]} (or
    [rows, P, ...features]) on the model's device and the last-position logits [rows, vocab].
    """
    device = model.device
    nn = model.nn
    rows, tokens = input_ids.shape
    saved: dict[str, torch.Tensor] = {}
    if positions is not None:
        positions = positions.to(device)
        row_index = torch.arange(rows, device=device).unsqueeze(1)
    with torch.no_grad():
        with nn.trace(input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=1):
            for key, point in points:
                envoy = nn.get(point.module)
                value = envoy.output if point.io == "output" else envoy.input
                # A position embedding may come back as [1, tokens, d] and broadcast.
                tensor = _checked(value if point.index is None else value[point.index], point, rows, tokens,
                                  broadcast_rows=positions is None)
                # clone: the model may later update a tensor it returned in place
                picked = tensor[:, -1] if positions is None else tensor[row_index, positions]
                saved[key] = picked.clone().save()
            logits = nn.output.logits[:, -1, :].save()
    return dict(saved), logits


def sum_over_tokens(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, points: list[tuple[str, HookPoint]]
) -> dict[str, torch.Tensor]:
    """One forward pass; each hook point's tensor summed over every real (unpadded)
    token of every row, in float32: {key: [features]}. For dataset means."""
    device = model.device
    nn = model.nn
    rows, tokens = input_ids.shape
    weights = attention_mask.to(device).float().unsqueeze(-1)
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with nn.trace(input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=1):
            for key, point in points:
                envoy = nn.get(point.module)
                value = envoy.output if point.io == "output" else envoy.input
                tensor = _checked(value if point.index is None else value[point.index], point, rows, tokens)
                sums[key] = (tensor.float() * weights).sum((0, 1)).save()
    return dict(sums)


def _checked(tensor: torch.Tensor, point: HookPoint, rows: int, tokens: int, broadcast_rows: bool = False) -> torch.Tensor:
    """`tensor` if it is laid out [rows (or 1 when broadcast), tokens, ...]; else a clear error."""
    if tensor.dim() < 3 or tensor.shape[0] not in ((rows, 1) if broadcast_rows else (rows,)) or tensor.shape[1] != tokens:
        raise ModelError(
            f"{point.module} {point.io} has shape {list(tensor.shape)}, not [{rows} rows, {tokens} tokens, ...]; "
            "point its ArchSpec entry at a module whose tensor has that layout"
        )
    return tensor


def gradient_x_activation(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    points: list[tuple[str, HookPoint]],
    metric_name: str,
    answer: torch.Tensor,
    foil: torch.Tensor,
    keep_hidden: bool = False,
) -> dict[str, torch.Tensor]:
    """One forward and one backward pass over a left-padded batch: gradient x
    activation of the metric (one value per row, from the last-position logits) at
    every hook point, every position.

    Gradients flow from the token embedding's output, which is made to require
    gradients; the parameters are frozen, so no weight gradient is computed or kept.
    Rows do not interact (padding is masked), so the gradient of the sum of the rows'
    metrics gives each row its own gradient.

    Returns, on the CPU, in float32: "raw" [points, rows, tokens] (summed over the
    hidden dimension), "l2" [points, rows, tokens] (its L2 norm over the hidden
    dimension), "hidden" [points, rows, tokens, d] when `keep_hidden`, "metric"
    [rows] and "logits" [rows, vocab] at the last position.
    """
    from .memory import frozen_parameters

    metric = get_metric(metric_name).fn
    device = model.device
    nn = model.nn
    rows, tokens = input_ids.shape
    answer, foil = answer.to(device), foil.to(device)
    raw, l2, hidden = [], [], []
    with frozen_parameters(model.hf), torch.enable_grad():
        with nn.trace(input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=1):
            nn.get(model.arch.spec.embed).output.requires_grad_(True)
            activations = []
            for _, point in points:
                envoy = nn.get(point.module)
                value = envoy.output if point.io == "output" else envoy.input
                activations.append(_checked(value if point.index is None else value[point.index], point, rows, tokens))
            logits = nn.output.logits[:, -1, :].float()
            values = metric(logits, answer, foil)
            grads = torch.autograd.grad(values.sum(), activations)
            for activation, grad in zip(activations, grads):
                product = grad.detach().float() * activation.detach().float()
                raw.append(product.sum(-1).cpu())
                l2.append(product.norm(dim=-1).cpu())
                if keep_hidden:
                    hidden.append(product.cpu())
            metric_values = values.detach().cpu().save()
            last_logits = logits.detach().cpu().save()
    out = {"raw": torch.stack(raw), "l2": torch.stack(l2), "metric": metric_values, "logits": last_logits}
    if keep_hidden:
        out["hidden"] = torch.stack(hidden)
    return out
