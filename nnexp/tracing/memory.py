"""Memory: measuring what a trace's activations take, and sizing traces to a budget.

A memory budget is bytes of activation memory per device, on top of the weights: a
trace of R rows must peak below it on every device the model lives on. What a row
costs depends on the architecture, the attention implementation, the sequence length
and whether a backward pass follows, so it is measured, not guessed: `row_cost` runs a
plain forward (and backward) pass of the model at the trace's length with 1 and 2
rows (small, so that measuring stays under any budget that fits two rows), and takes the peak's growth per row and what it does not explain (the part that
does not grow with rows). `RowCost.rows` then sizes traces, with a margin for what
nnexp's bodies add (edits, metrics, the values they keep).

`peak_memory` measures a peak: on CUDA devices with the allocator's own statistics
(`torch.cuda.max_memory_allocated`, which is what can run out); elsewhere (the CPU)
by following every tensor storage the operators create (a `TorchDispatchMode`, which
sees the model's operators and nnsight's alike, since nnsight's workers are greenlets
on the same thread) and when it is freed.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

# nnexp's trace bodies add edits and metrics to the plain forward pass that `row_cost`
# measures; the tests and bench/sweeps.py measure them at a few percent at most.
MARGIN = 1.10

# Bytes of activations per trace when neither max_rows nor a budget is given, for the
# kinds whose examples make thousands of runs (causal tracing, a user's grids): enough
# rows for a fast trace, few enough for any machine that holds the model.
DEFAULT_MEMORY_BUDGET = 2 * 2**30


def parse_bytes(text) -> int:
    """'2GB', '512MiB', '1.5gb' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise ConfigError(f"memory budget {text!r} is not a size; write it like 2GB, 512MiB or 1000000")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be positive")
    return value


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


# -- measuring a peak ------------------------------------------------------------------------


class _StorageBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that operators create, per device
    (CUDA devices excepted: their allocator keeps exact statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple, weakref.ref] = {}
        self.current: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type not in ("cuda", "meta")]
        if fresh:
            # a view, or an in-place result, shares an input's storage: nothing new
            inputs = {_key(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.device.type != "meta"}
            for tensor in fresh:
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set) -> None:
        storage = tensor.untyped_storage()
        key = _key(tensor)
        size = storage.nbytes()
        if key in self.live or key in inputs or size == 0:
            return
        device = str(tensor.device)
        self.live[key] = weakref.ref(storage, lambda ref: self._free(key, device, size, ref))
        self.current[device] += size
        self.peak[device] = max(self.peak[device], self.current[device])

    def _free(self, key, device: str, size: int, ref) -> None:
        if self.live.get(key) is ref:
            del self.live[key]
            self.current[device] -= size


def _key(tensor: torch.Tensor) -> tuple:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


@contextmanager
def peak_memory():
    """Measure the peak memory that what runs inside allocates, per device.

    Yields a dict, filled on exit: {"cpu": bytes, "cuda:0": bytes, ...}, each the peak
    of tensor memory above what was allocated on entry (weights and other tensors that
    already existed do not count)."""
    peaks: dict[str, int] = {}
    cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    start = {}
    for device in cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start[device] = torch.cuda.memory_allocated(device)
    tracker = _StorageBytes()
    with tracker:
        yield peaks
    for device in cuda:
        torch.cuda.synchronize(device)
        grown = torch.cuda.max_memory_allocated(device) - start[device]
        if grown > 0:
            peaks[str(device)] = grown
    peaks.update({device: peak for device, peak in tracker.peak.items() if peak > 0})


# -- what a row costs --------------------------------------------------------------------------


