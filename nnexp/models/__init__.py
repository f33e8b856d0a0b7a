"""Loading models and knowing their layout: aliases, the architecture table, `load_model`."""

from .aliases import ALIASES, DEFAULT_MODEL, cache_root
from .architectures import ARCHITECTURES, Architecture, ArchSpec, register_architecture
from .loading import Model, load_model, wrap_model

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "ArchSpec",
    "Architecture",
    "DEFAULT_MODEL",
    "Model",
    "cache_root",
    "load_model",
    "register_architecture",
    "wrap_model",
]
