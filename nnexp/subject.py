"""Where the subject sits in a tokenised prompt.

Factual-recall analyses look at "the last subject token": the token positions that
spell the subject are found from the tokenizer's character offsets, so they are right
for any tokenizer (BPE or SentencePiece, with or without a BOS token, a subject that
starts mid-word or is merged with a leading space) without re-tokenising pieces.
"""

from __future__ import annotations

from .errors import DataError


def subject_span(tokenizer, prompt: str, ids: list[int], subject: str, where: str) -> tuple[int, int]:
    """Token positions [start, end) of the first occurrence of `subject` in `prompt`.

    A token belongs to the subject when its characters overlap the subject's; special
    tokens (BOS), which cover no characters, never do.
    """
    first_char = prompt.find(subject)
    if not subject or first_char < 0:
        raise DataError(
            f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}; give the subject "
            "exactly as it is written in the prompt"
        )
    end_char = first_char + len(subject)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{where}: locating the subject needs character offsets, which only fast (Rust) tokenizers "
            "give; load the model's tokenizer with use_fast=True"
        )
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    if list(encoded.input_ids) != list(ids):
        raise DataError(f"{where}: the prompt tokenises differently with offsets; cannot locate the subject")
    inside = [i for i, (start, end) in enumerate(encoded.offset_mapping) if end > start and start < end_char and end > first_char]
    if not inside:
        raise DataError(f"{where}: no token of the prompt covers the subject {subject!r}")
    return inside[0], inside[-1] + 1
