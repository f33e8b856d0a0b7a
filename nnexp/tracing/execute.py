"""The bodies of nnexp's traces, and the functions that build and run them.

`run_plans` runs `TracePlan`s (patching, knockout, ablation, causal tracing);
`read_positions` reads activations at the last (or chosen) positions for logit
attribution and attribute extraction; `sum_over_tokens` sums activations for
dataset means; `gradients_x_activation` runs a forward and a backward pass for
gradient attribution. Each turns its requests into `TraceJob`s and hands them, all
at once, to the model's executor (`nnexp.tracing.jobs`): local traces, or one
session request to a remote server.

nnsight 0.8 runs a trace's body as ordinary Python in a worker interleaved with the
real forward pass: reading `envoy.output` waits until that module has run and returns
the live tensor, which can be edited in place before the model continues. The bodies
below walk their hook points in forward order (nnsight requires that order), apply
each point's edits to the whole batch, and reduce what they return on the spot (one
metric per row, one position per row), so that little travels back from a server.
Bodies run wherever the model is: they move the tensors they carry to the device of
the activation they meet, and return results on the CPU.
"""

from __future__ import annotations

from functools import partial

import torch

from ..errors import ModelError
from ..metrics import get_metric
from ..sites import HookPoint
from .jobs import TraceJob, hf_module
from .plan import TracePlan


def _inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> dict:
    inputs = {"input_ids": input_ids.cpu(), "attention_mask": attention_mask.cpu()}
    if position_ids is not None:
        inputs["position_ids"] = position_ids.cpu()
    return inputs


def _run(model, jobs: list[TraceJob]) -> list:
    return model.executor.run(jobs) if jobs else []


# -- trace plans ----------------------------------------------------------------------


def plan_job(plan: TracePlan) -> TraceJob:
    names = (plan.metric,) if isinstance(plan.metric, str) else tuple(plan.metric)
    metrics = [get_metric(name) for name in names]
    inputs = {"answer": plan.answer_ids, "foil": plan.foil_ids}
    if plan.reference_rows is not None:
        inputs["reference_rows"] = plan.reference_rows
    if plan.answer_sets is not None:
        inputs["answers"] = plan.answer_sets
    body = partial(
        plan_body,
        edits=plan.edits,
        metrics=[(metric.fn, metric.needs) for metric in metrics],
        inputs=inputs,
        offsets=plan.metric_offsets,
        shape=tuple(plan.input_ids.shape),
        metric_index=plan.metric_index,
        readout=plan.readout,
    )
    job = TraceJob(_inputs(plan.input_ids, plan.attention_mask, plan.position_ids), body)
    if plan.metric_index is not None:
        job.runs = plan.n_rows
    if plan.metric_offsets is not None:
        # the logits of the last k positions, so that each row's metric position is among them
        job.options["logits_to_keep"] = int(plan.metric_offsets.max())
    return job


def plan_body(nn, edits, metrics, inputs, offsets, shape, metric_index=None, readout=None):
    """Apply a plan's operations in forward order; return [rows, metrics] on the CPU, or,
    when the plan reads activations, {"metrics": [rows, metrics], "reads": {key: values}}.
    A packed plan's metrics read the final norm's output at `metric_index` and apply the
    unembedding there (the model's own logits cover its last position only)."""
    rows, tokens = shape
    reads = {}
    for group in _operation_groups(edits):
        if group[0][0].io == "operation_input":
            _edit_operation_inputs(nn, group, rows, tokens, reads)
            continue
        point, point_edits = group[0]
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
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            device = mask.device if mask is not None else hidden.device
            for edit in point_edits:
                mask = edit.to(device).edit_mask(mask, rows, tokens, device)
            envoy.inputs = (args, {**kwargs, "attention_mask": mask})
            continue
        value = envoy.output if point.io == "output" else envoy.input
        tensor = value if point.index is None else value[point.index]
        if tuple(tensor.shape[:2]) != (rows, tokens):
            raise ModelError(
                f"{point.module} {point.io} has shape {list(tensor.shape)}, not [{rows} rows, "
                f"{tokens} tokens, ...]; nnexp patches tensors laid out [batch, tokens, features], "
                "so point this site's ArchSpec entry at a module whose tensor has that layout"
            )
        for edit in point_edits:
            read = edit.to(tensor.device).apply(tensor, point)
            if read is not None:
                reads[edit.key] = read
    if metric_index is not None:
        logits = _logits_at(nn, readout, metric_index)
        rows = logits.shape[0]
    elif offsets is None:
        logits = nn.output.logits[:, -1, :].float()
    else:
        logits = nn.output.logits
        kept = logits.shape[1]
        index = (kept - offsets).to(logits.device)
        logits = logits[torch.arange(rows, device=logits.device), index].float()
    given = {name: value.to(logits.device) for name, value in inputs.items() if value is not None}
    if "reference_rows" in given:
        given["reference"] = logits[given.pop("reference_rows")]
    values = []
    for fn, needs in metrics:
        extra = {name: given[name] for name in needs if name not in ("answer", "foil")}
        values.append(fn(logits, given.get("answer"), given.get("foil"), **extra))
    values = torch.stack(values, -1).cpu()
    return {"metrics": values, "reads": reads} if reads else values


