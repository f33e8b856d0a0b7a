"""The one planner of edited runs and the plan a runner decodes by, without a model:
how examples pack into traces, what each trace's edits hold, and the fingerprint that
ties a submitted job to its layout."""

from __future__ import annotations

import pytest
import torch

from nnexp import ConfigError, ResultsError
from nnexp.contract import ChunkPlan, expect_rows
from nnexp.sites import HookPoint
from nnexp.tracing.jobs import TraceJob
from nnexp.tracing.plan import AddRows, BlockAttention, CopyRows, SetRows, left_pad
from nnexp.tracing.runs import Run, RunEdit, build_plan, pack_runs

pytestmark = pytest.mark.fast

EMBED = HookPoint("embed", "output", None, (-1, 0))
MASK_1 = HookPoint("h.1.attn", "attention_mask", None, (1, 1))
Z_0 = HookPoint("h.0.attn.c_proj", "input", None, (0, 2), n_heads=4)
RESID_2 = HookPoint("h.2", "output", 0, (2, 5))


def example(key, n_variants, n_base=2, ids=(1, 2, 3)):
    base = [Run() for _ in range(n_base)]
    variants = [Run([RunEdit(RESID_2, "copy", [v % len(ids)])]) for v in range(n_variants)]
    return (key, list(ids), 7, 8, base, variants)


def test_variants_split_into_traces_with_their_base_runs():
    traces = pack_runs([example("a", 5), example("b", 3)], max_rows=4)
    assert all(sum(len(group.runs) for group in trace) <= 4 for trace in traces)
    for key, n in (("a", 5), ("b", 3)):
        groups = [group for trace in traces for group in trace if group.key == key]
        assert sorted(v for group in groups for v in group.variants) == list(range(n))  # each once
        assert all(len(group.runs) == 2 + len(group.variants) for group in groups)  # base runs in every part
    # unbounded: one trace holds everything
    assert [[len(g.runs) for g in trace] for trace in pack_runs([example("a", 5), example("b", 3)], None)] == [[7, 5]]
    with pytest.raises(ConfigError, match="max_rows is 2; this experiment needs at least 3 rows per trace"):
        pack_runs([example("a", 1)], max_rows=2)


def test_a_plan_holds_one_vectorised_edit_per_point_and_kind():
    clean, corrupted = [5, 6, 7], [5, 9, 7]
    noise = torch.arange(6.0).reshape(2, 3)
    runs = [
        Run(ids=clean),
        Run(ids=corrupted),
        Run([RunEdit(Z_0, "copy", [0, 2], head=3)], ids=corrupted),  # one head's slice, two positions
        Run([RunEdit(EMBED, "add", [1, 2], noise)], ids=corrupted),
        Run([RunEdit(RESID_2, "set", [2], torch.zeros(1, 3)), RunEdit(MASK_1, "block", [0])], ids=corrupted),
    ]
    short = [Run(), Run([RunEdit(RESID_2, "copy", [1])])]  # a second, shorter example: left-padded
    groups = pack_runs([("pair", clean, 7, 8, runs[:2], runs[2:]), ("short", [4, 4], 1, 2, short[:1], short[1:])], None)
    plan, firsts = build_plan(groups[0], pad_id=0, metric="logit_diff")
    assert firsts == [0, 5]
    assert plan.input_ids.tolist() == [clean, corrupted, corrupted, corrupted, corrupted, [0, 4, 4], [0, 4, 4]]
    assert plan.attention_mask[5].tolist() == [0, 1, 1]
    assert plan.answer_ids.tolist() == [7] * 5 + [1] * 2
    assert [point for point, _ in plan.edits] == [EMBED, Z_0, MASK_1, RESID_2]  # forward order
    edits = dict(plan.edits)
    (add,), (copy_head,), (block,) = edits[EMBED], edits[Z_0], edits[MASK_1]
    assert isinstance(add, AddRows) and add.rows.tolist() == [3, 3] and torch.equal(add.values, noise)
    assert isinstance(copy_head, CopyRows) and copy_head.heads.tolist() == [3, 3]
    assert copy_head.target_rows.tolist() == [2, 2] and copy_head.source_rows.tolist() == [0, 0]
    assert isinstance(block, BlockAttention) and block.keys.tolist() == [[True, False, False]]
    kinds = {type(edit) for edit in edits[RESID_2]}
    assert kinds == {SetRows, CopyRows}
    copy = next(edit for edit in edits[RESID_2] if isinstance(edit, CopyRows))
    # the short example's copy reads its own clean row (5) at the padded position 1 + 1
    assert copy.target_rows.tolist() == [6] and copy.source_rows.tolist() == [5] and copy.positions.tolist() == [2]
    assert copy.heads is None


def test_an_unknown_operation_names_the_known_ones():
    groups = pack_runs([("x", [1, 2], 1, 2, [Run()], [Run([RunEdit(RESID_2, "scale", [0])])])], None)
    with pytest.raises(ConfigError, match="unknown trace operation 'scale'; choose one of: copy, add, set, rewrite, "
                                          "read, block"):
        build_plan(groups[0], 0, "logit_diff")


def test_left_pad():
    ids, mask, offsets = left_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]] and offsets == [0, 2]


def chunk_plan(layout=((0, 1),), row_limit=9, ids=((1, 2), (3, 4))):
    tensor = torch.tensor(ids)
    job = TraceJob({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}, body=lambda nn: None)
    return ChunkPlan([job], [list(x) for x in layout], row_limit, [0, 1])


def test_a_plan_fingerprint_changes_with_anything_decoding_depends_on():
    fingerprint = chunk_plan().fingerprint
    assert chunk_plan().fingerprint == fingerprint  # planning again gives the same
    assert chunk_plan(row_limit=8).fingerprint != fingerprint
    assert chunk_plan(layout=((1, 0),)).fingerprint != fingerprint
    assert chunk_plan(ids=((1, 2), (3, 5))).fingerprint != fingerprint
    assert chunk_plan().rows == [2]


def test_values_that_do_not_match_the_plan_are_refused():
    plan = chunk_plan()
    with pytest.raises(ResultsError, match="2 trace results came back for a chunk planned as 1 traces"):
        plan.check_values([torch.zeros(2), torch.zeros(2)])
    assert expect_rows(torch.zeros(2, 3), 2, "x").shape == (2, 3)
    with pytest.raises(ResultsError, match=r"x came back with shape \[3, 3\] where 2 rows were planned"):
        expect_rows(torch.zeros(3, 3), 2, "x")
