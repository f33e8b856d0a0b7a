"""Trace jobs and the executors that run them: here, in-process as nnsight's remote
path would, or on an NDIF server.

A `TraceJob` is one forward pass (and a backward pass when `grad`): the model inputs
and a `body`, a function called inside the trace with the nnsight model that reads
and edits activations and returns what to keep (tensors, reduced to what the
experiment stores). The bodies live in `nnexp.tracing.execute`.

Executors run a list of jobs, one list per chunk of examples (`Executor.run`);
those that can leave a list running on a server also submit it and poll for it
(`SubmittingExecutor.submit` / `poll`). The runner decides which to call:

* `LocalExecutor`: one trace per job on the model's own device(s).
* `SimulatedRemoteExecutor`: every job of the list in ONE nnsight session request,
  with nnsight's `remote="local"` (serialised and deserialised in-process, with
  nnexp hidden, the way a server would see it).
* `nnexp.remote.RemoteExecutor` (a `SubmittingExecutor`): the same session, sent to
  an NDIF server, waited for or submitted and polled.

The bodies run wherever the model is, so they move the small tensors they carry
(row indices, values, answer ids) to the device of the activation they touch, and
return their results on the CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

# Every trace asks for the last position's logits only, and no KV cache.
TRACE_OPTIONS = {"use_cache": False, "logits_to_keep": 1}


@dataclass
class TraceJob:
    """One forward pass: `inputs` (input_ids, attention_mask, optionally position_ids,
    on the CPU) and `body(nn) -> saved values`, run inside the trace. `runs`: how many
    rows its values have, when that is not its batch's (a packed plan's runs share the
    batch's sequences, `nnexp.tracing.prefix`)."""

    inputs: dict[str, torch.Tensor]
    body: Callable[[Any], Any]
    grad: bool = False
    options: dict = field(default_factory=lambda: dict(TRACE_OPTIONS))
    runs: int | None = None

    @property
    def rows(self) -> int:
        """The rows its values have: one per run."""
        return self.runs if self.runs is not None else int(self.inputs["input_ids"].shape[0])


class Executor(ABC):
    """Runs lists of trace jobs for one model; `kind` names it in specs and messages."""

    kind: ClassVar[str]

    def __init__(self, model) -> None:
        self.model = model

    @abstractmethod
    def run(self, jobs: list[TraceJob]) -> list:
        """Each job's saved values, in order, once all have run."""

    def describe(self) -> dict:
        return {"kind": self.kind}


class SubmittingExecutor(Executor):
    """An executor whose jobs run elsewhere and can be left running: `submit` sends a
    list of jobs and returns a job id at once; `poll` asks for its values later."""

    host: str
    bytes_received: int

    @abstractmethod
    def submit(self, jobs: list[TraceJob]) -> str:
        """Send `jobs` as one request without waiting; the id to poll it by."""

    @abstractmethod
    def poll(self, job_id: str) -> tuple[list | None, str]:
        """(each job's saved values, "COMPLETED") once the request has finished, or
        (None, its status) while it has not."""


class LocalExecutor(Executor):
    """Runs each job as its own trace on the model's device(s)."""

    kind = "local"

    def run(self, jobs: list[TraceJob]) -> list:
        from nnsight import save

        nn = self.model.nn
        device = self.model.device
        results = []
        for job in jobs:
            inputs = {name: value.to(device) for name, value in job.inputs.items()}
            input_ids = inputs.pop("input_ids")
            # (a gradient body freezes the weights itself, here as on a server)
            with torch.enable_grad() if job.grad else torch.no_grad():
                with nn.trace(input_ids, **inputs, **job.options):
                    value = save(job.body(nn))
            results.append(value)
        return results


