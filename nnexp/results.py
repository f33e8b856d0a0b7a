"""Results in memory: per-example records of labelled tensors, and views across examples.

`nnexp.load_results(dir)` returns a `Results`; each stored example is an
`ExampleRecord` holding its labelled tensors (e.g. "resid_post": layer x position),
its scalars (e.g. the clean and corrupted metric) and its info (prompts, tokens,
answer, foil). Examples that share a group and a token count can be stacked into
one tensor with an "example" axis and averaged; `summary()` gives every dataset-level
mean with its bootstrap interval, examples of any length aligned by role.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ResultsError
from .labelled import LabelledTensor


@dataclass
class ExampleRecord:
    index: int
    tensors: dict[str, LabelledTensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LabelledTensor:
        if name not in self.tensors:
            raise KeyError(f"example {self.index} has no tensor {name!r}; it has {sorted(self.tensors)}")
        return self.tensors[name]

    @property
    def tokens(self) -> list[str]:
        return list(self.info.get("tokens", []))

    @property
    def group(self) -> str:
        """Examples are comparable position by position when they share this key."""
        group = self.info.get("group") or "all"
        return f"{group} ({len(self.tokens)} tokens)" if self.tokens else group

    def figures(self) -> dict:
        """This example's figures by name (usually the site: "resid_post"), drawn by its
        experiment kind as for the run's figure files; the example must come from loaded
        results (`nnexp.load_results`, `nnexp.run`)."""
        from .figure_set import example_figures

        run = getattr(self, "_run", None)
        if run is None:
            raise ResultsError(f"example {self.index} is not part of loaded results, so its experiment is unknown; "
                               "take it from nnexp.load_results(DIR)")
        return example_figures(run.experiment(), run, [self])[self.index]

    def figure(self, site: str):
        """This example's figure of `site` (a plotly Figure, shown inline in a notebook)."""
        figures = self.figures()
        for name in (site, site.replace("_", "-")):
            if name in figures:
                return figures[name]
        raise KeyError(f"example {self.index} has no figure {site!r}; it has {sorted(figures)}")

    def _repr_html_(self) -> str:
        """Jupyter's view: the prompt(s), tokens, scalars and tensors."""
        from html import escape

        rows = [(key, self.info[key]) for key in ("clean", "corrupted", "prompt", "answer", "foil", "group")
                if self.info.get(key) is not None]
        rows.append(("tokens", " | ".join(self.tokens)))
        rows += [(name, f"{value:.4g}" if isinstance(value, float) else value) for name, value in self.scalars.items()]
        rows += [(name, repr(tensor)) for name, tensor in sorted(self.tensors.items())]
        body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td style='text-align:left'>"
                       f"{escape(str(v))}</td></tr>" for k, v in rows)
        return f"<p><b>ExampleRecord</b> {self.index}</p><table>{body}</table>"


