"""`run`: examples -> tokens -> trace plans -> traces -> stored results -> figures.

The runner is the same for every experiment kind. It checks that the results
directory can be written before loading the model, validates all examples before
computing anything (bad data fails in seconds, not after an hour), skips examples
already stored in the run directory, runs the rest in chunks with a progress bar,
stores each example the moment its chunk finishes, and at the end draws figures,
writes summary.csv (every dataset-level mean with its bootstrap interval), naming the
largest effects at the terminal, records the command's timings in spec.json and writes
the run's report.html (`nnexp.report`).

Several processes may run the same command into one directory: each claims the
examples of a chunk before computing them (`nnexp.claims`), leaves to the others
what they claimed, and when nothing is left to claim waits for theirs, computing any
that a failed or killed process let go unstored. Every process ends with the whole
run stored, and no example is computed twice.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import time
import warnings
from collections import deque
from pathlib import Path

from .console import note, progress
from .contract import ChunkPlan, CompiledExperiment
from .disk import check_writable
from .errors import ConfigError, NnexpError, ResultsError, StoreWriteError
from .experiment import Experiment
from .interrupts import InterruptGuard
from .models import Model, load_model
from .models.aliases import DEFAULT_MODEL
from .remote import RemoteRunError
from .results import Results
from .store import FORMAT, RunDirectory, SubmittedJob, load_results, run_id
from .tracing.jobs import Executor, SubmittingExecutor
from .tracing.memory import tightest

DEFAULT_RESULTS_ROOT = Path("results")
POLL_INTERVAL_S = 2.0  # between asks for a submitted job's results, when waiting for them


def _versions() -> dict:
    out = {}
    for package in ("nnexp", "nnsight", "torch", "transformers", "safetensors", "numpy", "pandas", "plotly"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def build_spec(experiment: Experiment, model: Model, n_examples: int, options: dict, declared: dict | None = None) -> dict:
    return {
        "format": FORMAT,
        "experiment": {**experiment.spec(), **({"declared": declared} if declared is not None else {})},
        "model": model.describe(),
        "data": {**experiment.data_source(), "n_examples": n_examples},
        "run": {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            **options,
        },
    }


class Chunks:
    """Plans, runs (or submits) and stores chunks of examples, each the moment it
    finishes; collects chunks submitted earlier. The only place executors are called.
    Every example is claimed before it is computed (see the module docstring)."""

    def __init__(self, compiled: CompiledExperiment, directory: RunDirectory, executor: Executor, bound: int | None,
                 bar, interrupts: InterruptGuard) -> None:
        self.compiled = compiled
        self.directory = directory
        self.executor = executor
        self.bound = bound  # the user's row bound: max_rows and the memory budget's, whichever is tighter
        self.bar = bar
        self.interrupts = interrupts
        self.received = 0  # examples whose results came back from a server in this call
        self.submitted = 0
        self.still_running = 0
        self.computed = 0  # examples this process computed (or submitted)
        self.by_others = 0  # examples another process stored while this one ran
        self.remote = isinstance(executor, SubmittingExecutor)

    def _plan(self, chunk: list) -> ChunkPlan:
        return self.compiled.plan(chunk, self.compiled.row_limit(chunk, self.bound))

    def _store(self, chunk: list, plan: ChunkPlan, values: list) -> None:
        plan.check_values(values)
        records = self.compiled.decode(chunk, plan, values)
        if sorted(record.index for record in records) != sorted(item.index for item in chunk):
            raise RuntimeError("decode returned records for other examples than its chunk's")  # nnexp bug
        for record in records:
            self.directory.write_example(record)
        self.bar.update(len(chunk))
        if self.remote:
            self.received += len(chunk)
        self.interrupts.check()  # a Ctrl-C that a finalizer swallowed stops the run here

    def run(self, chunk: list) -> None:
        plan = self._plan(chunk)
        self._store(chunk, plan, self.executor.run(plan.jobs) if plan.jobs else [])

    def submit(self, chunk: list) -> None:
        plan = self._plan(chunk)
        job_id = self.executor.submit(plan.jobs)
        self.directory.add_job(job_id, SubmittedJob(plan.examples, plan.row_limit, plan.fingerprint))
        self.submitted += len(chunk)
        self.interrupts.check()

    # -- sharing the directory with other processes -----------------------------------

    def _settled(self, index: int) -> bool:
        """Whether another process stored (or submitted) example `index` since this run looked."""
        if self.directory.is_stored(index):
            return True
        return self.remote and any(index in job.examples for job in self.directory.read_jobs().values())

    def _claim_chunk(self, queue: deque, size: int, others: list) -> tuple[list, list]:
        """Up to `size` examples from the front of `queue` that this process claims;
        those another process holds go to `others`."""
        chunk, claims = [], []
        while queue and len(chunk) < size:
            item = queue.popleft()
            claim = self.directory.try_claim(item.index)
            if claim is None:
                others.append(item)
            elif self._settled(item.index):
                claim.release(stored=True)
                self._found_settled()
            else:
                chunk.append(item)
                claims.append(claim)
        return chunk, claims

    def _found_settled(self) -> None:
        self.by_others += 1
        self.bar.update(1)

    def compute(self, items: list, size: int, submit: bool) -> None:
        """Compute (or submit) `items` in chunks of `size`, each example claimed first; then
        wait for those other processes hold, and compute any they let go unstored."""
        queue, others, waiting_noted = deque(items), [], False
        while queue or others:
            chunk, claims = self._claim_chunk(queue, size, others)
            if not chunk and others:
                if not waiting_noted:
                    note(f"waiting for {len(others)} examples another process is computing in {self.directory.path}")
                    waiting_noted = True
                item = others.pop(0)
                claim = self.directory.wait_claim(item.index)
                queue.extendleft(reversed(others))
                others = []
                if self._settled(item.index):
                    claim.release(stored=True)
                    self._found_settled()
                    continue
                chunk, claims = [item], [claim]  # its holder stopped without storing it
            if not chunk:
                continue
            done = False
            try:
                self.submit(chunk) if submit else self.run(chunk)
                self.computed += len(chunk)
                done = True
            finally:
                for claim in claims:
                    claim.release(stored=done)

    def collect(self, jobs: dict[str, SubmittedJob], items: dict[int, object], done: set[int], wait: bool) -> None:
        """Fetch the chunks submitted earlier (waiting for each when `wait`), and decode
        each exactly as it was planned: its own examples, under its own row limit."""
        for job_id, job in jobs.items():
            if all(index in done for index in job.examples):
                self.directory.forget_job(job_id)
                continue
            missing = [index for index in job.examples if index not in items]
            if missing:
                self.directory.forget_job(job_id)
                note(f"job {job_id} holds examples this run no longer computes ({missing[:5]}); it is forgotten, "
                     "and `nnexp resume` computes what is missing")
                continue
            chunk = [items[index] for index in job.examples]
            plan = self.compiled.plan(chunk, job.row_limit)
            if plan.fingerprint != job.layout:
                raise ResultsError(
                    f"job {job_id} in {self.directory.jobs_path} was planned differently from how its examples plan "
                    "now (the data, the experiment's code or nnexp changed), so its results cannot be decoded "
                    "safely; collect it with the nnexp and data that submitted it, or delete its entry and run "
                    f"`nnexp resume {self.directory.path}` to compute its examples again")
            claims = [self.directory.try_claim(index) for index in job.examples]
            if None in claims or job_id not in self.directory.read_jobs():
                # another process is collecting it (or has)
                for claim in claims:
                    if claim is not None:
                        claim.release(stored=False)
                if job_id in self.directory.read_jobs():
                    note(f"job {job_id} is being collected by another process")
                    self.still_running += len(chunk)
                continue
            stored = False
            try:
                try:
                    values = self._poll(job_id, wait)
                except RemoteRunError as error:
                    self.directory.forget_job(job_id)
                    raise RemoteRunError(f"{error}. Its examples will be resubmitted by `nnexp resume "
                                         f"{self.directory.path}`") from None
                if values is None:
                    self.still_running += len(chunk)
                    continue
                self._store(chunk, plan, values)
                self.directory.forget_job(job_id)
                stored = True
            finally:
                for claim in claims:
                    claim.release(stored=stored)

    def _poll(self, job_id: str, wait: bool) -> list | None:
        while True:
            values, status = self.executor.poll(job_id)
            if values is not None:
                return values
            if not wait:
                note(f"job {job_id} is still {status.lower()}")
                return None
            time.sleep(POLL_INTERVAL_S)


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
    checkpoint: str | Path | None = None,
) -> Results:
    """Run `experiment` on `model` and store the results; returns them loaded.

    Args:
        experiment: an experiment instance (e.g. `IOIPatching()`).
        model: a loaded `Model`, or a name for `load_model` (alias, folder or hub id).
        out: results directory; default `results/<experiment>/<model>/<run>/`, where
            <run> is derived from the parameters, so rerunning resumes.
        limit: compute only the first `limit` examples (None: all). It is stored with the
            run, and `nnexp resume` continues with it unless given another.
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
        checkpoint: when `model` is a name, a training checkpoint whose weights are loaded
            into that architecture (`load_model(..., checkpoint=)`); its SHA-256 is part of
            the run's identity, so another checkpoint makes another run.
    """
    if examples_per_trace is None:
        examples_per_trace = experiment.examples_per_trace
    if examples_per_trace < 1:
        raise ConfigError(f"examples_per_trace is {examples_per_trace}; it must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit is {limit}; give a positive number of examples")
    remote = dict(remote or {})
    started = time.monotonic()
    # Refused now rather than after loading the model and computing the first chunk.
    check_writable(out if out is not None else DEFAULT_RESULTS_ROOT / (experiment.name or ""))
    if checkpoint is not None and not isinstance(model, str):
        raise ConfigError("checkpoint= applies when model is a name; for a loaded model, pass it to "
                          "load_model(name, checkpoint=...)")
    given_loaded = not isinstance(model, str)
    if not given_loaded:
        backend = backend or "local"
        model = load_model(model, device=device, dtype=dtype, load_in_8bit=load_in_8bit, backend=backend,
                           remote_model=remote_model, checkpoint=checkpoint,
                           **(remote if backend == "remote" else {}))
    loaded = time.monotonic()
    if given_loaded and backend is not None:
        if backend == "remote" and model.remote_id is None:
            # a model loaded here, run on a server that serves the same weights (tests do this)
            if remote_model is None:
                raise ConfigError("a model loaded here needs remote_model= (the repo id the server serves it under) "
                                  "to run remotely")
            model.remote_id = remote_model
        if backend != model.executor.kind or remote:
            model.use_backend(backend, **(remote if backend == "remote" else {}))
    executor = model.executor
    submitting = isinstance(executor, SubmittingExecutor)
    if (not wait or collect_only) and not submitting:
        raise ConfigError("submitting without waiting, and fetching, apply to remote runs (--backend remote)")
    if memory_budget is not None and model.is_remote:
        raise ConfigError("--memory-budget sizes traces for memory on this machine; a remote model's memory is the "
                          "server's, so bound its traces with --max-rows instead")
    budget = None
    if memory_budget is not None:
        from .tracing.memory import parse_bytes

        budget = parse_bytes(memory_budget)
    examples = experiment.examples()
    total = len(examples)

    compiled = experiment.compile(model)  # validates sites/layers/heads against the model
    # Every example is prepared (tokenised and validated) before anything is computed, and
    # dataset statistics (mean activations, a noise level) come from every example,
    # whatever `limit` is, so a limited run and its continuation agree.
    prepared = [compiled.prepare(example, index) for index, example in enumerate(examples)]
    compiled.fit(prepared)

    options = {"examples_per_trace": examples_per_trace, "max_rows": max_rows, "memory_budget": memory_budget,
               "backend": executor.describe()}
    if not collect_only:
        options["limit"] = limit  # what `nnexp resume` continues (fetching changes no run's limit)
    spec = build_spec(experiment, model, total, options, compiled.declared())
    directory = RunDirectory(out if out is not None else default_run_dir(spec))
    directory.open(spec)
    done, damaged = directory.scan()
    for index, error in sorted(damaged.items()):
        note(f"{error.path} is damaged ({error.why}); example {index} is computed again")
    jobs = directory.read_jobs() if submitting else {}
    in_jobs = {index for job in jobs.values() for index in job.examples}
    wanted = total if limit is None else min(limit, total)
    # What to compute now: the examples within the limit not yet stored, and every example
    # of a submitted chunk (decoding it needs all of them, even beyond a smaller --limit).
    candidates = [item for item in prepared if (item.index < wanted and item.index not in done) or item.index in in_jobs]
    # e.g. keep only the facts the model predicts (gradient attribution's only_correct)
    selected = compiled.select(candidates, examples_per_trace) if candidates else []
    items = {item.index: item for item in selected}
    left_out = {item.index: item for item in candidates if item.index < wanted and item.index not in items}
    directory.add_skipped(set(left_out), {index: compiled.skip_reason(item) for index, item in left_out.items()})
    stored = sum(1 for index in done if index < wanted)
    beyond = f"; the run is limited to its first {wanted} of {total} examples (--limit)" if wanted < total else ""
    if done:
        note(f"resuming {directory.path}: {stored} of {wanted} examples already stored{beyond}")
    else:
        note(f"writing results to {directory.path}")
    rest = [item for item in selected if item.index < wanted and item.index not in done and item.index not in in_jobs]
    bound = max_rows
    if budget is not None and rest:
        bound = tightest(max_rows, compiled.rows_for_budget(rest, budget))

    bar = progress(total=stored + len(rest) + len(in_jobs - done), initial=stored, desc=experiment.name or "run")
    interrupts = InterruptGuard()
    chunks = Chunks(compiled, directory, executor, bound, bar, interrupts)
    computing = time.monotonic()
    if submitting:
        executor.bytes_received = 0  # count what the examples' own requests bring back
    try:
        with interrupts:
            if jobs:
                chunks.collect(jobs, items, done, wait=wait)
            if collect_only:
                unsubmitted = [item for item in rest if not directory.is_stored(item.index)]
                if unsubmitted:
                    note(f"{len(unsubmitted)} examples were never submitted (or their job failed); run `nnexp resume "
                         f"{directory.path}` to compute them")
                if wanted < total:
                    note(f"examples {wanted} to {total - 1} lie beyond this run's --limit {wanted}; `nnexp resume "
                         f"{directory.path} --limit {total}` computes them")
            else:
                chunks.compute(rest, examples_per_trace, submit=not wait)
    except BaseException as error:
        bar.close()
        # A failed write says itself what is stored and what to do.
        if not isinstance(error, StoreWriteError):
            # Whatever stopped the run (Ctrl-C, out of memory, a bad example), every
            # finished example is already on disk; say so and how to continue.
            what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
            note(f"{what}: {directory.count_files()} examples are stored in {directory.path}; run the same command "
                 "again to resume")
        raise
    bar.close()
    if chunks.computed or chunks.by_others:
        others = f"; {chunks.by_others} were computed by another process" if chunks.by_others else ""
        note(f"{'computed' if wait else 'submitted'} {chunks.computed} examples here{others}")
    if submitting:
        stats = directory.add_remote_traffic(executor.describe(), executor.bytes_received, chunks.received)
        if chunks.received:
            note(f"received {executor.bytes_received:,} bytes from {executor.host} for {chunks.received} examples "
                 f"({executor.bytes_received // chunks.received:,} per example; {stats['bytes_per_example']:,} over the run)")

    computed = time.monotonic()
    results = load_results(directory.path, allow_missing=True)
    directory.write_index(results.records)
    waiting = chunks.submitted + chunks.still_running
    if waiting:
        note(f"{waiting} examples are running on {executor.host}; collect them with: nnexp fetch {directory.path}")
        return results
    stored_now = {record.index for record in results.records}
    if any(index not in stored_now for index in items if index < wanted) and not collect_only:
        return results
    drawn: dict | None = {} if figures else None
    if figures:
        written = draw_figures(experiment, results, directory, drawn)
        if written:
            note(f"wrote {len(written)} figure files to {directory.figures_dir}")
    rows = write_summary(experiment, results, directory)
    finished = time.monotonic()
    directory.record_timings({
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_model_s": round(loaded - started, 2), "compute_s": round(computed - computing, 2),
        "examples_computed": chunks.computed, "figures_s": round(finished - computed, 2),
        "total_s": round(finished - started, 2)})
    results.spec = directory.read_spec()
    try:
        write_run_report(experiment, results, directory, rows, drawn)
    except Exception as error:  # noqa: BLE001 - every example is stored; the page alone failed
        warnings.warn(f"could not write the run's report ({type(error).__name__}: {error}); the results are "
                      f"stored, and `nnexp report {directory.path}` tries again", RuntimeWarning, stacklevel=2)
    return results


def write_run_report(experiment: Experiment, results: Results, directory: RunDirectory, rows: list[dict] | None,
                     drawn: dict | None) -> Path:
    """report.html in the run directory, from the summary rows and figures already made
    (`drawn` None: the run drew no figures, and the report has none)."""
    from .report import REPORT_NAME, build_report

    page = build_report(results, experiment=experiment, rows=rows, drawn=drawn, figures=drawn is not None)
    path = directory.path / REPORT_NAME
    with directory.lock():
        directory.write_text(path, page)
    note(f"wrote the run's report to {path}")
    return path


def write_summary(experiment: Experiment, results: Results, directory: RunDirectory) -> list[dict] | None:
    """summary.csv (every dataset-level mean with its bootstrap interval) and a few lines
    at the terminal naming the largest effects with their intervals; returns the rows
    (None when the run has nothing to summarise)."""
    from .statistics import summary_csv, top_findings

    if not results.records:
        return None
    try:
        rows = experiment.summary_rows(results)
    except NnexpError as error:  # e.g. examples whose tensors cannot be averaged; the run is stored
        note(f"no summary: {error}")
        return None
    if not rows:
        return None
    with directory.lock():
        path = directory.write_summary(summary_csv(rows))
    note(f"wrote {len(rows)} means with {100 * experiment.ci:g}% bootstrap intervals ({experiment.n_boot} resamples "
         f"of the {len(results)} examples) to {path}")
    for line in top_findings(rows):
        note(line)
    return rows


def draw_figures(experiment: Experiment, results: Results, directory: RunDirectory,
                 drawn: dict | None = None) -> list[Path]:
    """The experiment's figures, drawn by one process at a time; a failed write is one
    line that says the examples are stored and how to draw the figures again. `drawn`,
    when given, receives the figures by name (for the report)."""
    from .figure_set import draw
    from .plotting import write_figures

    try:
        with directory.lock():
            figures, own = draw(experiment, results, directory.figures_dir)
            if drawn is not None:
                drawn.update(figures)
            written = write_figures([(fig, directory.figures_dir / name) for name, fig in figures.items()])
            return written + [path for path in own if path not in written]
    except OSError as error:
        raise StoreWriteError(
            f"cannot write the figures into {directory.figures_dir} ({error.strerror or error}); the {len(results)} "
            f"examples are stored: fix that, then draw them with `nnexp plot {directory.path}`") from None
