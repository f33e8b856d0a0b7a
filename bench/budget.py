"""Memory budget: the same sweeps split to fit a budget, their peak, and their numbers.

For the IOI head sweep and gradient attribution over a batch of facts, nnexp runs
once without a budget and once under budgets of a half and a quarter of that run's
peak; for each, the rows per trace the budget allowed, the traces, the time, the
measured peak against the budget, and the largest difference from the unbudgeted
numbers.
"""

from __future__ import annotations

import time

from nnexp import PatchingExperiment
from nnexp.counterfact import builtin_facts
from nnexp.errors import ConfigError
from nnexp.kinds.gradient_attribution import GradientAttributionExperiment
from nnexp.tracing.jobs import recorded_traces
from nnexp.tracing.memory import peak_memory

from .common import Table, mib, sync
from .patching_sweeps import PAIR


def _cases(model, args):
    patching = PatchingExperiment(sites=("head_out",), head_positions="each").compile(model)
    yield "IOI head sweep (1 example)", patching, [patching.prepare(PAIR, 0)], "head_out"
    gradient = GradientAttributionExperiment(multi_token="skip").compile(model)
    items = [gradient.prepare(f, i) for i, f in enumerate(builtin_facts())]
    yield f"gradient attribution ({args.facts} facts)", gradient, [i for i in items if i.fact is not None][: args.facts], "attribution"


def _run(compiled, items, budget, device):
    rows = None if budget is None else compiled.rows_for_budget(items, budget)
    with recorded_traces(compiled.model) as traces, peak_memory() as peaks:
        sync(device)
        start = time.perf_counter()
        records = compiled.run(items, max_rows=rows)
        sync(device)
        seconds = time.perf_counter() - start
    return records, seconds, max(peaks.values(), default=0), traces


def run(model, args, folder) -> list[Table]:
    device = model.device
    table = Table("Memory budget: traces split to fit, peak measured",
                  ["sweep", "budget (MiB)", "rows per trace", "traces", "seconds", "peak (MiB)", "peak / budget",
                   "max |difference|"])
    for title, compiled, items, key in _cases(model, args):
        whole, seconds, peak, traces = _run(compiled, items, None, device)
        table.add(title, "none", max(traces), len(traces), seconds, mib(peak), "", "")
        for fraction in (2, 4):
            budget = peak // fraction
            try:
                records, seconds, used, traces = _run(compiled, items, budget, device)
            except ConfigError as error:  # a budget below one trace's minimum says so
                table.add(title, mib(budget), "", "", "", "", "", str(error).split(";")[0])
                continue
            difference = max(float((a[name].values.float() - b[name].values.float()).abs().nan_to_num().max())
                             for a, b in zip(whole, records) for name in a.tensors if name.startswith(key))
            assert used <= budget, f"{title}: peak {used} over the budget {budget}"
            table.add(title, mib(budget), max(traces), len(traces), seconds, mib(used), f"{used / budget:.2f}",
                      f"{difference:.1e}")
    table.notes.append("peak: tensor memory above the weights (CUDA: the allocator's peak; CPU: every storage "
                       "the operators create, followed until freed), see nnexp/tracing/memory.py")
    table.notes.append("seconds are taken while the peak is measured, which on the CPU slows every operator: "
                       "compare them with each other, not with the other sections")
    return [table]

