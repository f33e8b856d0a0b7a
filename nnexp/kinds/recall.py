"""What the four factual-recall kinds share: the attribute token, edited runs, batching.

Attention knockout, sublayer knockout and causal tracing each turn a fact into base
runs (the clean run; causal tracing adds noised runs) and variant runs, each with its
edits (`nnexp.tracing.runs`). `CompiledRunsExperiment.plan` packs the runs of many
facts into as few traces as the row limit (`max_rows`, or the memory budget) allows,
each ONE batched forward pass, and `decode` hands each fact the probability and rank
of its attribute token in every run.

The attribute token (`attribute`): "predicted", the model's own top next token on the
clean prompt (Geva et al.; with `only_correct` it is the true target), or "true", the
fact's true target (Meng et al.'s causal tracing).
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..contract import ChunkPlan, expect_rows
from ..errors import ConfigError, DataError, ResultsError
from ..labelled import LabelledTensor
from ..results import ExampleRecord
from ..tracing.execute import plan_job
from ..tracing.memory import DEFAULT_MEMORY_BUDGET, forward_bytes_per_row, row_cost, rows_for_budget
from ..tracing.prefix import prefix_sharing
from ..tracing.runs import Run, build_plan, pack_runs
from .facts import CompiledFactExperiment, FactExperiment, FactItem, TokenizedFact

ATTRIBUTES = ("predicted", "true")
RUN_METRICS = ("prob", "rank")  # of the attribute token, per run: the columns of a runs trace's values


@dataclass
class RecallExperiment(FactExperiment):
    """Base of the factual-recall analyses.

    Fields (besides `FactExperiment`'s dataset, only_correct, multi_token):
        attribute: "predicted" (the model's top next token) or "true" (the true target).
    """

    attribute: str = "predicted"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attribute not in ATTRIBUTES:
            raise ConfigError(f"attribute is {self.attribute!r}; choose 'predicted' (the model's top next token) "
                              "or 'true' (the fact's true target)")


def check_window(window: int, name: str = "window") -> int:
    if window < 1:
        raise ConfigError(f"{name} is {window!r}; give a positive number of layers")
    return window


def check_choices(values: tuple[str, ...], allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    """A non-empty tuple of distinct names from `allowed` (the field's type already made
    a tuple of a JSON list or of comma-separated text, `nnexp.params`)."""
    if not values:
        raise ConfigError(f"{name} is empty; choose from {', '.join(allowed)}")
    for value in values:
        if value not in allowed:
            raise ConfigError(f"unknown {name} entry {value!r}; choose from {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} {list(values)} name an entry twice; list each once")
    return values


class CompiledRecall(CompiledFactExperiment):
    """A recall experiment bound to a model: the attribute token and the scalars every
    recall record carries."""

    @property
    def needs_prediction(self) -> bool:  # type: ignore[override]
        return self.experiment.attribute == "predicted"

    def attribute_id(self, fact: TokenizedFact) -> int:
        return fact.predicted_id if self.experiment.attribute == "predicted" else fact.true_id

    def info(self, fact: TokenizedFact) -> dict:
        info = fact.info()
        attribute = self.attribute_id(fact)
        info["attribute"] = self.experiment.attribute
        info["attribute_id"] = attribute
        info["attribute_token"] = self.model.tokenizer.decode([attribute])
        if fact.predicted_id is not None:
            info["predicted"] = self.model.tokenizer.decode([fact.predicted_id])
        return info


class CompiledRunsExperiment(CompiledRecall):
    """A recall experiment made of edited runs; subclasses say which runs a fact needs
    (`runs`) and how to turn their probabilities and ranks into a record (`record`).

    A plan's layout holds, per trace, one entry per group of a fact's runs in it:
    {"fact": its index, "first": its first row, "base": how many base runs it starts
    with, "variants": which of the fact's variant runs follow}. A fact split across
    traces has a group in each, each starting with its base runs (the clean run is the
    source of every copy); its base values are read from the first."""

    @abstractmethod
    def runs(self, fact: TokenizedFact) -> tuple[list[Run], list[Run]]:
        """(base runs, variant runs) of one fact; base[0] is the clean run."""

    @abstractmethod
    def record(self, fact: TokenizedFact, base: torch.Tensor, variants: torch.Tensor) -> ExampleRecord:
        """`base` [base runs, 2] and `variants` [variant runs, 2]: (probability, rank)
        of the attribute token at the last position of each run."""

    # -- sizing traces -------------------------------------------------------------------

    def rows_for_budget(self, items: list[FactItem], budget: int) -> int:
        """The rows per trace for a trace's activations to peak under `budget` bytes on
        every device (measured; see `nnexp.tracing.memory`)."""
        tokens, kept_per_row, minimum, what = self._row_needs(items)
        return rows_for_budget(self.model, budget, tokens, kept_per_row=kept_per_row, minimum=minimum, what=what)

    def row_limit(self, items: list[FactItem], bound: int | None) -> int | None:
        """`bound` when the user set one; else the rows that keep a trace under
        DEFAULT_MEMORY_BUDGET: causal tracing makes thousands of runs per fact, too many
        for one trace (measured here; estimated for a remote model, whose weights are not
        here to measure)."""
        if bound is not None:
            return bound
        if self.model.is_remote:
            tokens = max(len(item.fact.ids) for item in items)
            return max(2, DEFAULT_MEMORY_BUDGET // forward_bytes_per_row(self.model, tokens))
        tokens, kept_per_row, minimum, what = self._row_needs(items)
        return row_cost(self.model, tokens).rows(DEFAULT_MEMORY_BUDGET, kept_per_row, minimum, what)

    def _row_needs(self, items: list[FactItem]) -> tuple[int, int, int, str]:
        """What sizing a trace of `items` needs: its tokens, the bytes a row carries
        beyond the plain pass, the fewest rows a trace may hold, and what to call it."""
        tokens = max(len(item.fact.ids) for item in items)
        base, _ = self.runs(items[0].fact)
        # beyond the plain pass, a row carries its edit's values (noise, ablation
        # values: at most one vector per token) and an edited copy of the attention mask
        width = torch.finfo(self.model.dtype).bits // 8
        kept_per_row = 4 * tokens * self.model.arch.d_model + width * tokens * tokens
        what = f"this experiment ({len(base)} base runs per fact and one edited run)"
        return tokens, kept_per_row, len(base) + 1, what

    # -- planning and decoding -------------------------------------------------------------

    def plan(self, items: list[FactItem], row_limit: int | None) -> ChunkPlan:
        """The runs of every fact packed into traces of at most `row_limit` rows."""
        laid_out = []
        for item in items:
            fact = item.fact
            base, variants = self.runs(fact)
            laid_out.append((fact.index, fact.ids, self.attribute_id(fact), fact.false_id, base, variants))
        sharing = prefix_sharing(self.model, self.experiment.prefix_sharing,
                                 max(len(item.fact.ids) for item in items))
        jobs, layout = [], []
        for trace in pack_runs(laid_out, row_limit):
            trace_plan, firsts = build_plan(trace, self.pad_id, RUN_METRICS, sharing)
            jobs.append(plan_job(trace_plan))
            layout.append([{"fact": group.key, "first": first, "base": len(group.runs) - len(group.variants),
                            "variants": group.variants} for group, first in zip(trace, firsts)])
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    def decode(self, items: list[FactItem], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        """Each fact's base runs' values (from its first trace) and its variants' values
        (gathered from every trace that holds some), handed to `record`."""
        plan.check_values(values)
        base_values: dict[int, torch.Tensor] = {}
        variant_parts: dict[int, list[tuple[list[int], torch.Tensor]]] = defaultdict(list)
        for k, (groups, rows, value) in enumerate(zip(plan.layout, plan.rows, values)):
            what = f"trace {k + 1} of {len(plan.jobs)}"
            expect_rows(value, rows, what)
            if value.dim() != 2 or value.shape[1] != len(RUN_METRICS):
                raise ResultsError(f"{what} came back with shape {list(value.shape)}, not [{rows} rows, "
                                   f"{len(RUN_METRICS)} metrics {RUN_METRICS}]; its examples were not stored "
                                   "(rerun or resume to compute them)")
            for group in groups:
                first, n_base, variants = group["first"], group["base"], group["variants"]
                base_values.setdefault(group["fact"], value[first : first + n_base])
                variant_parts[group["fact"]].append((variants, value[first + n_base : first + n_base + len(variants)]))
        records = []
        for item in items:
            if item.index not in base_values:
                raise ResultsError(f"example {item.index} is in none of the chunk's traces; it was not stored "
                                   "(rerun or resume to compute it)")
            parts = variant_parts[item.index]
            variants = torch.full((sum(len(ids) for ids, _ in parts), len(RUN_METRICS)), float("nan"))
            for ids, part in parts:
                variants[ids] = part
            records.append(self.record(item.fact, base_values[item.index], variants))
        return records


# -- views over a dataset of results (the kinds' summaries build on these) ------------------


def fact_records(results) -> list:
    """The records of `results` (loaded `Results` or a list of records), or an error
    when there are none to average."""
    records = list(results)
    if not records:
        raise DataError(f"{getattr(results, 'path', 'the results')} hold no examples")
    return records


def mean_over_facts(results, name: str) -> LabelledTensor:
    """Mean over facts of each record's tensor `name`, with its dims and coords."""
    records = fact_records(results)
    first = records[0][name]
    return LabelledTensor(torch.stack([r[name].values for r in records]).mean(0), first.dims, first.coords)
