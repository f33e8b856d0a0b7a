"""Experiments researchers write themselves: runs declared with the intervention vocabulary.

An `InterventionExperiment` says, per example, which runs to make of it
(`runs(example, model) -> {name: Run | Grid}`, in the vocabulary of
`nnexp.interventions`), which metrics to measure in every run, and optionally which
run the metrics compare with (`reference`). nnexp compiles the runs of a chunk of
examples into batched traces through the one planner of edited runs
(`nnexp.tracing.runs`): the runs another run reads from (a `Patch` or `Interpolate`
source) and the reference run are *base* runs, repeated in every trace that holds
some of the example's other runs; everything else is spread over traces of at most
the row limit. Vectors that come from the model (`Mean()`, `Activation(...)`) are
computed once, before the sweep (`fit`), from every example whatever `--limit` is.

Stored per example:

- for a `Run` named r: scalars `r.<metric>`; for a `Grid` named g: tensors
  `g.<metric>` over the grid's axes;
- with a `reference`, for every metric that does not itself compare with the
  reference: `r.<metric>.change` / `g.<metric>.change`, the value minus the reference
  run's;
- for every `Read` named x of run r: `r.x`, [(grid axes...,) position, (head,) feature],
  or without the feature axis for a probe (a read with a direction).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ...console import note
from ...contract import ChunkPlan, CompiledExperiment, expect_rows
from ...data import answer_and_foil_tokens, continuation_token, example_location, token_strings
from ...errors import ConfigError, DataError, ResultsError
from ...experiment import Experiment
from ...interventions import (EDITS, Activation, Apply, Block, EditFunction, Given, Grid, Mean, Patch, Read, Run,
                              Vector, Zero)
from ...labelled import LabelledTensor
from ...metrics import get_metric
from ...results import ExampleRecord
from ...sites import SITES, attention_mask_point, check_heads, check_layers, is_per_head, resolve_site, site_heads
from ...tracing.execute import plan_job, read_positions, sum_over_tokens
from ...tracing.jobs import function_modules
from ...tracing.memory import DEFAULT_MEMORY_BUDGET, forward_bytes_per_row, row_cost, rows_for_budget
from ...tracing.plan import left_pad
from ...tracing.runs import Run as PlannedRun
from ...tracing.prefix import prefix_sharing
from ...tracing.runs import RunEdit, build_plan, pack_runs
from .examples import InterventionExample, load_intervention_examples


@dataclass(frozen=True)
class ModelShape:
    """What `runs` may know of the model: its size."""

    n_layers: int
    n_heads: int
    d_model: int
    head_dim: int


@dataclass
class InterventionExperiment(Experiment):
    """Runs of each example declared with `nnexp.interventions`, measured by metrics.

    Subclasses implement `runs(example, model)` and, for built-in data,
    `default_examples()`; `prompts()` names prompts the whole experiment shares (the
    `Activation` vectors read them).

    Fields:
        metrics: metric names (`nnexp list`), measured in every run.
        metric_position: where the metrics read the next-token distribution: -1 (the
            last position, default), -2, ... from the end, or 0, 1, ... from the start.
        reference: the run (a `Run`, not a `Grid`) that metrics needing a reference
            (KL divergence, change in log-probability, top-1 agreement) compare with,
            and that `.change` values are taken from; None for none.
    """

    examples_per_trace: ClassVar[int] = 4

    metrics: tuple[str, ...] = ("logit_diff",)
    metric_position: int = -1
    reference: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_metrics()

    def check_metrics(self) -> None:
        """Known metrics, each once, and a reference run for those that compare with one
        (a subclass that sets `metrics` from fields of its own calls this again)."""
        if not self.metrics:
            raise ConfigError("metrics is empty; name at least one metric (nnexp list shows them)")
        if len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(f"metrics {list(self.metrics)} name a metric twice; list each once")
        for name in self.metrics:
            if "reference" in get_metric(name).needs and self.reference is None:
                raise ConfigError(f"metric {name!r} compares each run with a reference run, and this experiment has "
                                  "none; set reference to the name of one of its runs (e.g. reference=\"clean\")")

    # -- what a user writes ------------------------------------------------------------

    def runs(self, example: InterventionExample, model: ModelShape) -> dict:
        """The runs of one example: {name: Run or Grid}."""
        raise NotImplementedError(f"{type(self).__name__} must define runs(self, example, model)")

    def prompts(self) -> dict[str, str]:
        """Prompts shared by every example, by name (read by `Activation` vectors)."""
        return {}

    # -- the framework's side -------------------------------------------------------------

    def read_data_file(self, path: str) -> list[InterventionExample]:
        return load_intervention_examples(path)

    def compile(self, model) -> CompiledInterventions:
        return CompiledInterventions(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import intervention_figures

        return intervention_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


@dataclass
class _Row:
    """One declared run of an example: its name, its place in a grid, what it is."""

    name: str
    cell: tuple[int, ...] | None  # index into its grid; None for a single Run
    run: Run
    ids: list[int]


@dataclass
class _Item:
    index: int
    example: InterventionExample
    ids: list[int]
    answer_id: int
    foil_id: int
    answer_ids: tuple[int, ...]
    declared: dict  # name -> Run | Grid
    rows: list[_Row]  # base rows first
    n_base: int
    tokens: list[str]
    positions: dict = field(default_factory=dict)  # (row number, read name) -> positions read


class CompiledInterventions(CompiledExperiment):
    """An `InterventionExperiment` bound to a model: validated runs, planned and decoded."""

    def __init__(self, experiment: InterventionExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        self.shape = ModelShape(arch.n_layers, arch.n_heads, arch.d_model, arch.head_dim)
        self.metric_names = tuple(experiment.metrics)
        self.metrics = [get_metric(name) for name in self.metric_names]
        self.shared_prompts = dict(experiment.prompts())
        for name, text in self.shared_prompts.items():
            if not isinstance(text, str) or not text:
                raise ConfigError(f"prompt {name!r} of prompts() must be a non-empty string, got {text!r}")
        self.vectors: dict[tuple, torch.Tensor] = {}  # resolved Mean and Activation vectors (fit)
        self._points: dict[tuple[str, int], object] = {}
        self._shippable: set[str] = set()  # user edits already checked to pickle by value
        self.declared_json: dict | None = None

    # -- widths and places ------------------------------------------------------------------

    def width(self, site: str, per_head_slice: bool) -> int:
        if is_per_head(site):
            # k and v have the key/value heads (fewer with grouped-query attention)
            return self.shape.head_dim if per_head_slice else self.shape.head_dim * site_heads(site, self.model.arch)
        return self.shape.d_model

    def _layers(self, layers, where: str) -> list[int]:
        try:
            return check_layers([layers] if isinstance(layers, int) else list(layers), self.model.arch)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    def _heads(self, site: str, heads, where: str) -> list[int | None]:
        if heads is None:
            return [None]
        if not is_per_head(site):
            raise ConfigError(f"{where}: heads are given for site {site!r}, which is not split into heads; "
                              "use a per-head site (head_out) or leave heads unset")
        try:
            return check_heads([heads] if isinstance(heads, int) else list(heads), self.model.arch, site)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None

    @staticmethod
    def _positions(spec, n: int, where: str) -> list[int]:
        if spec == "all":
            return list(range(n))
        if spec == "last":
            return [n - 1]
        out = []
        for p in [spec] if isinstance(spec, int) else spec:
            if not -n <= p < n:
                raise ConfigError(f"{where}: position {p} is outside the prompt, which has {n} tokens "
                                  f"(0-{n - 1}; negative positions count from the end)")
            out.append(p % n)
        return out

    # -- preparing examples -------------------------------------------------------------------

    def prepare(self, example, index: int) -> _Item:
        if not isinstance(example, InterventionExample):
            raise ConfigError(f"example {index} is a {type(example).__name__}, not an InterventionExample")
        where = example_location(example, index)
        tokenizer = self.model.tokenizer
        ids = tokenizer(example.prompt).input_ids
        needs = {need for metric in self.metrics for need in metric.needs}
        answer_id = foil_id = 0
        if "foil" in needs and (example.answer is None or example.foil is None):
            missing = [n for n in ("answer", "foil") if getattr(example, n) is None]
            raise DataError(f"{where}: has no {' or '.join(missing)}, which metric(s) "
                            f"{', '.join(m.name for m in self.metrics if 'foil' in m.needs)} compare; add them to "
                            "the record or choose metrics that do not need them")
        if "answer" in needs and example.answer is None:
            raise DataError(f"{where}: has no answer, which metric(s) "
                            f"{', '.join(m.name for m in self.metrics if 'answer' in m.needs)} need; add it")
        if example.answer is not None and example.foil is not None:
            answer_id, foil_id = answer_and_foil_tokens(tokenizer, example.prompt, ids, example.answer,
                                                        example.foil, where)
        elif example.answer is not None:
            answer_id = continuation_token(tokenizer, example.prompt, ids, example.answer, "answer", where)
        answer_ids = tuple(continuation_token(tokenizer, example.prompt, ids, text, "answer in answers", where)
                           for text in example.answers)
        if "answers" in needs and not answer_ids:
            raise DataError(f"{where}: has no \"answers\", the set of answer tokens that answer_set_prob sums over")

        declared = self.experiment.runs(example, self.shape)
        if not isinstance(declared, dict) or not declared:
            raise ConfigError(f"{type(self.experiment).__name__}.runs must return a non-empty dict of "
                              f"{{name: Run or Grid}}, got {declared!r}")
        prompts = {**self.shared_prompts, **example.all_prompts()}
        ids_of = {"prompt": ids, "clean": ids}
        rows: list[_Row] = []
        for name, value in declared.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ConfigError(f"run name {name!r} must be a non-empty string without dots")
            runs = value.runs if isinstance(value, Grid) else [value]
            if not isinstance(value, (Grid, Run)):
                raise ConfigError(f"run {name!r} is a {type(value).__name__}; declare a Run(...) or a Grid(...)")
            if isinstance(value, Grid):
                shapes = {tuple((read.name, read.positions, read.heads, read.direction is None) for read in run.reads)
                          for run in runs}
                if len(shapes) > 1:
                    raise ConfigError(f"the runs of grid {name!r} read different things; every run of a grid must "
                                      "declare the same reads (names, positions, heads), so that they stack")
            for k, run in enumerate(runs):
                if run.prompt not in prompts:
                    raise ConfigError(f"{where}: run {name!r} runs prompt {run.prompt!r}, which is neither the "
                                      f"example's nor the experiment's; known prompts: {', '.join(sorted(prompts))}")
                if run.prompt not in ids_of:
                    ids_of[run.prompt] = tokenizer(prompts[run.prompt]).input_ids
                cell = tuple(int(i) for i in _unravel(k, value.shape)) if isinstance(value, Grid) else None
                rows.append(_Row(name, cell, run, ids_of[run.prompt]))

        # the runs others read from, and the reference, are base runs: in every trace
        singles = {name for name, value in declared.items() if isinstance(value, Run)}
        base_names = []
        reference = self.experiment.reference
        if reference is not None:
            if reference not in declared:
                raise ConfigError(f"reference is {reference!r}, which is not one of the runs "
                                  f"({', '.join(declared)}); name one of them")
            if reference not in singles:
                raise ConfigError(f"reference {reference!r} is a Grid; the reference must be a single Run")
            base_names.append(reference)
        for row in rows:
            for edit in row.run.edits:
                source = getattr(edit, "source", None)
                if source is None:
                    continue
                if source not in singles:
                    raise ConfigError(f"{where}: run {row.name!r} reads from run {source!r}, which is not a single "
                                      f"Run of this example; its runs are {', '.join(declared)}")
                if len(ids_of[declared[source].prompt]) != len(row.ids):
                    raise ConfigError(f"{where}: run {row.name!r} ({len(row.ids)} tokens) reads run {source!r}, "
                                      f"whose prompt has {len(ids_of[declared[source].prompt])} tokens; reading "
                                      "another run's activations matches positions one to one, so both prompts "
                                      "must have as many tokens")
                if source not in base_names:
                    base_names.append(source)
        base_rows = [row for name in base_names for row in rows if row.name == name]
        rows = base_rows + [row for row in rows if row.name not in base_names]
        item = _Item(index, example, ids, answer_id, foil_id, answer_ids, declared, rows, len(base_rows),
                     token_strings(tokenizer, ids))
        for number, row in enumerate(rows):
            self._check_row(item, number, row, prompts, where)
        if self.declared_json is None:
            self.declared_json = {name: value.to_json() for name, value in declared.items()}
        return item

    def _check_row(self, item: _Item, number: int, row: _Row, prompts: dict, where: str) -> None:
        """Everything about one run that can be wrong, found before anything runs."""
        what = f"{where}, run {row.name!r}"
        n = len(row.ids)
        self._offset(n, what)
        for edit in row.run.edits:
            if isinstance(edit, Block):
                self._layers(edit.layer, what)
                self._positions(edit.keys, n, what)
                continue
            for layer in self._layers(edit.layer, what):
                self._point(edit.site, layer, what)
            heads = self._heads(edit.site, edit.heads, what)
            self._positions(edit.positions, n, what)
            if not isinstance(edit, Patch) and not isinstance(EDITS.get(getattr(edit, "edit", edit.name)),
                                                                 (type, EditFunction)):
                raise ConfigError(f"{what}: unknown edit {edit!r}")
            if isinstance(edit, Apply) and self.model.executor.kind != "local":
                self._check_shippable(edit.edit, edit.function())
            for vector in edit.vectors():
                self._check_vector(vector, edit.site, heads[0] is not None, prompts, what)
        for read in row.run.reads:
            self._point(read.site, self._layers(read.layer, what)[0], what)
            heads = self._heads(read.site, read.heads, what)
            item.positions[(number, read.name)] = self._positions(read.positions, n, what)
            if read.direction is not None:
                self._check_vector(read.direction, read.site, heads[0] is not None, prompts, what)

    def _point(self, site: str, layer: int, what: str):
        """The hook point of (site, layer), if this architecture has its module."""
        key = (site, layer)
        if key not in self._points:
            SITES.get(site)  # an unknown site: one line naming the known ones
            point = resolve_site(site, layer, self.model.arch)
            try:
                self.model.hf.get_submodule(point.module)
            except AttributeError:
                raise ConfigError(f"{what}: site {site!r} at layer {layer} is module {point.module}, which this "
                                  f"model ({self.model.hf.config.model_type}) does not have; choose another site "
                                  "(nnexp list) or register the site for this architecture") from None
            self._points[key] = point
        return self._points[key]

    def _check_shippable(self, name: str, fn) -> None:
        """A user's edit function must pickle by value to travel to a server: refuse one
        that cannot, before anything runs, rather than when the request is sent. Each
        function is checked once, however many runs use it."""
        if name in self._shippable:
            return
        import cloudpickle
        from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

        # by value, as the executor will ship it (nnexp.tracing.jobs.register_for_shipping)
        added = function_modules(fn) - _PICKLE_BY_VALUE_MODULES
        _PICKLE_BY_VALUE_MODULES.update(added)
        try:
            cloudpickle.dumps(fn)
        except Exception as error:  # noqa: BLE001 - any failure means it cannot be shipped
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"edit {name!r} cannot be shipped to a remote server ({reason}); a user's edit must "
                              "be a plain function of tensors that refers only to picklable values") from None
        finally:
            _PICKLE_BY_VALUE_MODULES.difference_update(added)
        self._shippable.add(name)

    def _check_vector(self, vector: Vector, site: str, per_head: bool, prompts: dict, what: str) -> None:
        for _, basic in vector.terms():
            if isinstance(basic, Given):
                widths = {self.width(site, per_head), self.width(site, False)}
                if basic.values.numel() not in widths:
                    raise ConfigError(f"{what}: a vector of width {basic.values.numel()} is given for site {site!r}, "
                                      f"whose vectors have width {' or '.join(map(str, sorted(widths)))}")
            elif isinstance(basic, Activation):
                if basic.prompt not in self.shared_prompts:
                    raise ConfigError(f"{what}: Activation({basic.prompt!r}) names no prompt of the experiment's "
                                      f"prompts() ({', '.join(self.shared_prompts) or 'none'}); "
                                      "add it there (to read another run of the example, use Patch or Interpolate)")
                if basic.site is not None or basic.layer is not None:
                    self._point(basic.site or site, self._layers(basic.layer or 0, what)[0], what)
            elif isinstance(basic, Mean):
                if basic.site is not None or basic.layer is not None:
                    self._point(basic.site or site, self._layers(basic.layer or 0, what)[0], what)

    def _offset(self, n: int, what: str) -> int:
        """How far from the end a run of `n` tokens reads its metrics (1 = the last position)."""
        p = self.experiment.metric_position
        if not -n <= p < n:
            raise ConfigError(f"{what}: metric_position {p} is outside the prompt, which has {n} tokens")
        return n - (p % n)

    def declared(self) -> dict | None:
        """The runs declared for the first example, as JSON: saved in the run's spec."""
        return {"runs": self.declared_json, "reference": self.experiment.reference} if self.declared_json else None

    # -- vectors from the model ---------------------------------------------------------------

    def _vector_keys(self, items: list[_Item]) -> tuple[set, set]:
        """The (site, layer) means and (prompt, position, site, layer) activations the runs use."""
        means, activations = set(), set()

        def visit(vector: Vector, site: str, layers: list[int]) -> None:
            for _, basic in vector.terms():
                for layer in layers:
                    if isinstance(basic, Mean):
                        means.add((basic.site or site, self._vector_layer(basic, layer)))
                    elif isinstance(basic, Activation):
                        activations.add((basic.prompt, basic.position, basic.site or site,
                                         self._vector_layer(basic, layer)))

        for item in items:
            for row in item.rows:
                for edit in row.run.edits:
                    if not isinstance(edit, Block):
                        for vector in edit.vectors():
                            visit(vector, edit.site, self._layers(edit.layer, ""))
                for read in row.run.reads:
                    if read.direction is not None:
                        visit(read.direction, read.site, [read.layer])
        return means, activations

    def fit(self, items: list[_Item], batch: int = 16) -> None:
        """Compute the `Mean()` and `Activation(...)` vectors the runs use: each mean over
        every token of every example's prompt, each activation from its prompt run alone."""
        means, activations = self._vector_keys(items)
        arch = self.model.arch
        if means:
            points = sorted({(f"{site}.{layer}", resolve_site(site, layer, arch)) for site, layer in means},
                            key=lambda kv: kv[1].order)
            requests = [left_pad([item.ids for item in items[start : start + batch]], self.pad_id)[:2] + (points,)
                        for start in range(0, len(items), batch)]
            count = sum(int(mask.sum()) for _, mask, _ in requests)
            totals: dict[str, torch.Tensor] = {}
            for sums in sum_over_tokens(self.model, requests):
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0) + value
            for site, layer in means:
                self.vectors[("mean", site, layer)] = totals[f"{site}.{layer}"] / count
            note(f"mean vectors: {len(means)} site means over {count} tokens of {len(items)} examples")
        by_prompt = defaultdict(list)
        for prompt, position, site, layer in activations:
            by_prompt[prompt].append((position, site, layer))
        requests, order = [], []
        for prompt, wanted in sorted(by_prompt.items()):
            ids = self.model.tokenizer(self.shared_prompts[prompt]).input_ids
            input_ids, mask, _ = left_pad([ids], self.pad_id)
            positions = sorted({self._positions(position, len(ids), f"Activation({prompt!r})")[0]
                                for position, _, _ in wanted})
            points = sorted({(f"{site}.{layer}", resolve_site(site, layer, arch)) for _, site, layer in wanted},
                            key=lambda kv: kv[1].order)
            requests.append((input_ids, mask, points, torch.tensor([positions]), "none"))
            order.append((prompt, ids, positions, wanted))
        for (saved, _), (prompt, ids, positions, wanted) in zip(read_positions(self.model, requests) if requests
                                                               else [], order):
            for position, site, layer in wanted:
                p = position % len(ids)
                self.vectors[("activation", prompt, position, site, layer)] = (
                    saved[f"{site}.{layer}"][0, positions.index(p)].float().reshape(-1))

    def resolve(self, vector: Vector, site: str, layer: int) -> torch.Tensor:
        """A vector's values at (site, layer), full width, float32."""
        total = None
        for weight, basic in vector.terms():
            if isinstance(basic, Given):
                value = basic.values
            elif isinstance(basic, Zero):
                value = torch.zeros(self.width(site, False))
            elif isinstance(basic, Mean):
                value = self._fitted(("mean", basic.site or site, self._vector_layer(basic, layer)))
            elif isinstance(basic, Activation):
                value = self._fitted(("activation", basic.prompt, basic.position, basic.site or site,
                                      self._vector_layer(basic, layer)))
            else:
                raise ConfigError(f"unknown vector {basic!r}")
            total = weight * value if total is None else total + weight * value
        return total

    def _vector_layer(self, vector, layer: int) -> int:
        """The layer a Mean or Activation is taken at: its own, or the edit's."""
        return layer if vector.layer is None else vector.layer % self.shape.n_layers

    def _fitted(self, key: tuple) -> torch.Tensor:
        if key not in self.vectors:
            raise ConfigError(f"the vector {key} is computed by fit(items), which has not run; call fit first "
                              "(nnexp.run does)")
        return self.vectors[key]

    def _slice(self, value: torch.Tensor, site: str, head: int | None) -> torch.Tensor:
        """A head's slice of a full-width vector (a head-width vector is the same for every head)."""
        if head is None or value.numel() == self.shape.head_dim:
            return value
        d = self.shape.head_dim
        return value[head * d : (head + 1) * d]

    # -- lowering declared runs to trace operations ---------------------------------------------

    def lower(self, item: _Item, row: _Row) -> PlannedRun:
        arch = self.model.arch
        n = len(row.ids)
        base = [r.name for r in item.rows[: item.n_base]]
        edits: list[RunEdit] = []
        for edit in row.run.edits:
            if isinstance(edit, Block):
                keys = self._positions(edit.keys, n, "")
                for layer in self._layers(edit.layer, ""):
                    edits.append(RunEdit(attention_mask_point(layer, arch), "block", keys))
                continue
            positions = self._positions(edit.positions, n, "")
            source = base.index(edit.source) if edit.needs_source else 0
            for layer in self._layers(edit.layer, ""):
                point = resolve_site(edit.site, layer, arch)
                for head in self._heads(edit.site, edit.heads, ""):
                    if isinstance(edit, Patch):
                        edits.append(RunEdit(point, "copy", positions, head=head, source=source))
                        continue
                    vectors = {f: self._slice(self.resolve(vector, edit.site, layer), edit.site, head)
                               for f, vector in _edit_vectors(edit).items()}
                    edits.append(RunEdit(point, "rewrite", positions, head=head, source=source, fn=edit.function(),
                                         params=edit.parameters(vectors), with_source=edit.needs_source))
        for read in row.run.reads:
            point = resolve_site(read.site, read.layer, arch)
            positions = self._positions(read.positions, n, "")
            for head in self._heads(read.site, read.heads, ""):
                direction = None
                if read.direction is not None:
                    direction = self._slice(self.resolve(read.direction, read.site, read.layer), read.site, head)
                    direction = direction.expand(len(positions), -1)
                edits.append(RunEdit(point, "read", positions, values=direction, head=head,
                                     key=_read_key(read)))
        reference = base.index(self.experiment.reference) if self.experiment.reference is not None else None
        return PlannedRun(edits, ids=row.ids, reference=reference, metric_offset=self._offset(n, ""),
                          answers=item.answer_ids)

    # -- sizing, planning, decoding ---------------------------------------------------------------

    def _read_bytes(self, item: _Item) -> int:
        """The most bytes of reads one run of `item` returns."""
        most = 0
        for number, row in enumerate(item.rows):
            total = 0
            for read in row.run.reads:
                heads = len(self._heads(read.site, read.heads, ""))
                width = 1 if read.direction is not None else self.width(read.site, read.heads is not None)
                total += 4 * len(item.positions[(number, read.name)]) * heads * width
            most = max(most, total)
        return most

    def _metric_bytes(self, items: list[_Item]) -> int:
        """What the metrics hold per row at their peak: the kept logits and, per metric,
        a few float32 copies of the next-token distribution (softmax, log-softmax, the
        reference row's), which for a large vocabulary outweigh a small model's pass."""
        vocab = self.model.hf.get_output_embeddings().weight.shape[0]
        kept = max(self._offset(len(row.ids), "") for item in items for row in item.rows)
        return 4 * vocab * (kept + 2 + 3 * len(self.metrics))

    def _row_needs(self, items: list[_Item]) -> tuple[int, int, int, str]:
        """Sizing a trace of `items`: its tokens, the bytes a row holds beyond the plain
        pass (an edit's values, reads, the metrics' working copies), the fewest rows a
        trace may hold, and what to call it."""
        tokens = max(len(row.ids) for item in items for row in item.rows)
        kept = (max(self._read_bytes(item) for item in items) + 4 * tokens * self.shape.d_model
                + self._metric_bytes(items))
        minimum = max(item.n_base for item in items) + 1
        return tokens, kept, minimum, f"this experiment ({minimum - 1} base runs per example and one other run)"

    def rows_for_budget(self, items: list[_Item], budget: int) -> int:
        tokens, kept, minimum, what = self._row_needs(items)
        return rows_for_budget(self.model, budget, tokens, kept_per_row=kept, minimum=minimum, what=what)

    def row_limit(self, items: list[_Item], bound: int | None) -> int | None:
        """`bound` when the user set one; else the rows that keep a trace under
        DEFAULT_MEMORY_BUDGET (a grid can make thousands of runs per example: measured
        here, estimated for a remote model, whose weights are not here to measure)."""
        if bound is not None:
            return bound
        tokens, kept, minimum, what = self._row_needs(items)
        if self.model.is_remote:
            return max(minimum, DEFAULT_MEMORY_BUDGET // (forward_bytes_per_row(self.model, tokens) + kept))
        return row_cost(self.model, tokens).rows(DEFAULT_MEMORY_BUDGET, kept, minimum, what)

    def plan(self, items: list[_Item], row_limit: int | None) -> ChunkPlan:
        laid_out = []
        for item in items:
            runs = [self.lower(item, row) for row in item.rows]
            laid_out.append((item.index, item.ids, item.answer_id, item.foil_id, runs[: item.n_base],
                             runs[item.n_base :]))
        sharing = prefix_sharing(self.model, self.experiment.prefix_sharing,
                                 max(len(row.ids) for item in items for row in item.rows))
        jobs, layout = [], []
        for trace in pack_runs(laid_out, row_limit):
            trace_plan, firsts = build_plan(trace, self.pad_id, self.metric_names, sharing)
            jobs.append(plan_job(trace_plan))
            reads: dict[str, list] = defaultdict(list)  # key -> [row, entries] in the order the trace returns them
            for group, first in zip(trace, firsts):
                for r, run in enumerate(group.runs):
                    for edit in run.edits:
                        if edit.kind == "read":
                            reads[edit.key].append([first + r, len(edit.positions)])
            layout.append({"groups": [[group.key, first, len(group.runs) - len(group.variants), group.variants]
                                      for group, first in zip(trace, firsts)],
                           "reads": dict(reads)})
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    def decode(self, items: list[_Item], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        plan.check_values(values)
        metric_rows: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)  # example -> its row -> [metrics]
        read_rows: dict[int, dict[tuple[int, str], list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        by_index = {item.index: item for item in items}
        for k, (rows, layout, value) in enumerate(zip(plan.rows, plan.layout, values)):
            what = f"trace {k + 1} of {len(plan.jobs)}"
            reads = {}
            if isinstance(value, dict):
                value, reads = value["metrics"], value["reads"]
            expect_rows(value, rows, what)
            if value.dim() != 2 or value.shape[1] != len(self.metric_names):
                raise ResultsError(f"{what} came back with shape {list(value.shape)}, not [{rows} rows, "
                                   f"{len(self.metric_names)} metrics]; its examples were not stored "
                                   "(rerun or resume to compute them)")
            owner = {}  # trace row -> (example, its row number)
            for index, first, n_base, variants in layout["groups"]:
                for r in range(n_base):
                    # a base run is repeated in every trace of its example: the first one counts
                    if r not in metric_rows[index]:
                        metric_rows[index][r] = value[first + r]
                        owner[first + r] = (index, r)
                for offset, v in enumerate(variants):
                    metric_rows[index][n_base + v] = value[first + n_base + offset]
                    owner[first + n_base + offset] = (index, n_base + v)
            for key, entries in layout["reads"].items():
                if key not in reads:
                    raise ResultsError(f"{what} came back without its read {key!r}; its examples were not stored")
                start = 0
                for row, count in entries:
                    if row in owner:
                        index, number = owner[row]
                        read_rows[index][(number, key)].append(reads[key][start : start + count])
                    start += count
        records = []
        for index in [item.index for item in items]:
            if len(metric_rows[index]) != len(by_index[index].rows):
                raise ResultsError(f"example {index} came back with {len(metric_rows[index])} of its "
                                   f"{len(by_index[index].rows)} runs; it was not stored (rerun or resume)")
            records.append(self._record(by_index[index], metric_rows[index], read_rows[index]))
        return records

    def _record(self, item: _Item, metrics: dict[int, torch.Tensor], reads: dict) -> ExampleRecord:
        tensors, scalars = {}, {}
        reference = self.experiment.reference
        numbers = defaultdict(list)  # run name -> its row numbers, in declaration order
        for number, row in enumerate(item.rows):
            numbers[row.name].append(number)
        reference_values = metrics[numbers[reference][0]] if reference is not None else None
        for name, value in item.declared.items():
            rows = numbers[name]
            stacked = torch.stack([metrics[number] for number in rows]).float()  # [runs, metrics]
            for m, metric in enumerate(self.metric_names):
                compares = "reference" in get_metric(metric).needs
                if isinstance(value, Grid):
                    grid = stacked[:, m].reshape(value.shape)
                    coords = {axis: list(values) for axis, values in value.axes.items()}
                    tensors[f"{name}.{metric}"] = LabelledTensor(grid, value.dims, coords)
                    if reference_values is not None and not compares:
                        tensors[f"{name}.{metric}.change"] = LabelledTensor(grid - reference_values[m].float(),
                                                                            value.dims, coords)
                else:
                    scalars[f"{name}.{metric}"] = float(stacked[0, m])
                    if reference_values is not None and not compares and name != reference:
                        scalars[f"{name}.{metric}.change"] = float(stacked[0, m] - reference_values[m])
            run = value.runs[0] if isinstance(value, Grid) else value
            for read in run.reads:
                # each run of a grid has a read of this name (checked), at its own layer
                keys = [_read_key(next(r for r in item.rows[number].run.reads if r.name == read.name))
                        for number in rows]
                parts = [torch.cat(reads[(number, key)]) for number, key in zip(rows, keys)]
                positions = item.positions[(rows[0], read.name)]
                heads = self._heads(read.site, read.heads, "")
                per_run = [part.reshape(len(heads), len(positions), *part.shape[1:]).transpose(0, 1) for part in parts]
                tensor = torch.stack(per_run)  # [runs, position, head, (feature)]
                dims = ("position",) + (("head",) if read.heads is not None else ())
                if read.heads is None:
                    tensor = tensor.squeeze(2)
                if read.direction is None:
                    dims += ("feature",)
                coords = {"position": positions, **({"head": heads} if read.heads is not None else {})}
                if isinstance(value, Grid):
                    tensor = tensor.reshape(*value.shape, *tensor.shape[1:])
                    dims = value.dims + dims
                    coords.update({axis: list(values) for axis, values in value.axes.items()})
                else:
                    tensor = tensor[0]
                tensors[f"{name}.{read.name}"] = LabelledTensor(tensor, dims, coords)
        info = {"index": item.index, **item.example.to_json(), "ids": item.ids, "tokens": item.tokens,
                "answer_id": item.answer_id, "foil_id": item.foil_id, "runs": list(item.declared),
                "metrics": list(self.metric_names)}
        if item.answer_ids:
            info["answer_ids"] = list(item.answer_ids)
        return ExampleRecord(index=item.index, tensors=tensors, scalars=scalars, info=info)


def _unravel(k: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(k % size)
        k //= size
    return list(reversed(out))


def _edit_vectors(edit) -> dict[str, Vector]:
    """An edit's vectors, by the name its `parameters` takes them under."""
    if isinstance(edit, Apply):
        return {key: value for key, value in edit.params.items() if isinstance(value, Vector)}
    return {f.name: getattr(edit, f.name) for f in dataclasses.fields(edit) if isinstance(getattr(edit, f.name), Vector)}


def _read_key(read: Read) -> str:
    return f"{read.name}@{read.site}.{read.layer}" + (":heads" if read.heads is not None else "")
