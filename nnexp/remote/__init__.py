"""Remote execution on NDIF (nnsight's remote service): the executor and its errors."""

from .client import RemoteExecutor, RemoteRunError

__all__ = ["RemoteExecutor", "RemoteRunError"]
