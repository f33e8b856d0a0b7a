"""Gradient attribution: numbers against independent autograd hooks on three families,
every site and metric; one forward+backward trace per batch; memory budget; data and
input errors; the CLI and figures."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nnexp
from nnexp.counterfact import Fact
from nnexp.errors import ConfigError, DataError, ModelError
from nnexp.kinds.gradient_attribution import GradientAttributionExperiment, subject_and_last_profile
from tests.gradient_reference import reference
from tests.helpers import assert_close_relative, gpt2_facts, make_gpt2_tokenizer, tiny_model


def run_records(model, facts, **params):
    experiment = GradientAttributionExperiment(**{k: v for k, v in params.items() if k not in ("max_rows",)})
    compiled = experiment.compile(model)
    items = compiled.select([compiled.prepare(f, i) for i, f in enumerate(facts)], 16)
    return compiled.run(items, max_rows=params.get("max_rows"))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3_text"])
def family_model(request):
    return request.param, tiny_model(request.param, seed=3)


@pytest.mark.parametrize("site,metric", [("mlp_out", "contrast_prob_diff"), ("mlp_out", "contrast_logits_diff"),
                                         ("attn_out", "prob"), ("resid_pre", "logit"), ("resid_post", "contrast_prob_diff")])
def test_matches_independent_autograd(family_model, site, metric):
    """Five facts of different lengths, left-padded into one trace, against one
    unpadded autograd run per fact: per hidden unit, summed, and Inseq-aggregated."""
    family, model = family_model
    facts = gpt2_facts(model.tokenizer, 5)
    records = run_records(model, facts, site=site, metric=metric, keep_hidden=True)
    for record in records:
        expected = reference(model.hf, family, record.info["ids"], record.info["target_true_id"],
                             record.info["target_false_id"], site, metric)
        what = f"{family} {site} {metric} example {record.index}"
        assert_close_relative(record["attribution_hidden"].values, expected, what + " (per hidden unit)")
        assert_close_relative(record["attribution"].values, expected.sum(-1), what + " (summed)")
        l2 = expected.norm(dim=-1)
        assert_close_relative(record["attribution_norm"].values, l2 / l2.sum(-1, keepdim=True), what + " (Inseq)")
        assert record["attribution"].dims == ("layer", "position")
        assert record["attribution"].shape == (3, len(record.info["ids"]))


def test_one_forward_and_backward_per_batch_and_frozen_parameters(gpt2_tiny, monkeypatch):
    from tests.helpers import count_traces

    calls = count_traces(gpt2_tiny, monkeypatch)
    facts = gpt2_facts(gpt2_tiny.tokenizer, 8)
    flags = [p.requires_grad for p in gpt2_tiny.hf.parameters()]
    together = run_records(gpt2_tiny, facts)
    assert calls == [8]  # every layer, every position, 8 facts: one trace
    assert all(p.grad is None for p in gpt2_tiny.hf.parameters())  # no weight gradient was computed
    assert [p.requires_grad for p in gpt2_tiny.hf.parameters()] == flags  # and the flags are restored
    split = run_records(gpt2_tiny, facts, max_rows=3)
    assert calls[1:] == [3, 3, 2]
    for a, b in zip(together, split):
        assert torch.allclose(a["attribution"].values, b["attribution"].values, rtol=1e-4, atol=1e-12)
        assert a.scalars["metric"] == pytest.approx(b.scalars["metric"], rel=1e-5)


def test_memory_budget_sizes_the_batches(gpt2_tiny, monkeypatch):
    from nnexp.tracing.memory import parse_bytes, row_cost
    from tests.helpers import count_traces

    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(1000) == 1000
    with pytest.raises(ConfigError, match="write it like 2GB"):
        parse_bytes("lots")
    facts = gpt2_facts(gpt2_tiny.tokenizer, 8)
    compiled = GradientAttributionExperiment().compile(gpt2_tiny)
    items = [compiled.prepare(f, i) for i, f in enumerate(facts)]
    longest = max(len(item.fact.ids) for item in items)
    forward, backward = row_cost(gpt2_tiny, longest), row_cost(gpt2_tiny, longest, grad=True)
    assert backward.per_row["cpu"] > forward.per_row["cpu"]  # a backward pass holds the autograd graph
    calls = count_traces(gpt2_tiny, monkeypatch)
    rows = compiled.rows_for_budget(items, int(3.2 * (backward.fixed["cpu"] + backward.per_row["cpu"])))
    assert 1 <= rows < 8
    compiled.run(items, max_rows=rows)
    assert calls == [rows] * (8 // rows) + ([8 % rows] if 8 % rows else [])
    with pytest.raises(ConfigError, match="below what gradient attribution of one fact needs"):
        compiled.rows_for_budget(items, 1000)


def test_multi_token_targets_subjects_and_bad_parameters(gpt2_tiny):
    compiled = GradientAttributionExperiment().compile(gpt2_tiny)
    long_target = Fact("The capital of Vietnam is", "Vietnam", " Hanoi", " Bangkok")
    with pytest.raises(DataError, match=r"example 0: the target_true ' Hanoi' is 3 tokens \[' H', 'ano', 'i'\] .*"
                                        r"multi_token=skip"):
        compiled.prepare(long_target, 0)
    skipping = GradientAttributionExperiment(multi_token="skip").compile(gpt2_tiny)
    good = Fact("The capital of France is", "France", " Paris", " Rome")
    items = skipping.select([skipping.prepare(long_target, 0), skipping.prepare(good, 1)], 16)
    assert [item.index for item in items] == [1]
    with pytest.raises(DataError, match="does not occur in the prompt"):
        Fact.from_json({"prompt": "The capital of France is", "subject": "Spain", "target_true": " Paris",
                        "target_false": " Rome"}, "facts.jsonl:3")
    with pytest.raises(ConfigError, match="choose one of mlp_out, attn_out, resid_pre, resid_post"):
        GradientAttributionExperiment(site="head_out")
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        GradientAttributionExperiment(metric="nope")
    with pytest.raises(ConfigError, match="metric 'kl' needs reference, which a gradient attribution experiment"):
        GradientAttributionExperiment(metric="kl")
    with pytest.raises(ConfigError, match="layer 7 is out of range: the model has 3 layers"):
        GradientAttributionExperiment(layers=(0, 7)).compile(gpt2_tiny)
    with pytest.raises(ConfigError, match="multi_token"):
        GradientAttributionExperiment(multi_token="truncate")


def test_only_correct_keeps_the_facts_the_model_predicts(gpt2_tiny):
    # A random model knows no facts: make every other fact "true" by taking the model's
    # own top prediction as its target, then the filter must keep exactly those.
    facts = gpt2_facts(gpt2_tiny.tokenizer, 8)
    everything = run_records(gpt2_tiny, facts)
    predicted = [r.info["predicted"] for r in everything]
    rigged = [Fact(f.prompt, f.subject, p, f.target_false if p != f.target_false else f.target_true)
              if i % 2 == 0 else f for i, (f, p) in enumerate(zip(facts, predicted))]
    kept = run_records(gpt2_tiny, rigged, only_correct=True)
    assert [r.index for r in kept] == [0, 2, 4, 6]
    assert all(r.scalars["correct"] == 1.0 for r in kept)
    with pytest.raises(DataError, match="predicts none of the 1 facts"):
        run_records(gpt2_tiny, [facts[1]], only_correct=True)


def test_eight_bit_loading_without_cuda_is_a_clear_error(tiny_gpt2_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; 8-bit loading is checked on GPU machines by hand (see README)")
    from tests.helpers import cli

    with pytest.raises(ModelError, match="8-bit loading .* runs on CUDA GPUs only"):
        nnexp.load_model(str(tiny_gpt2_folder), load_in_8bit=True)
    result = cli("run", "counterfact-attribution", "--model", tiny_gpt2_folder, "--load-in-8bit")
    assert result.returncode == 2 and "runs on CUDA GPUs only" in result.stderr


def test_cli_run_resume_figures(tmp_path, tiny_gpt2_folder):
    from tests.helpers import cli

    facts = gpt2_facts(make_gpt2_tokenizer(), 6)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    out = tmp_path / "run"
    result = cli("run", "counterfact-attribution", "--model", tiny_gpt2_folder, "--data", data, "--out", out,
                 "--limit", "4", "--metric", "contrast_logits_diff", "--site", "attn_out", "--memory-budget", "50MB")
    assert result.returncode == 0, result.stderr
    result = cli("resume", out, "--limit", "6")  # without --limit, resume keeps the run's limit of 4
    assert result.returncode == 0, result.stderr
    assert re.search(r"resuming .*: 4 of 6 examples already stored", result.stderr)
    results = nnexp.load_results(out)
    assert len(results) == 6 and results[0].info["site"] == "attn_out"
    assert results.spec["experiment"]["params"]["metric"] == "contrast_logits_diff"
    profile = subject_and_last_profile(results)
    assert profile["n"] == 6 and profile["last_token"].shape == (3,)
    expected = torch.stack([r["attribution"].values[:, r.info["subject_tokens"][1] - 1] for r in results]).mean(0)
    assert torch.allclose(profile["last_subject_token"], expected)
    figures = out / "figures"
    for stem in ("example-0000-attribution", "example-0005-attribution-norm", "mean-attribution-by-layer",
                 "mean-attribution-norm-by-layer"):
        assert (figures / f"{stem}.html").exists(), stem
    page = (figures / "mean-attribution-by-layer.html").read_text()
    assert "last subject token" in page and "n = 6 facts" in page and "layer" in page
    example = (figures / "example-0000-attribution.html").read_text()
    assert "\\u003cb\\u003e" in example and "subject tokens in bold" in example  # plotly escapes "<b>" in its JSON
