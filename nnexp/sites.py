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
| `q`          | each head's query as attention uses it (after any RoPE and   | `hook_q`         |
|              | q_norm): the input of the attention function                 |                  |
| `k`, `v`     | each key/value head's key (after RoPE, k_norm) and value, as | `hook_k`,`hook_v`|
|              | the attention function gets them: with grouped-query         |                  |
|              | attention these have the model's kv heads, fewer than `q`'s  |                  |

For Gemma 2/3, `attn_out` and `mlp_out` are the outputs of the post-attention and
post-feedforward norms: what is actually added to the residual stream.

Sites live in the `SITES` registry; `register_site` adds one (a function of the layer
and the architecture giving its hook point). `resolve_site` turns (site, layer) into a `HookPoint`: a module path, whether its
input or output is meant, the tuple index of the tensor, and an order key that sorts
hook points in the order the forward pass computes them (nnsight requires values to
be requested in that order within one invoke).

`q`, `k` and `v` are not module inputs but the inputs of the attention function call
inside the attention module (`ArchSpec.attn_function`, reached through nnsight's
`.source`), laid out [batch, heads, tokens, head_dim]. Their hook points say so
(`io="operation_input"`, `operation`, and the argument's index `index`); trace bodies
read them as [batch, tokens, heads * head_dim] like every site and write edits back
into the call's inputs (`nnexp.tracing.execute`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ConfigError, ModelError
from .models.architectures import Architecture
from .registry import Registry

@dataclass(frozen=True)
class HookPoint:
    """A tensor inside the forward pass that nnsight can read and edit in place.

    Attributes:
        module: dotted module path from the root of the HF model.
        io: "input" (first positional input), "output", "attention_mask" (the
            `attention_mask` keyword input of an attention module), or
            "operation_input" (a positional input of the call `operation` inside the
            module's forward, reached through nnsight's `.source`).
        index: tuple index of the tensor within the output (or, for
            "operation_input", the positional argument's index), or None.
        order: sort key giving the forward pass's order of computation.
        n_heads: for head sites, the number of heads the last dimension splits into.
        operation: for "operation_input", the name of the call in the module's
            `.source` (e.g. "attention_interface_1").
    """

    module: str
    io: str
    index: int | None
    order: tuple[int, int]
    n_heads: int | None = None
    operation: str | None = None


# Within a block, the order in which the forward pass produces each site ("attn_mask":
# the attention module's input mask, edited by attention knockout). A site of one's own
# takes a rank between these (e.g. 3.5: after attention's output, before the MLP's).
# q, k, v: the attention function's inputs, after the module's input (and mask), before
# the output projection's input; one call, so they sit together.
RANKS = {"resid_pre": 0, "attn_mask": 1, "q": 1.3, "k": 1.4, "v": 1.5, "head_out": 2, "attn_out": 3, "mlp_out": 4,
         "resid_post": 5}


@dataclass(frozen=True)
class Site:
    """A named activation per layer: `resolve(layer, arch)` gives its `HookPoint`.

    `per_head`: the tensor's last dimension splits into the model's heads, so a site
    can be read or patched one head at a time (`head_out`)."""

    name: str
    description: str
    resolve: Callable[[int, Architecture], HookPoint]
    per_head: bool = False


SITES: Registry[Site] = Registry("site")


def register_site(name: str, description: str, per_head: bool = False, replace: bool = False):
    """Decorator: register `fn(layer, arch) -> HookPoint` as site `name`, so every
    experiment that names sites (`--sites`, `--site`) can use it. The hook point's
    `order` must be (layer, rank), with the rank placing it among `RANKS`."""

    def decorator(fn):
        SITES.register(name, Site(name, description, fn, per_head), description=description, replace=replace)
        return fn

    return decorator


@register_site("resid_pre", "residual stream entering the block")
def _resid_pre(layer: int, arch: Architecture) -> HookPoint:
    return HookPoint(arch.block(layer), "input", None, (layer, RANKS["resid_pre"]))


@register_site("resid_post", "residual stream leaving the block")
def _resid_post(layer: int, arch: Architecture) -> HookPoint:
    return HookPoint(arch.block(layer), "output", arch.spec.block_output_index, (layer, RANKS["resid_post"]))


@register_site("attn_out", "attention output added to the residual stream")
def _attn_out(layer: int, arch: Architecture) -> HookPoint:
    spec = arch.spec
    return HookPoint(f"{arch.block(layer)}.{spec.attn_out}", "output", spec.attn_out_index, (layer, RANKS["attn_out"]))


@register_site("mlp_out", "MLP output added to the residual stream")
def _mlp_out(layer: int, arch: Architecture) -> HookPoint:
    spec = arch.spec
    return HookPoint(f"{arch.block(layer)}.{spec.mlp_out}", "output", spec.mlp_out_index, (layer, RANKS["mlp_out"]))


@register_site("head_out", "per-head attention output before the output projection (TransformerLens hook_z)",
               per_head=True)
def _head_out(layer: int, arch: Architecture) -> HookPoint:
    return HookPoint(f"{arch.block(layer)}.{arch.spec.head_proj}", "input", None, (layer, RANKS["head_out"]),
                     n_heads=arch.n_heads)


# the positional arguments of an HF attention function: (module, query, key, value, attention_mask)
_ATTENTION_ARGS = {"q": 1, "k": 2, "v": 3}


def _attention_input(site: str, layer: int, arch: Architecture) -> HookPoint:
    function = arch.attn_function
    if function is None:
        raise ModelError(
            f"site {site} needs the attention function call inside {arch.model_type}'s attention module "
            "(Hugging Face's attention_interface), which this model does not make (GPT-J; GPT-2 with eager "
            "attention and reorder_and_upcast_attn); load it with SDPA attention, or set attn_function in its "
            "ArchSpec (nnexp/models/architectures.py) to the `.source` name of a call taking (module, query, key, "
            "value, attention_mask), or use head_out"
        )
    heads = arch.n_heads if site == "q" else arch.n_kv_heads
    return HookPoint(f"{arch.block(layer)}.{arch.spec.attn}", "operation_input", _ATTENTION_ARGS[site],
                     (layer, RANKS[site]), n_heads=heads, operation=function)


@register_site("q", "per-head query as the attention function gets it (after RoPE / q_norm; TransformerLens hook_q)",
               per_head=True)
def _q(layer: int, arch: Architecture) -> HookPoint:
    return _attention_input("q", layer, arch)


@register_site("k", "per-kv-head key as the attention function gets it (after RoPE / k_norm); heads are the "
               "model's key/value heads (fewer than its query heads with grouped-query attention)", per_head=True)
def _k(layer: int, arch: Architecture) -> HookPoint:
    return _attention_input("k", layer, arch)


@register_site("v", "per-kv-head value as the attention function gets it; heads are the model's key/value heads "
               "(fewer than its query heads with grouped-query attention)", per_head=True)
def _v(layer: int, arch: Architecture) -> HookPoint:
    return _attention_input("v", layer, arch)


def check_site(site: str) -> str:
    SITES.get(site)
    return site


def is_per_head(site: str) -> bool:
    return SITES.get(site).per_head


def resolve_site(site: str, layer: int, arch: Architecture) -> HookPoint:
    return SITES.get(site).resolve(layer, arch)


def embedding_point(arch: Architecture) -> HookPoint:
    """The token embedding's output, before block 0 (and before any position embedding)."""
    return HookPoint(arch.spec.embed, "output", None, (-1, 0))


def attention_mask_point(layer: int, arch: Architecture) -> HookPoint:
    """The attention mask that block L's attention module receives."""
    return HookPoint(f"{arch.block(layer)}.{arch.spec.attn}", "attention_mask", None, (layer, RANKS["attn_mask"]))


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


def check_selection(values: tuple[int, ...] | None, name: str) -> None:
    """A selection of layers or heads is None (all of them) or names at least one: an
    empty one would sweep nothing."""
    if values is not None and not values:
        raise ConfigError(f"{name} is empty; name at least one, or leave {name} unset (none) for all")


def check_layers(layers, arch: Architecture) -> list[int]:
    return _check_indices(layers, arch.n_layers, "layer", "layers")


def site_heads(site: str, arch: Architecture) -> int:
    """How many heads a per-head site has: the query heads, or for `k` and `v` the
    key/value heads (fewer with grouped-query attention)."""
    return arch.n_kv_heads if site in ("k", "v") else arch.n_heads


def check_heads(heads, arch: Architecture, site: str | None = None) -> list[int]:
    """A head selection for `site` (by default any site with the model's query heads)."""
    if site is not None and site_heads(site, arch) != arch.n_heads:
        return _check_indices(heads, site_heads(site, arch), "head",
                              f"key/value heads per layer (site {site} has the key/value heads)")
    return _check_indices(heads, arch.n_heads, "head", "attention heads per layer")
