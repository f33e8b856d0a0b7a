"""Examples for contrastive experiments: clean/corrupted prompt pairs, files, tokens.

A `PromptPair` is one example of a patching experiment: a clean prompt, a corrupted
prompt of the same token length, and the answer and foil tokens whose logit
difference is measured. They come from a generator (see `experiments/`) or from a
JSON Lines file with one record per line:

    {"clean": "...", "corrupted": "...", "answer": " John", "foil": " Mary"}

An example read from a file remembers where (`source`, "pairs.jsonl:12"), so that an
error found later, when it is tokenised, names the line to fix.

Optional fields: "group" (examples of one group share token structure and are
averaged together in figures) and "roles" (a map from role name to the word that
plays it, e.g. {"IO": " John", "S": " Mary"}, used to label positions whose tokens
vary within a group). Any other fields are kept in `meta`.

`tokenize_pair` turns a pair into token ids and checks everything a patching run
relies on, so bad data fails before any compute with an error naming the example.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

PAIR_FIELDS = ("clean", "corrupted", "answer", "foil")


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    answer: str
    foil: str
    group: str | None = None
    roles: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # where the record was read ("pairs.jsonl:12"); not part of the example's identity
    source: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return record_json(self, PAIR_FIELDS)

    @classmethod
    def from_json(cls, record, where: str) -> PromptPair:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with fields {', '.join(PAIR_FIELDS)}, got {type(record).__name__}")
        missing = [name for name in PAIR_FIELDS if name not in record]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}; each record needs "
                f"{', '.join(PAIR_FIELDS)}"
            )
        for name in PAIR_FIELDS:
            if not isinstance(record[name], str) or not record[name]:
                raise DataError(f"{where}: field {name!r} must be a non-empty string, got {record[name]!r}")
        group, roles = group_and_roles(record, where)
        meta = {k: v for k, v in record.items() if k not in PAIR_FIELDS + ("group", "roles")}
        return cls(
            clean=record["clean"],
            corrupted=record["corrupted"],
            answer=record["answer"],
            foil=record["foil"],
            group=group,
            roles=roles,
            meta=meta,
            source=where,
        )


def example_location(example, index: int) -> str:
    """Where an example is, for an error: the file and line it was read from
    ("pairs.jsonl:12"), or its index when it was not read from a file."""
    return getattr(example, "source", None) or f"example {index}"


def record_json(example, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """An example (pair, prompt, intervention example) as its JSON record: `fields`, then
    those of `optional` that are set (not None, not empty), then group and roles when set,
    then meta. Tuples become lists and dicts copies, so the record is plain JSON data."""
    record = {name: getattr(example, name) for name in fields}
    for name in optional + ("group", "roles"):
        value = getattr(example, name)
        if value is not None and (not isinstance(value, (tuple, list, dict)) or value):
            record[name] = dict(value) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else value
    record.update(example.meta)
    return record


def group_and_roles(record: dict, where: str) -> tuple[str | None, dict]:
    """The optional "group" and "roles" fields of a record, validated."""
    group = record.get("group")
    if group is not None and not isinstance(group, str):
        raise DataError(f"{where}: field 'group' must be a string, got {group!r}")
    roles = record.get("roles") or {}
    if not isinstance(roles, dict) or not all(isinstance(v, str) for v in roles.values()):
        raise DataError(f"{where}: field 'roles' must map role names to strings, got {roles!r}")
    return group, roles


def read_records(path) -> list[tuple[str, object]]:
    """Records of a JSON Lines file (or a JSON array), each with where it came from."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass the path of a JSON Lines file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text; save it as UTF-8 JSON Lines") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty; it needs one JSON record per line")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); fix the file") from None
        return [(f"{path} item {i}", record) for i, record in enumerate(records)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{lineno}: not valid JSON ({error.msg}, column {error.colno}); "
                "each line must be one JSON object"
            ) from None
    return out


def load_examples(path, from_json, what: str = "JSON record") -> list:
    """Every record of a data file parsed by `from_json(record, where)`; an empty file is an error."""
    examples = [from_json(record, where) for where, record in read_records(path)]
    if not examples:
        raise DataError(f"data file {path} holds no records; it needs one {what} per line")
    return examples


