"""What nnexp tells the person at the terminal: notes and progress bars, on stderr.

Results go to files and stdout stays clean for them; everything here is for a human
watching a long job.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence nnexp's notes and progress bars, and transformers' loading bars with them."""
    global _quiet
    _quiet = quiet
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def note(message: str) -> None:
    """A one-line message for the person running nnexp."""
    if not _quiet:
        print(f"nnexp: {message}", file=sys.stderr, flush=True)


def progress(total: int, initial: int = 0, desc: str = "", unit: str = "example"):
    """A progress bar over a known number of items (tqdm; silent when quiet)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=_quiet,
        file=sys.stderr,
        dynamic_ncols=True,
    )
