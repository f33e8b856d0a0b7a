"""CounterFact facts: a subject, a prompt that ends where the attribute should come,
the true attribute and a false one (Meng et al. 2022).

Three sources, one record type (`Fact`):

- the built-in set (`"builtin"`): 105 facts over 9 relations written for nnexp, whose
  targets are single tokens for both built-in models (SmolLM2, Gemma 3); works offline;
- the Hugging Face Hub (`"hub"`, i.e. `NeelNanda/counterfact-tracing`, or any dataset
  id or local dataset folder with the same fields) through `datasets`;
- a local JSON or JSON Lines file.

Records may be flat, as in `NeelNanda/counterfact-tracing`:

    {"prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
     "target_true": " French", "target_false": " English", "relation_id": "P103", ...}

or nested, as in ROME's `counterfact.json`:

    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is",
     "subject": "Danielle Darrieux", "target_true": {"str": "French"},
     "target_new": {"str": "English"}, "relation_id": "P103"}, ...}

Targets are continuations of the prompt: one without leading whitespace gets a space
(ROME's files store "French" for " French"). Other fields are kept in `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import load_examples
from .errors import DataError

BUILTIN_FILE = Path(__file__).parent / "builtin_data" / "counterfact.jsonl"
HUB_DATASET = "NeelNanda/counterfact-tracing"
FACT_FIELDS = ("prompt", "subject", "target_true", "target_false")


@dataclass(frozen=True)
class Fact:
    prompt: str
    subject: str
    target_true: str
    target_false: str
    relation_id: str | None = None
    case_id: int | str | None = None
    meta: dict = field(default_factory=dict)
    # where the record was read ("facts.jsonl:12", "dataset[train] row 7"); not part of
    # the fact's identity
    source: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        record = {name: getattr(self, name) for name in FACT_FIELDS}
        if self.relation_id is not None:
            record["relation_id"] = self.relation_id
        if self.case_id is not None:
            record["case_id"] = self.case_id
        record.update(self.meta)
        return record

    @classmethod
    def from_json(cls, record, where: str) -> Fact:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object with fields prompt, subject, target_true, target_false; "
                f"got {type(record).__name__}"
            )
        if "requested_rewrite" in record:
            return cls._from_rome(record, where)
        missing = [name for name in FACT_FIELDS if name not in record]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}; a CounterFact record needs prompt, subject, "
                "target_true and target_false (or ROME's nested requested_rewrite form)"
            )
        values = {name: _text(record[name], name, where) for name in FACT_FIELDS}
        meta = {k: v for k, v in record.items() if k not in FACT_FIELDS + ("relation_id", "case_id")}
        return cls._checked(values, record.get("relation_id"), record.get("case_id"), meta, where)

    @classmethod
    def _from_rome(cls, record: dict, where: str) -> Fact:
        rewrite = record["requested_rewrite"]
        if not isinstance(rewrite, dict):
            raise DataError(f"{where}: 'requested_rewrite' must be an object, got {type(rewrite).__name__}")
        missing = [n for n in ("prompt", "subject", "target_true", "target_new") if n not in rewrite]
        if missing:
            raise DataError(f"{where}: requested_rewrite is missing field(s) {', '.join(missing)}")
        template = _text(rewrite["prompt"], "requested_rewrite.prompt", where)
        if "{}" not in template:
            raise DataError(f"{where}: requested_rewrite.prompt {template!r} has no '{{}}' where the subject goes")
        subject = _text(rewrite["subject"], "requested_rewrite.subject", where)
        values = {
            "prompt": template.replace("{}", subject),
            "subject": subject,
            "target_true": _text(_str_field(rewrite["target_true"]), "requested_rewrite.target_true", where),
            "target_false": _text(_str_field(rewrite["target_new"]), "requested_rewrite.target_new", where),
        }
        meta = {"relation": template}
        return cls._checked(values, rewrite.get("relation_id"), record.get("case_id"), meta, where)

    @classmethod
    def _checked(cls, values: dict, relation_id, case_id, meta: dict, where: str) -> Fact:
        prompt, subject = values["prompt"], values["subject"]
        if subject not in prompt:
            raise DataError(
                f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}; the subject's "
                "tokens are located by finding it in the prompt, so it must appear there exactly"
            )
        if prompt != prompt.rstrip():
            raise DataError(
                f"{where}: the prompt {prompt!r} ends with whitespace; end it at the last word and put the "
                "space at the start of the targets (' Paris')"
            )
        targets = {k: v if v[:1].isspace() else " " + v for k, v in values.items() if k.startswith("target")}
        if targets["target_true"] == targets["target_false"]:
            raise DataError(f"{where}: target_true and target_false are both {targets['target_true']!r}")
        return cls(prompt, subject, targets["target_true"], targets["target_false"], relation_id, case_id, meta, where)


def _text(value, name: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _str_field(value):
    # ROME stores targets as {"str": "French", "id": "Q150"}
    return value.get("str") if isinstance(value, dict) else value


def load_facts(path) -> list[Fact]:
    """Facts from a local JSON Lines file or JSON array (flat or ROME records)."""
    return load_examples(path, Fact.from_json, "CounterFact record")


def builtin_facts() -> list[Fact]:
    """The built-in offline set (single-token targets for SmolLM2 and Gemma 3)."""
    return load_facts(BUILTIN_FILE)


def hub_facts(dataset: str = HUB_DATASET, split: str = "train") -> list[Fact]:
    """Facts from a Hugging Face dataset (id or local dataset folder) via `datasets`."""
    import datasets

    try:
        rows = datasets.load_dataset(dataset, split=split)
    except Exception as error:  # datasets raises many types for "not reachable" and "not found"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"could not load the CounterFact dataset {dataset!r} (split {split!r}) through `datasets`: "
            f"{first_line}. Without access to the Hugging Face Hub use the built-in set "
            "(dataset=builtin) or a local JSON/JSONL file (--data FILE)"
        ) from None
    facts = [Fact.from_json(dict(row), f"{dataset}[{split}] row {i}") for i, row in enumerate(rows)]
    if not facts:
        raise DataError(f"the dataset {dataset!r} (split {split!r}) holds no records")
    return facts


def load_counterfact(source: str = "builtin", split: str = "train") -> list[Fact]:
    """Facts from "builtin", "hub" (NeelNanda/counterfact-tracing), a local JSON/JSONL
    file, or another Hugging Face dataset id or dataset folder."""
    if source == "builtin":
        return builtin_facts()
    if source == "hub":
        return hub_facts(HUB_DATASET, split)
    path = Path(source)
    if path.is_file():
        return load_facts(path)
    return hub_facts(source, split)
