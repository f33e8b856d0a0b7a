"""Attribution patching (AtP, AtP*'s GradDrop) against an independent autograd
implementation (tests/atp_reference.py), its exact values against activation
patching, the linear case where the estimate is exact, and its rank statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nnexp
from nnexp.errors import ConfigError
from nnexp.kinds.attribution_patching.experiment import FIELDS, false_negative
from nnexp.registry import EXPERIMENTS
from nnexp.statistics import average_ranks, spearman
from tests import atp_reference
from tests.helpers import assert_close, count_traces, make_gpt2_tokenizer, tiny_hf_model, tiny_model

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")


def ioi_atp(**fields):
    return EXPERIMENTS["ioi-attribution-patching"](**{"n_examples": 2, **fields})


def raw_estimate(record, site, variant):
    """A record's estimate in metric units (undoing the normalisation by clean - corrupted)."""
    denominator = record.scalars["clean"] - record.scalars["corrupted"]
    return record[f"{site}.{variant}"].values.double() * (abs(denominator) if variant == "atp_star" else denominator)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_estimates_match_independent_autograd(family, tmp_path):
    """Every site's AtP and GradDrop estimate of every cell, against plain hooks and
    autograd on the same weights (GradDrop by L separate forward passes there)."""
    model = tiny_model(family, seed=1)
    experiment = ioi_atp(sites=SITES, top_k=3, sample=2)
    results = nnexp.run(experiment, model, out=tmp_path / "run", figures=False)
    n_layers = model.arch.n_layers
    for record in results:
        pair = experiment.examples()[record.index]
        clean, corrupted = (model.tokenizer(text).input_ids for text in (pair.clean, pair.corrupted))
        answer, foil = (model.tokenizer(word).input_ids[0] for word in (pair.answer, pair.foil))
        ref_clean, ref_corrupted = atp_reference.metrics(model.hf, clean, corrupted, answer, foil)
        assert record.scalars["clean"] == pytest.approx(ref_clean, rel=1e-4, abs=1e-5)
        assert record.scalars["corrupted"] == pytest.approx(ref_corrupted, rel=1e-4, abs=1e-5)
        plain = atp_reference.atp(model.hf, clean, corrupted, answer, foil, SITES)
        star = atp_reference.atp_star(model.hf, clean, corrupted, answer, foil, SITES)
        for site in SITES:
            for variant, reference in (("atp", plain), ("atp_star", star)):
                expected = torch.stack([reference[(site, layer)] for layer in range(n_layers)])
                if site == "head_out":
                    expected = expected.permute(0, 2, 1)  # [layer, head, position]
                assert_close(raw_estimate(record, site, variant), expected,
                             f"{family} {site} {variant} example {record.index}")


def test_exact_values_are_activation_patchings_and_linear_cells_are_exact(tmp_path):
    """With the final norm removed, the metric is linear in the last block's MLP output
    and output at the last position: there the estimate equals exact patching. Every
    verified cell's exact effect is the number activation patching reports for it."""
    from nnexp import wrap_model

    hf = tiny_hf_model("gpt2", seed=2)
    hf.transformer.ln_f = torch.nn.Identity()
    # float64 model: the normalised effect divides by a small clean - corrupted difference (estimates
    # are stored in float32 and the metrics come back in float32, hence abs=1e-4 below)
    hf.double()
    model = wrap_model(hf, make_gpt2_tokenizer(), "tiny-gpt2-no-final-norm", {"kind": "test", "family": "gpt2"})
    sites = ("resid_post", "mlp_out", "head_out")
    experiment = ioi_atp(sites=sites, top_k=400, sample=0)  # every cell verified
    results = nnexp.run(experiment, model, out=tmp_path / "atp", figures=False)
    patching = nnexp.run(EXPERIMENTS["ioi-patching"](sites=sites, positions="each", head_positions="each",
                                                     n_examples=2), model, out=tmp_path / "patching", figures=False)
    nonlinear_gap = 0.0
    for record, patched in zip(results, patching):
        assert record.scalars["n_verified"] == record.scalars["n_cells"]
        for site in sites:
            exact = record[f"{site}.exact"].values
            known = ~torch.isnan(exact)
            assert known.sum() > 0
            assert torch.equal(exact[known], patched[site].values[known].to(exact.dtype))
            gap = (record[f"{site}.atp"].values - exact)[known].abs().max()
            nonlinear_gap = max(nonlinear_gap, float(gap))
        for site in ("mlp_out", "resid_post"):
            last = record[f"{site}.exact"].values[-1, -1]
            assert not math.isnan(last)
            assert float(record[f"{site}.atp"].values[-1, -1]) == pytest.approx(float(last), abs=1e-4)
    print("largest |estimate - exact| over the nonlinear cells:", nonlinear_gap)
    assert nonlinear_gap > 1e-2, "every cell exact: the linear-cell check would prove nothing"


