"""The examples of an intervention experiment: a prompt, what its metrics compare, other prompts.

A data record (one JSON object per line):

    {"prompt": "I think dogs are", "answer": " great", "foil": " terrible"}

Optional: "answers" (a list of answer texts, for `answer_set_prob`), "prompts" (other
named prompts of this example, e.g. {"counterfactual": "..."}), "corrupted" (a
shortcut for prompts["corrupted"]), "group", "roles"; any other field is kept. A
patching record (`"clean"` and `"corrupted"`) works as it is: "clean" is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...data import group_and_roles, load_examples, record_json
from ...errors import DataError

NAMED = ("prompt", "answer", "foil", "answers", "prompts", "corrupted", "clean", "group", "roles")


@dataclass(frozen=True)
class InterventionExample:
    prompt: str
    answer: str | None = None
    foil: str | None = None
    answers: tuple[str, ...] = ()
    prompts: dict = field(default_factory=dict)
    group: str | None = None
    roles: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # where the record was read ("data.jsonl:12"); not part of the example's identity
    source: str | None = field(default=None, compare=False, repr=False)

    def all_prompts(self) -> dict[str, str]:
        """Every prompt of the example by name; "prompt" (also "clean") is its own."""
        return {"prompt": self.prompt, "clean": self.prompt, **self.prompts}

    def to_json(self) -> dict:
        return record_json(self, ("prompt",), optional=("answer", "foil", "answers", "prompts"))

    @classmethod
    def from_json(cls, record, where: str) -> InterventionExample:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a \"prompt\", got {type(record).__name__}")
        prompt = record.get("prompt", record.get("clean"))
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"{where}: needs a non-empty string \"prompt\" (or \"clean\")")
        for name in ("answer", "foil"):
            if name in record and (not isinstance(record[name], str) or not record[name]):
                raise DataError(f"{where}: field {name!r} must be a non-empty string, got {record[name]!r}")
        answers = record.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
            raise DataError(f"{where}: field 'answers' must be a list of non-empty strings, got {answers!r}")
        prompts = dict(record.get("prompts") or {})
        if "corrupted" in record:
            prompts["corrupted"] = record["corrupted"]
        for name, text in prompts.items():
            if not isinstance(text, str) or not text:
                raise DataError(f"{where}: prompt {name!r} must be a non-empty string, got {text!r}")
            if name in ("prompt", "clean"):
                raise DataError(f"{where}: a named prompt cannot be called {name!r}; that is the example's own")
        group, roles = group_and_roles(record, where)
        return cls(prompt=prompt, answer=record.get("answer"), foil=record.get("foil"), answers=tuple(answers),
                   prompts=prompts, group=group, roles=roles,
                   meta={k: v for k, v in record.items() if k not in NAMED}, source=where)


def load_intervention_examples(path) -> list[InterventionExample]:
    return load_examples(path, InterventionExample.from_json, "JSON record with a prompt")