def recording_rows(run: Callable[[list[TraceJob]], list], rows: list[int]) -> Callable[[list[TraceJob]], list]:
    """An executor's `run` that first appends the rows of each job's trace to `rows`:
    one entry per trace. How tests and benchmarks count the traces that a chunk size
    or a memory budget produces."""

    def recording(jobs: list[TraceJob]) -> list:
        rows.extend(job.rows for job in jobs)
        return run(jobs)

    return recording


@contextmanager
def recorded_traces(model) -> Iterator[list[int]]:
    """Within the block, the rows of every trace `model` (an `nnexp.models.Model`) runs,
    one entry per trace, in the list this yields."""
    rows: list[int] = []
    executor = model.executor
    shadowed = vars(executor).get("run")  # a recording already in place stays in place
    executor.run = recording_rows(executor.run, rows)
    try:
        yield rows
    finally:
        if shadowed is None:
            del executor.run
        else:
            executor.run = shadowed


def hf_module(nn):
    """The torch module an nnsight model wraps."""
    return object.__getattribute__(nn, "_module")


def register_for_shipping(extra_modules=()) -> None:
    """Ship nnexp's own code (and any module named in `extra_modules`, e.g. where a
    user's metric lives) by value with each request: the server has torch,
    transformers and nnsight, not nnexp."""
    import nnsight

    nnsight.register("nnexp")
    for module in extra_modules:
        if module and not module.startswith(("torch", "nnsight", "transformers", "builtins")):
            nnsight.register(module)


def run_session(nn, jobs: list[TraceJob], backend) -> list | None:
    """Every job in one nnsight session run by `backend`; returns each job's saved
    values. The session body below is what travels: nnsight re-reads it from this file,
    so it must stay a plain `with` block. A non-blocking backend only submits: the block
    runs on the server alone, its saved values (under the name `results`) are fetched
    later by job id, and this returns None."""
    from nnsight import save

    with nn.session(backend=backend):
        results = []
        for job in jobs:
            inputs = dict(job.inputs)
            input_ids = inputs.pop("input_ids")
            with torch.enable_grad() if job.grad else torch.no_grad():
                with nn.trace(input_ids, **inputs, **job.options):
                    value = save(job.body(nn))
            results.append(value)
        save(results)
    return results if getattr(backend, "blocking", True) else None


class SimulatedRemoteExecutor(Executor):
    """nnsight's `remote="local"`: each list of jobs is serialised into one session
    request and deserialised in-process with nnexp hidden, then run on the local model.
    Proves that a request would run on a server that does not have nnexp."""

    kind = "remote-local"

    def run(self, jobs: list[TraceJob]) -> list:
        from nnsight.intervention.backends.local import LocalSimulationBackend

        register_for_shipping(_body_modules(jobs))
        return run_session(self.model.nn, jobs, LocalSimulationBackend(self.model.nn))


def _body_modules(jobs: list[TraceJob]) -> set[str]:
    """Modules of the functions a job's body refers to (its function and, for a
    `functools.partial`, the functions among its arguments, however nested: a user's
    edit function inside a plan's operations, a user's metric), to ship them by value."""
    modules: set[str] = set()
    for job in jobs:
        body = job.body
        for value in [body, getattr(body, "func", None), *getattr(body, "keywords", {}).values()]:
            modules |= function_modules(value)
    return modules


def function_modules(value, depth: int = 0) -> set[str]:
    """The modules of the functions in `value` (functions, and lists, tuples, dicts and
    objects holding them, e.g. a trace operation's `fn`) that are not the standard
    library's: pickling the standard library by value breaks it."""
    import dataclasses
    import inspect
    import sys

    if depth > 6:
        return set()
    if inspect.isfunction(value):
        module = getattr(value, "__module__", None)
        return {module} if module and module.partition(".")[0] not in sys.stdlib_module_names else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(function_modules(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return set().union(*(function_modules(v, depth + 1) for v in value.values()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return set().union(*(function_modules(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)
                             if not isinstance(getattr(value, f.name), torch.Tensor)))
    return set()
