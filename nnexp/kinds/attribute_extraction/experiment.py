"""Attribute extraction (Geva et al. 2023): which hidden states already name the attribute?

For each layer, the residual stream (`resid_post`), the attention output (`attn_out`)
and the MLP output (`mlp_out`) at a chosen position (the last subject token, the last
token, or both) are projected to the vocabulary in two ways:

- "unembed": through the model's final norm (applied afresh to that vector alone)
  and the unembedding: the logit lens;
- "embed": through the transposed input embedding matrix, without any norm (Geva et
  al.'s choice for reading the subject representation, after Dar et al. 2022).

Per layer: the rank of the attribute token (1 = top) and the `top_k` tokens. With a set
of attribute words, also the attribute rate: the share of the top-k tokens that are
among the attribute words' tokens (each word tokenised with and without a leading
space). Attribute words come per fact from the data record (`"attributes": [...]`)
or for all facts from `attributes_file`, a JSON object from subject to a list of words.

One forward pass per batch of facts (16 by default) reads every layer's three sites at
the chosen positions; the projections are computed from what it saved.

Stored per fact: `rank` and, with attribute words, `attribute_rate` (position x
projection x site x layer), `top_ids` (the same x k); the top tokens as strings in
`info["top_tokens"]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ...contract import ChunkPlan, expect_rows
from ...data import example_location, token_strings
from ...errors import ConfigError, DataError, ResultsError
from ...labelled import LabelledTensor
from ...models.architectures import _get_module
from ...results import ExampleRecord
from ...sites import check_layers, check_selection, resolve_site
from ...tracing.execute import positions_job
from ...tracing.memory import rows_for_budget
from ...tracing.plan import left_pad, row_batches
from ..facts import FactItem, TokenizedFact
from ..recall import CompiledRecall, RecallExperiment, check_choices

EXTRACTION_SITES = ("resid_post", "attn_out", "mlp_out")
PROJECTIONS = ("unembed", "embed")
POSITIONS = ("last_subject", "last")


@dataclass
class AttributeExtractionExperiment(RecallExperiment):
    """Project hidden states and sublayer outputs to the vocabulary, layer by layer.

    Fields (besides `RecallExperiment`'s dataset, only_correct, multi_token, attribute):
        positions: "last_subject" and/or "last".
        sites: "resid_post", "attn_out", "mlp_out".
        projections: "unembed" (final norm + unembedding) and/or "embed" (E^T, no norm).
        top_k: tokens kept per projection (default 10).
        attributes_file: JSON object {subject: [attribute words]} for the attribute rate.
        layers: layers to read (None = all).
    """

    examples_per_trace: ClassVar[int] = 16
    multi_token_hint: ClassVar[str] = "extraction ranks one attribute token"

    positions: tuple[str, ...] = POSITIONS
    sites: tuple[str, ...] = EXTRACTION_SITES
    projections: tuple[str, ...] = PROJECTIONS
    top_k: int = 10
    attributes_file: str | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.positions = check_choices(self.positions, POSITIONS, "positions")
        self.sites = check_choices(self.sites, EXTRACTION_SITES, "sites")
        self.projections = check_choices(self.projections, PROJECTIONS, "projections")
        if self.top_k < 1:
            raise ConfigError(f"top_k is {self.top_k!r}; give a positive number of tokens")
        check_selection(self.layers, "layers")

    def compile(self, model) -> CompiledAttributeExtraction:
        return CompiledAttributeExtraction(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import extraction_figures

        return extraction_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


def load_attributes_file(path: str) -> dict[str, list[str]]:
    """{subject: [words]} from a JSON file, or a DataError naming what is wrong."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"attributes file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"attributes file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataError(f"attributes file {path} must hold a JSON object {{subject: [words]}}, got {type(data).__name__}")
    for subject, words in data.items():
        check_words(words, f"attributes file {path}, subject {subject!r}")
    return data


def check_words(words, where: str) -> list[str]:
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise DataError(f"{where}: attributes must be a list of non-empty strings, got {words!r}")
    return words


def attribute_token_ids(tokenizer, words: list[str]) -> set[int]:
    """Every token of each word, tokenised with and without a leading space."""
    ids: set[int] = set()
    for word in words:
        word = word.strip()
        for text in (" " + word, word):
            ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return ids


class CompiledAttributeExtraction(CompiledRecall):
    def __init__(self, experiment: AttributeExtractionExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        hf = model.hf
        # projections run here: a remote model reads these modules from the server once
        model.require_parameters([arch.spec.final_norm, arch.spec.unembed, arch.spec.embed])
        self.layers = sorted(check_layers(experiment.layers, arch))
        # forward order: within a block attention comes before the MLP and the block output
        self.points = sorted(((f"{site}.{layer}", resolve_site(site, layer, arch))
                              for site in experiment.sites for layer in self.layers), key=lambda kv: kv[1].order)
        self.final_norm = _get_module(hf, arch.spec.final_norm)
        self.unembed = _get_module(hf, arch.spec.unembed)
        self.embedding = hf.get_input_embeddings().weight  # [vocab, d]
        self.attributes = load_attributes_file(experiment.attributes_file) if experiment.attributes_file else {}

    def prepare(self, example, index: int) -> FactItem:
        item = super().prepare(example, index)
        if item.fact is not None:
            self.words(item.fact)  # malformed attribute words fail before any compute
        return item

    def words(self, fact: TokenizedFact) -> list[str] | None:
        words = fact.fact.meta.get("attributes")
        if words is not None:
            return check_words(words, example_location(fact.fact, fact.index))
        return self.attributes.get(fact.fact.subject)

    def position(self, fact: TokenizedFact, name: str) -> int:
        return fact.last_subject if name == "last_subject" else len(fact.ids) - 1

    def rows_for_budget(self, items: list[FactItem], budget: int) -> int:
        """The facts per trace for a trace and its projections to the vocabulary to
        peak under `budget` bytes on every device."""
        d = self.embedding.shape[1]
        vocab = self.embedding.shape[0]
        n_pos = len(self.experiment.positions)
        # per fact: the vectors read; in the read-out, the logits of one projection at a
        # time (in the model's dtype, then float32) and the comparison the ranks need
        width = torch.finfo(self.model.dtype).bits // 8
        saved = 4 * d * len(self.points) * n_pos
        readout = saved + (width + 4 + 1) * n_pos * vocab
        tokens = max(len(item.fact.ids) for item in items)
        return rows_for_budget(self.model, budget, tokens, kept_per_row=saved, readout=(0, readout),
                               what="attribute extraction of one fact")

    def plan(self, items: list[FactItem], row_limit: int | None) -> ChunkPlan:
        """One trace per batch of at most `row_limit` facts, reading every point at the
        chosen positions. The layout: per trace, the fact of each row."""
        batches = row_batches(items, row_limit)
        jobs = [positions_job(*self._request(batch)) for batch in batches]
        layout = [[item.index for item in batch] for batch in batches]
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    def decode(self, items: list[FactItem], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        """Each trace's saved vectors projected to the vocabulary: one record per fact."""
        plan.check_values(values)
        facts = {item.index: item.fact for item in items}
        records = {}
        for k, (indices, saved) in enumerate(zip(plan.layout, values)):
            for key, _ in self.points:
                expect_rows(saved[key], len(indices), f"trace {k + 1} of {len(plan.jobs)}: {key}")
            for record in self._records([facts[index] for index in indices], saved):
                records[record.index] = record
        missing = [item.index for item in items if item.index not in records]
        if missing:
            raise ResultsError(f"examples {missing} are in none of the chunk's traces; they were not stored "
                               "(rerun or resume to compute them)")
        return [records[item.index] for item in items]

    def project(self, vectors: torch.Tensor, projection: str) -> torch.Tensor:
        """[n, d] -> [n, vocab] float32 logits."""
        with torch.no_grad():
            if projection == "unembed":
                return self.unembed(self.final_norm(vectors)).float()
            return vectors.float() @ self.embedding.float().T

    def _request(self, items: list[FactItem]) -> tuple:
        """(input_ids, attention_mask, points, positions, logits) of one trace: the facts
        left-padded, every point read at each chosen position, no logits."""
        facts = [item.fact for item in items]
        input_ids, mask, offsets = left_pad([fact.ids for fact in facts], self.pad_id)
        positions = torch.tensor([[offset + self.position(fact, name) for name in self.experiment.positions]
                                  for fact, offset in zip(facts, offsets)])
        return input_ids, mask, self.points, positions, "none"

    def _records(self, facts: list[TokenizedFact], saved: dict) -> list[ExampleRecord]:
        experiment = self.experiment
        device = self.unembed.weight.device
        attribute = torch.tensor([self.attribute_id(fact) for fact in facts], device=device)
        k = experiment.top_k
        n_pos, n_proj, n_site, n_layer = len(experiment.positions), len(experiment.projections), len(experiment.sites), len(self.layers)
        rank = torch.zeros(len(facts), n_pos, n_proj, n_site, n_layer)
        top = torch.zeros(len(facts), n_pos, n_proj, n_site, n_layer, k, dtype=torch.long)
        for si, site in enumerate(experiment.sites):
            for li, layer in enumerate(self.layers):
                vectors = saved[f"{site}.{layer}"].to(device)  # [rows, positions, d]
                for pi, projection in enumerate(experiment.projections):
                    logits = self.project(vectors.reshape(-1, vectors.shape[-1]), projection)
                    logits = logits.reshape(len(facts), n_pos, -1)
                    target = logits.gather(-1, attribute[:, None, None].expand(-1, n_pos, 1))
                    rank[:, :, pi, si, li] = ((logits > target).sum(-1) + 1).float().cpu()
                    top[:, :, pi, si, li] = logits.topk(k, dim=-1).indices.cpu()
        return [self._record(fact, rank[row], top[row]) for row, fact in enumerate(facts)]

    def _record(self, fact: TokenizedFact, rank: torch.Tensor, top: torch.Tensor) -> ExampleRecord:
        experiment = self.experiment
        dims = ("position", "projection", "site", "layer")
        coords = {"position": list(experiment.positions), "projection": list(experiment.projections),
                  "site": list(experiment.sites), "layer": self.layers}
        tensors = {
            "rank": LabelledTensor(rank, dims, coords),
            "top_ids": LabelledTensor(top, dims + ("k",), {**coords, "k": list(range(1, experiment.top_k + 1))}),
        }
        info = self.info(fact)
        words = self.words(fact)
        if words is not None:
            allowed = torch.tensor(sorted(attribute_token_ids(self.model.tokenizer, words)))
            rate = torch.isin(top, allowed).float().mean(-1)
            tensors["attribute_rate"] = LabelledTensor(rate, dims, coords)
            info["attributes"] = words
        info["top_tokens"] = _decoded(self.model.tokenizer, top.tolist())  # nested like top_ids
        info["positions"] = {name: self.position(fact, name) for name in experiment.positions}
        info["top_k"] = experiment.top_k
        return ExampleRecord(index=fact.index, tensors=tensors, scalars={}, info=info)


def _decoded(tokenizer, nested):
    if nested and isinstance(nested[0], list):
        return [_decoded(tokenizer, inner) for inner in nested]
    return token_strings(tokenizer, nested)
