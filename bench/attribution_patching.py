"""Attribution patching's cost on one IOI pair: AtP and AtP* (GradDrop) screening of
every head x position cell against the exact head x position sweep through nnexp's
activation patching, in units of one plain forward pass.

The unit, a *forward-pass equivalent*: one plain no-grad forward of the pair, its two
prompts (clean and corrupted) as one batch of 2 rows, through the Hugging Face model
with no hooks (last-position logits only, no KV cache). The time of one prompt alone (1
row) is reported beside it.

Contenders (every one on the same pair, medians over interleaved repetitions):
- AtP screening: `select` of an `attribution-patching` experiment on head_out with
  graddrop off: one nnsight trace of [clean, corrupted], one backward pass.
- AtP* screening: the same with GradDrop (one more partial backward pass per layer).
- AtP and AtP* screening of head_out plus every q, k, v cell (per head, per kv head for
  k and v): the same single trace, more cells, and for AtP* the QK fix of every query
  and key cell (per GradDrop layer, recomputed from tensors already read: no forward).
- exact sweep: activation patching of every layer x head x position cell outside the
  shared prefix (`PatchingExperiment(sites=("head_out",), head_positions="each")`),
  in traces of `--atp-rows` rows; unless `--atp-exact-traces 0`, only the first few
  traces are timed and the time is scaled by rows to the whole sweep (every row costs
  the same: the same prompt with one cell patched).

Prefix sharing (running the shared prefix once) has not landed in nnexp; the exact
sweep already skips cells inside the shared prefix (exact no-ops).
"""

from __future__ import annotations

import torch

from nnexp.kinds.attribution_patching import AttributionPatchingExperiment
from nnexp.kinds.patching import PatchingExperiment

from .common import Table, ratio, time_interleaved
from .patching_sweeps import PAIR


def run(model, args, folder) -> list[Table]:
    hf = model.hf
    device = model.device
    atp = AttributionPatchingExperiment(sites=("head_out",), graddrop=False).compile(model)
    star = AttributionPatchingExperiment(sites=("head_out",), graddrop=True).compile(model)
    qkv = ("head_out", "q", "k", "v")
    atp_qkv = AttributionPatchingExperiment(sites=qkv, graddrop=False).compile(model)
    star_qkv = AttributionPatchingExperiment(sites=qkv, graddrop=True).compile(model)
    item = atp.prepare(PAIR, 0)
    pair = item.patch.pair
    both = torch.tensor([pair.clean_ids, pair.corrupted_ids], device=device)

    def forward(ids):
        def call():
            with torch.no_grad():
                hf(input_ids=ids, use_cache=False, logits_to_keep=1)
        return call

    def screen(compiled):
        def call():
            fresh = compiled.prepare(PAIR, 0)
            compiled.select([fresh], 1)
            return fresh
        return call

    exact = PatchingExperiment(sites=("head_out",), head_positions="each").compile(model)
    exact_item = exact.prepare(PAIR, 0)
    plan = exact.plan([exact_item], args.atp_rows)
    timed = plan.jobs if args.atp_exact_traces <= 0 else plan.jobs[: args.atp_exact_traces]
    # with prefix sharing a trace's rows are packed sequences of different lengths: scale
    # the timed traces to the sweep by the tokens they compute
    total_tokens = sum(int(job.inputs["input_ids"].numel()) for job in plan.jobs)
    timed_tokens = sum(int(job.inputs["input_ids"].numel()) for job in timed)

    def sweep():
        model.executor.run(timed)

    times = time_interleaved({"pair": forward(both), "one": forward(both[1:]), "atp": screen(atp),
                              "star": screen(star), "atp_qkv": screen(atp_qkv), "star_qkv": screen(star_qkv)},
                             args.reps, device)
    # the sweep is long: fewer repetitions (its rows all cost the same, so its noise is small)
    times["sweep"] = time_interleaved({"sweep": sweep}, max(1, min(args.reps, 2)), device, warmup=0)["sweep"]
    sweep_time = times["sweep"] * total_tokens / timed_tokens
    unit = times["pair"]
    n_cells = len(item.patch.run_cells)
    table = Table(f"Attribution patching: every head x position cell of one IOI pair ({n_cells} cells, "
                  f"{model.arch.n_layers} layers x {model.arch.n_heads} heads)",
                  ["contender", "seconds", "forward-pass equivalents (pair)", "vs the exact sweep"])
    table.add("one plain forward of the pair (2 rows): the unit", unit, "1.00", "")
    table.add("one plain forward of one prompt (1 row)", times["one"], ratio(times["one"], unit), "")
    table.add("AtP screening (1 trace: forward of the pair + 1 backward)", times["atp"],
              ratio(times["atp"], unit), f"{sweep_time / times['atp']:.1f}x faster")
    table.add(f"AtP* screening (GradDrop: + {model.arch.n_layers} partial backward passes)",
              times["star"], ratio(times["star"], unit), f"{sweep_time / times['star']:.1f}x faster")
    table.add("AtP screening of head_out and every q, k, v cell (1 trace)", times["atp_qkv"],
              ratio(times["atp_qkv"], unit), "")
    table.add("AtP* screening of head_out and every q, k, v cell (GradDrop, QK fix of every q and k cell)",
              times["star_qkv"], ratio(times["star_qkv"], unit), "")
    scaled = "" if timed_tokens == total_tokens else f", scaled from {len(timed)} of its {len(plan.jobs)} traces"
    table.add(f"exact sweep, nnexp activation patching ({n_cells} cells, {total_tokens} tokens in {len(plan.jobs)} "
              f"traces{scaled})",
              sweep_time, ratio(sweep_time, unit), "1.00x")
    table.notes += [
        "forward-pass equivalent: one plain no-grad forward of the pair (clean and corrupted, 2 rows), Hugging Face "
        "model, no hooks",
        "screening times include building the nnsight trace and returning every cell's estimate to the CPU",
        "exact sweep: nnexp's activation patching as it runs by default: cells inside the prefix the prompts share "
        "are not run (exact no-ops), and each patched run computes its tokens from the cell's position on "
        "(prefix sharing)",
        "the q, k, v rows have no exact sweep of their own here: the 'vs' column compares head_out sweeps only",
    ]
    return [table]