def load_prompt_pairs(path) -> list[PromptPair]:
    """Read `PromptPair`s from a JSON Lines file (or a JSON array of records)."""
    return load_examples(path, PromptPair.from_json)


def file_fingerprint(path) -> dict:
    data = Path(path).read_bytes()
    return {"path": str(Path(path).resolve()), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class TokenizedPair:
    """A validated pair in token ids, with display strings for each position."""

    index: int
    pair: PromptPair
    clean_ids: list[int]
    corrupted_ids: list[int]
    answer_id: int
    foil_id: int
    tokens: list[str]
    corrupted_tokens: list[str]

    @property
    def n_tokens(self) -> int:
        return len(self.clean_ids)

    def info(self) -> dict:
        """JSON-ready description stored with this example's results."""
        return {
            "index": self.index,
            **self.pair.to_json(),
            "clean_ids": self.clean_ids,
            "corrupted_ids": self.corrupted_ids,
            "answer_id": self.answer_id,
            "foil_id": self.foil_id,
            "tokens": self.tokens,
            "corrupted_tokens": self.corrupted_tokens,
        }


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own, as it reads in the text (" John", not "ĠJohn")."""
    return [tokenizer.decode([i]) for i in ids]


class MultiTokenError(DataError):
    """An answer or target that is not one next token."""


def continuation_token(tokenizer, prompt: str, prompt_ids: list[int], text: str, what: str, where: str) -> int:
    """The single token that `text` adds after `prompt`, or a DataError saying why not.

    Tokenising prompt + text and taking what follows the prompt's own tokens gives the
    token the model would actually see next (" John" after "to" is one token in a BPE
    vocabulary, "▁John" in a SentencePiece one) without guessing about spaces.
    """
    full = tokenizer(prompt + text).input_ids
    if full[: len(prompt_ids)] != prompt_ids:
        raise DataError(
            f"{where}: the {what} {text!r} merges with the end of the prompt when tokenised, so it "
            "is not a separate next token; move spaces into the start of the answer (' John') "
            "and end the prompt without a trailing space"
        )
    added = full[len(prompt_ids):]
    if len(added) != 1:
        pieces = token_strings(tokenizer, added)
        raise MultiTokenError(
            f"{where}: the {what} {text!r} is {len(added)} tokens {pieces} for this tokenizer; "
            f"the metric compares single next tokens, so the {what} must be one token"
        )
    return added[0]


def answer_and_foil_tokens(tokenizer, prompt: str, prompt_ids: list[int], answer: str, foil: str, where: str,
                           names: tuple[str, str] = ("answer", "foil")) -> tuple[int, int]:
    """The single next tokens of the two texts a metric compares; they must differ."""
    answer_id = continuation_token(tokenizer, prompt, prompt_ids, answer, names[0], where)
    foil_id = continuation_token(tokenizer, prompt, prompt_ids, foil, names[1], where)
    if answer_id == foil_id:
        raise DataError(
            f"{where}: {names[0]} {answer!r} and {names[1]} {foil!r} are the same token, so their "
            f"logit difference is always 0; give a {names[1]} that differs from the {names[0]}"
        )
    return answer_id, foil_id


def tokenize_pair(tokenizer, pair: PromptPair, index: int) -> TokenizedPair:
    where = example_location(pair, index)
    clean_ids = tokenizer(pair.clean).input_ids
    corrupted_ids = tokenizer(pair.corrupted).input_ids
    if len(clean_ids) != len(corrupted_ids):
        raise DataError(
            f"{where}: the clean prompt is {len(clean_ids)} tokens but the corrupted prompt is "
            f"{len(corrupted_ids)}; patching matches positions one to one, so both must tokenise "
            "to the same length (swap in words that are single tokens, e.g. single-token names)"
        )
    answer_id, foil_id = answer_and_foil_tokens(tokenizer, pair.clean, clean_ids, pair.answer, pair.foil, where)
    return TokenizedPair(
        index=index,
        pair=pair,
        clean_ids=clean_ids,
        corrupted_ids=corrupted_ids,
        answer_id=answer_id,
        foil_id=foil_id,
        tokens=token_strings(tokenizer, clean_ids),
        corrupted_tokens=token_strings(tokenizer, corrupted_ids),
    )
