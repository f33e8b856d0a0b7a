"""CounterFact data: the built-in set, local files (flat and ROME's nested records),
datasets through `datasets`, malformed input, and locating the subject's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nnexp.counterfact import HUB_DATASET, Fact, builtin_facts, load_counterfact, load_facts
from nnexp.errors import DataError
from nnexp.subject import subject_span
from tests.helpers import REPO, make_gpt2_tokenizer

FLAT = {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_true": " French", "target_false": " English", "relation_id": "P103", "case_id": 0,
        "relation": "The mother tongue of {} is"}
ROME = {"case_id": 1, "pararel_idx": 2796, "requested_rewrite": {
    "prompt": "{}, that was created by", "relation_id": "P176", "subject": "Toyota Camry",
    "target_new": {"str": "Nissan", "id": "Q20165"}, "target_true": {"str": "Toyota", "id": "Q53268"}},
    "paraphrase_prompts": ["..."]}


def test_the_builtin_set():
    facts = builtin_facts()
    assert len(facts) >= 60
    assert len({f.relation_id for f in facts}) >= 8
    assert len({(f.prompt, f.target_true) for f in facts}) == len(facts)  # no duplicates
    for fact in facts:
        assert fact.subject in fact.prompt and fact.target_true.startswith(" ") and fact.target_true != fact.target_false
    assert load_counterfact("builtin") == facts


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_builtin_targets_are_single_tokens_for_both_builtin_models(alias):
    from transformers import AutoTokenizer

    from nnexp.kinds.facts import tokenize_fact
    from nnexp.models.aliases import alias_folder

    tokenizer = AutoTokenizer.from_pretrained(alias_folder(alias))
    for i, fact in enumerate(builtin_facts()):
        tokenized = tokenize_fact(tokenizer, fact, i)  # raises on a multi-token target
        start, end = tokenized.subject
        assert fact.subject.strip() in tokenizer.decode(tokenized.ids[start:end]).strip(), fact


def test_flat_and_rome_records_from_files(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(FLAT) + "\n\n" + json.dumps(ROME) + "\n")
    flat, rome = load_facts(path)
    assert flat == Fact(FLAT["prompt"], "Danielle Darrieux", " French", " English", "P103", 0,
                        {"relation": "The mother tongue of {} is"})
    assert rome.prompt == "Toyota Camry, that was created by" and rome.subject == "Toyota Camry"
    assert (rome.target_true, rome.target_false, rome.relation_id) == (" Toyota", " Nissan", "P176")
    array = tmp_path / "facts.json"
    array.write_text(json.dumps([FLAT, ROME]))
    assert load_counterfact(str(array)) == [flat, rome]
    assert Fact.from_json(flat.to_json(), "again") == flat


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x is", "subject": "x"}, r"missing field\(s\) target_true, target_false"),
    ({**FLAT, "subject": "Marie Curie"}, "the subject 'Marie Curie' does not occur in the prompt"),
    ({**FLAT, "prompt": FLAT["prompt"] + " "}, "ends with whitespace"),
    ({**FLAT, "target_false": " French"}, "both ' French'"),
    ({**FLAT, "target_true": 3}, "field 'target_true' must be a non-empty string"),
    ({"requested_rewrite": {"prompt": "The capital of France is", "subject": "France", "target_true": {"str": "Paris"},
                            "target_new": {"str": "Rome"}}}, "has no '{}' where the subject goes"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_malformed_records_say_what_is_wrong(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FLAT) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*" + message):
        load_facts(path)


def test_malformed_files(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(FLAT) + "\n{not json\n")
    with pytest.raises(DataError, match="broken.jsonl:2: not valid JSON"):
        load_facts(path)
    with pytest.raises(DataError, match="does not exist"):
        load_facts(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="holds no records; it needs one CounterFact record per line"):
        load_facts(empty)


def test_a_dataset_through_the_datasets_library(tmp_path):
    """The hub path, on a local dataset folder with counterfact-tracing's columns."""
    import datasets

    folder = tmp_path / "counterfact-tracing"
    folder.mkdir()
    rows = [dict(FLAT, target_true_id=[5], target_false_id=[6]),
            {**FLAT, "prompt": "Toyota Camry, that was created by", "subject": "Toyota Camry", "target_true": " Toyota",
             "target_false": " Nissan", "relation_id": "P176", "case_id": 1, "relation": "{}, that was created by",
             "target_true_id": [7], "target_false_id": [8]}]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train.parquet"))
    facts = load_counterfact(str(folder))
    assert [f.subject for f in facts] == ["Danielle Darrieux", "Toyota Camry"]
    assert facts[1].target_true == " Toyota" and facts[1].meta["target_true_id"] == [7]


def test_an_unreachable_hub_is_a_clear_error():
    code = "from nnexp.counterfact import load_counterfact\nload_counterfact('hub')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode != 0
    assert f"could not load the CounterFact dataset '{HUB_DATASET}'" in result.stderr
    assert "use the built-in set (dataset=builtin) or a local JSON/JSONL file (--data FILE)" in result.stderr


@pytest.mark.parametrize("with_bos", [False, True])
def test_subject_span_with_and_without_bos(with_bos):
    tokenizer = make_gpt2_tokenizer(with_bos=with_bos)
    prompt = "The mother tongue of Danielle Darrieux is"
    ids = tokenizer(prompt).input_ids
    start, end = subject_span(tokenizer, prompt, ids, "Danielle Darrieux", "example 0")
    assert tokenizer.decode(ids[start:end]) == " Danielle Darrieux"
    assert (start, end) == ((5, 9) if with_bos else (4, 8))
    first = "Toyota Camry, that was created by"
    ids = tokenizer(first).input_ids
    start, end = subject_span(tokenizer, first, ids, "Toyota Camry", "example 1")
    assert start == int(with_bos) and tokenizer.decode(ids[start:end]) == "Toyota Camry"
    with pytest.raises(DataError, match="example 2: the subject 'Marie Curie' does not occur in the prompt"):
        subject_span(tokenizer, prompt, tokenizer(prompt).input_ids, "Marie Curie", "example 2")
