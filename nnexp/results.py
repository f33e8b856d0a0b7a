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
