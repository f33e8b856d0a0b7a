"""A memory budget (bytes per device) splits every kind of experiment into traces whose
peak stays under it, and the split run gives the same numbers as the whole one.

Peaks are measured with `nnexp.tracing.memory.peak_memory`, whose own accounting is
checked first against tensors of known sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nnexp
from nnexp.errors import ConfigError
from nnexp.tracing.memory import parse_bytes, peak_memory, row_cost
from tests.helpers import KINDS, count_traces, kind_experiments, tiny_model

MiB = 2**20


def test_peak_memory_counts_what_is_allocated_and_freed():
    keep = torch.ones(1000)  # exists before: not counted
    with peak_memory() as peaks:
        a = torch.zeros(MiB // 4)  # 1 MiB of float32
        b = torch.zeros(MiB // 2)  # 2 MiB: 3 MiB live
        del a
        c = b.view(-1, 2)  # a view: no new memory
        b.add_(1)  # in place: no new memory
        d = torch.zeros(MiB // 8, dtype=torch.float64)  # 1 MiB: 3 MiB live again
        e = keep * 2  # 4000 bytes
        del b, c, d
    assert peaks == {"cpu": 3 * MiB + 4000}
    assert e.shape == (1000,)
    with peak_memory() as peaks:
        pass
    assert peaks == {}


def test_row_cost_grows_with_rows_and_tokens():
    model = tiny_model("gpt2")
    short, long = row_cost(model, 8), row_cost(model, 32)
    # (this tiny model's peak is its last-position logits, [rows, vocab], at any length)
    assert 0 < short.per_row["cpu"] <= long.per_row["cpu"]
    # the prediction matches a measured plain forward of 20 rows, with a probability
    # difference read from its logits, within 5%
    ids = torch.zeros(20, 32, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with torch.no_grad(), peak_memory() as peaks:
        logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        difference = logits.softmax(-1)[:, 0] - logits.softmax(-1)[:, 1]
    assert difference.shape == (20,)
    predicted = long.fixed["cpu"] + 20 * long.per_row["cpu"]
    assert abs(peaks["cpu"] - predicted) <= 0.05 * peaks["cpu"]
    assert row_cost(model, 32) is long  # measured once per model and length
    gradient = row_cost(model, 32, grad=True)
    assert gradient.per_row["cpu"] > long.per_row["cpu"]  # the autograd graph


@pytest.mark.parametrize("name", KINDS)
def test_budget_splits_traces_keeps_the_peak_under_it_and_the_numbers(name, tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    experiment = kind_experiments(tmp_path, model.tokenizer)[name]
    if name == "logit-attribution":
        # the logit lens's read-out, one [points, vocab] at a time, is most of this tiny
        # model's peak and no split can lower it: split the decompositions
        experiment = dataclasses.replace(experiment, analyses=("dla_layers", "dla_heads"))
    calls = count_traces(model, monkeypatch)
    options = dict(limit=8, examples_per_trace=8, figures=False)
    with peak_memory() as whole_peak:
        whole = nnexp.run(experiment, model, out=tmp_path / "whole", **options)
    whole_traces = len(calls)
    calls.clear()
    # the smallest of these fractions of the whole run's peak that fits one trace (the
    # read-out of this tiny model's 50,257-token vocabulary sets a floor)
    for fraction in (3, 2, 1.5, 1.2):
        budget = int(whole_peak["cpu"] / fraction)
        try:
            with peak_memory() as split_peak:
                split = nnexp.run(experiment, model, out=tmp_path / f"split-{fraction}", memory_budget=budget, **options)
            break
        except ConfigError as error:
            assert "is below what" in str(error)
    assert len(calls) > whole_traces, f"a budget of a third of the peak ({budget} bytes) did not split the traces"
    assert split_peak["cpu"] <= budget, f"peak {split_peak['cpu']} bytes over the budget of {budget}"
    assert split.spec["run"]["memory_budget"] == budget
    assert_same_numbers(whole.records, split.records)


def test_recorded_traces_counts_each_trace_and_restores_the_executor(tmp_path):
    from nnexp.tracing.jobs import recorded_traces

    model = tiny_model("gpt2")
    experiment = kind_experiments(tmp_path, model.tokenizer)["patching"]
    with recorded_traces(model) as outer:
        nnexp.run(experiment, model, out=tmp_path / "apart", limit=2, examples_per_trace=1, figures=False)
        with recorded_traces(model) as inner:
            nnexp.run(experiment, model, out=tmp_path / "together", limit=2, examples_per_trace=2, figures=False)
        assert "run" in vars(model.executor)  # the outer recording is back in place
    # one trace per example, then both examples' rows in one trace
    assert len(outer) == 3 and inner == outer[2:] and outer[2] == outer[0] + outer[1] > outer[0] > 0
    assert "run" not in vars(model.executor)


def assert_same_numbers(whole, split):
    """Equal to float rounding (a row's matrix products may round differently in a
    batch of another size). Patching's normalised effects divide by clean - corrupted,
    which a random model makes tiny, so the metrics they come from are compared."""
    assert [r.index for r in whole] == [r.index for r in split]
    for a, b in zip(whole, split):
        for name in a.tensors:
            if f"{name}.patched" in a.tensors:
                continue
            torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        assert a.scalars == pytest.approx(b.scalars, rel=1e-5, abs=1e-6, nan_ok=True)


def test_budget_too_small_for_one_trace_says_so(tmp_path):
    model = tiny_model("gpt2")
    experiment = kind_experiments(tmp_path, model.tokenizer)["patching"]
    with pytest.raises(ConfigError, match="memory budget .* is below what a patching trace .* needs.*raise --memory-budget"):
        nnexp.run(experiment, model, out=tmp_path / "run", limit=1, memory_budget="10kB", figures=False)
    with pytest.raises(ConfigError, match="is not a size"):
        parse_bytes("lots")
