"""The intervention vocabulary: what a user's experiment declares its runs with.

A run of a prompt is a list of edits, each at a (site, layer, positions[, heads]):

| edit | parameters | what it does to the selected vectors x |
|---|---|---|
| `Patch(source)` | the run to copy from | x = the source run's vectors at the same positions (activation patching) |
| `Interpolate(source, alpha)` | a run, a weight | x = (1 - alpha) x + alpha source (alpha = 1 is `Patch`) |
| `Add(vector, coefficient)` | a vector, a number | x = x + coefficient * vector (steering, noise) |
| `Set(vector)` | a vector (`Zero()`, `Mean()`, given) | x = vector (zero or mean ablation) |
| `Scale(factor)` | a number | x = factor * x |
| `ProjectOut(direction)` | a vector | x = x - (x . u) u, u = direction / norm (removes a direction) |
| `Block(keys)` | key positions (no site) | the last position cannot attend to `keys` in `layer` (attention knockout) |
| `Apply(name, **params)` | a registered function | x = fn(x, **params) (a user's edit, `register_edit`) |

Vectors: `Given(values)` (a list or tensor), `Zero()`, `Mean()` (the site's mean over
every token of every example's prompt: the dataset), `Activation(prompt, position)`
(the site's activation in one of the experiment's named prompts, computed before the
sweep), and sums and multiples of these (`Activation("love") - Activation("hate")`).
Where a vector's site and layer are not given, they are the edit's.

`Run(*edits, prompt="prompt", reads=(...))` is one row of the batch; `Grid(make,
layer=[...], coefficient=[...])` expands `make(layer=..., coefficient=...) -> Run` over
the product of its axes, so a sweep is declared once and stored as a labelled tensor
over those axes. `Read(name, site, layer, positions)` returns activations (or, with a
`direction`, their projection: a probe) as labelled tensors.

Everything here is data: each edit and vector is a dataclass that turns into JSON
(`to_json`) and back (`edit_from_json`), which is how a run's declared interventions
are saved in its `spec.json`. `lower` turns them into the trace operations of
`nnexp.tracing.plan` (copy, rewrite, block, read), vectorised over every row of a
batch, so whatever is declared still runs as one batched forward pass per trace,
locally or on a server.

A user's edit is a function of the selected vectors and its parameters, registered
by name:

    @nnexp.register_edit("clamp", "clamp every feature into [low, high]")
    def clamp(x, low, high):
        return torch.maximum(torch.minimum(x, high.unsqueeze(-1)), low.unsqueeze(-1))

    Run(Apply("clamp", low=-1.0, high=1.0, site="mlp_out", layer=3))

The rules it follows (stated once, in the README's "Writing your own experiment"): x
is [entries, features] in float32, one entry per (row, position[, head]); each
parameter arrives as a float32 tensor with one row per entry; it returns a tensor of
x's shape; it uses torch operations only, on x's device; it is shipped to a remote
server by value (with its module), so it may not close over objects that cannot be
pickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, ClassVar

import torch

from .errors import ConfigError
from .registry import Registry

# -- vectors ------------------------------------------------------------------------------


class Vector:
    """A vector an edit adds, sets or projects out. Combine with +, - and * (by numbers)."""

    kind: ClassVar[str] = ""

    def __add__(self, other: Vector) -> Combination:
        return Combination(((1.0, self), (1.0, _vector(other))))

    def __sub__(self, other: Vector) -> Combination:
        return Combination(((1.0, self), (-1.0, _vector(other))))

    def __mul__(self, factor: float) -> Combination:
        return Combination(((float(factor), self),))

    __rmul__ = __mul__

    def __neg__(self) -> Combination:
        return Combination(((-1.0, self),))

    def to_json(self) -> dict:
        return {"vector": self.kind, **{f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def terms(self) -> list[tuple[float, Vector]]:
        """(weight, vector) pairs of the basic vectors this is a weighted sum of."""
        return [(1.0, self)]


@dataclass(frozen=True)
class Given(Vector):
    """A given vector: its width must be the site's (or, with heads, a head's)."""

    kind: ClassVar[str] = "given"
    values: torch.Tensor

    def __post_init__(self) -> None:
        values = torch.as_tensor(self.values, dtype=torch.float32)
        if values.dim() != 1 or not values.numel():
            raise ConfigError(f"a given vector must be 1-dimensional and non-empty, got shape {list(values.shape)}")
        if not torch.isfinite(values).all():
            raise ConfigError("a given vector holds NaN or infinite values; give finite numbers")
        object.__setattr__(self, "values", values)

    def to_json(self) -> dict:
        # the values are identified by their hash: a run's spec stays small, and any change
        # to the vector changes the run's identity
        data = self.values.numpy().tobytes()
        return {"vector": self.kind, "width": self.values.numel(), "sha256": hashlib.sha256(data).hexdigest()}

    def __eq__(self, other) -> bool:
        return isinstance(other, Given) and torch.equal(self.values, other.values)

    def __hash__(self) -> int:
        return hash(self.values.numpy().tobytes())


@dataclass(frozen=True)
class Zero(Vector):
    """The zero vector (zero ablation)."""

    kind: ClassVar[str] = "zero"


@dataclass(frozen=True)
class Mean(Vector):
    """The site's mean over every token of every example's prompt (mean ablation).
    `site` and `layer` default to the edit's."""

    kind: ClassVar[str] = "mean"
    site: str | None = None
    layer: int | None = None


