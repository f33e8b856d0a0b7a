"""IOI patching sweeps: nnexp's one trace against the floor and the usual alternatives.

For one IOI example and one sweep (every layer x position of the residual stream, or
every layer x head x position of the heads' outputs), each contender computes the
clean run, the corrupted run and one patched run per cell, and the logit difference
of each:

- floor: the same rows in ONE plain forward pass, raw PyTorch hooks doing the same
  vectorised edits (what nnexp cannot beat);
- nnexp: `PatchingExperiment(...).compile(model).run([item])`, one nnsight trace;
- nnsight, one invoke per patched run: the tutorial pattern, all invokes batched into
  one forward by nnsight, each with its own intervention code;
- a loop of separate traces: one trace per patched run (plus one clean, one corrupted).
  Every trace costs about the same, so the loop is timed over a sample of cells
  (`--loop-cells`) and its time scaled to the whole sweep: the full loop of 1,890
  traces of SmolLM2's head sweep takes minutes per pass on a CPU;
- TransformerLens: `patching.get_act_patch_resid_pre` / `get_act_patch_attn_head_out_by_pos`
  on a `TransformerBridge` over the same weights, one forward per cell. Its loop is
  timed over a sample of cells (TransformerLens' own `index_df`), and its time per
  cell is scaled to the whole sweep.

Every contender's numbers are checked against nnexp's before any timing.
"""

from __future__ import annotations

import copy
import random
import time
from functools import partial

import torch
from nnsight import save

from nnexp import PatchingExperiment, PromptPair
from nnexp.metrics import get_metric
from nnexp.tracing.execute import run_plan

from .common import Table, mib, peak_bytes, ratio, sync, time_interleaved

PAIR = PromptPair(
    clean="After John and Mary went to the store, Mary gave a bottle of milk to",
    corrupted="After John and Mary went to the store, John gave a bottle of milk to",
    answer=" John",
    foil=" Mary",
)

# nnexp's defaults: cells in the prefix the two prompts share are not run (they are
# no-ops); every contender runs the same cells (TransformerLens through its `index_df`).
SWEEPS = {
    "resid": ("residual stream (layer x position)", dict(sites=("resid_pre",))),
    "heads": ("heads (layer x head x position)", dict(sites=("head_out",), head_positions="each")),
}


# -- contenders -------------------------------------------------------------------------------


def floor(model, plan) -> torch.Tensor:
    """The plan's rows and edits in one forward with plain torch hooks; the metric per row."""
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
    device = model.device
    try:
        with torch.no_grad():
            logits = hf(input_ids=plan.input_ids.to(device), attention_mask=plan.attention_mask.to(device),
                        use_cache=False, logits_to_keep=1).logits[:, -1].float()
        return get_metric(plan.metric).fn(logits, plan.answer_ids.to(device), plan.foil_ids.to(device)).cpu()
    finally:
        for h in handles:
            h.remove()


def _tensor(nn, point):
    envoy = nn.get(point.module)
    value = envoy.output if point.io == "output" else envoy.input
    return value if point.index is None else value[point.index]


def _patch(tensor, source, cell, point) -> None:
    if cell.head is None:
        tensor[:, cell.positions] = source[:, cell.positions]
        return
    width = tensor.shape[-1] // point.n_heads
    columns = slice(cell.head * width, (cell.head + 1) * width)
    tensor[:, cell.positions, columns] = source[:, cell.positions, columns]


def _diff(logits, answer, foil):
    return (logits[:, -1, answer] - logits[:, -1, foil]).float()


def per_invoke(model, compiled, item) -> torch.Tensor:
    """nnsight's tutorial pattern: one invoke per run, all in one trace."""
    nn = model.nn
    pair = item.pair
    cells = [item.cells[i] for i in item.run_cells]
    points = sorted({compiled.points[(c.site, c.layer)] for c in cells}, key=lambda p: p.order)
    clean_ids, corrupted_ids = torch.tensor([pair.clean_ids]), torch.tensor([pair.corrupted_ids])
    answer, foil = pair.answer_id, pair.foil_id
    values = []
    with torch.no_grad(), nn.trace(use_cache=False, logits_to_keep=1) as tracer:
        with tracer.invoke(clean_ids):
            # filled as the forward pass goes: a patched invoke at layer L reads it then
            clean = {}
            for point in points:
                clean[point] = _tensor(nn, point).clone()
            values.append(save(_diff(nn.output.logits, answer, foil)))
        with tracer.invoke(corrupted_ids):
            values.append(save(_diff(nn.output.logits, answer, foil)))
        for cell in cells:
            with tracer.invoke(corrupted_ids):
                point = compiled.points[(cell.site, cell.layer)]
                tensor = _tensor(nn, point)  # park on the location before reading `clean`
                _patch(tensor, clean[point], cell, point)
                values.append(save(_diff(nn.output.logits, answer, foil)))
    return torch.cat([v.cpu() for v in values])


