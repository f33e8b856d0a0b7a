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
import time
from pathlib import Path

import torch

import nnexp
from nnexp.counterfact import builtin_facts
from nnexp.gradient_attribution import GradientAttributionExperiment
from nnexp.tracing.plan import left_pad
from nnexp.tracing.memory import peak_memory

from .attribution import floor
from .common import Table, mib, sync


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

    def floor_run(batch: int):
        for start in range(0, n, batch):
            facts = [item.fact for item in items[start : start + batch]]
            ids, mask, _ = left_pad([fact.ids for fact in facts], compiled.pad_id)
            true = torch.tensor([fact.true_id for fact in facts], device=device)
            false = torch.tensor([fact.false_id for fact in facts], device=device)
            floor(model, modules, ids.to(device), mask.to(device), true, false)

    table = Table(f"Dataset throughput: gradient attribution (every layer) over {n} CounterFact-style facts",
                  ["run", "examples per trace", "seconds", "examples / s", "/ floor at the same batch",
                   "peak memory (MiB)"])
    for batch in args.batches:
        sync(device)
        start = time.perf_counter()
        floor_run(batch)
        sync(device)
        base = time.perf_counter() - start
        out = folder / f"run-{batch}"
        with peak_memory() as peaks:
            sync(device)
            start = time.perf_counter()
            results = nnexp.run(experiment, model, out=out, examples_per_trace=batch, figures=False)
            sync(device)
            seconds = time.perf_counter() - start
        assert len(results.records) == n
        table.add("floor: plain forward+backward per batch", batch, base, f"{n / base:.1f}", "1.00x", "")
        table.add("nnexp.run, results stored", batch, seconds, f"{n / seconds:.1f}", f"{seconds / base:.2f}x",
                  mib(max(peaks.values(), default=0)))
    table.notes.append("nnexp.run includes tokenising the data file, building the traces, and writing every "
                       "chunk's records (safetensors + JSONL) as it finishes")
    return [table]
