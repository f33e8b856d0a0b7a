"""Prefix sharing (`nnexp.tracing.prefix`): which prefix each run shares, how runs pack,
and that a packed plan gives the numbers of the unpacked one.

The oracles (tests/test_patching_reference.py, test_recall.py, test_interventions.py)
run with prefix sharing on, its default; here each planned kind and every operation is
compared with sharing off on the same weights, and the packing is checked without a model.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nnexp import ConfigError
from nnexp.sites import HookPoint, attention_mask_point, resolve_site
from nnexp.tracing.execute import run_plan
from nnexp.tracing.prefix import PackedLayout, PrefixSharing, PrefixTree, prefix_sharing
from nnexp.tracing.runs import Run, RunEdit, build_plan, pack_runs
from tests.helpers import FAMILIES, compiled_and_items, gpt2_facts, kind_experiments, tiny_model

RESID_2 = HookPoint("h.2", "output", 0, (2, 5))
EMBED = HookPoint("embed", "output", None, (-1, 0))
MASK_1 = HookPoint("h.1.attn", "attention_mask", None, (1, 1))
SHARING = PrefixSharing("norm", "head", torch.float32, pack_tokens=16)


def layout(runs, n_base, ids=(1, 2, 3, 4, 5), sharing=SHARING):
    sequences = [list(ids) if run.ids is None else run.ids for run in runs]
    return PackedLayout([sequences], [runs], [n_base], 0, sharing)


# -- without a model ---------------------------------------------------------------------------


@pytest.mark.fast
def test_each_run_shares_the_longest_prefix_it_can():
    clean, corrupted = [1, 2, 3, 4, 5], [1, 2, 9, 4, 5]
    copy = lambda p: Run([RunEdit(RESID_2, "copy", [p])], ids=corrupted)  # noqa: E731
    runs = [Run(ids=clean), Run(ids=corrupted), copy(3), copy(1), Run([RunEdit(RESID_2, "copy", [0, 1, 2, 3, 4])],
                                                                    ids=corrupted)]
    tree = PrefixTree([r.ids for r in runs], runs, 2)
    # the corrupted run departs from the clean run at its first different token; a cell at
    # position 3 from the corrupted run there; a cell in the shared prefix copies what is
    # already there (no token to compute); a cell over every position from the first
    # different token
    assert tree.parents == [None, 0, 1, 1, 1]
    assert tree.starts == [0, 2, 3, 5, 2]


@pytest.mark.fast
def test_noised_and_restored_runs_share_with_their_noised_run():
    noise = [RunEdit(EMBED, "add", [1, 2], torch.ones(2, 3) * s) for s in range(2)]
    restore = lambda s, p: Run([noise[s], RunEdit(RESID_2, "copy", [p])])  # noqa: E731
    runs = [Run(), Run([noise[0]]), Run([noise[1]]), restore(1, 3), restore(0, 0), restore(1, 1)]
    tree = PrefixTree([[1, 2, 3, 4, 5]] * len(runs), runs, 3)
    assert tree.parents == [None, 0, 0, 2, 1, 2]
    # restoring before the subject restores what the noised run already has: nothing to compute
    assert tree.starts == [0, 1, 1, 3, 5, 1]


@pytest.mark.fast
def test_a_knockout_row_is_one_token():
    runs = [Run()] + [Run([RunEdit(MASK_1, "block", [k])]) for k in range(4)]
    packed = layout(runs, 1)
    assert packed.starts == [0, 4, 4, 4, 4]
    assert packed.tokens == 5 + 4  # the clean run, then one token per knocked-out run
    plan, _ = build_plan(pack_runs([("f", [1, 2, 3, 4, 5], 7, 8, runs[:1], runs[1:])], None)[0], 0, "prob", SHARING)
    block = plan.edits[0][1][0]
    assert block.rows.tolist() == [0] * 4 and block.queries.tolist() == [5, 6, 7, 8]
    assert block.keys.nonzero()[:, 1].tolist() == [0, 1, 2, 3]  # the keys are the clean run's tokens


@pytest.mark.fast
def test_the_packed_mask_shows_each_token_exactly_its_runs_earlier_tokens():
    clean, corrupted = [1, 2, 3, 4, 5], [1, 9, 3, 4, 5]
    runs = [Run(ids=clean), Run(ids=corrupted)] + [Run([RunEdit(RESID_2, "copy", [p])], ids=corrupted)
                                                   for p in range(1, 5)] * 4
    packed = layout(runs, 2)
    assert len(packed.index) > 1  # 16 tokens per pack: the runs split into packs, each with the base runs
    visible = packed.attention_mask[:, 0] == 0  # (an additive mask: 0 where visible)
    for row, packs in enumerate(packed.packs_of):
        for pack in packs:
            for p in range(packed.starts[row], 5):
                query = packed.coordinate(row, p, pack)
                expected = {packed.coordinate(row, q, pack) for q in range(p + 1)}
                assert set(visible[pack, query].nonzero()[:, 0].tolist()) == expected, (row, pack, p)
                assert packed.input_ids[pack, query] == runs[row].ids[p]
                assert packed.position_ids[pack, query] == p


@pytest.mark.fast
def test_a_packed_copy_reads_its_source_where_the_source_lives():
    clean, corrupted = [1, 2, 3, 4, 5], [1, 9, 3, 4, 5]
    runs = [Run(ids=clean), Run(ids=corrupted), Run([RunEdit(RESID_2, "copy", [3, 4])], ids=corrupted),
            Run([RunEdit(RESID_2, "read", [0, 4], key="r")], ids=corrupted)]
    trace, = pack_runs([("pair", clean, 7, 8, runs[:2], runs[2:])], None)
    plan, firsts = build_plan(trace, 0, "logit_diff", SHARING)
    copy, read = plan.edits[0][1]
    # the clean run is tokens 0-4, the corrupted run 5-8 (from position 1), the patched run 9-10
    assert copy.target_rows.tolist() == [0, 0] and copy.positions.tolist() == [9, 10]
    assert copy.source_positions.tolist() == [3, 4]
    assert read.positions.tolist() == [0, 8]  # position 0 of the read run lives in the clean run's tokens
    assert plan.metric_index.tolist() == [[0, 4], [0, 8], [0, 10], [0, 8]]  # the read-only run is its parent
    assert plan.n_rows == 4


@pytest.mark.fast
def test_models_that_cannot_share_prefixes_are_refused_in_one_line():
    def model(implementation, window=None):
        config = SimpleNamespace(model_type="llama", _attn_implementation=implementation, sliding_window=window)
        return SimpleNamespace(hf=SimpleNamespace(config=config, dtype=torch.float32),
                               arch=SimpleNamespace(spec=SimpleNamespace(final_norm="n", unembed="u")))

    assert prefix_sharing(model("sdpa"), False, 10) is None
    assert prefix_sharing(model("eager", window=16), True, 10).mask_dtype == torch.float32
    assert prefix_sharing(model("sdpa"), True, 10).mask_dtype == torch.bool
    for bad, fragment in ((model("flash_attention_2"), "'flash_attention_2' attention"),
                          (model("sdpa", window=8), "sliding attention window (8 tokens)")):
        with pytest.raises(ConfigError, match="--no-prefix-sharing") as error:
            prefix_sharing(bad, True, 10)
        assert fragment in str(error.value) and "\n" not in str(error.value)


# -- on random models: sharing on gives the numbers of sharing off ---------------------------------


def every_operation(model):
    """Runs of one prompt pair using every operation the planner has, on `model`."""
    arch = model.arch
    clean = model.tokenizer(" The cat sat on the mat and then").input_ids
    corrupted = model.tokenizer(" The dog sat on the mat and then").input_ids
    n, d, last = len(clean), arch.d_model, arch.n_layers - 1
    torch.manual_seed(0)
    noise = RunEdit(resolve_site("resid_pre", 0, arch), "add", [1, 2], torch.randn(2, d))
    head = resolve_site("head_out", 1, arch)
    base = [Run(ids=clean), Run(ids=corrupted), Run([noise], ids=clean)]
    variants = [
        Run([RunEdit(resolve_site("resid_post", 0, arch), "copy", [p])], ids=corrupted) for p in range(n)
    ] + [
        Run([RunEdit(head, "copy", list(range(n)), head=1)], ids=corrupted),
        Run([noise, RunEdit(resolve_site("mlp_out", 0, arch), "copy", [3])], ids=clean),
        Run([RunEdit(resolve_site("attn_out", last, arch), "set", [n - 1], torch.zeros(1, d))], ids=clean),
        Run([RunEdit(attention_mask_point(layer, arch), "block", [1, 2]) for layer in range(arch.n_layers)],
            ids=clean),
        Run([RunEdit(resolve_site("resid_post", 1, arch), "rewrite", [4, 5], source=1, with_source=True,
                     fn=lambda x, source, alpha: x + alpha[:, None] * (source - x), params={"alpha": 0.5})],
            ids=clean, metric_offset=2),
        Run([RunEdit(resolve_site("resid_post", 1, arch), "read", [0, n - 1], key="probe")], ids=corrupted),
    ]
    answer, foil = model.tokenizer(" sat").input_ids[0], model.tokenizer(" ran").input_ids[0]
    return pack_runs([("pair", clean, answer, foil, base, variants)], None)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_operation_gives_the_same_numbers_packed(family):
    model = tiny_model(family)
    trace = every_operation(model)
    metrics = ("logit_diff", "prob", "kl")
    off, _ = build_plan(trace, model.tokenizer.pad_token_id or 0, metrics)
    off.reference_rows = torch.zeros(off.n_rows, dtype=torch.long)
    on, _ = build_plan(trace, model.tokenizer.pad_token_id or 0, metrics, prefix_sharing(model, True, 16))
    on.reference_rows = off.reference_rows
    assert on.input_ids.numel() < 0.6 * off.input_ids.numel()  # the tokens the forward pass computes
    a, b = run_plan(model, off), run_plan(model, on)
    torch.testing.assert_close(b["metrics"], a["metrics"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b["reads"]["probe"], a["reads"]["probe"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["patching", "attention-knockout", "sublayer-knockout", "causal-tracing",
                                  "interventions"])
def test_each_planned_kind_gives_the_same_records_with_sharing_off(kind, tmp_path, gpt2_tiny):
    import dataclasses

    experiment = kind_experiments(tmp_path, gpt2_tiny.tokenizer)[kind]
    records = []
    for sharing in (True, False):
        compiled, items = compiled_and_items(dataclasses.replace(experiment, prefix_sharing=sharing), gpt2_tiny,
                                             experiment.examples()[:2])
        records.append(compiled.run(items))
    on, off = records
    for a, b in zip(on, off):
        assert a.tensors.keys() == b.tensors.keys()
        # the values the traces return (patched metrics, probabilities, ranks, reads), not
        # the effects derived from them by subtraction, whose float noise a random model
        # magnifies
        raw = [name for name in a.tensors if "." in name and not name.endswith(".change")]
        assert raw
        for name in raw:
            expected = b[name].values.float()
            scale = float(expected.abs().nan_to_num().max())
            torch.testing.assert_close(a[name].values.float(), expected, rtol=1e-4, atol=1e-5 * scale,
                                       equal_nan=True)
        assert a.scalars == pytest.approx(b.scalars, rel=1e-4, nan_ok=True)


def test_sharing_is_not_part_of_a_runs_identity():
    from nnexp.registry import EXPERIMENTS
    from nnexp.store import identity

    spec = lambda e: {"experiment": {"name": e.name, "class": "x:y", "params": e.params()},  # noqa: E731
                      "model": {"name": "m", "source": {}, "dtype": "float32"}, "data": {}}
    experiment = EXPERIMENTS["ioi-patching"]()
    assert identity(spec(experiment)) == identity(spec(EXPERIMENTS["ioi-patching"](prefix_sharing=False)))


def test_facts_of_different_lengths_pack_into_one_trace(gpt2_tiny):
    from nnexp.kinds.attention_knockout import AttentionKnockoutExperiment

    facts = gpt2_facts(gpt2_tiny.tokenizer, 3)
    compiled, items = compiled_and_items(AttentionKnockoutExperiment(window=2), gpt2_tiny, facts)
    plan = compiled.plan(items, None)
    inputs = plan.jobs[0].inputs
    assert inputs["attention_mask"].dim() == 4 and plan.rows[0] > inputs["input_ids"].shape[0]
