"""Roles (`nnexp.roles`) against hand-labelled examples: every IOI template in both
name orders, with and without a BOS token, and facts with and without one; and the
role-aligned average of a patching run's stored records (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnexp.counterfact import Fact
from nnexp.data import PromptPair, tokenize_pair
from nnexp.kinds.facts import tokenize_fact
from nnexp.labelled import LabelledTensor
from nnexp.results import ExampleRecord, Results
from nnexp.roles import align, roles_of, word_roles
from nnexp_experiments.ioi import TEMPLATES, ioi_pair
from nnexp_experiments.ioi_patching import IOIPatching
from tests.helpers import make_gpt2_tokenizer

pytestmark = pytest.mark.fast

# Hand-labelled, per template: the text of the token after the second name (B+1), of
# the range from there to S2 (B+2..S2-1), of the token after S2 (S2+1), of the range
# from there to the last token (S2+2..END-1; None: there is none), and of the last token.
# The first name is always followed by " and", and the words before it are no role.
LABELS = {
    "store": (" went", " to the store,", " gave", " a bottle of milk", " to"),
    "shops": (" went", " to the shops,", " gave", " the bag", " to"),
    "park": (" went", " to the park,", " gave", " the ball", " to"),
    "apple": (" went", " to the shops,", " gave", " an apple", " to"),
    "drink": (" went", " to the park,", " gave", " a drink", " to"),
    "office": (" were", " working at the office,", " handed", " a document", " to"),
    "beach": (" found", " a necklace at the beach.", " gave", " it", " to"),
    "argument": (" had", " a long argument. Afterwards", " said", None, " to"),
}
BEFORE = {"store": "After", "shops": "When", "park": "When", "apple": "When", "drink": "After",
          "office": "While", "beach": "Friends", "argument": "Then,"}


def _record(tokenizer, pair: PromptPair, index: int = 0) -> ExampleRecord:
    return ExampleRecord(index, info=tokenize_pair(tokenizer, pair, index).info())


def _text(record, positions) -> str:
    return "".join(record.tokens[p] for p in positions)


@pytest.mark.parametrize("with_bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("io_first", [True, False], ids=["ABB", "BAB"])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_ioi_roles_of_every_template_and_order(template, io_first, with_bos):
    assert set(LABELS) == set(TEMPLATES), "label every template"
    tokenizer = make_gpt2_tokenizer(with_bos=with_bos)
    record = _record(tokenizer, ioi_pair(template, io="John", s="Mary", io_first=io_first))
    roles = roles_of(record)
    first, second = ("IO", "S1") if io_first else ("S1", "IO")
    after_b, middle, after_s2, rest, end = LABELS[template]
    expected = {first: (" John" if io_first else " Mary"), f"{first}+1": " and",
                second: (" Mary" if io_first else " John"), f"{second}+1": after_b,
                f"{second}+2..S2-1": middle, "S2": " Mary", "S2+1": after_s2, "END": end}
    if rest is not None:
        expected["S2+2..END-1"] = rest
    assert {name: _text(record, positions) for name, positions in roles.items()} == expected
    # in position order, covering every position from the first name on, each once
    covered = [p for positions in roles.values() for p in positions]
    assert covered == list(range(covered[0], len(record.tokens)))
    before = "".join(record.tokens[: covered[0]])
    assert before == ("<|endoftext|>" if with_bos else "") + BEFORE[template]
    assert roles["END"] == [len(record.tokens) - 1]


def test_user_roles_from_a_data_record():
    tokenizer = make_gpt2_tokenizer()
    pair = PromptPair.from_json({"clean": "The cat sat on the mat because the cat was tired", "corrupted":
                                 "The dog sat on the mat because the cat was tired", "answer": " and",
                                 "foil": " but", "roles": {"ANIMAL": " cat", "PLACE": " mat"}}, "pairs.jsonl:1")
    roles = roles_of(_record(tokenizer, pair))
    assert list(roles) == ["ANIMAL1", "ANIMAL1+1", "ANIMAL1+2..PLACE-1", "PLACE", "PLACE+1", "PLACE+2..ANIMAL2-1",
                           "ANIMAL2", "ANIMAL2+1", "END"]
    # The| cat| sat| on| the| mat| because| the| cat| was| tired
    assert roles["ANIMAL1"] == [1] and roles["ANIMAL1+2..PLACE-1"] == [3, 4] and roles["PLACE"] == [5]
    assert roles["PLACE+2..ANIMAL2-1"] == [7] and roles["ANIMAL2"] == [8] and roles["END"] == [10]
    assert word_roles([], {"X": "x"}) == {} and roles_of(ExampleRecord(0, info={"tokens": ["a"]})) == {}


@pytest.mark.parametrize("with_bos", [False, True], ids=["no-bos", "bos"])
def test_fact_roles_with_and_without_bos(with_bos):
    tokenizer = make_gpt2_tokenizer(with_bos=with_bos)
    offset = 1 if with_bos else 0
    # subject "The Eiffel Tower": "The", then " Eiffel" (GPT-2: " E", "iff", "el"), then " Tower"
    fact = Fact("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris", " Rome")
    record = ExampleRecord(0, info=tokenize_fact(tokenizer, fact, 0).info())
    start, end = record.info["subject_tokens"]
    assert start == offset and _text(record, range(start, end)) == "The Eiffel Tower"
    roles = roles_of(record)
    assert _text(record, roles["first subject token"]) == "The"
    assert _text(record, roles["middle subject tokens"]) == " Eiffel"
    assert _text(record, roles["last subject token"]) == " Tower"
    assert _text(record, roles["first subsequent token"]) == " is"
    assert _text(record, roles["further tokens"]) == " located in the city"
    assert _text(record, roles["last token"]) == " of"
    assert all(p >= offset for positions in roles.values() for p in positions)  # BOS is no role
    # a one-token subject right before the last token: no middle, no subsequent tokens
    short = ExampleRecord(1, info=tokenize_fact(tokenizer, Fact("Paris is", "Paris", " a", " the"), 1).info())
    assert list(roles_of(short)) == ["first subject token", "last subject token", "last token"]


def _patching_results(tokenizer) -> Results:
    """Stored-like records of an IOI patching run over every template (different token
    counts), with effect = 1 at S2, 0.5 at END and 0 elsewhere, plus noise."""
    rng = np.random.default_rng(0)
    records = []
    for i, template in enumerate(list(TEMPLATES) * 2):
        pair = ioi_pair(template, io="John", s="Mary", io_first=i % 2 == 0)
        info = tokenize_pair(tokenizer, pair, i).info()
        record = ExampleRecord(i, info=info)
        roles = roles_of(record)
        n = len(info["tokens"])
        effect = torch.zeros(3, n)
        effect[:, roles["S2"]] = 1.0
        effect[:, roles["END"]] = 0.5
        effect += torch.as_tensor(rng.normal(0, 0.05, size=(3, n)), dtype=torch.float32)
        record.tensors["resid_post"] = LabelledTensor(effect, ("layer", "position"),
                                                      {"layer": [0, 1, 2], "position": list(range(n))})
        record.tensors["head_out"] = LabelledTensor(torch.full((3, 2), 0.1 * (i % 3)), ("layer", "head"),
                                                    {"layer": [0, 1, 2], "head": [0, 1]})
        records.append(record)
    experiment = IOIPatching(sites=("resid_post", "head_out"), n_boot=200)
    spec = {"experiment": experiment.spec(), "model": {"name": "gpt2"}, "data": {"n_examples": len(records)}}
    return Results("/nonexistent", spec, records)


def test_role_aligned_average_and_summary_of_mixed_templates():
    results = _patching_results(make_gpt2_tokenizer())
    aligned = align(results.records, "resid_post")
    assert aligned.dims == ("example", "layer", "role") and aligned.shape[0] == 16
    roles = aligned.coords["role"]
    assert {"IO", "S1", "S2", "END", "S2+1"} <= set(roles) and roles.index("S2") < roles.index("END")
    frame = results.summary()
    assert list(frame.columns) == ["kind", "measure", "role", "layer", "head", "mean", "lower", "upper", "n"]
    s2 = frame[(frame["measure"] == "effect (resid_post)") & (frame["role"] == "S2")]
    assert len(s2) == 3 and (s2["n"] == 16).all()
    assert ((s2["mean"] - 1).abs() < 0.05).all() and (s2["lower"] < s2["mean"]).all() and (s2["mean"] < s2["upper"]).all()
    # S2+2..END-1 exists in 14 of the 16 examples (not in the "argument" template's two)
    assert (frame[frame["role"] == "S2+2..END-1"]["n"] == 14).all()
    heads = frame[frame["measure"] == "effect (head_out)"]
    assert len(heads) == 6 and heads["head"].notna().all() and heads["role"].isna().all()
    # a narrower interval with ci=0.5
    narrow = results.summary(ci=0.5)
    assert ((narrow["upper"] - narrow["lower"]) <= (frame["upper"] - frame["lower"]) + 1e-12).all()


def test_role_aligned_patching_figures(tmp_path, monkeypatch):
    from nnexp import plotting
    from nnexp.kinds.patching.figures import patching_figures

    # HTML only: rendering PNGs starts a browser, which the fast tier does not
    monkeypatch.setitem(plotting._png_state, "checked", True)
    monkeypatch.setitem(plotting._png_state, "available", False)

    results = _patching_results(make_gpt2_tokenizer())
    experiment = results.experiment()
    written = patching_figures(experiment, results, tmp_path, max_examples=1)
    names = {path.name for path in written}
    assert {"mean-roles-resid_post.html", "mean-all-head_out.html"} <= names
    page = (tmp_path / "mean-roles-resid_post.html").read_text()
    assert "per layer and role" in page and "95% CI [" in page and "interval contains 0" in page
    assert "S2+1" in page and "END" in page
