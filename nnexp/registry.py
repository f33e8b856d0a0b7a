"""Registries: every named thing a user can choose, in one style.

nnexp resolves five kinds of names, each through a `Registry`:

| registry      | holds                                   | `nnexp run` option        |
|---------------|-----------------------------------------|---------------------------|
| `KINDS`       | experiment kinds (each kind's base class)| (the experiment's kind)   |
| `EXPERIMENTS` | ready-made experiments, by name         | `nnexp run NAME`          |
| `SITES`       | activations per layer (`nnexp.sites`)   | `--sites`, `--site`       |
| `EDITS`       | edits a run declares (`nnexp.interventions`) | (experiments' runs)  |
| `METRICS`     | metrics of the last-position logits     | `--metric`                |

A registry maps a name to an object and says, for an unknown name, which names it
knows. Registering is a decorator or a call:

    @METRICS.register("my_metric", description="...")
    def my_metric(logits, answer, foil): ...

    EXPERIMENTS.register(MyExperiment.name, MyExperiment)

Names from outside the library come from plugins, loaded before any name is resolved:
modules listed under the entry-point group `nnexp.plugins` (the catalogue of
ready-made experiments is one), and modules or files given with `nnexp --include PATH`
(`include`). Importing a plugin is all it takes: its module registers what it defines.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")

PLUGIN_GROUP = "nnexp.plugins"


class Registry(Generic[T]):
    """Named entries of one sort (`what`: "metric", "site", ...), in registration order."""

    def __init__(self, what: str, *, load_plugins: bool = True) -> None:
        self.what = what
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}
        # Lookups of a registry that plugins add to load them first.
        self._load_plugins = load_plugins

    def register(self, name: str, entry: T | None = None, *, description: str = "", replace: bool = False):
        """Add `entry` under `name`; without `entry`, a decorator that adds what it decorates.

        Registering a name twice is refused unless `replace=True`, so two plugins that
        pick the same name are caught rather than one silently winning; re-registering
        the very same object (a module imported twice) is allowed."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.what} needs a non-empty name, got {name!r}")

        def add(value: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not value and not replace and not _same_definition(existing, value):
                raise ConfigError(f"{self.what} {name!r} is already registered ({_describe(existing)}); choose "
                                  "another name, or pass replace=True to replace it")
            self._entries[name] = value
            self._descriptions[name] = description or _first_line(value)
            return value

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry named `name`, or a one-line error listing the names there are."""
        if self._load_plugins:
            load_plugins()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def describe(self, name: str) -> str:
        self.get(name)
        return self._descriptions.get(name, "")

    def names(self) -> list[str]:
        if self._load_plugins:
            load_plugins()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self._entries[name]) for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


def _first_line(value: Any) -> str:
    text = getattr(value, "description", None) or (value.__doc__ or "" if callable(value) else "")
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def _describe(value: Any) -> str:
    module = getattr(value, "__module__", None)
    name = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{module}.{name}" if module else name


def _same_definition(a: Any, b: Any) -> bool:
    """The same class or function defined again (a file imported under two module names)."""
    return (getattr(a, "__qualname__", None) is not None and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
            and _source(a) is not None and _source(a) == _source(b))


def _source(value: Any) -> str | None:
    module = sys.modules.get(getattr(value, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


# -- plugins ------------------------------------------------------------------------------

_plugins_loaded = False
_loading = False


def load_plugins() -> None:
    """Import every module registered under the `nnexp.plugins` entry-point group, once.

    A plugin that fails to import stops with an error that names it: a missing
    experiment later would be harder to trace back."""
    global _plugins_loaded, _loading
    if _plugins_loaded or _loading:
        return
    _loading = True
    try:
        for entry in sorted(importlib.metadata.entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
            try:
                entry.load()
            except Exception as error:  # noqa: BLE001 - any import failure is named below
                raise ConfigError(f"the nnexp plugin {entry.name!r} ({entry.value}) failed to import: "
                                  f"{type(error).__name__}: {error}") from None
        _plugins_loaded = True
    finally:
        _loading = False


def include(path: str | Path):
    """Import a user's module so that what it registers (experiments, metrics, sites,
    edits) can be named: a `.py` file, a package folder, or a dotted module name.
    Returns the module."""
    text = str(path)
    candidate = Path(text).expanduser()
    try:
        if candidate.suffix == ".py" or candidate.exists():
            if candidate.is_dir():
                if not (candidate / "__init__.py").is_file():
                    raise ConfigError(f"--include {text}: the folder has no __init__.py; give a .py file or a package")
                return import_file(candidate / "__init__.py", package=True)
            if not candidate.is_file():
                raise ConfigError(f"--include {text}: no such file")
            return import_file(candidate)
        return importlib.import_module(text)
    except ConfigError:
        raise
    except ImportError as error:
        raise ConfigError(f"--include {text}: cannot import it ({error}); give a .py file, a package folder or "
                          "an importable module name") from None
    except Exception as error:  # noqa: BLE001 - the user's module failed: say where, in one line
        raise ConfigError(f"--include {text} failed to import: {type(error).__name__}: {error}") from None


def _module_from_file(path: Path):
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == path:
            return module
    return None


def import_file(path: Path, package: bool = False):
    """Import a Python file as a module named after it (`capitals.py` -> `capitals`), or
    under a private name when that name is taken by another module."""
    path = path.resolve()
    # A file already imported under any name (a test module, `pkg.mod`) is that module:
    # running it again would register its sites, edits and metrics a second time.
    loaded = _module_from_file(path / "__init__.py" if package else path)
    if loaded is not None:
        return loaded
    name = path.parent.name if package else path.stem
    existing = sys.modules.get(name)
    if existing is not None or not name.isidentifier():
        name = "nnexp_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(path.parent)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


# -- the registries of experiment kinds and ready-made experiments --------------------------
# (sites, edits and metrics keep theirs beside their definitions: nnexp.sites,
# nnexp.tracing.plan, nnexp.metrics)

KINDS: Registry = Registry("experiment kind")
EXPERIMENTS: Registry = Registry("experiment")
