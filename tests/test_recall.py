"""The factual-recall analyses against an independent plain-PyTorch implementation.

`tests/recall_reference.py` shares no code with nnexp: module names typed per family,
torch hooks, one unpadded prompt per forward pass, and attention knockout done by
literally setting pre-softmax scores to the dtype's minimum in a custom attention
function. nnexp runs several facts of different lengths in one left-padded trace.
Random models put ~1/vocab probability on every token, so probabilities are compared
relative to their scale.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import nnexp
from nnexp.counterfact import Fact
from nnexp.errors import ConfigError, DataError
from nnexp.kinds.attention_knockout import AttentionKnockoutExperiment
from nnexp.kinds.attribute_extraction import AttributeExtractionExperiment
from nnexp.kinds.causal_tracing import CausalTracingExperiment, average_indirect_effect, token_categories
from nnexp.kinds.sublayer_knockout import SublayerKnockoutExperiment
from tests import recall_reference as ref
from tests.helpers import assert_close, assert_rank_consistent, compiled_and_items, gpt2_facts, tiny_model

FAMILIES = ["gpt2", "llama", "gemma3_text"]


def run_records(experiment, model, facts, max_rows=None):
    compiled, items = compiled_and_items(experiment, model, facts)
    return compiled.run(items, max_rows=max_rows)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


# -- attention knockout ------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_knockout_matches_reference(family_model, implementation):
    model = family_model
    model.hf.set_attn_implementation(implementation)
    facts = gpt2_facts(model.tokenizer, 4)
    records = run_records(AttentionKnockoutExperiment(window=2), model, facts)
    n_layers = model.arch.n_layers
    changed = 0.0
    for record, fact in zip(records, facts):
        ids = record.info["ids"]
        clean = ref.last_logits(model.hf, ids)
        attribute = int(clean.argmax())
        assert record.info["attribute_id"] == attribute
        assert_close(record.scalars["p_clean"], float(clean.softmax(-1)[attribute]), "p_clean")
        s, e = ref.subject_span(model.tokenizer, fact.prompt, fact.subject)
        assert record.info["subject_tokens"] == [s, e]
        keys = {"subject": list(range(s, e)), "non_subject": [p for p in range(len(ids) - 1) if not s <= p < e],
                "last": [len(ids) - 1]}
        expected = torch.tensor([[ref.knockout_prob(model.hf, ids, attribute, ref.window(layer, 2, n_layers), keys[source])
                                  for layer in range(n_layers)] for source in ("subject", "non_subject", "last")])
        assert_close(record["knockout.prob"].values, expected, f"example {record.index} knocked probabilities")
        p_clean = record.scalars["p_clean"]
        assert_close(record["knockout"].values, (expected - p_clean) / p_clean, "relative change", rtol=1e-3)
        changed = max(changed, float(record["knockout"].values.abs().max()))
    assert changed > 1e-3, "no knockout changed the probability: the comparison would prove nothing"


def test_each_knocked_row_has_its_own_mask(gpt2_tiny):
    """One trace: fact A clean and knocked, fact B (another length) clean. Only A's knocked
    row changes; both clean rows equal unbatched clean runs."""
    from nnexp.sites import attention_mask_point
    from nnexp.tracing.execute import run_plan
    from nnexp.tracing.runs import Run, RunEdit, build_plan, pack_runs

    model = gpt2_tiny
    a, b = gpt2_facts(model.tokenizer, 2)
    ids_a, ids_b = (model.tokenizer(f.prompt).input_ids for f in (a, b))
    assert len(ids_a) != len(ids_b)
    keys = list(range(len(ids_a) - 1))  # everything but the last token itself
    blocked = Run([RunEdit(attention_mask_point(layer, model.arch), "block", keys) for layer in range(3)])
    trace, = pack_runs([("a", ids_a, 0, 1, [Run()], [blocked]), ("b", ids_b, 0, 1, [Run()], [])], None)
    plan, firsts = build_plan(trace, model.tokenizer.pad_token_id, "prob")
    probs = run_plan(model, plan)
    assert firsts == [0, 2] and probs.shape == (3,)
    assert_close(probs[0], ref.last_logits(model.hf, ids_a).softmax(-1)[0], "fact A clean", rtol=1e-5)
    assert_close(probs[2], ref.last_logits(model.hf, ids_b).softmax(-1)[0], "fact B clean", rtol=1e-5)
    assert_close(probs[1], ref.knockout_prob(model.hf, ids_a, 0, [0, 1, 2], keys), "fact A knocked", rtol=1e-5)
    assert abs(float(probs[1] - probs[0])) > 1e-3 * float(probs[0])


# -- attribute extraction ----------------------------------------------------------------


def test_extraction_matches_reference(family_model, tmp_path):
    model = family_model
    facts = gpt2_facts(model.tokenizer, 3)
    words = {facts[0].subject: ["Paris", "France", "the"], facts[1].subject: ["river"]}
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps(words))
    experiment = AttributeExtractionExperiment(top_k=7, attributes_file=str(path))
    records = run_records(experiment, model, facts)
    assert [("attribute_rate" in r.tensors) for r in records] == [True, True, False]
    for record, fact in zip(records, facts):
        ids = record.info["ids"]
        attribute = record.info["attribute_id"]
        s, e = ref.subject_span(model.tokenizer, fact.prompt, fact.subject)
        for pi, position in enumerate(("last_subject", "last")):
            expected = ref.extraction(model.hf, ids, e - 1 if position == "last_subject" else "last", attribute, 7)
            assert record.info["positions"][position] == (e - 1 if position == "last_subject" else len(ids) - 1)
            for ji, projection in enumerate(("unembed", "embed")):
                for si, site in enumerate(("resid_post", "attn_out", "mlp_out")):
                    for li in range(model.arch.n_layers):
                        logits = expected[projection][site]["logits"][li]
                        what = f"example {record.index} {position} {projection} {site} L{li}"
                        assert_rank_consistent(int(record["rank"].values[pi, ji, si, li]), logits, attribute, what)
                        top = record["top_ids"].values[pi, ji, si, li]
                        # the same top-k up to near-ties: the reference's logits at nnexp's ids, in order
                        assert_close(logits[top], logits.topk(7).values, what + " top-k")
                        if "attribute_rate" in record.tensors:
                            allowed = ref.attribute_token_ids(model.tokenizer, words[fact.subject])
                            rate = sum(int(t) in allowed for t in top) / 7
                            assert record["attribute_rate"].values[pi, ji, si, li].item() == pytest.approx(rate)
        assert len(record.info["top_tokens"][0][0][0][0]) == 7


def test_extraction_unembed_of_the_last_residual_is_the_model_prediction(llama_tiny):
    facts = gpt2_facts(llama_tiny.tokenizer, 3)
    for record in run_records(AttributeExtractionExperiment(positions=("last",), sites=("resid_post",)), llama_tiny, facts):
        # the last block's output through the final norm and unembedding is the model's logits
        assert record["rank"].sel(position="last", projection="unembed", site="resid_post", layer=2).item() == 1
        assert record["top_ids"].values[0, 0, 0, -1, 0].item() == record.info["attribute_id"]


# -- sublayer knockout -------------------------------------------------------------------


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_sublayer_knockout_matches_reference(family_model, ablation):
    model = family_model
    facts = gpt2_facts(model.tokenizer, 3)
    experiment = SublayerKnockoutExperiment(ablation=ablation, window=2)
    compiled, items = compiled_and_items(experiment, model, facts)
    records = compiled.run(items)
    n_layers = model.arch.n_layers
    all_ids = [model.tokenizer(f.prompt).input_ids for f in facts]
    means = {}
    if ablation == "mean":
        for site in ("mlp_out", "attn_out"):
            means[site] = ref.sublayer_means(model.hf, all_ids, site)
            for layer in range(n_layers):
                assert_close(compiled.means[(site, layer)], means[site][layer], f"mean {site} L{layer}", rtol=1e-5)
    for record in records:
        ids, attribute = record.info["ids"], record.info["attribute_id"]
        for si, site in enumerate(("mlp_out", "attn_out")):
            for pi, positions in enumerate(("all", "last")):
                for layer in range(n_layers):
                    values = None if ablation == "zero" else {j: means[site][j] for j in range(n_layers)}
                    prob, rank = ref.sublayer_ablation(model.hf, ids, attribute, site, ref.window(layer, 2, n_layers),
                                                       positions, values)
                    what = f"example {record.index} {site} {positions} L{layer}"
                    assert_close(record["sublayer_knockout.prob"].values[si, pi, layer], prob, what)
                    assert abs(record["sublayer_knockout.rank"].values[si, pi, layer].item() - rank) <= max(1, 1e-4 * rank), what
        assert float(record["sublayer_knockout"].values.abs().max()) > 1e-3


# -- causal tracing ----------------------------------------------------------------------


def test_causal_tracing_matches_reference(family_model):
    model = family_model
    facts = gpt2_facts(model.tokenizer, 2)
    experiment = CausalTracingExperiment(samples=3, window=2, seed=7)
    compiled, items = compiled_and_items(experiment, model, facts)
    records = compiled.run(items)
    all_ids = [model.tokenizer(f.prompt).input_ids for f in facts]
    spans = [ref.subject_span(model.tokenizer, f.prompt, f.subject) for f in facts]
    sigma = 3 * ref.embedding_std(model.hf, all_ids, spans)
    assert compiled.noise_std == pytest.approx(sigma, rel=1e-5)
    n_layers, d = model.arch.n_layers, model.arch.d_model
    for record, ids, span in zip(records, all_ids, spans):
        attribute = record.info["target_true_id"]
        assert record.info["attribute_id"] == attribute
        noise = ref.causal_noise(3, span[1] - span[0], d, sigma, 7)
        p_corrupted = ref.corrupted_prob(model.hf, ids, span, attribute, noise)
        assert_close(record.scalars["p_corrupted"], p_corrupted, "p_corrupted")
        assert_close(record.scalars["p_clean"], ref.last_logits(model.hf, ids).softmax(-1)[attribute], "p_clean")
        for site in ("resid_post", "mlp_out", "attn_out"):
            expected = torch.tensor([[
                ref.restored_prob(model.hf, ids, span, attribute, noise, site,
                                  [layer] if site == "resid_post" else ref.window(layer, 2, n_layers), position)
                for position in range(len(ids))] for layer in range(n_layers)])
            assert_close(record[f"{site}.prob"].values, expected, f"example {record.index} {site} restored")
            # An indirect effect is the difference of two probabilities each held to 1e-4 of
            # its scale above; on a random model it can be a thousandth of them, below their
            # float32 rounding (which differs between a packed trace and rows in full), so it
            # is held to the same absolute error as the probabilities it comes from.
            assert_close(record[site].values, expected - p_corrupted, f"example {record.index} {site} indirect effect",
                         atol=2e-4 * float(expected.abs().max()))
        # restoring the last block's output at the last position restores the clean run exactly
        assert record["resid_post.prob"].values[-1, -1].item() == pytest.approx(record.scalars["p_clean"], rel=1e-5)


def test_causal_tracing_chunks_equal_one_trace_and_budget(gpt2_tiny, monkeypatch):
    from nnexp.tracing.memory import row_cost

    facts = gpt2_facts(gpt2_tiny.tokenizer, 3)
    experiment = CausalTracingExperiment(samples=2, window=2)
    whole = run_records(experiment, gpt2_tiny, facts)
    from tests.helpers import count_traces

    calls = count_traces(gpt2_tiny, monkeypatch)
    split = run_records(experiment, gpt2_tiny, facts, max_rows=40)
    assert calls and max(calls) <= 40 and len(calls) > 3
    for a, b in zip(whole, split):
        for name in a.tensors:
            torch.testing.assert_close(a[name].values, b[name].values, rtol=1e-5, atol=1e-10)  # probabilities ~3e-5: float noise
    # a memory budget caps rows per trace by the measured cost of a row
    calls.clear()
    compiled, items = compiled_and_items(experiment, gpt2_tiny, facts)
    cost = row_cost(gpt2_tiny, max(len(i.fact.ids) for i in items))
    rows = compiled.rows_for_budget(items, cost.fixed["cpu"] + 30 * cost.per_row["cpu"])
    assert 10 <= rows < 30  # the margin for nnexp's edits, and the values a row carries
    budgeted = compiled.run(items, max_rows=rows)
    assert max(calls) <= rows
    torch.testing.assert_close(budgeted[0]["mlp_out"].values, whole[0]["mlp_out"].values, rtol=1e-5, atol=1e-10)  # probabilities ~3e-5: float noise
    with pytest.raises(ConfigError, match="needs at least 4 rows per trace"):
        compiled.run(items, max_rows=2)


def test_token_categories_and_average():
    # BOS, "The", "capital", "of", [Ne, w, Zea, land], "is", "a", "," -> last
    cats = token_categories(11, (4, 8))
    assert cats == {"first subject token": [4], "middle subject tokens": [5, 6], "last subject token": [7],
                    "first subsequent token": [8], "further tokens": [9], "last token": [10]}
    one = token_categories(5, (3, 4))  # one-token subject just before the last token
    assert one["first subject token"] == one["last subject token"] == [3]
    assert one["middle subject tokens"] == one["first subsequent token"] == one["further tokens"] == []


def test_causal_tracing_dataset_average(gpt2_tiny, tmp_path):
    facts = gpt2_facts(gpt2_tiny.tokenizer, 3)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    results = nnexp.run(CausalTracingExperiment(data=str(data), samples=2, restore=("mlp_out",)), gpt2_tiny,
                        out=tmp_path / "run", figures=False)
    average = average_indirect_effect(results, "mlp_out")
    expected = []
    for record in results:
        cats = token_categories(len(record.info["ids"]), tuple(record.info["subject_tokens"]))
        expected.append([record["mlp_out"].values[:, cats[c]].mean(-1) if cats[c] else torch.full((3,), math.nan)
                         for c in average["categories"]])
    stacked = torch.stack([torch.stack(row) for row in expected])
    torch.testing.assert_close(average["values"], torch.nanmean(stacked, 0))
    assert average["counts"][-1] == 3


def test_dataset_statistics_ignore_limit(gpt2_tiny, tmp_path):
    """The noise level and the ablation means come from the whole dataset, so a run with
    --limit and its continuation compute identical numbers."""
    facts = gpt2_facts(gpt2_tiny.tokenizer, 4)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    for experiment, name in ((CausalTracingExperiment(data=str(data), samples=2, restore=("attn_out",)), "attn_out"),
                             (SublayerKnockoutExperiment(data=str(data), ablation="mean"), "sublayer_knockout")):
        limited = nnexp.run(experiment, gpt2_tiny, out=tmp_path / f"{name}-1", limit=1, figures=False)
        full = nnexp.run(experiment, gpt2_tiny, out=tmp_path / f"{name}-all", figures=False)
        assert torch.equal(limited[0][name].values, full[0][name].values)


# -- planning and decoding ---------------------------------------------------------------


@pytest.mark.parametrize("experiment", [AttentionKnockoutExperiment(window=2), AttributeExtractionExperiment(top_k=3)],
                         ids=["runs", "positions"])
def test_plan_is_pure_and_decode_refuses_misaligned_values(gpt2_tiny, experiment):
    from nnexp.errors import ResultsError

    compiled, items = compiled_and_items(experiment, gpt2_tiny, gpt2_facts(gpt2_tiny.tokenizer, 3))
    plan = compiled.plan(items, compiled.row_limit(items, 2))
    assert len(plan.jobs) == len(plan.layout) > 1 and plan.examples == [item.index for item in items]
    assert compiled.plan(items, 2).fingerprint == plan.fingerprint  # the same chunk plans the same way again
    values = gpt2_tiny.executor.run(plan.jobs)
    records = compiled.decode(items, plan, values)
    assert [r.index for r in records] == [item.index for item in items]
    with pytest.raises(ResultsError, match="trace results came back"):
        compiled.decode(items, plan, values[:-1])
    short = [value[:-1] if isinstance(value, torch.Tensor) else {k: v[:-1] for k, v in value.items()} for value in values]
    with pytest.raises(ResultsError, match="rows were planned"):
        compiled.decode(items, plan, short)


# -- errors ----------------------------------------------------------------------------


def test_bad_parameters_and_data_are_clear_errors(gpt2_tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown sources entry 'object'; choose from subject, non_subject, last"):
        AttentionKnockoutExperiment(sources=("object",))
    with pytest.raises(ConfigError, match="window is 0; give a positive number of layers"):
        AttentionKnockoutExperiment(window=0)
    with pytest.raises(ConfigError, match="attribute is 'gold'"):
        SublayerKnockoutExperiment(attribute="gold")
    with pytest.raises(ConfigError, match="ablation is 'resample'; choose 'zero' or 'mean'"):
        SublayerKnockoutExperiment(ablation="resample")
    with pytest.raises(ConfigError, match="unknown restore entry 'head_out'"):
        CausalTracingExperiment(restore="mlp_out,head_out")
    assert CausalTracingExperiment(restore="mlp_out,attn_out").restore == ("mlp_out", "attn_out")
    with pytest.raises(ConfigError, match="samples is 0"):
        CausalTracingExperiment(samples=0)
    with pytest.raises(ConfigError, match="noise_std is -1"):
        CausalTracingExperiment(noise_std=-1)
    with pytest.raises(ConfigError, match="top_k is 0"):
        AttributeExtractionExperiment(top_k=0)
    with pytest.raises(ConfigError, match="layer 5 is out of range: the model has 3 layers"):
        AttentionKnockoutExperiment(layers=(5,)).compile(gpt2_tiny)
    model = tiny_model("llama")
    model.hf.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match="load the model with attn_implementation='eager' or 'sdpa'"):
        AttentionKnockoutExperiment().compile(model)

    compiled = AttentionKnockoutExperiment().compile(gpt2_tiny)
    with pytest.raises(DataError, match=r"the target_true ' Hanoi' is 3 tokens .*knockout measures one next token.*"
                                        r"multi_token=skip"):
        compiled.prepare(Fact("The capital of Vietnam is", "Vietnam", " Hanoi", " Bangkok"), 0)
    with pytest.raises(DataError, match="does not occur in the prompt"):
        Fact.from_json({"prompt": "The capital of France is", "subject": "Spain", "target_true": " Paris",
                        "target_false": " Rome"}, "facts.jsonl:3")

    for content, message in (("[1, 2]", "must hold a JSON object"), ("{\"France\": \"Paris\"}", "must be a list of non-empty strings"),
                             ("{not json", "is not valid JSON")):
        path = tmp_path / "attributes.json"
        path.write_text(content)
        with pytest.raises(DataError, match=message):
            AttributeExtractionExperiment(attributes_file=str(path)).compile(gpt2_tiny)
    with pytest.raises(DataError, match="does not exist"):
        AttributeExtractionExperiment(attributes_file=str(tmp_path / "missing.json")).compile(gpt2_tiny)
    extraction = AttributeExtractionExperiment().compile(gpt2_tiny)
    with pytest.raises(DataError, match="example 4: attributes must be a list"):
        extraction.prepare(Fact("The capital of France is", "France", " Paris", " Rome", meta={"attributes": "Paris"}), 4)


# -- command line and figures ------------------------------------------------------------


@pytest.mark.parametrize("name, options, tensors, figure", [
    ("attention-knockout", ["--set", "window=2"], ["knockout", "knockout.prob"], "mean-knockout.html"),
    ("sublayer-knockout", ["--set", "ablation=mean", "--positions", "last"], ["sublayer_knockout"],
     "mean-sublayer-knockout.html"),
    ("attribute-extraction", ["--sites", "resid_post,mlp_out", "--set", "top_k=5"], ["rank", "top_ids"],
     "mean-topk-last-subject.html"),
    ("causal-tracing", ["--set", "samples=2", "--set", "restore=mlp_out,attn_out", "--layers", "0,2"],
     ["mlp_out", "attn_out.prob"], "mean-mlp-out.html"),
])
def test_cli_run_resume_and_figures(tmp_path, tiny_gpt2_folder, name, options, tensors, figure):
    from tests.helpers import cli

    facts = gpt2_facts(nnexp.load_model(str(tiny_gpt2_folder)).tokenizer, 4)
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(f.to_json()) + "\n" for f in facts))
    out = tmp_path / "run"
    result = cli("run", name, "--model", tiny_gpt2_folder, "--data", data, "--out", out, "--limit", "2", "--no-figures",
                 *options)
    assert result.returncode == 0, result.stderr
    result = cli("resume", out, "--limit", "4")  # extends the run to every fact and draws its figures
    assert result.returncode == 0, result.stderr
    assert "2 of 4 examples already stored" in result.stderr
    results = nnexp.load_results(out)
    assert len(results) == 4
    for tensor in tensors:
        assert tensor in results[3].tensors
    page = (out / "figures" / figure).read_text()
    assert "facts" in page and "layer" in page
    assert (out / "figures" / "example-0000-").parent.is_dir()
