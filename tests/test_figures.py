"""Figures: titled, labelled with tokens, written as HTML (and PNG), and drawn by a real browser."""

from __future__ import annotations

import html
import shutil
import subprocess

import pytest

import nnexp
from nnexp.kinds.patching.figures import _site_figure
from nnexp.plotting import group_position_labels, heatmap, png_available
from nnexp_experiments.ioi import classic_ioi
from nnexp_experiments.ioi_patching import IOIPatching

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def classic_run(gpt2_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures") / "run"
    experiment = IOIPatching(dataset="classic", head_positions="each")
    return nnexp.run(experiment, gpt2_tiny, out=out, limit=4)


def test_figure_files_for_examples_and_means(classic_run):
    figures = classic_run.path / "figures"
    for site in ("resid_post", "attn_out", "mlp_out", "head_out"):
        for prefix in ("example-0000", "example-0003", "mean-shops-14-tokens", "mean-park-14-tokens"):
            assert (figures / f"{prefix}-{site}.html").exists(), (prefix, site)
    # head maps with a position axis are averaged per group only
    assert not (figures / "mean-all-head_out.html").exists()
    # plotly.js sits once beside the pages, so they open offline
    assert (figures / "plotly.min.js").stat().st_size > 1_000_000
    assert len(list(classic_run.path.rglob("plotly.min.js"))) == 1
    page = (figures / "example-0000-resid_post.html").read_text()
    assert 'src="plotly.min.js"' in page and "cdn.plot.ly" not in page
    if png_available():
        assert (figures / "example-0000-resid_post.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_has_titles_token_labels_and_centred_scale(classic_run):
    record = classic_run[0]
    fig = _site_figure(IOIPatching(), record["resid_post"], "resid_post", record.tokens, ["about"])
    layout = fig.layout
    assert "Patching the residual stream" in layout.title.text and "logit_diff" in layout.title.text
    assert layout.xaxis.title.text == "position (token)" and layout.yaxis.title.text == "layer"
    assert list(layout.xaxis.ticktext) == record.tokens  # repeated tokens keep their own column
    assert list(layout.yaxis.ticktext) == ["L0", "L1", "L2"]
    trace = fig.data[0]
    assert trace.zmid == 0 and trace.colorscale is not None
    heads = _site_figure(IOIPatching(), record["head_out"], "head_out", record.tokens, ["about"])
    assert len(heads.layout.yaxis.ticktext) == 3 * 4 and heads.layout.yaxis.ticktext[5] == "L1H1"


def test_group_labels_name_the_roles(classic_run):
    shops = [r for r in classic_run if r.info["group"] == "shops"]
    assert len(shops) == 2
    labels = group_position_labels(shops)
    # "When John and Mary went to the shops, <S2> gave the bag to": only S2 differs
    assert labels == ["When", " John", " and", " Mary", " went", " to", " the", " shops", ",", "[S2]", " gave", " the", " bag", " to"]


def test_role_aligned_means_with_intervals_and_summary_csv(classic_run):
    """Over all examples (two templates here), by role, each cell with its interval; the
    run's summary.csv holds the same numbers as results.summary()."""
    import pandas as pd

    figures = classic_run.path / "figures"
    for site in ("resid_post", "attn_out", "mlp_out", "head_out"):
        assert (figures / f"mean-roles-{site}.html").exists(), site
    page = (figures / "mean-roles-resid_post.html").read_text()
    assert "per layer and role" in page and "% CI [" in page
    assert '"S2"' in page and '"END"' in page and '"IO"' in page
    stored = pd.read_csv(classic_run.path / "summary.csv")
    assert list(stored.columns) == ["kind", "measure", "role", "layer", "head", "mean", "lower", "upper", "n"]
    frame = classic_run.summary()
    assert len(stored) == len(frame) and set(stored["measure"]) == {f"effect ({s})" for s in
                                                                    ("resid_post", "attn_out", "mlp_out", "head_out")}
    # two examples of each name order: the range up to S2 follows S1 in one order, IO in the other
    by_role = stored.groupby("role")["n"].agg(set).to_dict()
    assert by_role["S2"] == by_role["END"] == by_role["S1+1"] == by_role["IO+1"] == {4}
    assert by_role["S1+2..S2-1"] == by_role["IO+2..S2-1"] == {2}
    assert (stored["lower"] <= stored["mean"] + 1e-9).all() and (stored["mean"] <= stored["upper"] + 1e-9).all()
    pd.testing.assert_series_equal(stored["mean"], frame["mean"], check_names=False)


def test_nan_cells_are_gaps():
    import torch

    fig = heatmap(torch.tensor([[1.0, float("nan")]]), title="t", x_title="x", y_title="y",
                  x_labels=["a", "b"], y_labels=["c"], colorbar_title="v")
    assert fig.data[0].z[0][1] is None


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt install chromium)")
def test_a_browser_draws_the_figure(classic_run, tmp_path):
    page = classic_run.path / "figures" / "example-0000-resid_post.html"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = html.unescape(result.stdout)
    assert "main-svg" in dom, result.stderr[-2000:]  # plotly rendered its SVG
    assert "Patching the residual stream" in dom
    assert "position (token)" in dom and ">layer<" in dom
    for token in classic_ioi()[0].clean.split()[1:4]:
        assert f">{token}<" in dom.replace("> ", ">"), token  # token tick labels are drawn
    assert "normalised effect" in dom
