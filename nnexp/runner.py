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
        memory_budget: bytes of activation memory one trace may use ("2GB", "512MiB");
            traces are split to fit. Supported by gradient attribution (measured) and the
            factual-recall analyses (estimated); patching and logit attribution take `max_rows`.
        load_in_8bit: when `model` is a name, load it in 8 bits (bitsandbytes, CUDA only).
        figures: draw figures when the run completes.
    """
    if examples_per_trace is None:
        examples_per_trace = experiment.examples_per_trace
    if examples_per_trace < 1:
        raise ConfigError(f"examples_per_trace is {examples_per_trace}; it must be at least 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit is {limit}; give a positive number of examples")
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype, load_in_8bit=load_in_8bit)
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

    options = {"examples_per_trace": examples_per_trace, "max_rows": max_rows, "memory_budget": memory_budget}
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
    try:
        for start in range(0, len(pending), examples_per_trace):
            chunk = pending[start : start + examples_per_trace]
            for record in compiled.run(chunk, max_rows=max_rows):
                directory.write_example(record)
            bar.update(len(chunk))
    except BaseException as error:
        # Whatever stopped the run (Ctrl-C, out of memory, a bad example), every
        # finished example is already on disk; say so and how to continue.
        bar.close()
        stored = len(directory.done())
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "stopped by an error"
        note(f"{what}: {stored} examples are stored in {directory.path}; run the same command again to resume")
        raise
    bar.close()

    results = load_results(directory.path)
    directory.write_index(results.records)
    if figures:
        written = experiment.figures(results, directory.figures_dir)
        if written:
            note(f"wrote {len(written)} figure files to {directory.figures_dir}")
    return results
