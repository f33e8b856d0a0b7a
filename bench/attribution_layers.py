"""All-layer gradient attribution in one trace versus one attribution call per layer.

For a batch of built-in CounterFact facts, nnexp's gradient attribution (every layer's
MLP output, every position, one forward and one backward per batch) is timed against:

- the floor: the same batch in one plain forward and backward with raw PyTorch hooks
  reading every layer (what nnexp cannot beat);
- the per-layer loop: one forward and backward per layer per fact with a hook on that
  layer alone, which is how Inseq's `layer_gradient_x_activation` is used for this
  study (one `attribute` call per layer; Inseq's own overhead is not included).

Medians over interleaved repetitions, with ratios to the floor.

    python bench/attribution_layers.py [--model smollm2-135m] [--facts 16] [--reps 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nnexp import load_model
from nnexp.counterfact import builtin_facts
from nnexp.gradient_attribution import GradientAttributionExperiment
from nnexp.tracing.plan import left_pad


def _sites(model):
    return [model.hf.get_submodule(point.module) for _, point in
            GradientAttributionExperiment().compile(model).points]


def _metric(logits, true, false):
    probs = logits.float().softmax(-1)
    return probs.gather(1, true[:, None])[:, 0] - probs.gather(1, false[:, None])[:, 0]


def floor(model, ids, mask, true, false, layers=None):
    """Plain forward + backward over the batch, reading `layers` (default all)."""
    modules = _sites(model)
    layers = range(len(modules)) if layers is None else layers
    seen = {}
    handles = [modules[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in layers]
    embed = model.hf.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for p in model.hf.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
            grads = torch.autograd.grad(_metric(logits, true, false).sum(), [seen[i] for i in layers])
            return [(g * seen[i]).sum(-1) for i, g in zip(layers, grads)]
    finally:
        for handle in handles + [embed]:
            handle.remove()


def per_layer_loop(model, items):
    for item in items:
        ids = torch.tensor([item.fact.ids], device=model.device)
        mask = torch.ones_like(ids)
        true = torch.tensor([item.fact.true_id], device=model.device)
        false = torch.tensor([item.fact.false_id], device=model.device)
        for layer in range(model.arch.n_layers):
            floor(model, ids, mask, true, false, layers=[layer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    compiled = GradientAttributionExperiment(multi_token="skip").compile(model)
    items = compiled.select([compiled.prepare(f, i) for i, f in enumerate(builtin_facts())], 16)[: args.facts]
    ids, mask, _ = left_pad([item.fact.ids for item in items], compiled.pad_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    true = torch.tensor([item.fact.true_id for item in items], device=model.device)
    false = torch.tensor([item.fact.false_id for item in items], device=model.device)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    runs = {
        "floor: one plain forward+backward, all layers": lambda: floor(model, ids, mask, true, false),
        "nnexp: one trace, all layers": lambda: compiled.run(items),
        "per-layer loop: one forward+backward per layer per fact": lambda: per_layer_loop(model, items),
    }
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.reps):
        for name, fn in runs.items():  # interleaved
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times[next(iter(runs))])
    print(f"model {args.model} ({model.arch.n_layers} layers), {len(items)} facts, {args.dtype}, {args.device}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.reps} reps")
    print("| run | median (s) | / floor |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
