"""Examples for single-prompt experiments: a prompt, an answer and a foil.

Logit attribution reads one run per example, so an example is one prompt and the
two tokens whose logit difference is explained. A JSON Lines file has one record
per line:

    {"prompt": "When John and Mary went to the shops, Mary gave the bag to", "answer": " John", "foil": " Mary"}

"clean" is accepted in place of "prompt", so a patching data file (clean/corrupted
pairs) can be reused as it is; its "corrupted" field is then kept in `meta` and not
used. Optional fields "group" and "roles" mean what they mean for pairs
(`nnexp.data`); anything else is kept in `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import (PromptPair, answer_and_foil_tokens, example_location, group_and_roles, load_examples, record_json,
                   token_strings)
from .errors import DataError

PROMPT_FIELDS = ("prompt", "answer", "foil")


@dataclass(frozen=True)
class Prompt:
    prompt: str
    answer: str
    foil: str
    group: str | None = None
    roles: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # where the record was read ("prompts.jsonl:12"); not part of the example's identity
    source: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return record_json(self, PROMPT_FIELDS)

    @classmethod
    def from_pair(cls, pair: PromptPair) -> Prompt:
        """The clean prompt of a patching pair (the corrupted prompt is kept in meta)."""
        return cls(pair.clean, pair.answer, pair.foil, pair.group, dict(pair.roles),
                   {"corrupted": pair.corrupted, **pair.meta}, pair.source)

    @classmethod
    def from_json(cls, record, where: str) -> Prompt:
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object with fields prompt (or clean), answer, foil; "
                f"got {type(record).__name__}"
            )
        key = "prompt" if "prompt" in record else "clean" if "clean" in record else None
        missing = ([] if key else ["prompt (or clean)"]) + [n for n in ("answer", "foil") if n not in record]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}; each record needs prompt (or clean), "
                "answer and foil"
            )
        for name in (key, "answer", "foil"):
            if not isinstance(record[name], str) or not record[name]:
                raise DataError(f"{where}: field {name!r} must be a non-empty string, got {record[name]!r}")
        group, roles = group_and_roles(record, where)
        meta = {k: v for k, v in record.items() if k not in (key, "answer", "foil", "group", "roles")}
        return cls(record[key], record["answer"], record["foil"], group, roles, meta, where)


def load_prompts(path) -> list[Prompt]:
    """Read `Prompt`s from a JSON Lines file (or a JSON array of records)."""
    return load_examples(path, Prompt.from_json)


@dataclass
class TokenizedPrompt:
    """A validated prompt in token ids, with display strings for each position."""

    index: int
    prompt: Prompt
    ids: list[int]
    answer_id: int
    foil_id: int
    tokens: list[str]

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def info(self) -> dict:
        return {
            "index": self.index,
            **self.prompt.to_json(),
            "ids": self.ids,
            "answer_id": self.answer_id,
            "foil_id": self.foil_id,
            "tokens": self.tokens,
        }


def tokenize_prompt(tokenizer, prompt: Prompt, index: int) -> TokenizedPrompt:
    where = example_location(prompt, index)
    ids = tokenizer(prompt.prompt).input_ids
    answer_id, foil_id = answer_and_foil_tokens(tokenizer, prompt.prompt, ids, prompt.answer, prompt.foil, where)
    return TokenizedPrompt(index, prompt, ids, answer_id, foil_id, token_strings(tokenizer, ids))
