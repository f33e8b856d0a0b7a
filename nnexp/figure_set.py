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

from pathlib import Path

from .plotting import capturing

PER_CALL = 16  # the examples a kind draws per-example figures for (its max_examples)
_UNUSED = Path("figures")  # kinds build file paths from it; nothing is written while capturing


def example_prefix(index: int) -> str:
    """How the figures of example `index` are named: "example-0003-"."""
    return f"example-{index:04d}-"


def run_figures(experiment, results) -> dict:
    """Every figure the experiment draws for `results`, by name (file name without suffix)."""
    with capturing() as captured:
        experiment.figures(results, _UNUSED)
    return {_name(path): fig for fig, path in captured}


def _name(path: Path) -> str:
    """A figure's name: its path under the figures folder (no suffix is added yet)."""
    try:
        return path.relative_to(_UNUSED).as_posix()
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
        figures = run_figures(experiment, Results(results.path, results.spec, chunk))
        for record in chunk:
            prefix = example_prefix(record.index)
            out[record.index] = {name[len(prefix):]: fig for name, fig in figures.items() if name.startswith(prefix)}
    return {record.index: out.get(record.index, {}) for record in records}


def dataset_figures(drawn: dict) -> dict:
    """The figures of `drawn` that are not of one example (means, profiles, tables)."""
    return {name: fig for name, fig in drawn.items() if not name.startswith("example-")}
