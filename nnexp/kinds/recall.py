"""What the four factual-recall kinds share: the attribute token, edited runs, batching.

Attention knockout, sublayer knockout and causal tracing each turn a fact into base
runs (the clean run; causal tracing adds noised runs) and variant runs, each with its
edits (`nnexp.tracing.runs`). `CompiledRunsExperiment.run` packs the runs of many
facts into as few traces as `max_rows` (or the memory budget) allows, runs each as ONE
batched forward pass, and hands each fact the probability and rank of its attribute
token in every run.

The attribute token (`attribute`): "predicted", the model's own top next token on the
clean prompt (Geva et al.; with `only_correct` it is the true target), or "true", the
fact's true target (Meng et al.'s causal tracing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from ..labelled import LabelledTensor
from ..results import ExampleRecord
from ..tracing.execute import run_plans
from ..tracing.memory import row_cost, rows_for_budget, tightest
from ..tracing.runs import Run, build_plan, pack_runs
from .facts import CompiledFactExperiment, FactExperiment, FactItem, TokenizedFact

ATTRIBUTES = ("predicted", "true")
DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of activations per trace when neither max_rows nor a budget is given


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


def check_window(window, name: str = "window") -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ConfigError(f"{name} is {window!r}; give a positive number of layers")
    return window


def check_choices(values, allowed: tuple[str, ...], name: str) -> tuple[str, ...]:
    """A non-empty tuple of distinct names from `allowed` (a single name, or names
    separated by commas as `--set restore=mlp_out,attn_out` gives them, are accepted)."""
    if isinstance(values, str):
        values = tuple(part.strip() for part in values.split(",") if part.strip())
    values = tuple(values)
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
    (`runs`) and how to turn their probabilities and ranks into a record (`record`)."""

    rows_per_trace: int | None = None

    def runs(self, fact: TokenizedFact) -> tuple[list[Run], list[Run]]:
        """(base runs, variant runs) of one fact; base[0] is the clean run."""
        raise NotImplementedError

    def record(self, fact: TokenizedFact, base: torch.Tensor, variants: torch.Tensor) -> ExampleRecord:
        """`base` [base runs, 2] and `variants` [variant runs, 2]: (probability, rank)
        of the attribute token at the last position of each run."""
        raise NotImplementedError

    def run(self, items: list[FactItem], max_rows: int | None = None) -> list[ExampleRecord]:
        facts = [item.fact for item in items]
        laid_out = []
        for fact in facts:
            base, variants = self.runs(fact)
            laid_out.append((fact.index, fact.ids, self.attribute_id(fact), fact.false_id, base, variants))
        limit = tightest(max_rows, self.rows_per_trace)
        if limit is None:
            # causal tracing makes thousands of runs per fact: without a bound from the
            # user, keep each trace's activations under DEFAULT_MEMORY_BUDGET (measured
            # here; estimated for a remote model, whose weights are not here to measure)
            if self.model.is_remote:
                limit = max(2, DEFAULT_MEMORY_BUDGET // forward_bytes_per_row(self.model, max(len(f.ids) for f in facts)))
            else:
                limit = self._rows_within(items, DEFAULT_MEMORY_BUDGET, quiet=True)
        base_values: dict[int, torch.Tensor] = {}
        variant_values = {fact.index: torch.full((len(laid[5]), 2), float("nan")) for fact, laid in zip(facts, laid_out)}
        traces = pack_runs(laid_out, limit)
        built = [build_plan(trace, self.pad_id, ("prob", "rank")) for trace in traces]
        for trace, (_, firsts), values in zip(traces, built, run_plans(self.model, [plan for plan, _ in built])):
            for group, first in zip(trace, firsts):
                n_base = len(group.runs) - len(group.variants)
                base_values.setdefault(group.key, values[first : first + n_base])
                variant_values[group.key][group.variants] = values[first + n_base : first + len(group.runs)]
        return [self.record(fact, base_values[fact.index], variant_values[fact.index]) for fact in facts]

    def set_memory_budget(self, items: list[FactItem], budget: int) -> int:
        """Cap the rows per trace so that a trace's activations peak under `budget`
        bytes on every device (measured; see `nnexp.tracing.memory`)."""
        self.rows_per_trace = self._rows_within(items, budget)
        return self.rows_per_trace

    def _rows_within(self, items: list[FactItem], budget: int, quiet: bool = False) -> int:
        tokens = max(len(item.fact.ids) for item in items)
        base, _ = self.runs(items[0].fact)
        # beyond the plain pass, a row carries its edit's values (noise, ablation
        # values: at most one vector per token) and an edited copy of the attention mask
        width = torch.finfo(self.model.dtype).bits // 8
        per_row = 4 * tokens * self.model.arch.d_model + width * tokens * tokens
        what = f"this experiment ({len(base)} base runs per fact and one edited run)"
        if quiet:
            return row_cost(self.model, tokens).rows(budget, per_row, len(base) + 1, what)
        return rows_for_budget(self.model, budget, tokens, kept_per_row=per_row, minimum=len(base) + 1, what=what)


def forward_bytes_per_row(model, tokens: int) -> int:
    """For a remote model, whose weights are not here to measure: an upper estimate of
    the activation bytes one row of a no-grad forward pass holds at its peak: the residual stream and a block's largest intermediates (queries, keys,
    values, the MLP's hidden layer, the attention scores of every head), plus the
    last-position logits and their softmax in float32. Weights are not counted."""
    config = model.hf.config
    d = model.arch.d_model
    d_ff = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    heads = model.arch.n_heads
    width = torch.finfo(model.hf.dtype).bits // 8 if model.hf.dtype.is_floating_point else 4
    per_token = 6 * d + 3 * d_ff + 2 * heads * tokens
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    return width * tokens * per_token + 3 * 4 * vocab


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