@dataclass(frozen=True)
class Activation(Vector):
    """The site's activation at `position` (negative counts from the end) when the
    experiment's prompt named `prompt` is run on its own, unedited. `site` and `layer`
    default to the edit's."""

    kind: ClassVar[str] = "activation"
    prompt: str
    position: int = -1
    site: str | None = None
    layer: int | None = None


@dataclass(frozen=True)
class Combination(Vector):
    """A weighted sum of vectors (what +, - and * build)."""

    kind: ClassVar[str] = "combination"
    parts: tuple[tuple[float, Vector], ...]

    def terms(self) -> list[tuple[float, Vector]]:
        return [(weight * w, basic) for weight, vector in self.parts for w, basic in vector.terms()]

    def to_json(self) -> dict:
        return {"vector": self.kind, "parts": [[weight, vector.to_json()] for weight, vector in self.parts]}


VECTORS = {cls.kind: cls for cls in (Given, Zero, Mean, Activation, Combination)}


def _vector(value) -> Vector:
    """A `Vector`, or a given vector from a list or tensor."""
    if isinstance(value, Vector):
        return value
    if isinstance(value, (list, tuple, torch.Tensor)):
        return Given(torch.as_tensor(value, dtype=torch.float32))
    raise ConfigError(f"{value!r} is not a vector; give Zero(), Mean(), Activation(...), or a list or tensor")


def vector_from_json(data: dict) -> Vector:
    kind = data.get("vector")
    if kind == "combination":
        return Combination(tuple((float(w), vector_from_json(v)) for w, v in data["parts"]))
    if kind == "given":
        raise ConfigError("a given vector is stored by its hash only; rebuild it from the experiment's own code")
    if kind not in VECTORS:
        raise ConfigError(f"unknown vector kind {kind!r}; known: {', '.join(VECTORS)}")
    return VECTORS[kind](**{k: v for k, v in data.items() if k != "vector"})


# -- edits --------------------------------------------------------------------------------

# The edits a user declares runs with, by name: the built-in classes below and every
# function registered with `register_edit` (an `EditFunction`).
EDITS: Registry = Registry("edit")

Positions = Any  # "all", "last", an int, or a sequence of ints (negative counts from the end)


def _register(cls):
    EDITS.register(cls.name, cls, description=cls.__doc__.strip().splitlines()[0])
    return cls


