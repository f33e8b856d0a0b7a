"""`run`: examples -> tokens -> trace plans -> traces -> stored results -> figures.

The runner is the same for every experiment kind. It validates all examples before
computing anything (bad data fails in seconds, not after an hour), skips examples
already stored in the run directory, runs the rest in chunks with a progress bar,
stores each example the moment its chunk finishes, and draws figures at the end.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from pathlib import Path

from .console import note, progress
from .errors import ConfigError
from .experiment import Experiment
from .interrupts import InterruptGuard
from .models import Model, load_model
from .models.aliases import DEFAULT_MODEL
from .results import Results
from .store import FORMAT, RunDirectory, load_results, run_id

DEFAULT_RESULTS_ROOT = Path("results")


def _versions() -> dict:
    out = {}
    for package in ("nnexp", "nnsight", "torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def build_spec(experiment: Experiment, model: Model, n_examples: int, options: dict) -> dict:
    return {
        "format": FORMAT,
        "experiment": experiment.spec(),
        "model": model.describe(),
        "data": {**experiment.data_source(), "n_examples": n_examples},
        "run": {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            **options,
        },
    }


class Chunks:
    """Runs chunks of examples and stores each the moment it finishes; for a remote
    executor also submits chunks without waiting and collects submitted ones."""

    def __init__(self, compiled, directory: RunDirectory, executor, max_rows, bar,
                 interrupts: InterruptGuard) -> None:
        self.compiled = compiled
        self.directory = directory
        self.executor = executor
        self.max_rows = max_rows
        self.bar = bar
        self.interrupts = interrupts
        self.handled: set[int] = set()  # examples stored, or waiting on a submitted job
        self.received = 0  # examples whose results came back from a server in this call
        self.submitted = 0
        self.still_running = 0

    def _store(self, chunk: list) -> None:
        for record in self.compiled.run(chunk, max_rows=self.max_rows):
            self.directory.write_example(record)
        self.handled.update(item.index for item in chunk)
        self.bar.update(len(chunk))
        if self.executor.kind == "remote":
            self.received += len(chunk)
        self.interrupts.check()  # a Ctrl-C that a finalizer swallowed stops the run here

    def run(self, chunk: list, submit_only: bool = False) -> None:
        if not submit_only:
            self._store(chunk)
            return
        from .remote import JobSubmitted

        self.executor.submit_only = True
        try:
            self.compiled.run(chunk, max_rows=self.max_rows)
        except JobSubmitted as submitted:
            self.directory.add_job(submitted.job_id, [item.index for item in chunk])
            self.handled.update(item.index for item in chunk)
            self.submitted += len(chunk)
            self.interrupts.check()
        else:
            raise RuntimeError("a remote chunk ran instead of being submitted")  # nnexp bug, not user input
        finally:
            self.executor.submit_only = False

    def collect(self, pending: list, wait: bool) -> None:
        """Fetch the chunks submitted earlier (waiting for each when `wait`)."""
        jobs = self.directory.read_jobs() if self.executor.kind == "remote" else {}
        if not jobs:
            return
        from .remote import JobPending, RemoteRunError

        by_index = {item.index: item for item in pending}
        for job_id, indices in jobs.items():
            chunk = [by_index[i] for i in indices if i in by_index]
            if not chunk:
                self.directory.forget_job(job_id)
                continue
            self.executor.poll_job, self.executor.wait_for_pending = job_id, wait
            try:
                self._store(chunk)
            except JobPending as pending_job:
                self.handled.update(item.index for item in chunk)
                self.still_running += len(chunk)
                note(f"job {job_id} ({len(chunk)} examples) is still {pending_job.status.lower()}")
                continue
            except RemoteRunError as error:
                self.directory.forget_job(job_id)
                raise RemoteRunError(f"{error}. Its examples will be resubmitted by `nnexp resume "
                                     f"{self.directory.path}`") from None
            finally:
                self.executor.poll_job, self.executor.wait_for_pending = None, True
            self.directory.forget_job(job_id)


def default_run_dir(spec: dict, root: Path = DEFAULT_RESULTS_ROOT) -> Path:
    return Path(root) / spec["experiment"]["name"] / spec["model"]["name"] / run_id(spec)


def run(
    experiment: Experiment,
    model: Model | str = DEFAULT_MODEL,
    *,
    out: str | Path | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    examples_per_trace: int | None = None,
    max_rows: int | None = None,
    memory_budget: int | str | None = None,
    load_in_8bit: bool = False,
    figures: bool = True,
    backend: str | None = None,
    remote_model: str | None = None,
    remote: dict | None = None,
    wait: bool = True,
    collect_only: bool = False,
) -> Results:
    """Run `experiment` on `model` and store the results; returns them loaded.

    Args:
        experiment: an experiment instance (e.g. `IOIPatching()`).
        model: a loaded `Model`, or a name for `load_model` (alias, folder or hub id).
        out: results directory; default `results/<experiment>/<model>/<run>/`, where
            <run> is derived from the parameters, so rerunning resumes.
        limit: compute only the first `limit` examples.
        device, dtype: used when `model` is a name.
        examples_per_trace: how many examples share one batched trace (default: the
            experiment kind's `examples_per_trace`; 1 for patching, whose single
            example already fills a trace with hundreds of rows).
        max_rows: split any trace with more rows than this (memory bound).
        memory_budget: bytes of activation memory one trace may use on each device, on
            top of the weights ("2GB", "512MiB"); every experiment kind splits its traces
            to fit, by the measured cost of a row (`nnexp.tracing.memory`).
        load_in_8bit: when `model` is a name, load it in 8 bits (bitsandbytes, CUDA only).
        figures: draw figures when the run completes.
        backend: "local"; "remote" (an NDIF server: each chunk of examples is one
            request); or "remote-local" (nnsight's in-process check of the remote path).
            None keeps a loaded model's backend (local for a name).
        remote_model: with backend="remote", the repo id the server knows the model by.
        remote: options of `nnexp.remote.RemoteExecutor` (host, timeout, retries,
            backoff, trusted_hosts).
        wait: with backend="remote", False submits every chunk without waiting and
            stores the job ids in the results directory; collect them later with
            `nnexp fetch` (or this function with collect_only=True).
        collect_only: fetch the results of submitted chunks (waiting for them when
            `wait`), and submit nothing new.
    """
    if examples_per_trace is None:
        examples_per_trace = experiment.examples_per_trace
    if examples_per_trace < 1:
        raise ConfigError(f"examples_per_trace is {examples_per_trace}; it must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit is {limit}; give a positive number of examples")
    remote = dict(remote or {})
    if isinstance(model, str):
        backend = backend or "local"
        model = load_model(model, device=device, dtype=dtype, load_in_8bit=load_in_8bit, backend=backend,
                           remote_model=remote_model, **(remote if backend == "remote" else {}))
    elif backend is not None:
        if backend == "remote" and model.remote_id is None:
            # a model loaded here, run on a server that serves the same weights (tests do this)
            if remote_model is None:
                raise ConfigError("a model loaded here needs remote_model= (the repo id the server serves it under) "
                                  "to run remotely")
            model.remote_id = remote_model
        if backend != model.executor.kind or remote:
            model.use_backend(backend, **(remote if backend == "remote" else {}))
    executor = model.executor
    if (not wait or collect_only) and executor.kind != "remote":
        raise ConfigError("submitting without waiting, and fetching, apply to remote runs (--backend remote)")
    if memory_budget is not None and model.is_remote:
        raise ConfigError("--memory-budget sizes traces for memory on this machine; a remote model's memory is the "
                          "server's, so bound its traces with --max-rows instead")
    examples = experiment.examples()
    total = len(examples)

    compiled = experiment.compile(model)  # validates sites/layers/heads against the model
    if hasattr(compiled, "fit"):
        # Dataset statistics (mean activations, a noise level) come from every example,
        # whatever `limit` is, so a limited run and its continuation agree.
        items = [compiled.prepare(example, index) for index, example in enumerate(examples)]
        compiled.fit(items)
        items = items[:limit] if limit is not None else items
    else:
        items = [compiled.prepare(example, index) for index, example in enumerate(examples[:limit])]
    if hasattr(compiled, "select"):
        # e.g. keep only the facts the model predicts (gradient attribution's only_correct)
        items = compiled.select(items, examples_per_trace)
    if memory_budget is not None:
        if not hasattr(compiled, "set_memory_budget"):
            raise ConfigError(
                f"experiment {experiment.name!r} does not size its traces by a memory budget yet; "
                "bound its memory with max_rows (--max-rows) instead"
            )
        from .tracing.memory import parse_bytes

        compiled.set_memory_budget(items, parse_bytes(memory_budget))

    options = {"examples_per_trace": examples_per_trace, "max_rows": max_rows, "memory_budget": memory_budget,
               "backend": executor.describe()}
    spec = build_spec(experiment, model, total, options)
    directory = RunDirectory(out if out is not None else default_run_dir(spec))
    directory.open(spec)
    done = directory.done()
    pending = [item for item in items if item.index not in done]
    if done:
        note(f"resuming {directory.path}: {len(items) - len(pending)} of {len(items)} examples already stored")
    else:
        note(f"writing results to {directory.path}")

    bar = progress(total=len(items), initial=len(items) - len(pending), desc=experiment.name or "run")
    interrupts = InterruptGuard()
    chunks = Chunks(compiled, directory, executor, max_rows, bar, interrupts)
    if executor.kind == "remote":
        executor.bytes_received = 0  # count what the examples' own requests bring back
    try:
        with interrupts:
            chunks.collect(pending, wait=wait)
            rest = [item for item in pending if item.index not in chunks.handled]
            if collect_only:
                if rest:
                    note(f"{len(rest)} examples were never submitted (or their job failed); run `nnexp resume "
                         f"{directory.path}` to compute them")
            else:
                for start in range(0, len(rest), examples_per_trace):
                    chunks.run(rest[start : start + examples_per_trace], submit_only=not wait)
    except BaseException as error:
        # Whatever stopped the run (Ctrl-C, out of memory, a bad example), every
        # finished example is already on disk; say so and how to continue.
        bar.close()
        stored = len(directory.done())
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
        note(f"{what}: {stored} examples are stored in {directory.path}; run the same command again to resume")
        raise
    bar.close()
    if executor.kind == "remote":
        stats = directory.add_remote_traffic(executor.describe(), executor.bytes_received, chunks.received)
        if chunks.received:
            note(f"received {executor.bytes_received:,} bytes from {executor.host} for {chunks.received} examples "
                 f"({executor.bytes_received // chunks.received:,} per example; {stats['bytes_per_example']:,} over the run)")

    results = load_results(directory.path)
    directory.write_index(results.records)
    waiting = chunks.submitted + chunks.still_running
    if waiting:
        note(f"{waiting} examples are running on {executor.host}; collect them with: nnexp fetch {directory.path}")
        return results
    if len(results.records) < len(items) and not collect_only:
        return results
    if figures:
        written = experiment.figures(results, directory.figures_dir)
        if written:
            note(f"wrote {len(written)} figure files to {directory.figures_dir}")
    return results