@dataclass(frozen=True)
class RowCost:
    """Peak activation bytes of a trace of R rows, per device: fixed + per_row x R."""

    tokens: int
    fixed: dict[str, int]
    per_row: dict[str, int]

    def rows(self, budget: int, kept_per_row: int = 0, minimum: int = 1, what: str = "a trace") -> int:
        """The most rows a trace may hold for its peak to stay under `budget` on every
        device; `kept_per_row` is what the trace's body keeps per row beyond the plain pass."""
        rows = None
        for device, per_row in self.per_row.items():
            cost = int(per_row * MARGIN) + kept_per_row
            fits = (budget - self.fixed.get(device, 0)) // max(cost, 1)
            rows = fits if rows is None else min(rows, fits)
        if rows is None or rows < minimum:
            worst = max(self.per_row.values(), default=0) * MARGIN + kept_per_row
            raise ConfigError(
                f"memory budget {format_bytes(budget)} is below what {what} needs: at least {minimum} rows of "
                f"{self.tokens} tokens, about {format_bytes(int(worst))} each; raise --memory-budget"
            )
        return int(rows)


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def row_cost(model, tokens: int, grad: bool = False) -> RowCost:
    """Measure the peak activation memory of the plain model at `tokens` tokens, with 1
    and 2 rows (with a backward pass from the token embeddings when `grad`), as what
    one row adds and what does not grow with rows. Cached per model and length."""
    cache = _COSTS.setdefault(model.hf, {})
    if (tokens, grad) not in cache:
        one, two = (_probe(model, rows, tokens, grad) for rows in (1, 2))
        devices = set(one) | set(two)
        per_row = {d: max(0, two.get(d, 0) - one.get(d, 0)) for d in devices}
        fixed = {d: max(0, one.get(d, 0) - per_row[d]) for d in devices}
        cache[(tokens, grad)] = RowCost(tokens, fixed, per_row)
    return cache[(tokens, grad)]


def _probe(model, rows: int, tokens: int, grad: bool) -> dict[str, int]:
    from ..models.architectures import _get_module

    hf = model.hf
    device = model.device
    ids = torch.zeros(rows, tokens, dtype=torch.long, device=device)
    # one padded position makes the model build and apply an attention mask, the
    # costlier path (a batch without padding may use an implicit causal mask)
    mask = torch.ones(rows, tokens, dtype=torch.long, device=device)
    if tokens > 1:
        mask[0, 0] = 0
    handle = None
    if grad:
        embed = _get_module(hf, model.arch.spec.embed)
        handle = embed.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    try:
        with frozen_parameters(hf), torch.enable_grad() if grad else torch.no_grad(), peak_memory() as peaks:
            output = hf(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
            logits = output.logits[:, -1].float()
            metric = logits.softmax(-1)[:, 0] - logits.softmax(-1)[:, 1]
            if grad:
                metric.sum().backward()
            del output, logits, metric
    finally:
        if handle is not None:
            handle.remove()
    return peaks


@contextmanager
def frozen_parameters(module: torch.nn.Module):
    """Parameters need no gradients for attribution: switch them off for the duration
    (so the backward neither computes nor stores weight gradients) and restore after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def rows_for_budget(model, budget: int, tokens: int, *, grad: bool = False, kept_per_row: int = 0,
                    readout: tuple[int, int] = (0, 0), minimum: int = 1, what: str = "a trace") -> int:
    """The most rows a trace of `tokens` tokens may hold to peak under `budget` bytes
    on every device of `model` (measured with `row_cost`). `kept_per_row` is what the
    trace's body holds per row beyond the plain pass. `readout` is (fixed, per row)
    bytes of what the experiment computes from a trace's values once it has returned
    (projections to the vocabulary), a peak of its own that comes after the trace's.
    Says what it chose."""
    from ..console import note

    cost = row_cost(model, tokens, grad)
    rows = cost.rows(budget, kept_per_row, minimum, what)
    fixed, readout_per_row = readout
    if readout_per_row:
        fits = (budget - fixed) // readout_per_row
        if fits < minimum:
            raise ConfigError(
                f"memory budget {format_bytes(budget)} is below what {what} needs to read its results out: "
                f"{format_bytes(fixed)} and {format_bytes(readout_per_row)} per row; raise --memory-budget"
            )
        rows = min(rows, fits)
    per_row = max(cost.per_row.values(), default=0) + kept_per_row
    note(f"memory budget {format_bytes(budget)} per device: a row of {tokens} tokens takes about "
         f"{format_bytes(per_row)}, so at most {rows} rows per trace")
    return rows


def tightest(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (None when none is)."""
    return min((limit for limit in limits if limit is not None), default=None)


def forward_bytes_per_row(model, tokens: int) -> int:
    """For a remote model, whose weights are not here to measure: an upper estimate of
    the activation bytes one row of a no-grad forward pass holds at its peak: the residual stream and a block's largest intermediates (queries, keys,
    values, the MLP's hidden layer, the attention scores of every head), plus the
    last-position logits and their softmax in float32. Weights are not counted."""
    config = model.hf.config
    d = model.arch.d_model
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = model.arch.n_heads
    width = torch.finfo(model.hf.dtype).bits // 8 if model.hf.dtype.is_floating_point else 4
    per_token = 6 * d + 3 * d_ff + 2 * heads * tokens
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    return width * tokens * per_token + 3 * 4 * vocab
