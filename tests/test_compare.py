"""One experiment across models (`nnexp.compare`, `nnexp compare`): runs on two random
models of different depth and tokenizer, aligned by relative depth and role, checked
against the stored tensors read directly; and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnexp
from nnexp.cli import main
from nnexp.compare import check_comparable
from nnexp.errors import ResultsError
from nnexp_experiments.ioi_patching import IOIPatching
from tests.helpers import make_gpt2_tokenizer

N_EXAMPLES = 4


def _llama_5_layers():
    """A random Llama with 5 layers and a tokenizer that prepends a BOS token, so that
    its depths and token positions differ from the 3-layer GPT-2's."""
    import transformers as T

    torch.manual_seed(3)
    config = T.LlamaConfig(num_hidden_layers=5, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, max_position_embeddings=128, vocab_size=50257,
                           bos_token_id=50256, eos_token_id=50256)
    hf = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return nnexp.wrap_model(hf, make_gpt2_tokenizer(with_bos=True), "tiny-llama5", {"kind": "test", "family": "llama"})


@pytest.fixture(scope="module")
def two_runs(gpt2_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    experiment = IOIPatching(dataset="classic", sites=("resid_post",))
    gpt2 = nnexp.run(experiment, gpt2_tiny, out=root / "gpt2", limit=N_EXAMPLES, figures=False)
    llama = nnexp.run(experiment, _llama_5_layers(), out=root / "llama", limit=N_EXAMPLES, figures=False)
    return gpt2, llama


def _role_positions(tokens: list[str], roles: dict[str, str]) -> dict[str, int]:
    """S2 (the second mention of S), IO and END (the last token), found in the tokens
    directly."""
    s_word, io_word = roles["S"].strip(), roles["IO"].strip()
    s_at = [p for p, token in enumerate(tokens) if token.strip() == s_word]
    io_at = [p for p, token in enumerate(tokens) if token.strip() == io_word]
    assert len(s_at) == 2 and len(io_at) == 1, tokens
    return {"S2": s_at[1], "IO": io_at[0], "END": len(tokens) - 1}


def _oracle(results, role: str) -> np.ndarray:
    """[examples, layers]: the stored effect at the role's position in each example."""
    rows = []
    for record in results:
        position = _role_positions(record.tokens, record.info["roles"])[role]
        rows.append(record["resid_post"].values[:, position].double().numpy())
    return np.stack(rows)


def test_aligned_by_relative_depth_and_role(two_runs):
    gpt2, llama = two_runs
    # the BOS token shifts every position of the Llama's prompts by one
    assert len(llama[0].tokens) == len(gpt2[0].tokens) + 1
    comparison = nnexp.compare(gpt2.path, llama.path)
    frame = comparison.frame
    assert [run["n_layers"] for run in comparison.runs] == [3, 5]
    scipy_stats = pytest.importorskip("scipy.stats")
    for results, label, n_layers in ((gpt2, "tiny-gpt2", 3), (llama, "tiny-llama5", 5)):
        for role in ("S2", "IO", "END"):
            values = _oracle(results, role)
            for layer in range(n_layers):
                cell = frame[(frame["model"] == label) & (frame["role"] == role) & (frame["layer"] == layer)]
                assert len(cell) == 1, (label, role, layer)
                cell = cell.iloc[0]
                assert cell["relative_depth"] == pytest.approx(layer / (n_layers - 1))
                assert cell["mean"] == pytest.approx(values[:, layer].mean(), abs=1e-6), (label, role, layer)
                assert cell["n"] == N_EXAMPLES
        # the interval of one cell, by scipy's percentile bootstrap with the same seeded generator
        column = _oracle(results, "END")[:, n_layers - 2]
        kwargs = {"confidence_level": 0.95, "n_resamples": 1000, "method": "percentile", "vectorized": True}
        try:
            theirs = scipy_stats.bootstrap((column,), np.mean, rng=np.random.default_rng(0), **kwargs)
        except TypeError:  # scipy < 1.15
            theirs = scipy_stats.bootstrap((column,), np.mean, random_state=np.random.default_rng(0), **kwargs)
        cell = frame[(frame["model"] == label) & (frame["role"] == "END") & (frame["layer"] == n_layers - 2)].iloc[0]
        assert (cell["lower"], cell["upper"]) == pytest.approx(
            (theirs.confidence_interval.low, theirs.confidence_interval.high), abs=1e-9)


def test_peaks_and_figures(two_runs):
    gpt2, llama = two_runs
    comparison = nnexp.compare(gpt2.path, llama.path)
    by_role = comparison.peaks(by_role=True)
    for results, label in ((gpt2, "tiny-gpt2"), (llama, "tiny-llama5")):
        values = _oracle(results, "S2").mean(0)
        peak = by_role[(by_role["model"] == label) & (by_role["role"] == "S2")].iloc[0]
        assert peak["layer"] == int(np.argmax(np.abs(values)))
        assert peak["mean"] == pytest.approx(values[peak["layer"]], abs=1e-6)
    overall = comparison.peaks()
    assert list(overall["model"]) == ["tiny-gpt2", "tiny-llama5"]
    for row in overall.itertuples():
        cells = comparison.frame[(comparison.frame["model"] == row.model) & (comparison.frame["n"] > 1)]
        assert abs(row.mean) == pytest.approx(cells["mean"].abs().max())
    text = comparison.peaks_text()
    assert "tiny-llama5" in text and "[" in text

    figures = comparison.figures()
    assert list(figures) == ["effect (resid_post)"]
    fig = figures["effect (resid_post)"]
    assert "across models" in fig.layout.title.text
    roles = {annotation.text for annotation in fig.layout.annotations}
    assert {"S2", "IO", "END"} <= roles
    assert fig.layout.xaxis.title.text.startswith("relative depth") and fig.layout.yaxis.title.text == "effect (resid_post)"
    # one line per model in each role's panel, at the models' relative depths
    lines = [trace for trace in fig.data if trace.type == "scatter"]
    assert len(lines) == 2 * len(roles)
    assert {tuple(trace.x) for trace in lines} == {(0.0, 0.5, 1.0), (0.0, 0.25, 0.5, 0.75, 1.0)}
    assert all(trace.error_y.array is not None for trace in lines)


def test_command_line_prints_the_peaks_and_writes_a_page(two_runs, tmp_path, capsys):
    gpt2, llama = two_runs
    out = tmp_path / "compare.html"
    assert main(["compare", str(gpt2.path), str(llama.path), "-o", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "effect (resid_post)" in printed and "tiny-gpt2" in printed and "tiny-llama5" in printed
    page = out.read_text()
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:200]) == 1 and "Where each model's effect peaks" in page  # plotly.js once
    assert page.count('class="plotly-graph-div"') == 1


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nnexp: error:")]
    assert len(lines) == 1
    return lines[0]


def test_refusals(two_runs, gpt2_tiny, tmp_path, capsys):
    gpt2, llama = two_runs
    other_sites = nnexp.run(IOIPatching(dataset="classic", sites=("mlp_out",)), gpt2_tiny, out=tmp_path / "mlp",
                            limit=1, figures=False)
    error = _error(["compare", str(gpt2.path), str(other_sites.path)], capsys)
    assert "parameters differ in sites" in error and "resid_post" in error and "mlp_out" in error
    from nnexp_experiments.logit_attribution import LogitLens

    lens = nnexp.run(LogitLens(), gpt2_tiny, out=tmp_path / "lens", limit=1, figures=False)
    assert "different experiments" in _error(["compare", str(gpt2.path), str(lens.path)], capsys)
    assert "not an nnexp results directory" in _error(["compare", str(gpt2.path), str(tmp_path)], capsys)
    assert "same run" in _error(["compare", str(gpt2.path), str(gpt2.path)], capsys)
    assert "at least two" in _error(["compare", str(gpt2.path)], capsys)
    assert "is a folder" in _error(["compare", str(gpt2.path), str(llama.path), "-o", str(tmp_path)], capsys)


def _spec(experiment, model="m1", data=None) -> dict:
    return {"experiment": experiment.spec(), "model": {"name": model, "source": {"kind": "test"}, "dtype": "float32"},
            "data": data or {"kind": "builtin", "experiment": experiment.name, "n_examples": 8}}


@pytest.mark.fast
def test_what_may_differ_between_compared_runs():
    """The model, and the layers and heads numbered in it, may differ; the bootstrap
    settings too (one setting is used for all); nothing else."""
    base = IOIPatching(dataset="classic")
    paths = ["a", "b"]
    check_comparable([_spec(base), _spec(IOIPatching(dataset="classic", layers=(0, 17), heads=(1,), ci=0.9), "m2")],
                     paths)
    with pytest.raises(ResultsError, match=r"parameters differ in metric \(logit_diff vs prob\)"):
        check_comparable([_spec(base), _spec(IOIPatching(dataset="classic", metric="prob"), "m2")], paths)
    with pytest.raises(ResultsError, match="different data"):
        check_comparable([_spec(base, data={"kind": "file", "sha256": "aa", "path": "x", "n_examples": 8}),
                          _spec(base, "m2", data={"kind": "file", "sha256": "bb", "path": "x", "n_examples": 8})], paths)
    # the same data file's content in two places is the same data
    check_comparable([_spec(base, data={"kind": "file", "sha256": "aa", "path": "x", "n_examples": 8}),
                      _spec(base, "m2", data={"kind": "file", "sha256": "aa", "path": "y", "n_examples": 8})], paths)
