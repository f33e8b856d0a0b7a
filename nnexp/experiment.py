"""The experiment model: a declarative class the framework compiles and runs.

An experiment is a dataclass. Its fields are its parameters (sites, layers, metric,
data file...), its methods say where its data comes from, and a base class for each
kind of experiment (`PatchingExperiment`, ...) supplies `compile`, which turns it into
trace plans for a given model. The user's class declares; it never writes a trace.

Parameters are typed by their fields' annotations (`nnexp.params`): every value,
from Python, a stored spec or the command line, is coerced to its field's type or
refused with one line when the experiment is constructed, before any model loads.

Experiments are serialisable: `spec()` is plain JSON (the class reference and every
parameter), saved with the results, and `experiment_from_spec` rebuilds the same
experiment from it, which is how a stored run is resumed.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .data import file_fingerprint
from .errors import ConfigError
from .params import coerce_params, validate_fields
from .registry import EXPERIMENTS, import_file
from .statistics import DEFAULT_CI, DEFAULT_N_BOOT, check_settings


@dataclass
class Experiment:
    """Base of every experiment. Subclasses are dataclasses; every field needs a default.

    Class attributes:
        name: the name `nnexp run` knows it by (lowercase, dashes).
        description: one line for `nnexp list`.
        examples_per_trace: how many examples one trace holds by default.

    Fields:
        data: a data file to read examples from; None uses `default_examples()`.
        ci: the coverage of the bootstrap intervals of every dataset-level number
            (0.95: 95% intervals; `nnexp.statistics`).
        n_boot: how many bootstrap resamples of the examples each interval is drawn from.
        prefix_sharing: compute each edited run only from the first position where it
            departs from a base run (`nnexp.tracing.prefix`; the default); False runs
            every row in full (for comparison, or for a model that cannot take it).
            It applies to the kinds whose traces are edited runs (patching, the
            knockouts, causal tracing, declared interventions); the others ignore it.
        (ci and n_boot change summaries and figures, and prefix_sharing how fast the
        same numbers come, not stored numbers, so none is part of a run's identity.)

    Annotate every field precisely (`bool`, `int`, `tuple[int, ...] | None`...): the
    annotation is what a value is checked and coerced against (`nnexp.params`). A
    subclass's `__post_init__` calls `super().__post_init__()` first, then checks what
    its values mean (known sites, positive windows).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    examples_per_trace: ClassVar[int] = 1

    data: str | None = None
    ci: float = DEFAULT_CI
    n_boot: int = DEFAULT_N_BOOT
    prefix_sharing: bool = True

    def __post_init__(self) -> None:
        validate_fields(self)
        check_settings(self.ci, self.n_boot)

    # -- data -----------------------------------------------------------------

    def default_examples(self) -> list:
        """The built-in examples used when no data file is given."""
        raise ConfigError(
            f"experiment {self.name or type(self).__name__!r} has no built-in data; pass a data file (--data FILE)"
        )

    def read_data_file(self, path: str) -> list:
        """Examples from a data file; each experiment kind knows its record format."""
        raise NotImplementedError

    def examples(self) -> list:
        return self.read_data_file(self.data) if self.data else self.default_examples()

    def data_source(self) -> dict:
        """What identifies the data: the file's content hash, or the built-in set."""
        if self.data:
            return {"kind": "file", **file_fingerprint(self.data)}
        return {"kind": "builtin", "experiment": self.name}

    # -- the framework's side ---------------------------------------------------

    def compile(self, model):
        """Bind to a model: validate parameters against it and return a runnable form."""
        raise NotImplementedError

    def figures(self, results, out_dir: Path) -> list[Path]:
        """Draw the experiment's figures from stored results; returns the files written."""
        return []

    def summary_rows(self, results) -> list[dict]:
        """The dataset-level numbers of stored results with their bootstrap intervals, one
        dict per number with the columns of `nnexp.statistics.SUMMARY_COLUMNS` (kind,
        measure, role, layer, head, mean, lower, upper, n). `Results.summary()` and the
        run's summary.csv are made of these; every built-in kind overrides this, and a
        user's experiment may. The default has none."""
        return []

    # -- serialisation ---------------------------------------------------------

    def params(self) -> dict:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def spec(self) -> dict:
        cls = type(self)
        return {
            "name": self.name,
            "class": f"{cls.__module__}:{cls.__qualname__}",
            "source_file": _source_file(cls),
            "params": self.params(),
        }

    @classmethod
    def from_params(cls, params: dict) -> Experiment:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"experiment {cls.name or cls.__name__!r} has no parameter(s) {', '.join(unknown)}; "
                f"its parameters are: {', '.join(sorted(known))}"
            )
        # coerced here too, so a subclass whose __post_init__ skips super() is still typed
        return cls(**coerce_params(cls, params))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _source_file(cls) -> str | None:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


# -- finding experiments ----------------------------------------------------------


def builtin_experiments() -> dict[str, type[Experiment]]:
    """The named experiments: the catalogue of ready-made ones (`nnexp_experiments`, a
    plugin) and any a plugin or `--include` registered, by name."""
    return dict(EXPERIMENTS.items())


def register_experiment(cls: type[Experiment]) -> type[Experiment]:
    """Make `cls` known to `nnexp run` by its `name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Experiment)) or not cls.name:
        raise ConfigError(f"{cls!r} is not an nnexp Experiment class with a name; give it name = \"my-experiment\"")
    return EXPERIMENTS.register(cls.name, cls, description=cls.description)


def _experiment_classes(module) -> list[type[Experiment]]:
    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Experiment)
        and value.__module__ == module.__name__
        and value.name
    ]


def find_experiment(reference: str) -> type[Experiment]:
    """An experiment class from a built-in name, `file.py[:Class]` or `package.module:Class`."""
    builtins = builtin_experiments()
    if reference in builtins:
        return builtins[reference]
    target, _, attr = reference.partition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"experiment file {path} does not exist")
        module = import_file(path)
    elif attr:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise ConfigError(f"cannot import module {target!r} for experiment {reference!r}: {error}") from None
    else:
        raise ConfigError(
            f"unknown experiment {reference!r}; built-in experiments: {', '.join(sorted(builtins))} "
            "(or give a file: my_experiment.py[:ClassName], or module:ClassName)"
        )
    if attr:
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Experiment)):
            raise ConfigError(f"{reference!r}: {attr} is not an nnexp Experiment class in {target}")
        return cls
    classes = _experiment_classes(module)
    if len(classes) != 1:
        names = ", ".join(c.__name__ for c in classes) or "none"
        raise ConfigError(
            f"{target} defines {len(classes)} named Experiment classes ({names}); name one as {target}:ClassName"
        )
    return classes[0]


def experiment_from_spec(spec: dict) -> Experiment:
    """Rebuild the experiment a results directory was made with."""
    name = spec.get("name")
    builtins = builtin_experiments()
    qualname = spec["class"].partition(":")[2]
    if name in builtins and builtins[name].__qualname__ == qualname:
        cls = builtins[name]
    elif spec.get("source_file") and Path(spec["source_file"]).is_file():
        cls = find_experiment(f"{spec['source_file']}:{qualname}")
    else:
        cls = find_experiment(spec["class"])
    return cls.from_params(spec["params"])
