"""Bootstrap intervals (`nnexp.statistics`): exact on a known resample set, equal to
scipy's percentile bootstrap, shrinking with n, covering the true mean at the nominal
rate; and the summary table of a run, from stored results without a model."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from nnexp.errors import ConfigError
from nnexp.statistics import (
    bootstrap,
    percentile_interval,
    resample_indices,
    resampled_means,
    summary_csv,
    summary_frame,
    top_findings,
)

pytestmark = pytest.mark.fast


def test_intervals_from_given_resamples_are_exact_percentiles():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0]])
    indices = np.array([[0, 0, 0], [0, 1, 2], [2, 2, 2], [1, 1, 2], [0, 2, 2]])
    # the resampled means of the first cell, by hand
    means = np.array([1.0, 7 / 3, 4.0, 8 / 3, 3.0])
    assert np.allclose(resampled_means(values, indices)[:, 0], means)
    assert np.allclose(resampled_means(values, indices)[:, 1], 10 * means)
    lower, upper = percentile_interval(values, indices, ci=0.5)
    # 25th and 75th percentiles of [1, 7/3, 8/3, 3, 4] (linear interpolation): 7/3 and 3
    assert np.allclose(lower, [7 / 3, 70 / 3]) and np.allclose(upper, [3.0, 30.0])


def test_resample_indices_are_seeded_and_reproducible():
    a, b = resample_indices(7, 200, seed=3), resample_indices(7, 200, seed=3)
    assert a.shape == (200, 7) and a.min() >= 0 and a.max() < 7 and (a == b).all()
    assert not (a == resample_indices(7, 200, seed=4)).all()


def test_equal_to_scipys_percentile_bootstrap():
    """The same draws (scipy draws Generator.integers(0, n, (n_resamples, n)) with the
    Generator it is given) and the same percentiles: the same interval."""
    scipy_stats = pytest.importorskip("scipy.stats")
    data = np.random.default_rng(11).normal(0.3, 1.0, size=(24, 3))
    estimate = bootstrap(data, ci=0.9, n_boot=999, seed=5)
    for cell in range(3):
        ours = (estimate.lower[cell], estimate.upper[cell])
        kwargs = {"confidence_level": 0.9, "n_resamples": 999, "method": "percentile", "vectorized": True}
        try:
            result = scipy_stats.bootstrap((data[:, cell],), np.mean, rng=np.random.default_rng(5), **kwargs)
        except TypeError:  # scipy < 1.15 names the generator random_state
            result = scipy_stats.bootstrap((data[:, cell],), np.mean, random_state=np.random.default_rng(5), **kwargs)
        theirs = (result.confidence_interval.low, result.confidence_interval.high)
        assert np.allclose(ours, theirs, rtol=1e-12, atol=1e-12), (cell, ours, theirs)
    assert np.allclose(estimate.mean, data.mean(0)) and (estimate.n == 24).all()


def test_missing_cells_are_averaged_and_resampled_over_the_examples_that_have_them():
    data = np.random.default_rng(0).normal(size=(20, 2))
    with_gaps = data.copy()
    with_gaps[:5, 1] = np.nan
    estimate = bootstrap(with_gaps, n_boot=500, seed=2)
    alone = bootstrap(data[5:, 1:], n_boot=500, seed=2)  # the cell's 15 examples on their own
    assert estimate.n.tolist() == [20, 15]
    assert np.isclose(estimate.mean[1], data[5:, 1].mean())
    assert np.isclose(estimate.lower[1], alone.lower[0]) and np.isclose(estimate.upper[1], alone.upper[0])
    empty = bootstrap(np.full((4, 1), np.nan), n_boot=100)
    assert empty.n.tolist() == [0] and np.isnan(empty.mean[0]) and np.isnan(empty.lower[0])


def test_intervals_shrink_as_n_grows():
    """Widths (averaged over 200 simulated datasets, as 200 cells) shrink like
    1/sqrt(n): about 2 x 1.96 x sigma / sqrt(n)."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (10, 40, 160, 640):
        estimate = bootstrap(rng.normal(1.0, 2.0, size=(n, 200)), n_boot=1000)
        widths.append(float((estimate.upper - estimate.lower).mean()))
        assert widths[-1] == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(n), rel=0.15), n
    assert all(a > b for a, b in itertools.pairwise(widths)), widths


def test_95_percent_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    """1,000 simulated datasets of 100 examples, as the 1,000 cells of one bootstrap
    (cells are resampled together, like the cells of one patching map)."""
    true_mean = 0.7
    data = np.random.default_rng(2026).normal(true_mean, 1.5, size=(100, 1000))
    estimate = bootstrap(data, ci=0.95, n_boot=2000, seed=9)
    coverage = float(((estimate.lower <= true_mean) & (true_mean <= estimate.upper)).mean())
    assert 0.93 <= coverage <= 0.97, coverage


def test_settings_are_checked_and_labels_kept():
    with pytest.raises(ConfigError, match="ci is 1.5"):
        bootstrap(np.ones((3, 1)), ci=1.5)
    with pytest.raises(ConfigError, match="n_boot is 10"):
        bootstrap(np.ones((3, 1)), n_boot=10)
    import nnexp

    for kind in nnexp.KINDS.names():  # every experiment has them, checked when it is made
        cls = nnexp.KINDS.get(kind)
        with pytest.raises(ConfigError, match=r"ci is 1.5; give the interval's coverage as a share between 0 and 1"):
            cls.from_params({"ci": "1.5"})
        with pytest.raises(ConfigError, match="n_boot is 50; give at least 100"):
            cls.from_params({"n_boot": 50})
    from nnexp.labelled import LabelledTensor

    tensor = LabelledTensor(torch.arange(12.0).reshape(4, 3), ("example", "layer"), {"layer": [0, 2, 5]})
    estimate = bootstrap(tensor)
    assert estimate.dims == ("layer",) and estimate.labels("layer") == [0, 2, 5]
    assert estimate.sel(layer=2).mean == pytest.approx(5.5)
    rows = estimate.rows("patching", "effect", role="S2")
    assert [r["layer"] for r in rows] == [0, 2, 5] and rows[0]["role"] == "S2" and rows[0]["n"] == 4


def test_summary_table_csv_and_top_findings():
    import pandas as pd

    data = np.random.default_rng(3).normal(size=(30, 2, 4))
    data[:, 1, 1:3] += 5.0  # role "S2", layers 1-2: a clear effect
    estimate = bootstrap(data, ("role", "layer"), {"role": ["IO", "S2"], "layer": [0, 1, 2, 3]})
    rows = estimate.rows("patching", "effect (resid_post)")
    frame = summary_frame(rows)
    assert list(frame.columns) == ["kind", "measure", "role", "layer", "head", "mean", "lower", "upper", "n"]
    assert len(frame) == 8 and frame["head"].isna().all() and frame["layer"].tolist() == [0, 1, 2, 3] * 2
    read = pd.read_csv(io.StringIO(summary_csv(rows)))
    assert read["mean"].tolist() == frame["mean"].tolist() and read["role"].tolist() == frame["role"].tolist()
    assert read["head"].isna().all()
    lines = top_findings(rows)
    assert len(lines) == 1 and lines[0].startswith("largest effect (resid_post): S2, layer ")
    assert "n=30" in lines[0] and lines[0].endswith("excludes 0 at layers 1-2")
