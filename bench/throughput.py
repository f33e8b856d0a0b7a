"""Dataset throughput: examples per second over 1,000 CounterFact-style facts.

The facts are the built-in CounterFact set's facts whose targets are single tokens for
the model, repeated with new case ids up to 1,000, written as a JSONL data file. Each
run is `nnexp.run` end to end (preparing, batching examples across traces, storing
every chunk under a results directory), for gradient attribution at every layer,
against the floor: the same batches through one plain forward and backward each with
raw PyTorch hooks, storing nothing.
"""

from __future__ import annotations

import json
from functools import partial
from itertools import count
from pathlib import Path

import torch

import nnexp
from nnexp.counterfact import builtin_facts
from nnexp.kinds.gradient_attribution import GradientAttributionExperiment
from nnexp.tracing.plan import left_pad

from .attribution import floor
from .common import Table, mib, peak_bytes, time_interleaved


def facts_file(model, n: int, folder: Path) -> Path:
    probe = GradientAttributionExperiment(multi_token="skip").compile(model)
    usable = [fact for i, fact in enumerate(builtin_facts()) if probe.prepare(fact, i).fact is not None]
    path = folder / f"counterfact-{n}.jsonl"
    with path.open("w") as out:
        for i in range(n):
            record = usable[i % len(usable)].to_json()
            record["case_id"] = i
            out.write(json.dumps(record) + "\n")
    return path


def run(model, args, folder: Path) -> list[Table]:
    n = args.examples
    data = facts_file(model, n, folder)
    experiment = GradientAttributionExperiment(data=str(data), only_correct=False)
    compiled = experiment.compile(model)
    items = [compiled.prepare(example, i) for i, example in enumerate(experiment.examples())]
    from nnexp.models.architectures import _get_module

    modules = [_get_module(model.hf, point.module) for _, point in compiled.points]
    device = model.device

    def floor_run(batch: int, n: int = n):
        for start in range(0, n, batch):
            facts = [item.fact for item in items[start : start + batch]]
            ids, mask, _ = left_pad([fact.ids for fact in facts], compiled.pad_id)
            true = torch.tensor([fact.true_id for fact in facts], device=device)
            false = torch.tensor([fact.false_id for fact in facts], device=device)
            floor(model, modules, ids.to(device), mask.to(device), true, false)

    table = Table(f"Dataset throughput: gradient attribution (every layer) over {n} CounterFact-style facts",
                  ["run", "examples per trace", "seconds", "examples / s", "/ floor at the same batch",
                   "peak memory (MiB)"])
    runs = count()

    def nnexp_run(batch: int, limit: int | None = None):
        out = folder / f"run-{batch}-{next(runs)}"  # a fresh directory: nothing to resume
        results = nnexp.run(experiment, model, out=out, limit=limit, examples_per_trace=batch, figures=False)
        assert len(results.records) == (limit or n)

    for batch in args.batches:
        # peaks first, apart from the timed runs (following every storage slows the CPU;
        # they warm up both): every trace has the same rows, so two batches show the peak
        floor_peak = peak_bytes(lambda batch=batch: floor_run(batch, min(n, 2 * batch)))
        ours_peak = peak_bytes(lambda batch=batch: nnexp_run(batch, min(n, 2 * batch)))
        times = time_interleaved({"floor": partial(floor_run, batch), "nnexp": partial(nnexp_run, batch)},
                                 args.reps, device, warmup=0)
        base, seconds = times["floor"], times["nnexp"]
        table.add("floor: plain forward+backward per batch", batch, base, f"{n / base:.1f}", "1.00x", mib(floor_peak))
        table.add("nnexp.run, results stored", batch, seconds, f"{n / seconds:.1f}", f"{seconds / base:.2f}x",
                  mib(ours_peak))
    table.notes.append("nnexp.run includes tokenising the data file, building the traces, and writing every "
                       "chunk's records (safetensors + JSONL) as it finishes")
    table.notes.append(f"seconds: medians of {args.reps} interleaved passes over the whole dataset; peak memory "
                       "is measured on separate runs of the first two batches, not the timed ones")
    return [table]