def test_verification_selects_the_top_cells_and_a_seeded_sample(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    calls = count_traces(model, monkeypatch)
    results = nnexp.run(ioi_atp(sites=("resid_post", "head_out"), top_k=4, sample=3), model, out=tmp_path / "a",
                        figures=False)
    # screening first, one trace of 2 rows per pair; then per pair one verification trace of
    # clean, corrupted and one row per verified cell
    assert calls == [2, 2] + [2 + len(record["verified"].values) for record in results]
    columns = {name: i for i, name in enumerate(FIELDS)}
    for record in results:
        table = record["verified"].values
        sampled = table[:, columns["sampled"]] == 1
        assert int(sampled.sum()) == 3
        tops = table[~sampled]
        # the top-4 of each variant by |estimate| are verified, the sample lies outside both
        for variant in ("atp", "atp_star"):
            ranks = set(tops[:, columns[f"rank_{variant}"]].tolist())
            assert {1.0, 2.0, 3.0, 4.0} <= ranks
            assert (table[sampled][:, columns[f"rank_{variant}"]] > 4).all()
        # the table's estimates and exact values are the stored tensors'
        site_names, exact = record.info["sites"], []
        for row in table.tolist():
            site = site_names[int(row[columns["site"]])]
            head = () if row[columns["head"]] < 0 else (int(row[columns["head"]]),)
            index = (int(row[columns["layer"]]),) + head + (int(row[columns["position"]]),)
            exact.append(float(record[f"{site}.exact"].values[index]))
            assert not math.isnan(exact[-1])
        assert int((~torch.isnan(record["head_out.exact"].values)).sum()
                   + (~torch.isnan(record["resid_post.exact"].values)).sum()) == len(table)
        # recall: of the 4 largest |exact| among the verified, the share in AtP's top 4
        order = np.argsort(-np.abs(np.array(exact)), kind="stable")[:4]
        assert table[order, columns["rank_exact"]].tolist() == [1.0, 2.0, 3.0, 4.0]
        in_top = (table[order, columns["rank_atp"]] <= 4).float().mean()
        assert record.scalars["recall_atp"] == pytest.approx(float(in_top))
        # the largest false negative: the sampled cell outside AtP's top 4 with the largest |exact|
        missed = [i for i in range(len(table)) if sampled[i] and table[i, columns["rank_atp"]] > 4]
        worst = max(missed, key=lambda i: abs(exact[i]))
        found = false_negative(record, "atp")
        assert found["exact"] == exact[worst] and found["rank"] == int(table[worst, columns["rank_atp"]])
    # figures (HTML only here) and the dataset summary
    from nnexp.kinds.attribution_patching.figures import attribution_patching_figures

    monkeypatch.setattr("nnexp.plotting.png_available", lambda: False)
    written = {path.name for path in attribution_patching_figures(
        ioi_atp(sites=("resid_post", "head_out")), results, tmp_path / "figures")}
    assert {"scatter-atp.html", "scatter-atp-star.html", "mean-heads-atp.html", "example-0001-heads-atp-star.html"} \
        <= written
    page = (tmp_path / "figures" / "scatter-atp.html").read_text()
    assert "AtP estimate vs exact patching effect" in page and "exact patching effect (normalised)" in page
    rows = ioi_atp(sites=("resid_post", "head_out")).summary_rows(results)
    measures = {row["role"] for row in rows if row["measure"] == "agreement with exact patching"}
    assert {"recall_atp", "spearman_atp_star", "false_negative_atp"} <= measures
    again = nnexp.run(ioi_atp(sites=("resid_post", "head_out"), top_k=4, sample=3), model, out=tmp_path / "b",
                      figures=False)
    other = nnexp.run(ioi_atp(sites=("resid_post", "head_out"), top_k=4, sample=3, sample_seed=5), model,
                      out=tmp_path / "c", figures=False)
    assert torch.equal(results.records[0]["verified"].values, again.records[0]["verified"].values)
    assert not torch.equal(results.records[0]["verified"].values, other.records[0]["verified"].values)


@pytest.mark.fast
def test_spearman_matches_scipy():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    for n in (2, 5, 40):
        x, y = rng.normal(size=n), rng.normal(size=n)
        x[: n // 2] = np.round(x[: n // 2])  # ties
        y[::3] = 1.0
        assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
        assert np.allclose(average_ranks(x), rankdata(x))
    assert math.isnan(spearman([1.0, 1.0], [1.0, 2.0])) and math.isnan(spearman([1.0], [2.0]))


@pytest.mark.fast
def test_bad_parameters_are_refused_in_one_line():
    from nnexp.kinds.attribution_patching import AttributionPatchingExperiment

    from nnexp.sites import RANKS, HookPoint, register_site

    @register_site("test_atp_unsupported", "a user's site attribution patching does not screen", replace=True)
    def _site(layer, arch):
        return HookPoint(arch.block(layer), "input", None, (layer, RANKS["resid_pre"]))

    with pytest.raises(ConfigError, match="not supported by attribution patching") as error:
        AttributionPatchingExperiment(sites=("test_atp_unsupported",))
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="must be 0 or more"):
        AttributionPatchingExperiment(top_k=-1)
    with pytest.raises(ConfigError, match="name a site twice"):
        AttributionPatchingExperiment(sites=("mlp_out", "mlp_out"))


# -- query, key and value cells, and AtP*'s QK fix --------------------------------------

QKV = ("q", "k", "v")


def _pair_ids(model, pair):
    clean, corrupted = (model.tokenizer(text).input_ids for text in (pair.clean, pair.corrupted))
    # (Gemma's tokenizer puts BOS before a lone word too)
    answer, foil = (model.tokenizer(word, add_special_tokens=False).input_ids[0] for word in (pair.answer, pair.foil))
    return clean, corrupted, answer, foil


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_query_key_value_estimates_and_qk_fix_match_independent_autograd(family, tmp_path):
    """Plain AtP of every q, k, v cell, the signed QK-fixed estimate of every q and k cell,
    and AtP* (QK fix with GradDrop) against an attention function written in the test,
    rows recomputed one by one (GradDrop by L separate passes). Llama and Gemma 2 have
    fewer key/value heads than query heads; Gemma 2 caps its attention logits."""
    model = tiny_model(family, seed=3)
    experiment = ioi_atp(sites=QKV, top_k=2, sample=1, n_examples=1)
    results = nnexp.run(experiment, model, out=tmp_path / "run", figures=False)
    record = results.records[0]
    n_layers = model.arch.n_layers
    assert record["k.atp"].values.shape[1] == model.arch.n_kv_heads
    ids = _pair_ids(model, experiment.examples()[record.index])
    plain = atp_reference.attention_estimates(model.hf, *ids)
    star = atp_reference.attention_star(model.hf, *ids)
    denominator = record.scalars["clean"] - record.scalars["corrupted"]
    for site in QKV:
        expected = {
            "atp": torch.stack([plain[(site, layer)] for layer in range(n_layers)]).permute(0, 2, 1),
            "atp_star": torch.stack([star[(site, layer)] for layer in range(n_layers)]).permute(0, 2, 1),
        }
        if site != "v":
            expected["atp_qk"] = torch.stack([plain[(f"{site}_fix", layer)]
                                              for layer in range(n_layers)]).permute(0, 2, 1)
        heads = model.arch.n_heads if site == "q" else model.arch.n_kv_heads
        for variant, reference in expected.items():
            assert reference.shape[1] == heads
            got = record[f"{site}.{variant}"].values.double() * (abs(denominator) if variant == "atp_star"
                                                                  else denominator)
            assert_close(got, reference, f"{family} {site} {variant}")
    # the QK fix is a different estimate from AtP through the softmax (else the test above
    # would not tell them apart)
    gap = (record["q.atp_qk"].values - record["q.atp"].values).abs().max()
    assert gap > 1e-3 * record["q.atp"].values.abs().max()


class _Zero(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def test_qk_fix_equals_exact_patching_where_the_metric_is_linear_in_the_pattern(tmp_path):
    """The QK fix is exact for the attention pattern: in the last block of a float64 GPT-2
    whose final norm is removed and whose last MLP adds nothing, the metric (at the last
    position) is linear in that block's pattern row of the last position, so the QK-fixed
    estimate of every query and key cell there equals exact patching of that cell through
    nnexp's planner, while AtP through the softmax does not."""
    from nnexp import wrap_model

    hf = tiny_hf_model("gpt2", seed=4)
    hf.transformer.ln_f = torch.nn.Identity()
    hf.transformer.h[-1].mlp = _Zero()
    with torch.no_grad():  # sharper patterns in that block: larger effects, further from linear in q and k
        hf.transformer.h[-1].attn.c_attn.weight[:, : 2 * hf.config.n_embd] *= 4
    hf.double()
    model = wrap_model(hf, make_gpt2_tokenizer(), "tiny-gpt2-linear-pattern", {"kind": "test", "family": "gpt2"})
    last = model.arch.n_layers - 1
    experiment = ioi_atp(sites=("q", "k"), layers=(last,), top_k=200, sample=0, n_examples=1, graddrop=False)
    record = nnexp.run(experiment, model, out=tmp_path / "atp", figures=False).records[0]
    assert record.scalars["n_verified"] == record.scalars["n_cells"] > 0
    plain_gap = 0.0
    for site in ("q", "k"):
        exact = record[f"{site}.exact"].values
        known = ~torch.isnan(exact)
        assert known.sum() > 0
        # (the exact effects come from float32 metrics: 1e-6 is their resolution here)
        assert_close(record[f"{site}.atp_qk"].values[known], exact[known], f"QK fix vs exact, {site}", atol=1e-6)
        plain_gap = max(plain_gap, float((record[f"{site}.atp"].values - exact)[known].abs().max()))
    print("largest |AtP - exact| over the q, k cells:", plain_gap)
    assert plain_gap > 1e-5, "AtP through the softmax is exact too: the check would prove nothing"


def test_exact_patching_of_query_key_value_cells_matches_hooks(tmp_path):
    """The verified q, k, v cells' patched metrics (nnexp's planner, several cells per
    trace, here and through nnsight's remote serialisation) against the reference
    attention function with the clean value put in, on Llama with 2 key/value heads
    for 4 query heads."""
    model = tiny_model("llama", seed=5)
    experiment = ioi_atp(sites=QKV, top_k=3, sample=3, n_examples=1)
    record = nnexp.run(experiment, model, out=tmp_path / "run", figures=False).records[0]
    remote = nnexp.run(experiment, model, out=tmp_path / "remote", figures=False, backend="remote-local").records[0]
    ids = _pair_ids(model, experiment.examples()[record.index])
    for site in QKV:
        assert torch.allclose(record[f"{site}.exact.patched"].values, remote[f"{site}.exact.patched"].values,
                              equal_nan=True, atol=1e-5)
    columns = {name: i for i, name in enumerate(FIELDS)}
    table = record["verified"].values
    assert len(table) >= 6
    patched, expected = [], []
    for row in table.tolist():
        site = QKV[int(row[columns["site"]])]
        layer, head, position = (int(row[columns[name]]) for name in ("layer", "head", "position"))
        patched.append(float(record[f"{site}.exact.patched"].values[layer, head, position]))
        expected.append(atp_reference.patched_attention_metric(model.hf, *ids, site, layer, head, position))
    assert_close(torch.tensor(patched), torch.tensor(expected), "patched q/k/v metrics")
    corrupted = record.scalars["corrupted"]
    assert max(abs(value - corrupted) for value in expected) > 1e-4  # the patches change the metric


@pytest.mark.fast
def test_query_key_value_sites_are_refused_in_one_line():
    from nnexp.errors import ModelError
    from nnexp.models.architectures import spec_for
    from nnexp.sites import check_heads, resolve_site

    class Arch:  # a GPT-J-like architecture: no attention function call to reach
        model_type, spec, n_heads, n_kv_heads = "gptj", spec_for("gptj"), 4, 4
        attn_function = spec_for("gptj").attn_function

        def block(self, layer):
            return f"transformer.h.{layer}"

    with pytest.raises(ModelError, match="gptj.*attn_function") as error:
        resolve_site("q", 0, Arch())
    assert "\n" not in str(error.value)
    gqa = Arch()
    gqa.n_kv_heads = 2
    assert check_heads(None, gqa, "k") == [0, 1] and check_heads(None, gqa, "q") == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="head 3 is out of range.*key/value heads") as error:
        check_heads([3], gqa, "v")
    assert "\n" not in str(error.value)
    # forward order: after the block's input and the attention mask, before the head outputs
    from nnexp.sites import RANKS

    assert RANKS["resid_pre"] < RANKS["attn_mask"] < RANKS["q"] < RANKS["k"] < RANKS["v"] < RANKS["head_out"]
