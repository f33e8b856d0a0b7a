"""IOI data, data files and tokenisation: what is generated, and every bad input's error."""

from __future__ import annotations

import json
import re

import pytest

from nnexp import DataError, PromptPair, load_prompt_pairs
from nnexp.counterfact import load_facts
from nnexp.data import tokenize_pair
from nnexp.kinds.facts import tokenize_fact
from nnexp.prompts import load_prompts, tokenize_prompt
from nnexp_experiments.ioi import NAMES, TEMPLATES, classic_ioi, generate_ioi
from tests.helpers import make_gpt2_tokenizer

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def tok():
    return make_gpt2_tokenizer()


def test_generator_is_seeded_and_extends(tok):
    a = generate_ioi(12, seed=5)
    assert a == generate_ioi(12, seed=5)
    assert generate_ioi(20, seed=5)[:12] == a  # example i depends only on (seed, i)
    assert a != generate_ioi(12, seed=6)
    assert len({p.meta["template"] for p in generate_ioi(64, seed=0)}) == len(TEMPLATES)


def test_corrupted_swaps_the_second_subject():
    for pair in generate_ioi(30, seed=1) + classic_ioi():
        io, s = pair.answer.strip(), pair.foil.strip()
        assert pair.clean.count(s) == 2 and pair.clean.count(io) == 1
        # corrupted = clean with the last mention of S replaced by IO
        head, _, tail = pair.clean.rpartition(s)
        assert pair.corrupted == head + io + tail
        assert pair.roles == {"IO": pair.answer, "S": pair.foil}


def test_classic_set_is_transformerlens_walkthrough():
    prompts = [(p.clean, p.answer) for p in classic_ioi()]
    assert ("When John and Mary went to the shops, John gave the bag to", " Mary") in prompts
    assert ("When John and Mary went to the shops, Mary gave the bag to", " John") in prompts
    assert ("After Martin and Amy went to the park, Amy gave a drink to", " Martin") in prompts
    assert len(prompts) == 8


def test_names_are_single_tokens_and_pairs_align(tok):
    for name in NAMES:
        assert len(tok(" " + name).input_ids) == 1, name
    for i, pair in enumerate(generate_ioi(40, seed=2)):
        tp = tokenize_pair(tok, pair, i)
        assert len(tp.clean_ids) == len(tp.corrupted_ids)
        differing = [p for p, (a, b) in enumerate(zip(tp.clean_ids, tp.corrupted_ids)) if a != b]
        assert len(differing) == 1  # only S2 differs
        assert tp.answer_id == tok(pair.answer).input_ids[0]


def write(tmp_path, text, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = {"clean": "When Tom and James went to the park, James gave the ball to",
        "corrupted": "When Tom and James went to the park, Tom gave the ball to",
        "answer": " Tom", "foil": " James"}


def test_jsonl_and_json_array_load(tmp_path):
    pairs = load_prompt_pairs(write(tmp_path, json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "group": "g", "note": 1}) + "\n"))
    assert pairs[0] == PromptPair(**GOOD)
    assert pairs[1].group == "g" and pairs[1].meta == {"note": 1}
    assert load_prompt_pairs(write(tmp_path, json.dumps([GOOD]), "data.json")) == [PromptPair(**GOOD)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "is empty"),
        ("   \n\n", "is empty"),
        ('{"clean": "a", \n', ":1: not valid JSON"),
        (json.dumps(GOOD) + "\n{oops}\n", ":2: not valid JSON"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "foil"}), "missing field(s) foil"),
        (json.dumps({**GOOD, "answer": 3}), "field 'answer' must be a non-empty string"),
        (json.dumps({**GOOD, "clean": ""}), "field 'clean' must be a non-empty string"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({**GOOD, "roles": ["IO"]}), "field 'roles' must map role names to strings"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, text, expected):
    with pytest.raises(DataError) as error:
        load_prompt_pairs(write(tmp_path, text))
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompt_pairs(tmp_path / "nope.jsonl")


def test_different_token_lengths_are_refused(tok):
    pair = PromptPair(clean=GOOD["clean"], corrupted=GOOD["corrupted"].replace("Tom gave", "Christopherson gave"),
                      answer=" Tom", foil=" James")
    with pytest.raises(DataError) as error:
        tokenize_pair(tok, pair, 7)
    message = str(error.value)
    assert "example 7" in message and "same length" in message and "tokens" in message


def test_multi_token_answer_is_refused(tok):
    with pytest.raises(DataError) as error:
        tokenize_pair(tok, PromptPair(**{**GOOD, "answer": " Christopherson"}), 0)
    assert "answer ' Christopherson' is" in str(error.value) and "one token" in str(error.value)
    with pytest.raises(DataError, match="foil"):
        tokenize_pair(tok, PromptPair(**{**GOOD, "foil": " Zzyzxwv"}), 0)


def test_answer_equal_to_foil_is_refused(tok):
    with pytest.raises(DataError, match="same token"):
        tokenize_pair(tok, PromptPair(**{**GOOD, "foil": " Tom"}), 0)


def test_answer_merging_with_prompt_is_refused(tok):
    pair = PromptPair(clean=GOOD["clean"] + " ", corrupted=GOOD["corrupted"] + " ", answer="Tom", foil="James")
    with pytest.raises(DataError, match="merges with the end of the prompt"):
        tokenize_pair(tok, pair, 0)


# -- token-level errors name the file and line of the record (issue 20) --------------------


def test_pair_errors_name_file_and_line(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "answer": " Christopherson"}) + "\n")
    pairs = load_prompt_pairs(path)
    tokenize_pair(tok, pairs[0], 0)
    with pytest.raises(DataError) as error:
        tokenize_pair(tok, pairs[1], 1)
    message = str(error.value)
    assert message.startswith(f"{path}:3: the answer ' Christopherson' is"), message
    assert "example 1" not in message


def test_prompt_errors_name_file_and_line(tmp_path, tok):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "answer": " Paris", "foil": " Paris"}) + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: answer ' Paris' and foil ' Paris' are the same token"):
        tokenize_prompt(tok, load_prompts(path)[0], 0)


def test_fact_errors_name_file_and_line(tmp_path, tok):
    path = tmp_path / "facts.jsonl"
    records = [{"prompt": "The capital of France is", "subject": "France", "target_true": " Paris",
                "target_false": " Rome"},
               {"prompt": "The capital of Vietnam is", "subject": "Vietnam", "target_true": " Hanoi",
                "target_false": " Bangkok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    facts = load_facts(path)
    tokenize_fact(tok, facts[0], 0)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: the target_true ' Hanoi' is 3 tokens"):
        tokenize_fact(tok, facts[1], 1)


def test_examples_not_from_a_file_are_named_by_index(tok):
    with pytest.raises(DataError, match="^example 7: the answer"):
        tokenize_pair(tok, PromptPair(**{**GOOD, "answer": " Christopherson"}), 7)


def test_the_source_is_not_part_of_an_example(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    (pair,) = load_prompt_pairs(path)
    assert pair == PromptPair(**GOOD) and pair.to_json() == GOOD


@pytest.mark.parametrize("what, record", [("answer", {"answer": " Christopherson"}),
                                          ("foil", {"foil": " Christopherson"})])
def test_multi_token_errors_read_as_english(tok, what, record):
    """The multi-token error read "choose a answer"."""
    with pytest.raises(DataError) as error:
        tokenize_pair(tok, PromptPair(**{**GOOD, **record}), 0)
    message = str(error.value)
    assert "a answer" not in message and f"so the {what} must be one token" in message, message
