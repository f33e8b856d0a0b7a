"""nnexp's patching numbers against the independent plain-hook implementation.

Every patched value, on small random GPT-2 and Llama models, for every site and the
position/head options, single and batched (padded) traces, split traces: max abs
difference <= 1e-4 in float32.
"""

from __future__ import annotations

import pytest
import torch

from nnexp import PatchingExperiment, PromptPair
from nnexp_experiments.ioi import generate_ioi, ioi_pair
from tests.helpers import check_against_reference, nnexp_records

ALL_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_out")


@pytest.mark.parametrize("fixture", ["gpt2_tiny", "llama_tiny"])
def test_every_site_matches_plain_hooks(fixture, request):
    model = request.getfixturevalue(fixture)
    experiment = PatchingExperiment(sites=ALL_SITES)
    examples = [ioi_pair("store", "John", "Mary", io_first=True)]
    records, worst = check_against_reference(model, experiment, examples)
    # the patched values really vary (a broken patch would leave every cell = corrupted)
    values = records[0]["resid_post.patched"].values
    assert values.std() > 1e-3


@pytest.mark.parametrize("fixture", ["gpt2_tiny", "llama_tiny"])
def test_batched_examples_of_different_lengths_match(fixture, request):
    """Several examples of different token lengths share one left-padded trace."""
    model = request.getfixturevalue(fixture)
    experiment = PatchingExperiment(sites=("resid_post", "head_out"), layers=(0, -1))
    examples = generate_ioi(4, seed=3)
    lengths = {len(model.tokenizer(e.clean).input_ids) for e in examples}
    assert len(lengths) > 1, "the examples should need padding"
    check_against_reference(model, experiment, examples, per_trace=4)


def test_split_traces_equal_one_trace(gpt2_tiny):
    experiment = PatchingExperiment(sites=("resid_post", "mlp_out", "head_out"))
    examples = generate_ioi(3, seed=1)
    whole = nnexp_records(gpt2_tiny, experiment, examples, per_trace=3)
    split = nnexp_records(gpt2_tiny, experiment, examples, per_trace=3, max_rows=7)
    for a, b in zip(whole, split):
        # Different batch composition (and padding) moves float32 results by rounding only.
        for site in experiment.sites:
            assert torch.allclose(a[f"{site}.patched"].values, b[f"{site}.patched"].values, atol=1e-5), site
    check_against_reference(gpt2_tiny, experiment, examples, max_rows=7)


def test_position_and_head_options(llama_tiny):
    experiment = PatchingExperiment(
        sites=("attn_out", "head_out"), positions=[0, -1, 9], head_positions="each",
        layers=(1, 2), heads=(3, 0),
    )
    records, _ = check_against_reference(llama_tiny, experiment, [ioi_pair("park", "Tom", "James", io_first=False)])
    assert records[0]["head_out"].dims == ("layer", "head", "position")
    assert records[0]["head_out"].coords["head"] == [3, 0]
    experiment = PatchingExperiment(sites=("resid_pre", "mlp_out"), positions="all", head_positions="all")
    records, _ = check_against_reference(llama_tiny, experiment, [ioi_pair("park", "Tom", "James", io_first=False)])
    assert records[0]["mlp_out"].dims == ("layer",)


@pytest.mark.parametrize("metric", ["logit", "log_prob", "prob", "prob_diff"])
def test_metrics(gpt2_tiny, metric):
    experiment = PatchingExperiment(sites=("resid_post",), layers=(1,), metric=metric)
    check_against_reference(gpt2_tiny, experiment, [ioi_pair("shops", "Dan", "Sid", io_first=True)])


def test_patching_identical_prompts_gives_nan_effect_not_a_number(gpt2_tiny):
    """clean == corrupted: the normalised effect is undefined and says so (NaN), raw values stay."""
    pair = PromptPair(clean="When Tom and James went", corrupted="When Tom and James went", answer=" to", foil=" home")
    records = nnexp_records(gpt2_tiny, PatchingExperiment(sites=("resid_post",)), [pair])
    assert torch.isnan(records[0]["resid_post"].values).all()
    assert torch.isfinite(records[0]["resid_post.patched"].values).all()


def test_skipping_the_shared_prefix_changes_no_number(llama_tiny):
    """Cells before the first differing token are exact no-ops, so not running them is exact."""
    example = [ioi_pair("office", "Kate", "Mark", io_first=False)]
    skipped = PatchingExperiment(sites=("resid_post", "attn_out", "head_out"), head_positions="each")
    computed = PatchingExperiment(sites=("resid_post", "attn_out", "head_out"), head_positions="each", skip_shared_prefix=False)
    a = nnexp_records(llama_tiny, skipped, example)[0]
    b = nnexp_records(llama_tiny, computed, example)[0]
    compiled = skipped.compile(llama_tiny)
    item = compiled.prepare(example[0], 0)
    assert len(item.run_cells) < len(item.cells) * 0.7  # S2 sits past the middle of this prompt
    for name in a.tensors:
        assert torch.allclose(a[name].values, b[name].values, atol=1e-5), name
    check_against_reference(llama_tiny, computed, example)


def test_a_users_site_and_metric_from_the_command_line(tmp_path, tiny_gpt2_folder):
    """The README's plugin (a metric and a site of one's own) through `--include`: the
    site (GPT-2's block input, read at its first norm) patches exactly as resid_pre does
    in the hook reference, under the user's metric."""
    import re

    from nnexp.cli import main
    from nnexp.models import load_model
    from nnexp.store import load_results
    from tests.helpers import PATCHING_TOL, REPO
    from tests.reference import patching_sweep

    readme = (REPO / "README.md").read_text()
    [plugin] = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "register_site(" in b]
    (tmp_path / "my_metrics.py").write_text(plugin)
    out = tmp_path / "run"
    code = main(["run", "ioi-patching", "--include", str(tmp_path / "my_metrics.py"), "--model", str(tiny_gpt2_folder),
                 "--sites", "ln1_in", "--metric", "answer_over_mean", "--limit", "1", "--out", str(out),
                 "--no-figures", "--quiet"])
    assert code == 0
    record = load_results(out)[0]
    model = load_model(str(tiny_gpt2_folder))
    ref = patching_sweep(model.hf, record.info["clean_ids"], record.info["corrupted_ids"], record.info["answer_id"],
                         record.info["foil_id"], sites=("resid_pre",), layers=range(model.arch.n_layers),
                         metric="answer_over_mean")
    assert abs(record.scalars["clean"] - ref["clean"]) <= PATCHING_TOL
    assert (record["ln1_in.patched"].values - ref["resid_pre"]).abs().max() <= PATCHING_TOL
    assert record["ln1_in.patched"].values.std() > 1e-3  # the patch changes something
