"""Prefix sharing (`nnexp.tracing.prefix`): nnexp with sharing on against sharing off
(nnexp before it: every row in full) and against the naive batched floor.

- IOI patching sweeps (one example): the naive floor is ONE plain forward with raw
  PyTorch hooks over every cell of the sweep (the clean/corrupted shared prefix
  included), the same plain-hook forward as `bench/patching_sweeps.py`'s floor; nnexp
  off skips the shared prefix's cells and runs every other row in full; nnexp on runs
  each patched row from its cell's position on.
- Causal tracing (3 sites, window 10, 10 noise samples) and attention knockout (every
  window centre) per fact, with sharing off and on, through `compiled.run`.

Every contender's numbers are checked against nnexp's (sharing off) before timing.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from functools import partial

import torch

from nnexp import PatchingExperiment
from nnexp.kinds.attention_knockout import AttentionKnockoutExperiment
from nnexp.kinds.causal_tracing import CausalTracingExperiment

from .common import Table, ratio, time_interleaved
from .patching_sweeps import PAIR, floor

SWEEPS = {
    "resid": ("residual stream, every layer x position", dict(sites=("resid_pre",))),
    "heads": ("heads, every layer x head, all positions at once", dict(sites=("head_out",), head_positions="all")),
}


def _patched(records, sites) -> torch.Tensor:
    return torch.cat([records[0][f"{site}.patched"].values.flatten() for site in sites])


def _sweeps(model, args):
    for name in args.sweeps:
        title, options = SWEEPS[name]
        naive = PatchingExperiment(skip_shared_prefix=False, prefix_sharing=False, **options).compile(model)
        off = PatchingExperiment(prefix_sharing=False, **options).compile(model)
        on = PatchingExperiment(**options).compile(model)
        item = off.prepare(PAIR, 0)
        [floor_plan], _ = naive.trace_plans([naive.prepare(PAIR, 0)], None)
        [on_plan], _ = on.trace_plans([item], None)
        [off_plan], _ = off.trace_plans([item], None)
        contenders = {
            "naive floor: every cell, one plain forward, raw hooks": partial(floor, model, floor_plan),
            "nnexp, prefix sharing off (before)": partial(off.run, [item]),
            "nnexp, prefix sharing on (after)": partial(on.run, [item]),
        }
        reference = _patched(off.run([item]), options["sites"])  # (also warms both up)
        got = _patched(on.run([item]), options["sites"])
        error = float((got - reference).abs().nan_to_num().max())
        assert error <= 1e-3 * max(float(reference.abs().nan_to_num().max()), 1.0), f"sharing on differs by {error}"
        times = time_interleaved(contenders, args.reps, model.device, warmup=0)
        base = times["naive floor: every cell, one plain forward, raw hooks"]
        tokens_floor = floor_plan.input_ids.numel()
        tokens_on = on_plan.input_ids.numel()
        table = Table(f"IOI patching, {title} ({floor_plan.n_rows - 2} cells; {off_plan.n_rows - 2} outside the "
                      f"shared prefix)", ["contender", "median (s)", "/ naive floor", "/ nnexp off"])
        for label, seconds in times.items():
            table.add(label, seconds, ratio(seconds, base),
                      ratio(seconds, times["nnexp, prefix sharing off (before)"]))
        table.notes.append(f"tokens computed: naive floor {tokens_floor}, nnexp off {off_plan.input_ids.numel()}, "
                           f"nnexp on {tokens_on} (padding included) in {on_plan.input_ids.shape[0]} packed "
                           f"sequences; max |on - off| = {error:.1e}")
        yield table


def _facts(model, args):
    kinds = {"knockout": ("attention knockout (every window centre)", AttentionKnockoutExperiment()),
             "tracing": ("causal tracing (3 sites, window 10, 10 samples)", CausalTracingExperiment())}
    for label, experiment in (kinds[part] for part in args.sharing_parts if part in kinds):
        compiled, items = {}, None
        for sharing in (False, True):
            compiled[sharing] = dataclasses.replace(experiment, prefix_sharing=sharing).compile(model)
            prepared = [compiled[sharing].prepare(fact, i) for i, fact in enumerate(experiment.examples()[: args.facts_per_kind])]
            compiled[sharing].fit(prepared)
            items = items or compiled[sharing].select(prepared, 16)
        # timed as they run (interleaved, `--reps` rounds); the last round's records are compared
        times: dict[bool, list[float]] = {False: [], True: []}
        records = {}
        for _ in range(args.reps):
            for sharing in (False, True):
                start = time.perf_counter()
                records[sharing] = compiled[sharing].run(items)
                times[sharing].append(time.perf_counter() - start)
        for a, b in zip(records[False], records[True]):
            for name in a.tensors:
                if "." in name:  # what the traces return (probabilities, ranks)
                    torch.testing.assert_close(b[name].values, a[name].values, rtol=1e-4, atol=1e-7, equal_nan=True)
        off_plan = compiled[False].plan(items, None)
        on_plan = compiled[True].plan(items, None)
        table = Table(f"{label}: {len(items)} facts, {sum(off_plan.rows)} runs",
                      ["contender", "median (s)", "s per fact", "/ nnexp off"])
        off = statistics.median(times[False])
        for sharing, name in ((False, "nnexp, prefix sharing off (before)"), (True, "nnexp, prefix sharing on (after)")):
            seconds = statistics.median(times[sharing])
            table.add(name, seconds, seconds / len(items), ratio(seconds, off))
        off_tokens = sum(job.inputs["input_ids"].numel() for job in off_plan.jobs)
        on_tokens = sum(job.inputs["input_ids"].numel() for job in on_plan.jobs)
        table.notes.append(f"tokens computed (padding included): off {off_tokens} in {len(off_plan.jobs)} traces, "
                           f"on {on_tokens} in {len(on_plan.jobs)} traces")
        yield table


def run(model, args, folder):
    if "sweeps" in args.sharing_parts:
        yield from _sweeps(model, args)
    yield from _facts(model, args)