def loop_of_traces(model, compiled, item, sample: list[int] | None = None) -> torch.Tensor:
    """One trace per run: the clean run (saving every activation a patch needs), the
    corrupted run, then one trace per patched run (of every cell, or of the cells at
    indices `sample` of the item's run cells)."""
    nn = model.nn
    pair = item.pair
    cells = [item.cells[i] for i in item.run_cells]
    if sample is not None:
        cells = [cells[i] for i in sample]
    points = sorted({compiled.points[(c.site, c.layer)] for c in cells}, key=lambda p: p.order)
    device = model.device
    clean_ids, corrupted_ids = torch.tensor([pair.clean_ids], device=device), torch.tensor([pair.corrupted_ids], device=device)
    answer, foil = pair.answer_id, pair.foil_id
    values = []
    with torch.no_grad():
        with nn.trace(clean_ids, use_cache=False, logits_to_keep=1):
            clean = save({point: _tensor(nn, point).clone() for point in points})
            value = save(_diff(nn.output.logits, answer, foil))
        values.append(value)
        with nn.trace(corrupted_ids, use_cache=False, logits_to_keep=1):
            value = save(_diff(nn.output.logits, answer, foil))
        values.append(value)
        for cell in cells:
            point = compiled.points[(cell.site, cell.layer)]
            with nn.trace(corrupted_ids, use_cache=False, logits_to_keep=1):
                _patch(_tensor(nn, point), clean[point], cell, point)
                value = save(_diff(nn.output.logits, answer, foil))
            values.append(value)
    return torch.cat([v.cpu() for v in values])


# -- TransformerLens ---------------------------------------------------------------------------


class TransformerLensSweep:
    """TransformerLens' per-cell patching functions on a bridge over the model's weights."""

    def __init__(self, model, folder) -> None:
        from transformer_lens.model_bridge import TransformerBridge

        # a copy of the same weights: the bridge rearranges the module it wraps, and runs
        # eager attention (so must the model it wraps, to match numerics)
        hf = copy.deepcopy(model.hf)
        hf.config._attn_implementation = "eager"
        hf.config.save_pretrained(folder)
        model.tokenizer.save_pretrained(folder)
        self.bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=model.tokenizer,
                                                          device=str(model.device))
        self.bridge.enable_compatibility_mode(disable_warnings=True, fold_ln=False, center_writing_weights=False,
                                              center_unembed=False, fold_value_biases=False)

    def run(self, pair, site: str, cells: list | None = None) -> torch.Tensor:
        """The patched logit differences of every cell of the grid (or of `cells`, a
        list of index tuples): [layers, positions] or [layers, positions, heads]."""
        import pandas as pd
        from transformer_lens import patching

        device = next(self.bridge.parameters()).device
        clean = torch.tensor([pair.clean_ids], device=device)
        corrupted = torch.tensor([pair.corrupted_ids], device=device)
        with torch.no_grad():
            _, clean_cache = self.bridge.run_with_cache(clean)

        def metric(logits):
            return logits[0, -1, pair.answer_id] - logits[0, -1, pair.foil_id]

        with torch.no_grad():
            if site == "resid_pre":
                if cells is None:
                    return patching.get_act_patch_resid_pre(self.bridge, corrupted, clean_cache, metric)
                index = pd.DataFrame(cells, columns=["layer", "pos"])
                return patching.generic_activation_patch(
                    self.bridge, corrupted, clean_cache, metric, patching.layer_pos_patch_setter, "resid_pre",
                    index_df=index, return_index_df=False)
            if cells is None:
                return patching.get_act_patch_attn_head_out_by_pos(self.bridge, corrupted, clean_cache, metric)
            index = pd.DataFrame(cells, columns=["layer", "pos", "head_index"])
            return patching.generic_activation_patch(
                self.bridge, corrupted, clean_cache, metric, patching.layer_pos_head_vector_patch_setter, "z",
                index_df=index, return_index_df=False)


# -- the section -----------------------------------------------------------------------------------


