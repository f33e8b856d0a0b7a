"""All-layer contrastive gradient attribution: one nnexp trace against one Inseq call per
layer per example.

For a batch of built-in CounterFact facts, gradient x activation of p(true) - p(false)
at every layer's MLP output and every position:

- floor: the batch (left-padded) in one plain forward and backward with raw PyTorch
  hooks reading every layer;
- nnexp: `GradientAttributionExperiment`, one trace for the batch;
- per-layer loop: one forward and backward per layer per fact with a hook on that layer
  alone: Inseq's calls without Inseq's own overhead;
- Inseq: `layer_gradient_x_activation` with `attributed_fn="contrast_prob_diff"`, one
  `attribute` call per layer per fact (how Inseq is used for a layer sweep: it takes
  one target layer per model), in Inseq's own environment (tests/inseq_env.py) over the
  same weights, in a worker process that times its own calls.

The loops' cost is the same for every layer (each call is a full forward and backward),
so with `--loop-layers N` they are timed over N evenly spaced layers and scaled to all
of them. Inseq's attributions are checked against nnexp's before timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from nnexp.counterfact import builtin_facts
from nnexp.kinds.gradient_attribution import GradientAttributionExperiment
from nnexp.tracing.memory import frozen_parameters
from nnexp.tracing.plan import left_pad

from .common import Table, mib, peak_bytes, ratio, sync, time_interleaved

REPO = Path(__file__).resolve().parent.parent


def _metric(logits, true, false):
    probs = logits.float().softmax(-1)
    return probs.gather(1, true[:, None])[:, 0] - probs.gather(1, false[:, None])[:, 0]


def floor(model, modules, ids, mask, true, false, layers=None):
    """Plain forward + backward over the batch, reading `layers` (default all)."""
    layers = range(len(modules)) if layers is None else layers
    seen = {}
    handles = [modules[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in layers]
    embed = model.hf.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        with frozen_parameters(model.hf), torch.enable_grad():
            logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
            grads = torch.autograd.grad(_metric(logits, true, false).sum(), [seen[i] for i in layers])
            return [(g * seen[i].detach()).sum(-1) for i, g in zip(layers, grads)]
    finally:
        for handle in handles + [embed]:
            handle.remove()


def per_layer_loop(model, modules, facts, layers):
    for fact in facts:
        ids = torch.tensor([fact.ids], device=model.device)
        true = torch.tensor([fact.true_id], device=model.device)
        false = torch.tensor([fact.false_id], device=model.device)
        for layer in layers:
            floor(model, modules, ids, torch.ones_like(ids), true, false, layers=[layer])


class InseqWorker:
    """The Inseq environment's python, holding the model, timing one sweep per request."""

    def __init__(self, model, compiled, facts, layers, folder: Path) -> None:
        sys.path.insert(0, str(REPO))
        from tests.inseq_env import inseq_python

        model.hf.save_pretrained(folder / "model")
        model.tokenizer.save_pretrained(folder / "model")
        module = compiled.points[0][1].module.replace(f".{compiled.layers[0]}.", ".{layer}.")
        tokenizer = model.tokenizer
        examples = [{"prompt": item.fact.fact.prompt, "target": tokenizer.decode([item.fact.true_id]),
                     "contrast": tokenizer.decode([item.fact.false_id])} for item in facts]
        self.out = folder / "inseq.safetensors"
        request = {"model": str(folder / "model"), "module": module, "layers": list(layers), "examples": examples,
                   "out": str(self.out), "threads": torch.get_num_threads()}
        (folder / "request.json").write_text(json.dumps(request))
        self.process = subprocess.Popen([str(inseq_python()), str(REPO / "bench" / "inseq_worker.py"),
                                         str(folder / "request.json")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = self.process.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the Inseq worker did not start (said {line!r})")

    def sweep(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait(timeout=60)


def run(model, args, folder: Path) -> list[Table]:
    compiled = GradientAttributionExperiment(multi_token="skip").compile(model)
    items = [compiled.prepare(f, i) for i, f in enumerate(builtin_facts())]
    items = [item for item in items if item.fact is not None][: args.facts]
    facts = [item.fact for item in items]
    device = model.device
    ids, mask, offsets = left_pad([fact.ids for fact in facts], compiled.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    true = torch.tensor([fact.true_id for fact in facts], device=device)
    false = torch.tensor([fact.false_id for fact in facts], device=device)
    from nnexp.models.architectures import _get_module

    modules = [_get_module(model.hf, point.module) for _, point in compiled.points]
    n_layers = len(modules)
    sample = sorted({round(i * (n_layers - 1) / max(1, args.loop_layers - 1)) for i in range(args.loop_layers)})
    scale = n_layers / len(sample)

    records = compiled.run(items)
    reference = floor(model, modules, ids, mask, true, false)
    for layer in range(n_layers):
        for row, (record, offset) in enumerate(zip(records, offsets)):
            ours = record["attribution"].values[layer].float().cpu()
            theirs = reference[layer][row, offset:].float().cpu()
            assert torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max()) + 1e-12), \
                f"nnexp differs from the floor at layer {layer}, fact {row}"

    contenders = {
        "floor: one plain forward+backward, all layers": lambda: floor(model, modules, ids, mask, true, false),
        "nnexp: one trace, all layers": lambda: compiled.run(items),
        "per-layer loop, raw hooks (scaled)": lambda: per_layer_loop(model, modules, facts, sample),
    }
    worker = None
    if args.inseq:
        worker = InseqWorker(model, compiled, items, sample, folder)
        seconds = worker.sweep()  # warm-up, and the attributions to check
        theirs = load_file(worker.out)
        for row, record in enumerate(records):
            for layer in sample:
                got, want = theirs[f"{row}.{layer}"], record["attribution"].values[layer].float().cpu()
                assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-12), \
                    f"Inseq differs from nnexp at layer {layer}, fact {row}"
        inseq_times: list[float] = []
        contenders["Inseq: one call per layer per fact (scaled)"] = lambda: inseq_times.append(worker.sweep())
    times = time_interleaved(contenders, args.reps, device, warmup=0 if args.quick else 1)
    if worker is not None:
        import statistics

        # the worker's own clock: without the pipe round trip
        times["Inseq: one call per layer per fact (scaled)"] = statistics.median(inseq_times)
        worker.close()
    for name in list(times):
        if "(scaled)" in name:
            times[name] *= scale
    peaks = {name: peak_bytes(fn) for name, fn in contenders.items() if not name.startswith("Inseq")}
    sync(device)
    base = times["floor: one plain forward+backward, all layers"]
    ours = times["nnexp: one trace, all layers"]
    table = Table(f"All-layer contrastive attribution: {len(facts)} facts x {n_layers} layers "
                  f"({int(mask.sum())} tokens, left-padded to {ids.shape[1]})",
                  ["contender", "median (s)", "/ floor", "/ nnexp", "peak memory (MiB)"])
    for name, seconds in times.items():
        table.add(name, seconds, ratio(seconds, base), ratio(seconds, ours), mib(peaks[name]) if name in peaks else "")
    if scale != 1:
        table.notes.append(f"the loops were timed over {len(sample)} of {n_layers} layers ({sample}) and scaled by "
                           f"{scale:.1f}: each call is a full forward and backward whatever the layer")
    return [table]
