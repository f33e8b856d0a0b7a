"""Indirect-object identification (IOI) prompts: a seeded generator and the classic set.

An IOI prompt names two people, then repeats one of them (the subject, S) as the
giver; a model that tracks who is who completes it with the other (the indirect
object, IO):

    clean:     After John and Mary went to the store, Mary gave a bottle of milk to   -> " John"
    corrupted: After John and Mary went to the store, John gave a bottle of milk to

The corrupted prompt is the clean one with the second mention of the subject (S2)
swapped for the IO name, so the clean answer is no longer the natural completion.
The metric compares answer = IO with foil = S.

Every name below is a single token, with its leading space, for GPT-2's tokenizer,
SmolLM2's and Gemma 3's, so clean and corrupted prompts of one template always have
the same token length. Examples of a template share a `group`, and `roles` records
which word is IO and which is S, so averaged figures can label those positions.
"""

from __future__ import annotations

import random

from nnexp.data import PromptPair
from nnexp.errors import ConfigError

NAMES = (
    "John Mary Tom James Dan Sid Martin Amy Alice Bob Paul Sarah Kate Mark Anna Lisa David "
    "Emma Jack Rose Ben Laura Mike Steve Peter Susan Jane Chris Tim Adam Eric Sam Ryan Kevin "
    "Alex Grace Lucy Helen Max Joe Dave Mia Luke Sean Jake Karen Tony Frank"
).split()

# {A} and {B} are the two names in order of appearance; {S2} is the repeated subject.
TEMPLATES = {
    "store": "After {A} and {B} went to the store, {S2} gave a bottle of milk to",
    "shops": "When {A} and {B} went to the shops, {S2} gave the bag to",
    "park": "When {A} and {B} went to the park, {S2} gave the ball to",
    "apple": "When {A} and {B} went to the shops, {S2} gave an apple to",
    "drink": "After {A} and {B} went to the park, {S2} gave a drink to",
    "office": "While {A} and {B} were working at the office, {S2} handed a document to",
    "beach": "Friends {A} and {B} found a necklace at the beach. {S2} gave it to",
    "argument": "Then, {A} and {B} had a long argument. Afterwards {S2} said to",
}


def ioi_pair(template: str, io: str, s: str, io_first: bool, group: str | None = None) -> PromptPair:
    """One IOI example: `io` is the answer, `s` the subject repeated as S2."""
    a, b = (io, s) if io_first else (s, io)
    clean = TEMPLATES[template].format(A=a, B=b, S2=s)
    corrupted = TEMPLATES[template].format(A=a, B=b, S2=io)
    return PromptPair(
        clean=clean,
        corrupted=corrupted,
        answer=" " + io,
        foil=" " + s,
        group=group or template,
        roles={"IO": " " + io, "S": " " + s},
        meta={"template": template, "order": "ABB" if io_first else "BAB"},
    )


def generate_ioi(n: int, seed: int = 0, templates: tuple[str, ...] | None = None) -> list[PromptPair]:
    """`n` seeded IOI examples. Example i depends only on (seed, i), so a longer set
    extends a shorter one with the same seed."""
    names = list(templates or TEMPLATES)
    unknown = [t for t in names if t not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown IOI template(s) {unknown}; available: {', '.join(TEMPLATES)}")
    out = []
    for i in range(n):
        rng = random.Random(f"ioi:{seed}:{i}")
        template = rng.choice(names)
        io, s = rng.sample(NAMES, 2)
        out.append(ioi_pair(template, io, s, io_first=rng.random() < 0.5))
    return out


# TransformerLens' IOI walkthrough: 4 prompts x 2 name orders. Each prompt keeps the
# walkthrough's names; the order decides which of the two is repeated.
CLASSIC = (
    ("shops", "John", "Mary"),
    ("park", "Tom", "James"),
    ("apple", "Dan", "Sid"),
    ("drink", "Martin", "Amy"),
)


def classic_ioi() -> list[PromptPair]:
    """The 8 prompts of TransformerLens' IOI walkthrough (4 templates x 2 name orders)."""
    out = []
    for template, first, second in CLASSIC:
        out.append(ioi_pair(template, io=second, s=first, io_first=False))
        out.append(ioi_pair(template, io=first, s=second, io_first=True))
    return out


# -- the built-in data of the IOI experiments ------------------------------------------

BUILTIN_DATASETS = ("generated", "classic")


def check_builtin(dataset: str, n_examples: int) -> None:
    """Validate an IOI experiment's `dataset` and `n_examples` parameters."""
    if dataset not in BUILTIN_DATASETS:
        raise ConfigError(f"dataset must be 'generated' or 'classic', got {dataset!r}")
    if n_examples < 1:
        raise ConfigError(f"n_examples is {n_examples}; it must be at least 1")


def builtin_pairs(dataset: str, n_examples: int, seed: int) -> list[PromptPair]:
    """"classic": TransformerLens' 8 prompts; "generated": `n_examples` seeded ones, all templates."""
    if dataset == "classic":
        return classic_ioi()
    return generate_ioi(n_examples, seed=seed, templates=tuple(TEMPLATES))
