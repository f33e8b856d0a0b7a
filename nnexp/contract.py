"""The contract every experiment kind implements: prepare, fit, select, plan, decode.

An `Experiment` (a dataclass of parameters) compiles, for one model, into a
`CompiledExperiment`. The runner (`nnexp.runner`) drives every kind through the same
steps, and owns everything that touches an executor:

    items  = [compiled.prepare(example, i) ...]      tokens and validation; no model calls
    compiled.fit(items)                             dataset statistics (optional; may run the model)
    items  = compiled.select(items, batch)          e.g. only the facts the model gets right (optional)
    rows   = compiled.rows_for_budget(items, bytes) rows one trace may hold under a memory budget
    plan   = compiled.plan(chunk, row_limit)        PURE: the chunk's trace jobs and their layout
    values = executor.run(plan.jobs)                (or executor.submit(plan.jobs) ... executor.poll(job))
    records = compiled.decode(chunk, plan, values)  values -> labelled records, one per example

`plan` is a pure function of (the chunk's items, the row limit): planning the same
chunk with the same limit again gives the same jobs and layout, which is how a remote
job submitted in one process is decoded in another. The runner stores, with each
submitted job, the examples it holds, the row limit it was planned with and the
layout's fingerprint, and decodes it by planning again with exactly those, refusing
to decode if the fingerprint differs (`ChunkPlan.fingerprint`).

A `ChunkPlan`'s layout is plain JSON data (numbers, strings, lists, dicts): which
example (and which cell of it) each row of each job holds, whatever decoding needs
besides the items themselves.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, ResultsError
from .results import ExampleRecord
from .tracing.jobs import TraceJob


@dataclass
class ChunkPlan:
    """The traces of one chunk of examples, and how to read their values back.

    Attributes:
        jobs: one `TraceJob` per trace, in the order their values come back.
        layout: JSON data saying what each job's rows hold (kind-specific).
        row_limit: the limit the chunk was planned under (None: unbounded).
    """

    jobs: list[TraceJob]
    layout: Any
    row_limit: int | None = None
    examples: list[int] = field(default_factory=list)

    @property
    def rows(self) -> list[int]:
        """Rows of each job's trace."""
        return [job.rows for job in self.jobs]

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides what each returned value means: the layout,
        the examples and every job's token ids and mask."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"layout": self.layout, "examples": self.examples, "row_limit": self.row_limit},
                                 sort_keys=True, default=str).encode())
        for job in self.jobs:
            for name in sorted(job.inputs):
                value = job.inputs[name].detach().cpu().contiguous()
                digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
                digest.update(value.numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_values(self, values: list) -> None:
        """Refuse values that do not match this plan's jobs (never zip-truncate)."""
        if len(values) != len(self.jobs):
            raise ResultsError(f"{len(values)} trace results came back for a chunk planned as {len(self.jobs)} "
                               "traces; its examples were not stored (rerun or resume to compute them)")


def expect_rows(value: torch.Tensor, rows: int, what: str, dim: int = 0) -> torch.Tensor:
    """`value` if its dimension `dim` has `rows` entries; else an error rather than a
    silently misaligned decode."""
    if value.dim() <= dim or value.shape[dim] != rows:
        raise ResultsError(f"{what} came back with shape {list(value.shape)} where {rows} rows were planned; its "
                           "examples were not stored (rerun or resume to compute them)")
    return value


class CompiledExperiment(ABC):
    """An experiment bound to a model: what every kind implements (see the module docstring).

    Subclasses implement `prepare`, `plan` and `decode`, and `rows_for_budget` when
    they can size traces by memory (every built-in kind does); `fit`, `select` and
    `row_limit` have defaults that do nothing.
    """

    def __init__(self, experiment, model) -> None:
        self.experiment = experiment
        self.model = model
        tokenizer = model.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- before planning --------------------------------------------------------------

    @abstractmethod
    def prepare(self, example, index: int):
        """Tokenise and validate one example; return an item with an `index` attribute.
        No model calls: bad data must fail before anything is computed."""

    def fit(self, items: list) -> None:
        """Dataset statistics over every prepared item (a mean activation, a noise level).
        Called once per run, before `select` and before any chunk is planned."""

    def select(self, items: list, batch: int) -> list:
        """The items to compute (e.g. only those the model predicts correctly); `batch`
        is how many examples one preparatory pass may hold."""
        return items

    def skip_reason(self, item) -> str:
        """Why `select` left `item` out, in a few words (recorded in skipped.json and shown
        in the run's report)."""
        return "not selected by the experiment"

    def rows_for_budget(self, items: list, budget: int) -> int:
        """How many rows one trace may hold so that its activations (and what decoding
        computes from them) peak under `budget` bytes on every device."""
        raise ConfigError(f"experiment {self.experiment.name or type(self.experiment).__name__!r} does not size its "
                          "traces by a memory budget; bound its memory with max_rows (--max-rows) instead")

    def declared(self) -> dict | None:
        """What the experiment declared beyond its parameters, as JSON (e.g. the runs a
        user's experiment makes of an example), saved in the run's spec and part of its
        identity; None when its parameters say everything. Known after `prepare`."""
        return None

    def row_limit(self, items: list, bound: int | None) -> int | None:
        """The row limit to plan `items` under, given the user's bound (max_rows and the
        memory budget's rows, whichever is tighter; None when neither is set)."""
        return bound

    # -- planning and decoding ----------------------------------------------------------

    @abstractmethod
    def plan(self, items: list, row_limit: int | None) -> ChunkPlan:
        """The trace jobs of `items` under `row_limit` rows per trace, and their layout. Pure."""

    @abstractmethod
    def decode(self, items: list, plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        """One record per item from the values `plan.jobs` returned."""

    # -- running a chunk here (notebooks and tests; the runner does the same, and stores) --

    def run(self, items: list, max_rows: int | None = None) -> list[ExampleRecord]:
        """Plan `items`, run the traces on the model's executor, and decode: one record per item."""
        plan = self.plan(items, self.row_limit(items, max_rows))
        values = self.model.executor.run(plan.jobs) if plan.jobs else []
        plan.check_values(values)
        return self.decode(items, plan, values)
