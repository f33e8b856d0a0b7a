"""Experiments over CounterFact facts: data, tokens, subject spans, the model's prediction.

Gradient attribution and the factual-recall analyses (attention knockout, attribute
extraction, sublayer knockout, causal tracing) all take the same facts (a prompt, its
subject, a true and a false next token) from the same sources, and share:

- `FactExperiment`: the fields every fact experiment has (`dataset`, `only_correct`,
  `multi_token`) and where its facts come from (built-in set, hub, `--data FILE`);
- `tokenize_fact`: token ids, both targets as single next tokens, the subject's span;
- `CompiledFactExperiment`: `prepare` (tokenise, or mark a multi-token fact to skip)
  and `select` (drop skipped facts with a count; one forward pass over the facts to
  record the model's top prediction, and with `only_correct` keep the facts it gets
  right, as Meng et al. and Geva et al. do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..console import note
from ..contract import CompiledExperiment
from ..counterfact import Fact, load_counterfact, load_facts
from ..data import MultiTokenError, answer_and_foil_tokens, example_location, token_strings
from ..errors import ConfigError, DataError
from ..experiment import Experiment
from ..subject import subject_span
from ..tracing.execute import read_positions
from ..tracing.plan import left_pad

MULTI_TOKEN = ("error", "skip")


@dataclass
class FactExperiment(Experiment):
    """Base of the experiments over CounterFact facts.

    Fields:
        dataset: the facts when no data file is given: "builtin" (105 facts, offline),
            "hub" (NeelNanda/counterfact-tracing via `datasets`), or another dataset id
            or local dataset folder with the same fields.
        only_correct: keep only facts whose top next-token prediction is the true
            target; the count is reported.
        multi_token: "error" (default) or "skip" facts whose targets are not single tokens.
    """

    # Appended to the multi-token error: what this kind of experiment would need instead.
    multi_token_hint: ClassVar[str] = ""

    dataset: str = "builtin"
    only_correct: bool = False
    multi_token: str = "error"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.multi_token not in MULTI_TOKEN:
            raise ConfigError(f"multi_token is {self.multi_token!r}; choose 'error' or 'skip'")

    def default_examples(self) -> list[Fact]:
        return load_counterfact(self.dataset)

    def read_data_file(self, path: str) -> list[Fact]:
        return load_facts(path)

    def data_source(self) -> dict:
        if self.data:
            return super().data_source()
        return {"kind": "builtin" if self.dataset == "builtin" else "dataset", "dataset": self.dataset}


@dataclass
class TokenizedFact:
    index: int
    fact: Fact
    ids: list[int]
    true_id: int
    false_id: int
    tokens: list[str]
    subject: tuple[int, int]  # token positions [start, end)
    predicted_id: int | None = None  # the model's top next token, once `select` has run

    @property
    def last_subject(self) -> int:
        return self.subject[1] - 1

    def info(self) -> dict:
        out = {
            "index": self.index,
            **self.fact.to_json(),
            "ids": self.ids,
            "target_true_id": self.true_id,
            "target_false_id": self.false_id,
            "tokens": self.tokens,
            "subject_tokens": list(self.subject),
        }
        if self.predicted_id is not None:
            out["predicted_id"] = self.predicted_id
        return out


def tokenize_fact(tokenizer, fact: Fact, index: int, hint: str = "") -> TokenizedFact:
    where = example_location(fact, index)
    ids = tokenizer(fact.prompt).input_ids
    try:
        true_id, false_id = answer_and_foil_tokens(tokenizer, fact.prompt, ids, fact.target_true, fact.target_false,
                                                   where, names=("target_true", "target_false"))
    except MultiTokenError as error:
        raise MultiTokenError(
            f"{error} ({hint + '; ' if hint else ''}pass multi_token=skip (--set multi_token=skip) to drop these "
            "facts with a count)"
        ) from None
    span = subject_span(tokenizer, fact.prompt, ids, fact.subject, where)
    return TokenizedFact(index, fact, ids, true_id, false_id, token_strings(tokenizer, ids), span)


@dataclass
class FactItem:
    index: int
    fact: TokenizedFact | None
    problem: str | None = None  # why this fact is skipped (multi_token="skip")


class CompiledFactExperiment(CompiledExperiment):
    """A `FactExperiment` bound to a model: preparing and selecting facts.

    Subclasses set `needs_prediction` when their analysis is about the model's own top
    prediction (Geva et al.'s "attribute token"), so `select` records it for every fact.
    """

    needs_prediction: ClassVar[bool] = False

    def __init__(self, experiment: FactExperiment, model) -> None:
        super().__init__(experiment, model)

    def prepare(self, example, index: int) -> FactItem:
        if not isinstance(example, Fact):
            raise DataError(f"example {index}: {self.experiment.name or 'this experiment'} needs CounterFact facts, "
                            f"got {type(example).__name__}")
        try:
            return FactItem(index, tokenize_fact(self.model.tokenizer, example, index, self.experiment.multi_token_hint))
        except MultiTokenError as error:
            if self.experiment.multi_token == "skip":
                return FactItem(index, None, str(error).partition(" for this tokenizer")[0])
            raise

    def select(self, items: list[FactItem], batch: int) -> list[FactItem]:
        """Drop facts with multi-token targets (when asked to skip them); record the
        model's prediction when needed and, with `only_correct`, keep the facts whose
        top prediction is the true target. Reports both counts."""
        skipped = [item for item in items if item.fact is None]
        items = [item for item in items if item.fact is not None]
        if skipped:
            note(f"skipped {len(skipped)} of {len(skipped) + len(items)} facts whose targets are not single tokens "
                 f"for {self.model.name} (first: {skipped[0].problem})")
        if not items:
            raise DataError("no fact has single-token targets for this tokenizer; nothing to analyse")
        if not (self.experiment.only_correct or self.needs_prediction):
            return items
        self.predict([item.fact for item in items], batch)
        if not self.experiment.only_correct:
            return items
        kept = [item for item in items if item.fact.predicted_id == item.fact.true_id]
        note(f"only_correct: {self.model.name} predicts the true target first for {len(kept)} of {len(items)} facts; "
             "only those are analysed")
        if not kept:
            raise DataError(f"{self.model.name} predicts none of the {len(items)} facts correctly; nothing to analyse "
                            "(run without only_correct to analyse them anyway)")
        return kept

    def skip_reason(self, item: FactItem) -> str:
        if item.fact is None:
            return "target not a single token (multi_token=skip)"
        return "not predicted correctly (only_correct)"

    def predict(self, facts: list[TokenizedFact], batch: int) -> None:
        """Set each fact's `predicted_id`: one left-padded forward pass per `batch` facts."""
        chunks = [facts[start : start + batch] for start in range(0, len(facts), batch)]
        requests = [left_pad([fact.ids for fact in chunk], self.pad_id)[:2] + ([], None, "argmax") for chunk in chunks]
        for chunk, (_, top_ids) in zip(chunks, read_positions(self.model, requests)):
            for fact, top in zip(chunk, top_ids.tolist()):
                fact.predicted_id = top