# -- inputs of a call inside a module (the q, k, v sites) ---------------------------------
# The attention function's query, key and value are [batch, heads, tokens, head_dim]. A
# body sees them as [batch, tokens, heads * head_dim] (a copy), so that positions index
# dim 1 and head slices are the last dimension's blocks, as at every other site; edits
# are written back by setting the call's inputs, which the model then uses.


def heads_to_features(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, d] -> [batch, tokens, heads * d] (a new tensor)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def features_to_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, tokens, heads * d] -> [batch, heads, tokens, d]."""
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).transpose(1, 2).contiguous()


def _operation_groups(edits):
    """The plan's (point, edits) in order, the points that are inputs of one call (a
    layer's q, k and v) together: the call's inputs are read and set once."""
    groups = []
    for point, point_edits in edits:
        previous = groups[-1][0][0] if groups else None
        if (point.io == "operation_input" and previous is not None and previous.io == "operation_input"
                and (previous.module, previous.operation) == (point.module, point.operation)):
            groups[-1].append((point, point_edits))
        else:
            groups.append([(point, point_edits)])
    return groups


def operation_call(nn, point: HookPoint):
    """The envoy of the call `point.operation` inside `point.module`'s forward."""
    source = nn.get(point.module).source
    try:
        return getattr(source, point.operation)
    except AttributeError:
        raise ModelError(
            f"{point.module} makes no call named {point.operation} in its forward (nnsight .source), so nnexp "
            "cannot reach its query/key/value; correct attn_function in the model's ArchSpec "
            "(nnexp/models/architectures.py)"
        ) from None


def _operation_tensor(args, point: HookPoint, rows: int, tokens: int) -> torch.Tensor:
    if len(args) <= point.index:
        raise ModelError(
            f"{point.module}.{point.operation} got {len(args)} positional inputs, not (module, query, key, value, "
            "...); correct attn_function in the model's ArchSpec (nnexp/models/architectures.py)"
        )
    x = args[point.index]
    if x.dim() != 4 or tuple(x.shape[:3:2]) != (rows, tokens) or x.shape[1] != point.n_heads:
        raise ModelError(
            f"{point.module}.{point.operation} input {point.index} has shape {list(x.shape)}, not [{rows} rows, "
            f"{point.n_heads} heads, {tokens} tokens, head_dim]; correct attn_function in the model's ArchSpec "
            "(nnexp/models/architectures.py)"
        )
    return x


def _edit_operation_inputs(nn, group, rows, tokens, reads) -> None:
    first = group[0][0]
    call = operation_call(nn, first)
    args, kwargs = call.inputs
    args = list(args)
    for point, point_edits in group:
        x = heads_to_features(_operation_tensor(args, point, rows, tokens))
        for edit in point_edits:
            read = edit.to(x.device).apply(x, point)
            if read is not None:
                reads[edit.key] = read
        args[point.index] = features_to_heads(x, point.n_heads)
    call.inputs = (tuple(args), kwargs)


def read_point(nn, point: HookPoint, rows: int, tokens: int) -> torch.Tensor:
    """The tensor at `point` for reading, laid out [rows, tokens, ...] (q, k, v as
    [rows, tokens, heads * head_dim], a copy)."""
    if point.io == "operation_input":
        args, _ = operation_call(nn, point).inputs
        return heads_to_features(_operation_tensor(args, point, rows, tokens))
    value = nn.get(point.module).output if point.io == "output" else nn.get(point.module).input
    return value if point.index is None else value[point.index]


def _logits_at(nn, readout, metric_index) -> torch.Tensor:
    """The next-token logits, in float32, at (row, token) `metric_index` [runs, 2]: the
    final norm's output there through the unembedding (with the final logit softcapping
    of the families that have one, as their forward applies it)."""
    final_norm, unembed = readout
    hidden = nn.get(final_norm).output
    hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    index = metric_index.to(hidden.device)
    picked = hidden[index[:, 0], index[:, 1]]
    head = nn.get(unembed)._module
    logits = torch.nn.functional.linear(picked.to(head.weight.device), head.weight, head.bias)
    cap = getattr(hf_module(nn).config, "final_logit_softcapping", None)
    if cap:  # in the model's dtype, as its forward does
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def run_plans(model, plans: list[TracePlan]) -> list[torch.Tensor]:
    """Execute `plans` on `model` (an `nnexp.models.Model`), all in one request when
    the model is remote; return the metric per row of each plan, on the CPU: [rows],
    or [rows, metrics] when its `metric` is a tuple of names."""
    values = _run(model, [plan_job(plan) for plan in plans])
    return [value[:, 0] if isinstance(plan.metric, str) else value for plan, value in zip(plans, values)]


