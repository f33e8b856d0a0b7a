"""The benchmark harness: every section, one model, one device, in one run.

    python -m bench.run [--model smollm2-135m] [--device cpu] [--dtype float32]
                        [--sections patching,attribution,throughput,budget,atp] [--sweeps resid,heads] [--reps 5]
                        [--transformer-lens] [--inseq] [--out bench/results/NAME.md]

Sections: IOI patching sweeps against the floor, nnsight's per-invoke pattern, a loop
of traces and TransformerLens (bench/patching_sweeps.py); all-layer attribution
against a per-layer loop and Inseq (bench/attribution.py); dataset throughput over
1,000 CounterFact-style facts (bench/throughput.py); the memory budget
(bench/budget.py); attribution patching's screening against the exact head sweep
(bench/attribution_patching.py); prefix sharing on against off and the naive floor
(bench/prefix_sharing.py, `--sections sharing`). Timings are medians over interleaved repetitions; every contender's
numbers are checked against nnexp's first. Prints markdown tables (and writes them
to --out).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnexp import console

from . import attribution, attribution_patching, budget, patching_sweeps, prefix_sharing, throughput
from .common import bench_model, machine

SECTIONS = {"patching": patching_sweeps, "attribution": attribution, "throughput": throughput, "budget": budget,
            "atp": attribution_patching, "sharing": prefix_sharing}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="an nnexp model name, gpt2-small-shape or gpt2-xl-shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sections", default="patching,attribution,throughput,budget,atp")
    parser.add_argument("--sweeps", default="resid,heads", help="the patching section's sweeps")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip the slowest contenders and warm-ups (a smoke run)")
    parser.add_argument("--transformer-lens", action="store_true", help="add TransformerLens' per-cell patching")
    parser.add_argument("--loop-cells", type=int, default=64, help="cells of the loop of traces to time")
    parser.add_argument("--tl-cells", type=int, default=64, help="cells of the TransformerLens loop to time")
    parser.add_argument("--inseq", action="store_true", help="add Inseq's per-layer calls (its own environment)")
    parser.add_argument("--facts", type=int, default=16, help="facts in the attribution batch")
    parser.add_argument("--loop-layers", type=int, default=0, help="layers the per-layer loops are timed on (0: all)")
    parser.add_argument("--examples", type=int, default=1000, help="facts in the throughput dataset")
    parser.add_argument("--batches", default="1,16,64", help="examples per trace in the throughput section")
    parser.add_argument("--atp-rows", type=int, default=128, help="rows per trace of the exact head sweep (atp section)")
    parser.add_argument("--atp-exact-traces", type=int, default=3,
                        help="traces of the exact head sweep to time and scale from (0: all)")
    parser.add_argument("--facts-per-kind", dest="facts_per_kind", type=int, default=2,
                        help="facts the sharing section's causal tracing and knockout run on")
    parser.add_argument("--sharing-parts", dest="sharing_parts", default="sweeps,knockout,tracing",
                        help="the sharing section's parts: sweeps (IOI), knockout, tracing (causal tracing)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 keeps timings compute-bound on a shared machine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sweeps = args.sweeps.split(",")
    args.sharing_parts = args.sharing_parts.split(",")
    unknown = set(args.sweeps) - set(patching_sweeps.SWEEPS)
    if unknown:
        parser.error(f"unknown sweeps {sorted(unknown)}; choose from {', '.join(patching_sweeps.SWEEPS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    console.set_quiet(True)
    model = bench_model(args.model, args.device, args.dtype)
    if args.loop_layers <= 0:
        args.loop_layers = model.arch.n_layers
    header = (f"model {args.model} ({model.arch.n_layers} layers, d={model.arch.d_model}), {args.dtype}, "
              f"{args.device}; {machine(args.device)}; {args.reps} interleaved repetitions\n\n"
              f"command: python -m bench.run {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(header, flush=True)
    chunks = [header]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            start = time.perf_counter()
            folder = Path(tmp) / name
            folder.mkdir()
            for table in SECTIONS[name].run(model, args, folder):
                text = table.markdown()
                print(text, flush=True)
                chunks.append(text)
            print(f"({name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(chunks))


if __name__ == "__main__":
    main()
