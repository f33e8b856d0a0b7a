"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Corrupt the subject, then restore one clean state at a time and see which restore the
true target. For each fact:

- clean run: the prompt as it is;
- corrupted runs: Gaussian noise added to the subject tokens' embeddings, one run per
  noise sample (`samples`, default 10; seeded by `seed`, the same noise for every
  fact, as in ROME). The noise's standard deviation is `noise_scale` (default 3) times
  the standard deviation of the embeddings of the subject tokens of every fact in
  the dataset (ROME's `collect_embedding_std`), or `noise_std` when given;
- restored runs: for each restored site, layer l and position t, the corrupted run of
  each sample with the clean run's value written back at position t: the block's
  output (`resid_post`) at layer l alone, or the MLP output (`mlp_out`) or attention
  output (`attn_out`) at every layer of a window of `window` layers (default 10:
  l-5..l+4, as ROME's figures) centred on l.

    indirect effect (l, t) = p_restored(l, t) - p_corrupted     # probabilities of the true target,
                                                                # each the mean over the noise samples

All of a fact's runs (clean, corrupted, every restoration of every site) go into one
batched trace, split into several when `max_rows` or the memory budget says so; each
trace repeats the clean run, the source of every restored value.

Stored per fact: one tensor per restored site (`resid_post`, `mlp_out`, `attn_out`),
layer x position, the indirect effect, and `<site>.prob`, the restored probability;
scalars `p_clean`, `p_corrupted`, `noise_std`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ...console import note
from ...errors import ConfigError
from ...labelled import LabelledTensor
from ...results import ExampleRecord
from ...sites import check_layers, check_selection, embedding_point, resolve_site
from ...tracing.execute import read_positions
from ...tracing.plan import left_pad
from ...tracing.runs import Run, RunEdit, window
from ..facts import FactItem, TokenizedFact
from ..recall import CompiledRunsExperiment, RecallExperiment, check_choices, check_window

RESTORE_SITES = ("resid_post", "mlp_out", "attn_out")


@dataclass
class CausalTracingExperiment(RecallExperiment):
    """Noise the subject, restore clean states one (layer, position) at a time.

    Fields (besides `RecallExperiment`'s dataset, only_correct, multi_token, attribute,
    which defaults to "true" here, the fact's true target, as in Meng et al.):
        restore: sites to restore: "resid_post" (single layer), "mlp_out", "attn_out"
            (windows of `window` layers).
        window: layers restored together for mlp_out and attn_out (default 10; 1 =
            a single layer).
        samples: noise samples per fact (default 10).
        seed: seed of the noise.
        noise_scale: noise std in units of the subject embeddings' std (default 3).
        noise_std: an absolute noise std instead (None = use noise_scale).
        layers: layers to restore (None = all).
        prefix_sharing: on by default, as for every kind (`nnexp.tracing.prefix`): a
            fact's noised runs are computed from its first subject token and each
            restored run from its restored position.
    """

    examples_per_trace: ClassVar[int] = 1
    multi_token_hint: ClassVar[str] = "causal tracing measures the probability of one next token"

    attribute: str = "true"
    restore: tuple[str, ...] = RESTORE_SITES
    window: int = 10
    samples: int = 10
    seed: int = 0
    noise_scale: float = 3.0
    noise_std: float | None = None
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.restore = check_choices(self.restore, RESTORE_SITES, "restore")
        self.window = check_window(self.window)
        if self.samples < 1:
            raise ConfigError(f"samples is {self.samples!r}; give a positive number of noise samples")
        for name in ("noise_scale", "noise_std"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} is {value!r}; give a positive number")
        check_selection(self.layers, "layers")

    def compile(self, model) -> CompiledCausalTracing:
        return CompiledCausalTracing(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import causal_tracing_figures

        return causal_tracing_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


def subject_noise(samples: int, subject_tokens: int, d_model: int, std: float, seed: int) -> torch.Tensor:
    """[samples, subject_tokens, d_model] Gaussian noise, float32, from its own seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((samples, subject_tokens, d_model), generator=generator) * std


class CompiledCausalTracing(CompiledRunsExperiment):
    def __init__(self, experiment: CausalTracingExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        self.layers = sorted(check_layers(experiment.layers, arch))
        self.embed = embedding_point(arch)
        self.points = {(site, layer): resolve_site(site, layer, arch)
                       for site in experiment.restore for layer in range(arch.n_layers)}
        self.noise_std: float | None = None if experiment.noise_std is None else float(experiment.noise_std)

    def fit(self, items: list[FactItem], batch: int = 16) -> None:
        """The noise level: `noise_scale` x the std of the subject tokens' embeddings
        over every fact of the dataset (ROME's `collect_embedding_std`)."""
        if self.experiment.noise_std is not None:
            return
        facts = [item.fact for item in items if item.fact is not None]
        if not facts:
            return
        # The embedding module's output at the subject tokens, read in a trace (one per
        # `batch` facts): on a remote model only those vectors travel, not the embedding matrix.
        point = [("embed", embedding_point(self.model.arch))]
        chunks = [facts[start : start + batch] for start in range(0, len(facts), batch)]
        requests = []
        for chunk in chunks:
            input_ids, mask, offsets = left_pad([fact.ids for fact in chunk], self.pad_id)
            width = max(end - start for start, end in (fact.subject for fact in chunk))
            # every row reads `width` positions: its subject's, repeated at the end when shorter
            positions = torch.tensor([[offset + min(fact.subject[0] + k, fact.subject[1] - 1) for k in range(width)]
                                      for fact, offset in zip(chunk, offsets)])
            requests.append((input_ids, mask, point, positions, "none"))
        vectors = []
        for chunk, (saved, _) in zip(chunks, read_positions(self.model, requests)):
            for row, fact in enumerate(chunk):
                start, end = fact.subject
                vectors.append(saved["embed"][row, : end - start].float())
        std = float(torch.cat(vectors).std())
        self.noise_std = self.experiment.noise_scale * std
        note(f"causal tracing: noise std {self.noise_std:.4g} = {self.experiment.noise_scale:g} x {std:.4g}, the std of "
             f"the subject tokens' embeddings over {len(facts)} facts")

    def restored_layers(self, site: str, layer: int) -> list[int]:
        return [layer] if site == "resid_post" else window(layer, self.experiment.window, self.model.arch.n_layers)

    def runs(self, fact: TokenizedFact) -> tuple[list[Run], list[Run]]:
        if self.noise_std is None:
            raise ConfigError("causal tracing needs the noise level; call fit(items) first (nnexp.run does) "
                              "or set noise_std")
        start, end = fact.subject
        subject = list(range(start, end))
        noise = subject_noise(self.experiment.samples, end - start, self.model.arch.d_model, self.noise_std,
                              self.experiment.seed)
        noised = [RunEdit(self.embed, "add", subject, noise[s]) for s in range(self.experiment.samples)]
        base = [Run()] + [Run([edit]) for edit in noised]
        variants = []
        for site in self.experiment.restore:
            for layer in self.layers:
                restored = self.restored_layers(site, layer)
                for position in range(len(fact.ids)):
                    for s in range(self.experiment.samples):
                        copies = [RunEdit(self.points[(site, j)], "copy", [position]) for j in restored]
                        variants.append(Run([noised[s]] + copies))
        return base, variants

    def record(self, fact: TokenizedFact, base: torch.Tensor, variants: torch.Tensor) -> ExampleRecord:
        samples = self.experiment.samples
        p_clean = float(base[0, 0])
        p_corrupted = float(base[1:, 0].mean())
        tokens = len(fact.ids)
        shape = (len(self.experiment.restore), len(self.layers), tokens, samples)
        restored = variants[:, 0].reshape(shape).mean(-1)
        dims = ("layer", "position")
        coords = {"layer": self.layers, "position": list(range(tokens))}
        tensors = {}
        for i, site in enumerate(self.experiment.restore):
            tensors[site] = LabelledTensor(restored[i] - p_corrupted, dims, coords)
            tensors[f"{site}.prob"] = LabelledTensor(restored[i].clone(), dims, coords)
        info = self.info(fact)
        info.update(window=self.experiment.window, samples=samples, seed=self.experiment.seed,
                    restore=list(self.experiment.restore))
        return ExampleRecord(
            index=fact.index,
            tensors=tensors,
            scalars={"p_clean": p_clean, "p_corrupted": p_corrupted, "noise_std": self.noise_std},
            info=info,
        )
