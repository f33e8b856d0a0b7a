"""Sites: the named activations an experiment reads or patches, per layer.

A site is a name from TransformerLens' vocabulary, defined once against the
architecture table, so experiments never mention a module path:

| site         | what it is                                                   | TransformerLens  |
|--------------|--------------------------------------------------------------|------------------|
| `resid_pre`  | residual stream entering block L (block L's input)           | `hook_resid_pre` |
| `resid_post` | residual stream leaving block L (block L's output)           | `hook_resid_post`|
| `attn_out`   | what attention adds to the residual stream in block L        | `hook_attn_out`  |
| `mlp_out`    | what the MLP adds to the residual stream in block L          | `hook_mlp_out`   |
| `head_out`   | each head's output before the attention output projection,   | `hook_z`         |
|              | [..., head, head_dim] (the input of o_proj / c_proj, split)  |                  |

For Gemma 2/3, `attn_out` and `mlp_out` are the outputs of the post-attention and
post-feedforward norms: what is actually added to the residual stream.

`resolve_site` turns (site, layer) into a `HookPoint`: a module path, whether its
input or output is meant, the tuple index of the tensor, and an order key that sorts
hook points in the order the forward pass computes them (nnsight requires values to
be requested in that order within one invoke).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .models.architectures import Architecture

# Within a block, the order in which the forward pass produces each site ("attn_mask":
# the attention module's input mask, edited by attention knockout).
_RANK = {"resid_pre": 0, "attn_mask": 1, "head_out": 2, "attn_out": 3, "mlp_out": 4, "resid_post": 5}

SITES: dict[str, str] = {
    "resid_pre": "residual stream entering the block",
    "resid_post": "residual stream leaving the block",
    "attn_out": "attention output added to the residual stream",
    "mlp_out": "MLP output added to the residual stream",
    "head_out": "per-head attention output before the output projection (TransformerLens hook_z)",
}

HEAD_SITES = frozenset({"head_out"})


@dataclass(frozen=True)
class HookPoint:
    """A tensor inside the forward pass that nnsight can read and edit in place.

    Attributes:
        module: dotted module path from the root of the HF model.
        io: "input" (first positional input), "output", or "attention_mask" (the
            `attention_mask` keyword input of an attention module).
        index: tuple index of the tensor within the output, or None.
        order: sort key giving the forward pass's order of computation.
        n_heads: for head sites, the number of heads the last dimension splits into.
    """

    module: str
    io: str
    index: int | None
    order: tuple[int, int]
    n_heads: int | None = None


def check_site(site: str) -> str:
    if site not in SITES:
        raise ConfigError(
            f"unknown site {site!r}; available sites: {', '.join(SITES)}"
        )
    return site


def resolve_site(site: str, layer: int, arch: Architecture) -> HookPoint:
    check_site(site)
    spec = arch.spec
    block = arch.block(layer)
    order = (layer, _RANK[site])
    if site == "resid_pre":
        return HookPoint(block, "input", None, order)
    if site == "resid_post":
        return HookPoint(block, "output", spec.block_output_index, order)
    if site == "attn_out":
        return HookPoint(f"{block}.{spec.attn_out}", "output", spec.attn_out_index, order)
    if site == "mlp_out":
        return HookPoint(f"{block}.{spec.mlp_out}", "output", spec.mlp_out_index, order)
    # head_out
    return HookPoint(f"{block}.{spec.head_proj}", "input", None, order, n_heads=arch.n_heads)


def embedding_point(arch: Architecture) -> HookPoint:
    """The token embedding's output, before block 0 (and before any position embedding)."""
    return HookPoint(arch.spec.embed, "output", None, (-1, 0))


def attention_mask_point(layer: int, arch: Architecture) -> HookPoint:
    """The attention mask that block L's attention module receives."""
    return HookPoint(f"{arch.block(layer)}.{arch.spec.attn}", "attention_mask", None, (layer, _RANK["attn_mask"]))


def _check_indices(values, n: int, what: str, count: str) -> list[int]:
    """Normalise a selection of layers or heads: None = all, negatives count from the end."""
    if values is None:
        return list(range(n))
    out = []
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{what} {value!r} is not an integer; give {what}s as integers 0-{n - 1}")
        if not -n <= value < n:
            raise ConfigError(
                f"{what} {value} is out of range: the model has {n} {count} (0-{n - 1}; "
                "negative indices count from the end)"
            )
        out.append(value % n)
    if len(set(out)) != len(out):
        raise ConfigError(f"{what}s {list(values)} name the same {what} twice; list each {what} once")
    return out


def check_layers(layers, arch: Architecture) -> list[int]:
    return _check_indices(layers, arch.n_layers, "layer", "layers")


def check_heads(heads, arch: Architecture) -> list[int]:
    return _check_indices(heads, arch.n_heads, "head", "attention heads per layer")
