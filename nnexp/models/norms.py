"""Norms and projections as linear maps: what logit attribution needs to split a sum.

A LayerNorm or RMSNorm is not linear, but with its scale frozen it is:

    norm(x) = gamma * C(x) / s + beta,    s = sqrt(mean(C(x)^2) + eps)

where C centres x (LayerNorm) or is the identity (RMSNorm). Freezing s at the value
the model computed for the whole residual x = sum of components c_i gives

    norm(x) = sum_i gamma * C(c_i) / s + beta

exactly, so each component's share of a logit is well defined and the shares plus
the bias term sum to the true logit. That is TransformerLens' `apply_ln_to_stack`
convention (centre, divide by the cached scale), with gamma applied here rather than
folded into the unembedding.

`NormForm.of(module)` reads gamma, beta and eps from a norm module and confirms the
formula by running the module on probe inputs, so a norm that computes something
else (Gemma's `1 + weight`, an unusual centring) is recognised or refused, never
silently mis-modelled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..errors import ModelError


@dataclass
class NormForm:
    """A norm written as gamma * C(x) / s(x) + beta; tensors in float32.

    Attributes:
        centre: whether x is centred first (LayerNorm) or not (RMSNorm).
        eps: added to the mean square before the square root.
        gamma: the effective elementwise scale ([d_model]); for Gemma's RMSNorm this
            is 1 + weight.
        beta: the additive bias ([d_model]) or None.
        kind: "layernorm", "rmsnorm" or "rmsnorm (1 + weight)", for messages.
    """

    centre: bool
    eps: float
    gamma: torch.Tensor
    beta: torch.Tensor | None
    kind: str

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centre else x

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale s the norm divides `x` by, [..., 1], computed in float32."""
        x = self.centred(x.float())
        return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def linear(self, stack: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """gamma * C(c) / s for each component c of `stack` ([..., d_model]), no beta."""
        return self.centred(stack.float()) / scale * self.gamma

    def to(self, device) -> NormForm:
        beta = None if self.beta is None else self.beta.to(device)
        return NormForm(self.centre, self.eps, self.gamma.to(device), beta, self.kind)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x, self.scale(x))
        return out if self.beta is None else out + self.beta

    @classmethod
    def of(cls, module: torch.nn.Module, where: str) -> NormForm:
        """The form of `module`, checked against the module's own output."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ModelError(
                f"{where} ({type(module).__name__}) has no 1-d weight; nnexp decomposes through "
                "LayerNorm and RMSNorm modules only"
            )
        eps = next(
            (float(getattr(module, name)) for name in ("eps", "variance_epsilon", "epsilon") if hasattr(module, name)),
            None,
        )
        if eps is None:
            raise ModelError(f"{where} ({type(module).__name__}) has no eps attribute; cannot model it as a norm")
        bias = getattr(module, "bias", None)
        w = weight.detach().float().cpu()
        b = bias.detach().float().cpu() if isinstance(bias, torch.Tensor) else None
        candidates = [
            cls(True, eps, w, b, "layernorm"),
            cls(False, eps, w, b, "rmsnorm"),
            cls(False, eps, 1.0 + w, b, "rmsnorm (1 + weight)"),
        ]
        probe_module = copy.deepcopy(module).float().cpu()
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(4, w.numel(), generator=generator) * 3 + 0.5
        with torch.no_grad():
            expected = probe_module(probe).float()
        for form in candidates:
            if torch.allclose(form(probe), expected, rtol=1e-4, atol=1e-4):
                return form
        raise ModelError(
            f"{where} ({type(module).__name__}) computes neither LayerNorm nor RMSNorm (with weight or "
            "1 + weight) on a probe input, so nnexp cannot split the residual through it; add its form "
            "to nnexp/models/norms.py"
        )


def input_output_matrix(module: torch.nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as [in_features, out_features] and its bias (or None).

    `nn.Linear` stores [out, in]; GPT-2's `Conv1D` stores [in, out].
    """
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if isinstance(module, torch.nn.Linear):
        matrix = weight.T
    elif hasattr(module, "nf") and isinstance(weight, torch.Tensor):  # transformers' Conv1D
        matrix = weight
    else:
        raise ModelError(
            f"{where} is a {type(module).__name__}, not a Linear or Conv1D layer; nnexp splits the "
            "attention output projection into heads only for those"
        )
    return matrix, bias if isinstance(bias, torch.Tensor) else None
