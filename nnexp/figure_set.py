"""A run's figures as plotly objects, by name, drawn by its experiment kind's own code.

Every kind draws its figures into files (`Experiment.figures` -> `plotting.write_figures`).
Here the same drawing runs inside `plotting.capturing()`, so the figures come back as
objects named like their files ("mean-roles-resid_post", "example-0003-resid_post"):
what the report embeds and what `results.figure(name)` / `record.figure(site)` show in
a notebook, without a second implementation of any figure.

Kinds draw per-example figures for the first 16 examples of what they are given, so
the figures of later examples are drawn 16 examples at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .plotting import capturing

PER_CALL = 16  # the examples a kind draws per-example figures for (its max_examples)


def example_prefix(index: int) -> str:
    """How the figures of example `index` are named: "example-0003-"."""
    return f"example-{index:04d}-"


def run_figures(experiment, results, out_dir: Path | None = None) -> dict:
    """Every figure the experiment draws for `results`, by name (its file name under
    `out_dir` without the suffix); see `draw`."""
    return draw(experiment, results, out_dir)[0]


def draw(experiment, results, out_dir: Path | None = None) -> tuple[dict, list[Path]]:
    """(figures by name, files the experiment wrote itself). Nothing goes through
    `write_figures` meanwhile; the experiment is still given the run's figures folder
    (`out_dir`, by default <run>/figures), where a user's `figures()` that writes files
    of its own writes them."""
    out_dir = Path(out_dir) if out_dir is not None else Path(results.path) / "figures"
    with capturing() as captured:
        own = experiment.figures(results, out_dir) or []
    return {_name(path, out_dir): fig for fig, path in captured}, list(own)


def _name(path: Path, out_dir: Path) -> str:
    """A figure's name: its path under the figures folder (no suffix is added yet)."""
    try:
        return path.relative_to(out_dir).as_posix()
    except ValueError:
        return path.name


def example_figures(experiment, results, records, drawn: dict | None = None) -> dict[int, dict]:
    """{example index: {figure name without the example prefix (usually the site): figure}}
    for `records`; figures already in `drawn` (a `run_figures` result) are reused."""
    from .results import Results

    drawn = drawn or {}
    out: dict[int, dict] = {}
    todo = []
    for record in records:
        prefix = example_prefix(record.index)
        have = {name[len(prefix):]: fig for name, fig in drawn.items() if name.startswith(prefix)}
        if have:
            out[record.index] = have
        else:
            todo.append(record)
    for start in range(0, len(todo), PER_CALL):
        chunk = todo[start:start + PER_CALL]
        # a folder of its own: a user's figures() that writes files itself must not put
        # means over this chunk where the run's figures are
        with tempfile.TemporaryDirectory(prefix="nnexp-figures-") as scratch:
            figures = run_figures(experiment, Results(results.path, results.spec, chunk), Path(scratch))
        for record in chunk:
            prefix = example_prefix(record.index)
            out[record.index] = {name[len(prefix):]: fig for name, fig in figures.items() if name.startswith(prefix)}
    return {record.index: out.get(record.index, {}) for record in records}


def dataset_figures(drawn: dict) -> dict:
    """The figures of `drawn` that are not of one example (means, profiles, tables)."""
    return {name: fig for name, fig in drawn.items() if not name.startswith("example-")}
