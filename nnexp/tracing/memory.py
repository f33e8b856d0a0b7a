"""How much memory a forward-and-backward trace needs per row, measured, not guessed.

Gradient attribution keeps the autograd graph of the whole forward pass until the
backward has run. What that graph holds (the tensors autograd saves for the
backward) depends on the architecture, the attention implementation and the
sequence length, so it is measured: one forward pass of a single row at the given
length with `torch.autograd.graph.saved_tensors_hooks` counting the bytes of every
distinct storage saved. Batches are then sized so that rows x that figure (plus the
attributions kept) fits the user's budget.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from ..errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


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


def autograd_bytes_per_row(hf_model, embed_module: torch.nn.Module, ids: list[int]) -> int:
    """Bytes autograd saves for one row of `ids` with gradients flowing from the
    embedding output (the parameters frozen), plus the last-position logits."""
    seen: dict[tuple, int] = {}
    # Weights saved for the backward are shared by every row: not part of the per-row cost.
    weights = {(p.device, p.untyped_storage().data_ptr()) for p in hf_model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if key not in weights:
            seen[key] = max(seen.get(key, 0), storage.nbytes())
        return tensor

    def needs_grad(module, args, output):
        return output.requires_grad_(True)

    device = next(hf_model.parameters()).device
    handle = embed_module.register_forward_hook(needs_grad)
    try:
        with frozen_parameters(hf_model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = hf_model(torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
            logits_bytes = out.logits.numel() * 4
            del out
    finally:
        handle.remove()
    return sum(seen.values()) + logits_bytes
