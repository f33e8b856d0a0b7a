"""How close is an nnexp patching sweep to the cost of a plain batched forward?

For one IOI example, nnexp's trace (clean + corrupted + one row per patched cell,
edits applied through nnsight) is timed against the floor: the same rows in one
plain forward pass with raw PyTorch hooks doing the same edits, and the same metric.
Repetitions are interleaved and the median is reported, with the ratio to the floor.

    python bench/patching_floor.py [--model smollm2-135m] [--reps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch

from nnexp import PatchingExperiment, PromptPair, load_model
from nnexp.metrics import get_metric
from nnexp.tracing.plan import TracePlan

PAIR = PromptPair(
    clean="After John and Mary went to the store, Mary gave a bottle of milk to",
    corrupted="After John and Mary went to the store, John gave a bottle of milk to",
    answer=" John",
    foil=" Mary",
)

SWEEPS = {
    "residual stream, every layer x position": dict(sites=("resid_post",)),
    "heads, every layer x head x position": dict(sites=("head_out",), head_positions="each"),
    "ioi-patching default (3 sites x layer x position + heads)": dict(sites=("resid_post", "attn_out", "mlp_out", "head_out")),
}


def floor(model, plan: TracePlan) -> torch.Tensor:
    """The same rows and edits as `plan`, in one forward with plain torch hooks."""
    hf = model.hf
    handles = []
    for point, edits in plan.edits:
        module = hf.get_submodule(point.module)

        def edit(tensor, point=point, edits=edits):
            for e in edits:
                e.apply(tensor, point)

        if point.io == "output":
            def hook(mod, args, output, edit=edit, index=point.index):
                edit(output if index is None else output[index])
            handles.append(module.register_forward_hook(hook))
        else:
            def pre_hook(mod, args, edit=edit):
                edit(args[0])
            handles.append(module.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            logits = hf(input_ids=plan.input_ids, attention_mask=plan.attention_mask, use_cache=False,
                        logits_to_keep=1).logits[:, -1].float()
        return get_metric(plan.metric).fn(logits, plan.answer_ids, plan.foil_ids)
    finally:
        for h in handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"model {args.model} ({args.dtype}, {args.device}); torch {torch.__version__}")
    print("| sweep | rows | floor (s) | nnexp (s) | nnexp / floor |")
    print("|---|---|---|---|---|")
    for title, options in SWEEPS.items():
        compiled = PatchingExperiment(**options).compile(model)
        item = compiled.prepare(PAIR, 0)
        [(_, plan)] = compiled.plans([item])
        # both paths must compute the same numbers before their speed means anything
        ours = compiled.run([item])[0]
        reference = floor(model, plan)
        assert abs(ours.scalars["clean"] - float(reference[0])) < 1e-3
        times = {"floor": [], "nnexp": []}
        for _ in range(args.reps):
            for name, fn in (("floor", partial(floor, model, plan)), ("nnexp", partial(compiled.run, [item]))):
                start = time.perf_counter()
                fn()
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
        f, n = statistics.median(times["floor"]), statistics.median(times["nnexp"])
        print(f"| {title} | {plan.n_rows} | {f:.3f} | {n:.3f} | {n / f:.2f}x |")


if __name__ == "__main__":
    main()