@dataclass(frozen=True, kw_only=True)
class Edit:
    """Where an edit applies: `site` at `layer` (an int, or several layers: a window),
    at `positions` ("all" by default, "last", an int or a list; negative counts from
    the end of the run's prompt), restricted to `heads` on a per-head site (`head_out`)."""

    name: ClassVar[str] = ""
    needs_source: ClassVar[bool] = False
    # what the trace applies to the selected vectors, fn(x, **parameters); None: a copy (Patch)
    fn: ClassVar[Callable | None] = None

    site: str
    layer: int | tuple[int, ...]
    positions: Positions = "all"
    heads: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _ints(self.layer, "layer"))
        if self.heads is not None:
            object.__setattr__(self, "heads", _ints(self.heads, "heads"))
        object.__setattr__(self, "positions", _positions(self.positions))
        for f in self._own_fields():  # a vector field takes a Vector, or a list or tensor of its values
            if f.type in ("Vector", Vector):
                object.__setattr__(self, f.name, _vector(getattr(self, f.name)))

    def _own_fields(self) -> list:
        """The edit's own fields: not where it applies, not the run it reads (`source`)."""
        return [f for f in dataclasses.fields(self) if f.name not in _PLACE + ("source",)]

    def to_json(self) -> dict:
        return {"edit": self.name, **{f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    def vectors(self) -> list[Vector]:
        """The vectors this edit uses (resolved before the sweep runs)."""
        return [v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if isinstance(v, Vector)]

    def function(self) -> Callable:
        """How the trace applies it: a function of the selected vectors and its parameters."""
        return type(self).fn

    def parameters(self, vectors: dict[str, torch.Tensor]) -> dict:
        """The function's parameters: the edit's own fields, numbers as floats and vectors
        resolved (`vectors`: field -> tensor)."""
        return {f.name: vectors[f.name] if f.name in vectors else float(getattr(self, f.name))
                for f in self._own_fields()}


# the fields that say where an edit applies
_PLACE = ("site", "layer", "positions", "heads")


def _ints(value, what: str) -> int | tuple[int, ...]:
    if isinstance(value, bool) or not isinstance(value, (int, Sequence)) or isinstance(value, str):
        raise ConfigError(f"{what} {value!r} is not an integer or a list of integers")
    if isinstance(value, int):
        return value
    values = tuple(value)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{what} {list(values)!r} must be a non-empty list of integers")
    return values


def _positions(value) -> Positions:
    if value in ("all", "last"):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if len(set(values)) != len(values):
                raise ConfigError(f"positions {list(values)} name a position twice; list each once")
            return values
    raise ConfigError(f"positions {value!r} must be 'all', 'last', an integer or a non-empty list of integers")


def _json(value):
    if isinstance(value, Vector):
        return value.to_json()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


# The built-in edit functions. They run inside the trace, on the activation's device:
# x [entries, features] in float32, parameters one row per entry.


def add_vector(x, vector, coefficient):
    return x + coefficient.unsqueeze(-1) * vector


def set_vector(x, vector):
    return vector.expand_as(x).clone()


def scale(x, factor):
    return x * factor.unsqueeze(-1)


def project_out(x, direction):
    unit = direction / direction.norm(dim=-1, keepdim=True)
    return x - (x * unit).sum(-1, keepdim=True) * unit


def interpolate(x, alpha, source):
    return x + alpha.unsqueeze(-1) * (source - x)


@_register
@dataclass(frozen=True, kw_only=True)
class Patch(Edit):
    """Copy another run's activation at the same positions (activation patching)."""

    name: ClassVar[str] = "patch"
    needs_source: ClassVar[bool] = True
    source: str


@_register
@dataclass(frozen=True)
class Interpolate(Edit):
    """Move toward another run's activation: (1 - alpha) x + alpha source."""

    name: ClassVar[str] = "interpolate"
    needs_source: ClassVar[bool] = True
    fn: ClassVar[Callable] = interpolate
    source: str
    alpha: float


@_register
@dataclass(frozen=True)
class Add(Edit):
    """Add coefficient * vector (steering, noise)."""

    name: ClassVar[str] = "add"
    fn: ClassVar[Callable] = add_vector
    vector: Vector
    coefficient: float = 1.0


@_register
@dataclass(frozen=True)
class Set(Edit):
    """Overwrite with a vector: Zero() (zero ablation), Mean() (mean ablation), or a given one."""

    name: ClassVar[str] = "set"
    fn: ClassVar[Callable] = set_vector
    vector: Vector


@_register
@dataclass(frozen=True)
class Scale(Edit):
    """Multiply by a factor (0 is zero ablation)."""

    name: ClassVar[str] = "scale"
    fn: ClassVar[Callable] = scale
    factor: float


@_register
@dataclass(frozen=True)
class ProjectOut(Edit):
    """Remove the component along a direction: x - (x . u) u with u the unit direction."""

    name: ClassVar[str] = "project_out"
    fn: ClassVar[Callable] = project_out
    direction: Vector


@_register
@dataclass(frozen=True)
class Block:
    """Block attention from the last position to `keys` in `layer` (attention knockout)."""

    name: ClassVar[str] = "block"
    keys: Positions
    layer: int | tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _ints(self.layer, "layer"))
        object.__setattr__(self, "keys", _positions(self.keys))

    def to_json(self) -> dict:
        return {"edit": self.name, "keys": _json(self.keys), "layer": _json(self.layer)}

    def vectors(self) -> list[Vector]:
        return []


@dataclass(frozen=True)
class EditFunction:
    """A user's edit: `fn(x, **params) -> new x`, registered by name."""

    name: str
    description: str
    fn: Callable


def register_edit(name: str, description: str, replace: bool = False):
    """Decorator: register `fn(x, **params) -> new x` as the edit `name`, used as
    `Apply(name, **params, site=..., layer=...)`. See the module docstring for its rules."""

    def decorator(fn):
        if not callable(fn):
            raise ConfigError(f"edit {name!r} must be a function of the selected vectors and its parameters")
        EDITS.register(name, EditFunction(name, description, fn), description=description, replace=replace)
        return fn

    return decorator


@dataclass(frozen=True, kw_only=True)
class Apply(Edit):
    """Apply a registered edit function (`register_edit`) with its parameters."""

    name: ClassVar[str] = "apply"
    edit: str
    params: dict = field(default_factory=dict)

    def __init__(self, edit: str, *, site: str, layer, positions: Positions = "all", heads=None, **params):
        object.__setattr__(self, "edit", edit)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "heads", heads)
        self.__post_init__()
        entry = EDITS.get(edit)
        if not isinstance(entry, EditFunction):
            raise ConfigError(f"edit {edit!r} is a built-in edit class; declare it as {type(entry).__name__}(...), "
                              "not Apply(...)")
        for key, value in params.items():
            if isinstance(value, Vector):
                continue
            try:
                torch.as_tensor(value, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ConfigError(f"parameter {key}={value!r} of edit {edit!r} is not a number, a list of numbers "
                                  "or a vector; edit parameters travel as tensors") from None

    def __hash__(self) -> int:
        return hash((self.edit, self.site, self.layer, self.positions, self.heads, repr(sorted(self.params.items()))))

    def to_json(self) -> dict:
        return {"edit": self.edit, "apply": True, "site": self.site, "layer": _json(self.layer),
                "positions": _json(self.positions), "heads": _json(self.heads), "params": _json(self.params)}

    def vectors(self) -> list[Vector]:
        return [v for v in self.params.values() if isinstance(v, Vector)]

    def function(self):
        return EDITS.get(self.edit).fn

    def parameters(self, vectors):
        return {key: vectors.get(key, value) for key, value in self.params.items()}


def edit_from_json(data: dict):
    """An edit from its `to_json` form (vectors given by value cannot come back: they are
    stored by hash)."""
    data = dict(data)
    name = data.pop("edit")
    if data.pop("apply", False):
        params = {k: vector_from_json(v) if isinstance(v, dict) and "vector" in v else v
                  for k, v in data.pop("params").items()}
        return Apply(name, **data, **params)
    cls = EDITS.get(name)
    values = {k: vector_from_json(v) if isinstance(v, dict) and "vector" in v else v for k, v in data.items()}
    return cls(**values)


# -- runs, grids and reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    """Return the activation at `site`, `layer`, `positions` (default the last) of the
    run, after the run's edits there, as a labelled tensor [position, (head,) feature];
    with a `direction`, its projection on it, [position, (head)] (a probe)."""

    name: str
    site: str
    layer: int
    positions: Positions = "last"
    heads: int | tuple[int, ...] | None = None
    direction: Vector | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ConfigError(f"read name {self.name!r} must be a non-empty string without dots")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ConfigError(f"read {self.name!r}: layer {self.layer!r} must be one integer")
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.heads is not None:
            object.__setattr__(self, "heads", _ints(self.heads, "heads"))
        if self.direction is not None:
            object.__setattr__(self, "direction", _vector(self.direction))

    def to_json(self) -> dict:
        return {f.name: _json(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Run:
    """One row of the batch: a prompt ("prompt", the example's own, by default; or
    another of the example's or the experiment's named prompts) with edits and reads."""

    edits: tuple = ()
    prompt: str = "prompt"
    reads: tuple[Read, ...] = ()

    def __init__(self, *edits, prompt: str = "prompt", reads: Sequence[Read] = ()):
        for edit in edits:
            if not isinstance(edit, (Edit, Block)):
                raise ConfigError(f"{edit!r} is not an edit; runs take Patch, Add, Set, Scale, ProjectOut, "
                                  "Interpolate, Block or Apply")
        for read in reads:
            if not isinstance(read, Read):
                raise ConfigError(f"{read!r} is not a Read")
        if len({read.name for read in reads}) != len(reads):
            raise ConfigError(f"reads {[read.name for read in reads]} use a name twice; give each its own name")
        object.__setattr__(self, "edits", tuple(edits))
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "reads", tuple(reads))

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "edits": [edit.to_json() for edit in self.edits],
                "reads": [read.to_json() for read in self.reads]}


class Grid:
    """Runs over the product of named axes: `Grid(make, layer=[0, 1], coefficient=[-4, 4])`
    is make(layer=0, coefficient=-4), make(layer=0, coefficient=4), ... Its results are
    labelled tensors over those axes, in that order."""

    def __init__(self, make: Callable[..., Run], **axes: Sequence) -> None:
        if not axes:
            raise ConfigError("a Grid needs at least one axis, e.g. Grid(make, layer=[0, 1, 2])")
        for axis, values in axes.items():
            values = list(values)
            if not values:
                raise ConfigError(f"grid axis {axis!r} is empty; give it at least one value")
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"grid axis {axis!r} lists a value twice ({values}); list each once")
            axes[axis] = values
        self.axes: dict[str, list] = dict(axes)
        self.runs: list[Run] = []
        for values in product(*self.axes.values()):
            run = make(**dict(zip(self.axes, values)))
            if not isinstance(run, Run):
                raise ConfigError(f"a Grid's function must return a Run, got {type(run).__name__}")
            self.runs.append(run)

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.axes.values())

    def to_json(self) -> dict:
        """Its axes, its first and last runs in full, and a hash of every run: a spec stays
        small for a sweep of thousands of runs, and any change to one changes the hash."""
        runs = [run.to_json() for run in self.runs]
        digest = hashlib.sha256(json.dumps(runs, sort_keys=True).encode()).hexdigest()
        return {"grid": {axis: _json(values) for axis, values in self.axes.items()}, "n_runs": len(runs),
                "first": runs[0], "last": runs[-1], "sha256": digest}
