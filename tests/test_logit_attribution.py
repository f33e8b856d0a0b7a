"""Logit lens and direct logit attribution: against an independent hook implementation,
exact decomposition on every family, one trace per batch, bad input and figures."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch

import nnexp
from nnexp import ArchSpec, ConfigError, DataError, ModelError
from nnexp.kinds.logit_attribution import LogitAttributionExperiment
from nnexp.models.architectures import ARCHITECTURES
from nnexp.models.norms import NormForm
from nnexp.prompts import Prompt, load_prompts
from nnexp_experiments.ioi import classic_ioi
from nnexp_experiments.logit_attribution import DLAHeads, LogitAttribution
from tests.helpers import FAMILIES, randomise_norms_and_biases, tiny_model
from tests.logit_reference import reference

PROMPTS = [
    Prompt("When John and Mary went to the shops, Mary gave the bag to", " John", " Mary"),
    Prompt("Then, Tom and James had a long argument. Afterwards Tom said to", " James", " Tom"),
    Prompt("The capital of France is", " Paris", " London"),
]


def run_records(model, experiment=None, prompts=PROMPTS, max_rows=None):
    experiment = experiment or LogitAttributionExperiment()
    compiled = experiment.compile(model)
    items = [compiled.prepare(p, i) for i, p in enumerate(prompts)]
    return compiled.run(items, max_rows=max_rows)


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3_text"])
def family_model(request):
    return request.param, randomise_norms_and_biases(tiny_model(request.param))


def test_matches_independent_hooks(family_model):
    """Three prompts of different lengths, left-padded into one trace, against the
    per-family hook reference run one prompt at a time."""
    family, model = family_model
    records = run_records(model)
    for record, prompt in zip(records, PROMPTS):
        ids = record.info["ids"]
        assert record.info["prompt"] == prompt.prompt and len(ids) == len(model.tokenizer(prompt.prompt).input_ids)
        ref = reference(model.hf, family, ids, record.info["answer_id"], record.info["foil_id"])
        assert record.scalars["logit_diff"] == pytest.approx(ref["logit_diff"], abs=1e-4)
        layers = record["dla_layers"]
        assert layers.labels("component") == list(ref["dla_layers"])
        assert torch.allclose(layers.values, torch.tensor(list(ref["dla_layers"].values())), atol=1e-4)
        assert torch.allclose(record["dla_heads"].values, ref["dla_heads"], atol=1e-4)
        assert torch.allclose(record["logit_lens"].values, torch.tensor(ref["logit_lens"]), atol=1e-4)
        assert torch.allclose(record["logit_lens_linear"].values, torch.tensor(ref["logit_lens_linear"]), atol=1e-4)
        assert record["logit_lens_top_ids"].values[:, :3].tolist() == ref["logit_lens_top"]
        # the perturbed biases are really exercised: GPT-2's final-norm bias term is non-zero
        if family == "gpt2":
            assert abs(record.scalars["bias"]) > 1e-3 and abs(layers.values[1]) > 0  # pos_embed
        if family == "gemma3_text":
            assert record.tokens[0] == "<|endoftext|>"  # a BOS, as Gemma's tokenizer adds


@pytest.mark.parametrize("family", FAMILIES)
def test_components_sum_to_the_logit_difference_on_every_family(family):
    model = randomise_norms_and_biases(tiny_model(family))
    for record in run_records(model):
        true = record.scalars["logit_diff"]
        assert record["dla_layers"].values.sum().item() == pytest.approx(true, abs=1e-4)
        heads_total = record["dla_heads"].values.sum() + record["dla_heads_rest"].values.sum()
        assert heads_total.item() == pytest.approx(true, abs=1e-4)
        assert record["logit_lens"].values[-1].item() == pytest.approx(true, abs=1e-4)
        assert record["logit_lens_linear"].values[-1].item() == pytest.approx(true, abs=1e-4)
        for name in ("dla_layers_error", "dla_heads_error", "logit_lens_linear_error"):
            assert abs(record.scalars[name]) < 1e-4


def test_missing_post_norms_are_caught_loudly(monkeypatch, capsys):
    """A Gemma 3 row pointing at the attention and MLP outputs before their post-norms
    (not what joins the residual stream) fails the exactness check with a warning."""
    from nnexp import console

    model = tiny_model("gemma3_text")
    wrong = ArchSpec(model_types=("gemma3_text",), blocks="model.layers", attn="self_attn", attn_out="self_attn",
                     mlp_out="mlp", head_proj="self_attn.o_proj", embed="model.embed_tokens", final_norm="model.norm",
                     unembed="lm_head", norm="rmsnorm")
    monkeypatch.setattr("nnexp.models.architectures.ARCHITECTURES", [wrong] + list(ARCHITECTURES))
    model = nnexp.wrap_model(model.hf, model.tokenizer, "wrong", {"kind": "test"})
    console.set_quiet(False)
    records = run_records(model, LogitAttributionExperiment(analyses=("dla_layers",)))
    err = capsys.readouterr().err
    assert abs(records[0].scalars["dla_layers_error"]) > 1e-3
    assert re.search(r"WARNING: example 0: the layer components sum to .* but the model's logit difference is", err)


def test_one_trace_per_batch(gpt2_tiny, monkeypatch):
    from tests.helpers import count_traces

    calls = count_traces(gpt2_tiny, monkeypatch)
    prompts = [Prompt.from_pair(p) for p in classic_ioi()]
    together = run_records(gpt2_tiny, prompts=prompts)
    assert calls == [8]  # every analysis, every layer and head, all 8 prompts: one forward pass
    split = run_records(gpt2_tiny, prompts=prompts, max_rows=3)
    assert calls[1:] == [3, 3, 2]
    for a, b in zip(together, split):
        for name in a.tensors:
            assert torch.allclose(a[name].values.float(), b[name].values.float(), atol=1e-5), name


def test_experiment_validation():
    with pytest.raises(ConfigError, match="choose one or more of logit_lens, dla_layers, dla_heads"):
        LogitAttributionExperiment(analyses=("dla_neurons",))
    with pytest.raises(ConfigError, match="top_k"):
        LogitAttributionExperiment(top_k=0)


def test_prompt_files(tmp_path, gpt2_tiny):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "The capital of France is", "answer": " Paris", "foil": " Rome", "note": "x"}) + "\n"
        + json.dumps(classic_ioi()[0].to_json()) + "\n"  # a patching pair: its clean prompt is used
    )
    prompts = load_prompts(path)
    assert prompts[0].meta == {"note": "x"} and prompts[1].prompt == classic_ioi()[0].clean
    assert prompts[1].meta["corrupted"] == classic_ioi()[0].corrupted
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": " Paris", "foil": " Rome"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field\(s\) prompt \(or clean\)"):
        load_prompts(bad)
    compiled = LogitAttributionExperiment().compile(gpt2_tiny)
    with pytest.raises(DataError, match="example 0: the answer ' Parisiennes' is 3 tokens"):
        compiled.prepare(Prompt("The capital of France is", " Parisiennes", " Rome"), 0)


def test_norms_that_are_not_layernorm_or_rmsnorm_are_refused():
    class MaxNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-5

        def forward(self, x):
            return x / x.abs().amax(-1, keepdim=True) * self.weight

    with pytest.raises(ModelError, match="computes neither LayerNorm nor RMSNorm"):
        NormForm.of(MaxNorm(), "model.norm")
    assert NormForm.of(torch.nn.LayerNorm(8), "ln_f").kind == "layernorm"


def test_cli_run_figures_and_reload(tmp_path, tiny_gpt2_folder):
    from tests.helpers import cli

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(p.to_json()) + "\n" for p in PROMPTS))
    result = cli("run", "logit-attribution", "--model", tiny_gpt2_folder, "--data", data, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    results = nnexp.load_results(tmp_path / "run")
    assert len(results) == 3 and results[0]["dla_heads"].shape == (3, 4)
    top = results[2].info["logit_lens_top_tokens"]
    assert len(top) == 2 * 3 + 1 and len(top[0]) == 10  # 0_pre ... final_post, top 10 each
    figures = tmp_path / "run" / "figures"
    for stem in ("example-0000-logit-lens", "example-0000-logit-lens-top-tokens", "example-0002-dla-layers",
                 "example-0002-dla-heads", "mean-logit-lens", "mean-dla-layers", "mean-dla-heads"):
        assert (figures / f"{stem}.html").exists(), stem
    page = (figures / "mean-dla-heads.html").read_text()
    assert "Direct logit attribution per head (mean over prompts)" in page and '"zmid":0.0' in page
    # the named single-analysis experiments store only their own tensors
    result = cli("run", "dla-heads", "--model", tiny_gpt2_folder, "--out", tmp_path / "heads", "--no-figures")
    assert result.returncode == 0, result.stderr
    heads = nnexp.load_results(tmp_path / "heads")
    assert len(heads) == 8 and sorted(heads[0].tensors) == ["dla_heads", "dla_heads_rest"]
    assert DLAHeads().analyses == ("dla_heads",) and LogitAttribution().dataset == "classic"


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="needs Chromium (apt install chromium)")
def test_a_browser_draws_the_logit_figures(gpt2_tiny, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    results = nnexp.run(LogitAttribution(), gpt2_tiny, out=tmp_path / "run", limit=2)
    figures = results.path / "figures"

    def dom(page):
        result = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000", "--dump-dom", (figures / page).as_uri()],
            capture_output=True, text=True, timeout=120,
        )
        text = html.unescape(result.stdout)
        assert "main-svg" in text, result.stderr[-2000:]  # plotly rendered its SVG
        return text

    lens = dom("mean-logit-lens.html")
    assert "Logit lens (mean over prompts)" in lens and "logit difference (answer − foil)" in lens
    for label in ("0_pre", "0_mid", "2_mid", "final_post"):
        assert f">{label}<" in lens, label
    heads = dom("example-0001-dla-heads.html")
    assert "Direct logit attribution per head" in heads and ">L2<" in heads and ">H3<" in heads
    assert "When John and Mary went to the shops, Mary gave the bag to" in heads  # the prompt is in the subtitle