def run(model, args, folder):
    """Each sweep's table, as soon as it is measured."""
    device = model.device
    tl = TransformerLensSweep(model, folder) if args.transformer_lens else None
    for title, options in (SWEEPS[name] for name in args.sweeps):
        # nnexp runs as it does by default (prefix sharing: `bench/prefix_sharing.py` measures
        # it on and off); the other contenders run the same rows in full, from its plan without
        # sharing
        shared = PatchingExperiment(**options).compile(model)
        compiled = PatchingExperiment(prefix_sharing=False, **options).compile(model)
        item = compiled.prepare(PAIR, 0)
        [plan], _ = compiled.trace_plans([item], None)
        reference = run_plan(model, plan)
        contenders = {
            FLOOR: partial(floor, model, plan),
            NNEXP: partial(shared.run, [shared.prepare(PAIR, 0)]),
            INVOKES: partial(per_invoke, model, compiled, item),
        }
        n_cells = plan.n_rows - 2
        sample = sorted(random.Random(0).sample(range(n_cells), min(args.loop_cells, n_cells)))
        if not args.quick:
            contenders[TRACES] = partial(loop_of_traces, model, compiled, item, sample)
        # the same numbers first (the loop's on its sample: clean, corrupted, then its cells)
        for name in (FLOOR, INVOKES):
            _check(name, contenders[name](), reference, model.dtype)
        if TRACES in contenders:
            _check(TRACES, contenders[TRACES](), reference[[0, 1] + [2 + i for i in sample]], model.dtype)
        times = time_interleaved(contenders, args.reps, device, warmup=0)  # the checks above warmed up
        peaks = {name: peak_bytes(fn) for name, fn in contenders.items()}
        if TRACES in times:
            # every trace costs about the same: scale the sample's traces to the sweep's
            times[TRACES] *= (n_cells + 2) / (len(sample) + 2)
        table = Table(f"IOI patching, {title}: {plan.n_rows} rows ({n_cells} patched runs)",
                      ["contender", "median (s)", "/ floor", "peak memory (MiB)"])
        for name, seconds in times.items():
            table.add(name, seconds, ratio(seconds, times[FLOOR]), mib(peaks[name]))
        for other, what in ((INVOKES, "one invoke per patched run"), (TRACES, "a loop of traces")):
            if other in times:
                table.notes.append(f"{what} takes {times[other] / times[NNEXP]:.1f}x nnexp's time")
        if TRACES in times:
            table.notes.append(f"the loop of traces was timed on {len(sample) + 2} of its {n_cells + 2} traces "
                               f"(clean, corrupted and {len(sample)} sampled cells) and scaled to the sweep; its peak "
                               "memory is one trace's, as for TransformerLens' one forward per cell")
        if tl is not None:
            seconds, peak, note = _time_transformer_lens(tl, compiled, item, options, reference, args)
            table.add(TL, seconds, ratio(seconds, times[FLOOR]), mib(peak))
            table.notes.append(note + f"; it takes {seconds / times[NNEXP]:.1f}x nnexp's time")
        yield table


FLOOR = "floor: one plain forward, raw PyTorch hooks"
NNEXP = "nnexp: one trace (prefix sharing)"
INVOKES = "nnsight: one invoke per patched run"
TRACES = "nnsight: a loop of separate traces (scaled from a sample)"
TL = "TransformerLens: one forward per cell (scaled from a sample)"


def _check(name, got, reference, dtype) -> None:
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    error = float((got.float().cpu() - reference.float()).abs().max())
    assert error <= tolerance * max(float(reference.abs().max()), 1.0), f"{name} differs from nnexp by {error}"


def _time_transformer_lens(tl, compiled, item, options, reference, args):
    site = options["sites"][0]
    cells = [item.cells[i] for i in item.run_cells]
    layers = compiled.layers
    # every cell's grid index, and nnexp's value for it
    index, expected = [], []
    for k, cell in enumerate(cells):
        key = (layers.index(cell.layer), cell.positions[0]) + (() if cell.head is None else (cell.head,))
        index.append(key)
        expected.append(float(reference[2 + k]))
    rng = random.Random(0)
    sample = sorted(rng.sample(range(len(index)), min(args.tl_cells, len(index))))
    chosen = [index[i] for i in sample]
    tl.run(item.pair, site, chosen)  # warm-up
    sync(compiled.model.device)
    start = time.perf_counter()
    got = tl.run(item.pair, site, chosen)
    sync(compiled.model.device)
    per_cell = (time.perf_counter() - start) / len(chosen)
    want = torch.tensor([expected[i] for i in sample])
    got = got.flatten().float().cpu()
    _check("TransformerLens", got, want, compiled.model.dtype)
    error = float((got - want).abs().max())
    total = per_cell * len(index)
    # its clean cache and one patched forward at a time: a few cells show its peak
    peak = peak_bytes(lambda: tl.run(item.pair, site, chosen[:4]))
    return total, peak, (f"TransformerLens timed on {len(chosen)} of {len(index)} cells (max difference from "
                         f"nnexp {error:.1e}): {per_cell * 1e3:.1f} ms per cell, {total:.1f} s for the sweep")