def run_plan(model, plan: TracePlan) -> torch.Tensor:
    """`run_plans` for one plan."""
    return run_plans(model, [plan])[0]


# -- reading positions -------------------------------------------------------------------


def positions_job(input_ids, attention_mask, points, positions=None, logits="all") -> TraceJob:
    body = partial(positions_body, points=points, positions=positions, logits=logits, shape=tuple(input_ids.shape))
    return TraceJob(_inputs(input_ids, attention_mask), body)


def positions_body(nn, points, positions, shape, logits="all") -> dict:
    rows, tokens = shape
    saved = {}
    for key, point in points:
        # A position embedding may come back as [1, tokens, d] and broadcast.
        tensor = _checked(read_point(nn, point, rows, tokens), point, rows, tokens, broadcast_rows=positions is None)
        if positions is None:
            picked = tensor[:, -1]
        else:
            index = positions.to(tensor.device)
            picked = tensor[torch.arange(rows, device=tensor.device).unsqueeze(1), index]
        # clone: the model may later update a tensor it returned in place
        saved[key] = picked.detach().cpu().clone()
    if isinstance(logits, str) and logits == "none":
        return saved
    last = nn.output.logits[:, -1, :].detach()
    # what leaves the trace: the whole vocabulary (a model's largest output per row), the top
    # token only, or the logits of a few given tokens per row
    if isinstance(logits, str):
        saved["__logits__"] = last.argmax(-1).cpu() if logits == "argmax" else last.cpu()
    else:
        saved["__logits__"] = last.gather(1, logits.to(last.device)).cpu()
    return saved


