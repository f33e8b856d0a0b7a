"""Remote execution on NDIF (nnsight's remote service): the executor and its errors."""

from .client import JobPending, JobSubmitted, RemoteExecutor, RemoteRunError

__all__ = ["JobPending", "JobSubmitted", "RemoteExecutor", "RemoteRunError"]