class Results:
    """Everything stored for one run: its spec and one record per finished example.

    `missing` lists the examples the run computes that are not here (not computed yet,
    or damaged); it is empty unless the results were loaded with `allow_missing=True`.
    """

    def __init__(self, path: Path, spec: dict, records: list[ExampleRecord], missing=()) -> None:
        self.path = Path(path)
        self.spec = spec
        self.records = sorted(records, key=lambda r: r.index)
        self.missing: list[int] = sorted(missing)
        self._figures: dict | None = None
        for record in self.records:  # what `record.figure()` draws with (the first Results it was loaded into)
            if getattr(record, "_run", None) is None:
                record._run = self

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __getitem__(self, i: int) -> ExampleRecord:
        return self.records[i]

    def __repr__(self) -> str:
        missing = ""
        if self.missing:
            shown = ", ".join(map(str, self.missing[:8])) + (", ..." if len(self.missing) > 8 else "")
            missing = f", {len(self.missing)} missing ({shown})"
        return f"Results({self.spec.get('experiment', {}).get('name')!r}, {len(self)} examples{missing}, {self.path})"

    @property
    def names(self) -> list[str]:
        return sorted(self.records[0].tensors) if self.records else []

    def groups(self) -> dict[str, list[ExampleRecord]]:
        """Records grouped by `ExampleRecord.group` (same group label and token count)."""
        out: dict[str, list[ExampleRecord]] = defaultdict(list)
        for record in self.records:
            out[record.group].append(record)
        return dict(out)

    def stack(self, name: str, records: list[ExampleRecord] | None = None) -> LabelledTensor:
        """One tensor with a leading "example" axis; the records must have equal shapes."""
        records = self.records if records is None else records
        if not records:
            raise ResultsError(f"no examples to stack in {self.path}")
        first = records[0][name]
        for record in records[1:]:
            if record[name].shape != first.shape:
                raise ResultsError(
                    f"cannot stack {name!r}: example {records[0].index} has shape {tuple(first.shape)} "
                    f"but example {record.index} has {tuple(record[name].shape)} (different token "
                    "counts); stack one group at a time: results.stack(name, results.groups()[key])"
                )
        values = torch.stack([record[name].values for record in records])
        coords = dict(first.coords)
        coords["example"] = [record.index for record in records]
        return LabelledTensor(values, ("example",) + first.dims, coords)

    def scalar(self, name: str) -> torch.Tensor:
        return torch.tensor([record.scalars[name] for record in self.records])

    def experiment(self, **statistics):
        """The experiment this run was made with, rebuilt from its spec; `statistics`
        (ci=, n_boot=) override how it summarises."""
        import dataclasses

        from .experiment import experiment_from_spec

        experiment = experiment_from_spec(self.spec["experiment"])
        given = {k: v for k, v in statistics.items() if v is not None}
        return dataclasses.replace(experiment, **given) if given else experiment

    def figures(self) -> dict:
        """Every figure of the run by name ("mean-roles-resid_post", "example-0000-resid_post"),
        as plotly Figures, drawn by the experiment kind as for the run's figure files."""
        from .figure_set import run_figures

        if self._figures is None:
            self._figures = run_figures(self.experiment(), self)
        return self._figures

    def figure(self, name: str):
        """The run's figure `name` (a plotly Figure, shown inline in a notebook); the names
        are those of the figure files, without ".html": `list(results.figures())`."""
        figures = self.figures()
        if name not in figures:
            raise KeyError(f"no figure {name!r}; the run has {sorted(figures)}")
        return figures[name]

    def _repr_html_(self) -> str:
        """Jupyter's view: what was run on what, the examples, the largest effects."""
        from html import escape

        from .errors import NnexpError
        from .statistics import top_findings

        experiment = self.spec.get("experiment", {})
        model = self.spec.get("model", {})
        rows = [("experiment", experiment.get("name") or experiment.get("class")), ("model", model.get("name")),
                ("examples", len(self) if not self.missing else f"{len(self)} ({len(self.missing)} missing)"),
                ("tensors", ", ".join(self.names)), ("path", str(self.path))]
        try:
            findings = top_findings(self.experiment().summary_rows(self)) if self.records else []
        except NnexpError:
            findings = []
        body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td style='text-align:left'>"
                       f"{escape(str(v))}</td></tr>" for k, v in rows)
        found = "".join(f"<li>{escape(line)}</li>" for line in findings)
        return (f"<p><b>Results</b></p><table>{body}</table>" + (f"<ul>{found}</ul>" if found else "")
                + "<p>results.summary(): every mean with its interval; results.figure(name): a figure</p>")

    def summary(self, ci: float | None = None, n_boot: int | None = None):
        """Every dataset-level mean of the run with its bootstrap interval, as a tidy
        pandas DataFrame with columns kind, measure, role, layer, head, mean, lower,
        upper, n (`nnexp.statistics`). "role" holds whatever names the cell besides its
        layer and head: a role (S2, last subject token), a component, a source set.
        `ci` and `n_boot` default to the run's (its spec's) settings."""
        from .statistics import summary_frame

        if not self.records:
            raise ResultsError(f"{self.path} holds no examples to summarise")
        return summary_frame(self.experiment(ci=ci, n_boot=n_boot).summary_rows(self))