def read_positions(model, requests: list[tuple]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """For each request (input_ids, attention_mask, points[, positions[, logits]]), one
    forward pass over its left-padded batch reading each hook point at the last position
    (where every row's last real token sits), or at `positions` ([rows, P], padded
    coordinates).

    `points` must be in forward order. `logits` says what to return of the last-position
    logits: "all" ([rows, vocab], the default), "argmax" ([rows] token ids), "none", or a
    [rows, k] tensor of token ids (their logits, [rows, k]). Returns, per request,
    ({key: [rows or 1, ...features]} (or [rows, P, ...features]), logits), on the CPU.
    Every request goes in one request to a remote server.
    """
    values = _run(model, [positions_job(*request) for request in requests])
    out = []
    for saved in values:
        saved = dict(saved)
        logits = saved.pop("__logits__", None)
        out.append((saved, logits))
    return out


def sum_over_tokens(model, requests: list[tuple]) -> list[dict[str, torch.Tensor]]:
    """For each request (input_ids, attention_mask, points), one forward pass; each
    hook point's tensor summed over every real (unpadded) token of every row, in
    float32: {key: [features]}. For dataset means."""
    jobs = [TraceJob(_inputs(ids, mask), partial(sums_body, points=points, weights=mask, shape=tuple(ids.shape)))
            for ids, mask, points in requests]
    return _run(model, jobs)


def sums_body(nn, points, weights, shape) -> dict:
    rows, tokens = shape
    sums = {}
    for key, point in points:
        tensor = _checked(read_point(nn, point, rows, tokens), point, rows, tokens)
        w = weights.to(tensor.device).float().unsqueeze(-1)
        sums[key] = (tensor.float() * w).sum((0, 1)).cpu()
    return sums


def _checked(tensor: torch.Tensor, point: HookPoint, rows: int, tokens: int, broadcast_rows: bool = False) -> torch.Tensor:
    """`tensor` if it is laid out [rows (or 1 when broadcast), tokens, ...]; else a clear error."""
    if tensor.dim() < 3 or tensor.shape[0] not in ((rows, 1) if broadcast_rows else (rows,)) or tensor.shape[1] != tokens:
        raise ModelError(
            f"{point.module} {point.io} has shape {list(tensor.shape)}, not [{rows} rows, {tokens} tokens, ...]; "
            "point its ArchSpec entry at a module whose tensor has that layout"
        )
    return tensor


# -- gradients ------------------------------------------------------------------------


def gradient_job(model, input_ids, attention_mask, points, metric_name, answer, foil, keep_hidden=False) -> TraceJob:
    body = partial(gradient_body, embed=model.arch.spec.embed, points=points, metric=get_metric(metric_name).fn,
                   answer=answer, foil=foil, keep_hidden=keep_hidden, shape=tuple(input_ids.shape))
    return TraceJob(_inputs(input_ids, attention_mask), body, grad=True)


def gradient_body(nn, embed, points, metric, answer, foil, keep_hidden, shape) -> dict:
    """Gradient x activation of the metric at every hook point and position.

    Gradients flow from the token embedding's output, which is made to require
    gradients. Rows do not interact (padding is masked), so the gradient of the sum of
    the rows' metrics gives each row its own gradient."""
    rows, tokens = shape
    # No weight gradients: freeze the parameters for this pass, here as on a server, so
    # the backward graph, and with it the order in which gradients are summed, is the
    # same wherever this runs. A loop, not memory.frozen_parameters: nnsight ships
    # functions by source, and a @contextmanager arrives as a bare generator.
    flags = [(p, p.requires_grad) for p in hf_module(nn).parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        return _gradient_x_activation(nn, embed, points, metric, answer, foil, keep_hidden, rows, tokens)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _gradient_x_activation(nn, embed, points, metric, answer, foil, keep_hidden, rows, tokens) -> dict:
    nn.get(embed).output.requires_grad_(True)
    activations = []
    for _, point in points:
        if point.io == "operation_input":
            raise ModelError(f"gradient attribution reads module tensors, not the attention function's inputs "
                             f"({point.module}.{point.operation}); use attribution patching for the q, k, v sites")
        envoy = nn.get(point.module)
        value = envoy.output if point.io == "output" else envoy.input
        activations.append(_checked(value if point.index is None else value[point.index], point, rows, tokens))
    logits = nn.output.logits[:, -1, :].float()
    values = metric(logits, answer.to(logits.device), foil.to(logits.device))
    grads = torch.autograd.grad(values.sum(), activations)
    raw, l2, hidden = [], [], []
    for activation, grad in zip(activations, grads):
        product = grad.detach().float() * activation.detach().float()
        raw.append(product.sum(-1).cpu())
        l2.append(product.norm(dim=-1).cpu())
        if keep_hidden:
            hidden.append(product.cpu())
    # of the logits only what the records keep leaves the trace: the true and false targets'
    # logits and probabilities, and the top token
    logits = logits.detach()
    pair = torch.stack([answer.to(logits.device), foil.to(logits.device)], 1)
    out = {"raw": torch.stack(raw), "l2": torch.stack(l2), "metric": values.detach().cpu(),
           "pair_logits": logits.gather(1, pair).cpu(), "pair_probs": logits.softmax(-1).gather(1, pair).cpu(),
           "top": logits.argmax(-1).cpu()}
    if keep_hidden:
        out["hidden"] = torch.stack(hidden)
    return out


def gradients_x_activation(model, requests: list[tuple], keep_hidden: bool = False) -> list[dict[str, torch.Tensor]]:
    """For each request (input_ids, attention_mask, points, metric name, answer ids,
    foil ids), one forward and one backward pass over its left-padded batch: gradient x
    activation of the metric (one value per row, from the last-position logits) at
    every hook point, every position.

    Returns per request, on the CPU, in float32: "raw" [points, rows, tokens] (summed
    over the hidden dimension), "l2" [points, rows, tokens] (its L2 norm over the
    hidden dimension), "hidden" [points, rows, tokens, d] when `keep_hidden`, "metric"
    [rows], and at the last position "pair_logits" and "pair_probs" [rows, 2] (answer,
    foil) and "top" [rows] (the top token).
    """
    return _run(model, [gradient_job(model, *request, keep_hidden=keep_hidden) for request in requests])


# -- parameters ------------------------------------------------------------------------


def parameters_body(nn, paths) -> dict:
    """The parameters and buffers of the modules at `paths` (not their children), on the CPU."""
    out = {}
    for path in paths:
        module = nn.get(path)._module
        out[path] = {
            "parameters": {name: p.detach().cpu().clone() for name, p in module.named_parameters(recurse=False)},
            "buffers": {name: b.detach().cpu().clone() for name, b in module.named_buffers(recurse=False)},
        }
    return out


def fetch_parameters(model, paths: list[str], token_id: int = 0) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Read the parameters and buffers of the modules at `paths` from wherever the model
    runs: {path: {"parameters": {...}, "buffers": {...}}} (one one-token forward pass
    carries the request)."""
    ids = torch.tensor([[token_id]])
    return _run(model, [TraceJob(_inputs(ids, torch.ones_like(ids)), partial(parameters_body, paths=paths))])[0]
