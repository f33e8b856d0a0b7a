"""Logit attribution: the logit lens and direct logit attribution (DLA), from one trace.

The residual stream at the last position is a sum: the embeddings, plus what each
attention layer adds, plus what each MLP adds. The logit difference between the
answer and the foil is (up to the final norm) a linear read-out of that sum, so it
splits into per-component shares. The `LogitAttributionExperiment` kind computes, for
a batch of prompts and from ONE forward pass that reads every layer at the last
position:

- `logit_lens`: the accumulated residual before and after each sublayer, labelled as
  TransformerLens' `accumulated_resid(incl_mid=True)` labels it (`0_pre`, `0_mid`,
  `1_pre`, ..., `final_post`; `L_pre` is also layer L-1's output), read out as the
  answer-minus-foil logit difference two ways:
    * `logit_lens`: the final norm applied afresh to each point, then the unembedding
      (the usual logit lens; TransformerLens' `accumulated_resid(apply_ln=True)`),
      with the top-k next tokens at each point;
    * `logit_lens_linear`: the final norm linearised with the scale it computed for
      the final residual (TransformerLens' `apply_ln_to_stack`), plus the bias term.
- `dla_layers`: the final residual decomposed into `embed` (and `pos_embed` where the
  model has learned positions), `L_attn_out` and `L_mlp_out` for each layer
  (TransformerLens' `decompose_resid`), and `bias`, each projected through the
  linearised final norm onto W_U[answer] - W_U[foil].
- `dla_heads`: each head's share of each attention output: its slice of the input
  of the attention output projection times its rows of that projection
  (TransformerLens' `stack_head_results`), projected the same way; layer x head.
  `dla_heads_rest` holds the other components (embeddings, attention output biases,
  MLP outputs, bias) so that heads plus rest are the whole logit difference.

Linearising the final norm (see `nnexp.models.norms`): with its scale s frozen at the
value for the final residual x, norm(x) = sum_i gamma * C(c_i) / s + beta, so the
components' shares plus the bias term (beta . direction + the unembedding bias
difference) sum exactly to the model's logit difference. Every example checks this
and warns loudly when the error exceeds `tolerance`.

Post-sublayer norms (Gemma 2/3): what joins the residual stream is
post_attention_layernorm(attn) and post_feedforward_layernorm(mlp), so those outputs
are the layer components. For heads, the post-attention norm is linearised the same
way with the scale it computed for the whole attention output, which splits that
norm's output exactly into per-head shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from ...console import note
from ...contract import ChunkPlan, CompiledExperiment, expect_rows
from ...errors import ConfigError, ModelError
from ...experiment import Experiment
from ...labelled import LabelledTensor
from ...models.architectures import _get_module
from ...models.norms import NormForm, input_output_matrix
from ...prompts import Prompt, TokenizedPrompt, load_prompts, tokenize_prompt
from ...results import ExampleRecord
from ...sites import HookPoint, resolve_site
from ...tracing import memory
from ...tracing.execute import positions_job
from ...tracing.plan import left_pad, row_batches

ANALYSES = ("logit_lens", "dla_layers", "dla_heads")


@dataclass
class LogitAttributionExperiment(Experiment):
    """Explain the answer-minus-foil logit difference layer by layer and head by head.

    Fields:
        analyses: any of "logit_lens", "dla_layers", "dla_heads"; all chosen analyses
            come from the same trace.
        top_k: how many top next tokens the logit lens keeps at each point.
        tolerance: largest accepted |sum of components - true logit difference|.
    """

    # one row per prompt: a batch of 16 is still a small forward pass
    examples_per_trace: ClassVar[int] = 16

    analyses: tuple[str, ...] = ANALYSES
    top_k: int = 10
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise ConfigError(
                f"analyses {list(self.analyses)} are not valid; choose one or more of {', '.join(ANALYSES)}"
            )
        self.analyses = tuple(a for a in ANALYSES if a in self.analyses)
        if self.top_k < 1:
            raise ConfigError(f"top_k is {self.top_k!r}; it must be a positive integer")
        if not self.tolerance > 0:
            raise ConfigError(f"tolerance is {self.tolerance!r}; it must be positive")

    def read_data_file(self, path: str) -> list[Prompt]:
        return load_prompts(path)

    def compile(self, model) -> CompiledLogitAttribution:
        return CompiledLogitAttribution(self, model)

    def figures(self, results, out_dir: Path) -> list[Path]:
        from .figures import logit_attribution_figures

        return logit_attribution_figures(self, results, out_dir)

    def summary_rows(self, results) -> list[dict]:
        from .summaries import summary_rows

        return summary_rows(self, results)


@dataclass
class _Item:
    prompt: TokenizedPrompt

    @property
    def index(self) -> int:
        return self.prompt.index


class CompiledLogitAttribution(CompiledExperiment):
    """A `LogitAttributionExperiment` bound to a model: its read-out maps, ready to run.

    Each trace holds a batch of prompts, one row each (`row_batches`); a plan's layout
    is, per trace, the indices of the examples its rows hold, in row order."""

    def __init__(self, experiment: LogitAttributionExperiment, model) -> None:
        super().__init__(experiment, model)
        arch = model.arch
        spec = arch.spec
        hf = model.hf
        # The read-out runs here, through the model's own weights: a remote model reads
        # the few modules it needs from the server once.
        needed = [spec.final_norm, spec.unembed]
        if "dla_heads" in experiment.analyses:
            for layer in range(arch.n_layers):
                needed.append(f"{arch.block(layer)}.{spec.head_proj}")
                if spec.post_sublayer_norms:
                    needed.append(f"{arch.block(layer)}.{spec.attn_out}")
        model.require_parameters(needed)
        self.n_layers = arch.n_layers
        self.n_heads = arch.n_heads
        self.final_norm_module = _get_module(hf, spec.final_norm)
        self.final_norm = NormForm.of(self.final_norm_module, spec.final_norm)
        unembed = _get_module(hf, spec.unembed)
        self.unembed = unembed
        self.W_U = unembed.weight  # [vocab, d_model]
        self.b_U = unembed.bias if isinstance(getattr(unembed, "bias", None), torch.Tensor) else None
        self.softcap = getattr(hf.config, "final_logit_softcapping", None)
        if self.softcap and ("dla_layers" in experiment.analyses or "dla_heads" in experiment.analyses):
            note(
                f"{model.name} caps its logits (final_logit_softcapping={self.softcap}); the decomposition "
                "explains the logit difference before the cap, and is checked against that"
            )

        # What to read at the last position, in the order the forward pass makes it.
        points: list[tuple[str, HookPoint]] = []
        if spec.pos_embed:
            points.append(("pos_embed", HookPoint(spec.pos_embed, "output", None, (-1, 0))))
        self.heads = "dla_heads" in experiment.analyses
        self.head_proj: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.post_attn_norms: list[NormForm] = []
        for layer in range(self.n_layers):
            block = arch.block(layer)
            points.append((f"resid_pre.{layer}", resolve_site("resid_pre", layer, arch)))
            if self.heads:
                proj_path = f"{block}.{spec.head_proj}"
                points.append((f"z.{layer}", HookPoint(proj_path, "input", None, (layer, 1))))
                matrix, bias = input_output_matrix(_get_module(hf, proj_path), proj_path)
                # [n_heads * head_dim, d_model] -> [n_heads, head_dim, d_model]
                self.head_proj.append((matrix.reshape(self.n_heads, arch.head_dim, -1), bias))
                if spec.post_sublayer_norms:
                    points.append((f"o.{layer}", HookPoint(proj_path, "output", None, (layer, 1))))
                    norm_path = f"{block}.{spec.attn_out}"
                    self.post_attn_norms.append(NormForm.of(_get_module(hf, norm_path), norm_path))
            points.append((f"attn_out.{layer}", resolve_site("attn_out", layer, arch)))
            points.append((f"mlp_out.{layer}", resolve_site("mlp_out", layer, arch)))
        points.append(("final", HookPoint(spec.final_norm, "input", None, (self.n_layers, 0))))
        self.points = points
        self.lens_labels = [f"{layer}_{kind}" for layer in range(self.n_layers) for kind in ("pre", "mid")]
        self.lens_labels.append("final_post")
        self.layer_labels = (["embed"] + (["pos_embed"] if spec.pos_embed else [])
                             + [f"{layer}_{kind}" for layer in range(self.n_layers) for kind in ("attn_out", "mlp_out")]
                             + ["bias"])
        self.rest_labels = (["embed"] + (["pos_embed"] if spec.pos_embed else [])
                            + [f"{layer}_attn_bias" for layer in range(self.n_layers)]
                            + [f"{layer}_mlp_out" for layer in range(self.n_layers)] + ["bias"])

    # -- preparing and planning -----------------------------------------------------

    def prepare(self, example, index: int) -> _Item:
        if not isinstance(example, Prompt):
            example = Prompt.from_pair(example)
        return _Item(tokenize_prompt(self.model.tokenizer, example, index))

    def rows_for_budget(self, items: list[_Item], budget: int) -> int:
        """The prompts one trace may hold so that the trace, and the read-out of what it
        returns, peak under `budget` bytes on every device."""
        d = self.W_U.shape[1]
        layers = self.n_layers
        saved = 4 * d * len(self.points)  # per row: one vector per point read
        # the read-out: the vectors' float32 copies, the stacks it builds, and with
        # dla_heads every head's share of every attention output, per row; the logit
        # lens projects one row at a time: [points, vocab] float32 logits and softmax
        per_row = 2 * saved + 4 * d * (5 * layers + 1 + (2 * layers * self.n_heads if self.heads else 0))
        fixed = 2 * 4 * (2 * layers + 1) * self.W_U.shape[0] if "logit_lens" in self.experiment.analyses else 0
        tokens = max(len(item.prompt.ids) for item in items)
        return memory.rows_for_budget(self.model, budget, tokens, kept_per_row=saved, readout=(fixed, per_row),
                                      what="logit attribution of one prompt")

    def plan(self, items: list[_Item], row_limit: int | None) -> ChunkPlan:
        """One trace per batch of at most `row_limit` prompts (all of `items` when None),
        reading every point at the last position."""
        batches = row_batches(items, row_limit)
        jobs = []
        for batch in batches:
            input_ids, attention_mask, _ = left_pad([item.prompt.ids for item in batch], self.pad_id)
            # of the model's own logits only the answer's and the foil's leave the trace
            pair = torch.tensor([[item.prompt.answer_id, item.prompt.foil_id] for item in batch])
            jobs.append(positions_job(input_ids, attention_mask, self.points, None, pair))
        layout = [[item.index for item in batch] for batch in batches]
        return ChunkPlan(jobs, layout, row_limit, [item.index for item in items])

    # -- decoding -----------------------------------------------------------------------

    def decode(self, items: list[_Item], plan: ChunkPlan, values: list) -> list[ExampleRecord]:
        """Each trace's points and answer/foil logits -> one record per prompt, in item order."""
        plan.check_values(values)
        by_index = {item.index: item for item in items}
        records = []
        for indices, read in zip(plan.layout, values):
            batch = [by_index[index] for index in indices]
            saved = dict(read)
            logits = expect_rows(saved.pop("__logits__"), len(batch), "the answer and foil logits")
            for key, value in saved.items():
                if value.shape[0] != 1:  # a position embedding may come back as one row that broadcasts
                    expect_rows(value, len(batch), f"the activation {key!r}")
            records += self._records(batch, saved, logits)
        return records

    @torch.no_grad()
    def _records(self, items: list[_Item], saved: dict, logits: torch.Tensor) -> list[ExampleRecord]:
        # The read-out runs where the unembedding lives (the GPU locally, the CPU for a remote model).
        device = self.W_U.device
        saved = {key: value.to(device) for key, value in saved.items()}
        logits = logits.to(device)
        rows = len(items)
        answer = torch.tensor([item.prompt.answer_id for item in items], device=device)
        foil = torch.tensor([item.prompt.foil_id for item in items], device=device)
        f32 = {key: value.float().expand(rows, -1) for key, value in saved.items()}

        # The read-out direction and the bias term, per row.
        direction = (self.W_U[answer] - self.W_U[foil]).float()  # [rows, d]
        bias = torch.zeros(rows, device=device)
        if self.final_norm.beta is not None:
            bias = bias + direction @ self.final_norm.beta.to(device)
        if self.b_U is not None:
            bias = bias + (self.b_U[answer] - self.b_U[foil]).float()
        final = f32["final"]
        norm = self.final_norm.to(device)
        scale = norm.scale(final)  # [rows, 1]

        def project(stack: torch.Tensor) -> torch.Tensor:  # [..., rows, d] -> [..., rows]
            return (norm.linear(stack, scale) * direction).sum(-1)

        true = logits.float()  # [rows, 2]: the answer's logit and the foil's
        true_diff = true[:, 0] - true[:, 1]
        # With a logit cap the decomposition explains the logit before the cap.
        target = self._uncapped_diff(final, saved["final"].dtype, answer, foil) if self.softcap else true_diff

        pre = torch.stack([f32[f"resid_pre.{layer}"] for layer in range(self.n_layers)])
        attn = torch.stack([f32[f"attn_out.{layer}"] for layer in range(self.n_layers)])
        mlp = torch.stack([f32[f"mlp_out.{layer}"] for layer in range(self.n_layers)])
        embeds = [pre[0] - f32["pos_embed"], f32["pos_embed"]] if "pos_embed" in f32 else [pre[0]]

        out: dict[str, torch.Tensor] = {}
        scalars: dict[str, torch.Tensor] = {"logit_diff": true_diff, "bias": bias}
        if self.softcap:
            scalars["logit_diff_uncapped"] = target
        analyses = self.experiment.analyses
        if "logit_lens" in analyses:
            # 0_pre, 0_mid, 1_pre, ...: the block input, then the input plus what attention adds
            points = torch.stack([p for layer in range(self.n_layers) for p in (pre[layer], pre[layer] + attn[layer])]
                                 + [final])
            out["logit_lens_linear"] = project(points) + bias
            out["logit_lens"], out["logit_lens_top_ids"], out["logit_lens_top_probs"] = self._fresh_lens(
                points, saved["final"].dtype, answer, foil
            )
            scalars["logit_lens_linear_error"] = out["logit_lens_linear"][-1] - target
        if "dla_layers" in analyses:
            parts = embeds + [c for layer in range(self.n_layers) for c in (attn[layer], mlp[layer])]
            out["dla_layers"] = torch.cat([project(torch.stack(parts)), bias[None]])
            scalars["dla_layers_error"] = out["dla_layers"].sum(0) - target
        if "dla_heads" in analyses:
            heads, attn_bias = self._head_components(f32, device)  # [L, H, rows, d], [L, rows, d]
            out["dla_heads"] = project(heads)  # [L, H, rows]
            rest = embeds + list(attn_bias) + list(mlp)
            out["dla_heads_rest"] = torch.cat([project(torch.stack(rest)), bias[None]])
            total = out["dla_heads"].sum((0, 1)) + out["dla_heads_rest"].sum(0)
            scalars["dla_heads_error"] = total - target

        records = []
        for row, item in enumerate(items):
            record = self._record(item, row, out, {k: float(v[row]) for k, v in scalars.items()})
            self._check(record)
            records.append(record)
        return records

    def _uncapped_diff(self, final, dtype, answer, foil) -> torch.Tensor:
        with torch.no_grad():
            logits = self.unembed(self.final_norm_module(final.to(dtype))).float()
        return logits.gather(1, answer[:, None])[:, 0] - logits.gather(1, foil[:, None])[:, 0]

    def _fresh_lens(self, points, dtype, answer, foil):
        """The usual logit lens: the model's own final norm and unembedding at each point."""
        diffs, ids, probs = [], [], []
        k = self.experiment.top_k
        with torch.no_grad():
            for row in range(points.shape[1]):  # one row at a time bounds the [points, vocab] logits
                logits = self.unembed(self.final_norm_module(points[:, row].to(dtype))).float()
                if self.softcap:
                    logits = self.softcap * torch.tanh(logits / self.softcap)
                diffs.append(logits[:, answer[row]] - logits[:, foil[row]])
                top = logits.softmax(-1).topk(k, dim=-1)
                ids.append(top.indices)
                probs.append(top.values)
        # [points, rows], [points, rows, k]
        return torch.stack(diffs, 1), torch.stack(ids, 1), torch.stack(probs, 1)

    def _head_components(self, f32, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head shares of each attention output [L, H, rows, d], and the attention
        output bias share [L, rows, d], both as they join the residual stream."""
        heads, biases = [], []
        for layer in range(self.n_layers):
            matrix, proj_bias = self.head_proj[layer]
            z = f32[f"z.{layer}"]
            rows = z.shape[0]
            z = z.reshape(rows, self.n_heads, -1)
            per_head = torch.einsum("rhk,hkd->hrd", z, matrix.float())  # [H, rows, d]
            bias = (proj_bias.float() if proj_bias is not None else torch.zeros_like(per_head[0, 0])).expand(rows, -1)
            if self.post_attn_norms:
                post = self.post_attn_norms[layer].to(device)
                scale = post.scale(f32[f"o.{layer}"])
                per_head = post.linear(per_head, scale)
                bias = post.linear(bias, scale) + (post.beta if post.beta is not None else 0.0)
            heads.append(per_head)
            biases.append(bias)
        return torch.stack(heads), torch.stack(biases)

    def _record(self, item: _Item, row: int, out: dict, scalars: dict) -> ExampleRecord:
        tensors = {}
        if "logit_lens" in out:
            points = {"point": self.lens_labels}
            tensors["logit_lens"] = LabelledTensor(out["logit_lens"][:, row].cpu(), ("point",), points)
            tensors["logit_lens_linear"] = LabelledTensor(out["logit_lens_linear"][:, row].cpu(), ("point",), points)
            tensors["logit_lens_top_ids"] = LabelledTensor(out["logit_lens_top_ids"][:, row].cpu(), ("point", "rank"), points)
            tensors["logit_lens_top_probs"] = LabelledTensor(out["logit_lens_top_probs"][:, row].cpu(), ("point", "rank"), points)
        if "dla_layers" in out:
            tensors["dla_layers"] = LabelledTensor(out["dla_layers"][:, row].cpu(), ("component",), {"component": self.layer_labels})
        if "dla_heads" in out:
            tensors["dla_heads"] = LabelledTensor(
                out["dla_heads"][:, :, row].cpu(), ("layer", "head"),
                {"layer": list(range(self.n_layers)), "head": list(range(self.n_heads))},
            )
            tensors["dla_heads_rest"] = LabelledTensor(out["dla_heads_rest"][:, row].cpu(), ("component",), {"component": self.rest_labels})
        info = item.prompt.info()
        if "logit_lens" in out:
            decode = self.model.tokenizer.decode
            info["logit_lens_top_tokens"] = [[decode([int(i)]) for i in point] for point in out["logit_lens_top_ids"][:, row].tolist()]
        return ExampleRecord(index=item.index, tensors=tensors, scalars=scalars, info=info)

    def _check(self, record: ExampleRecord) -> None:
        """Warn loudly where the components do not add up to the model's logit difference."""
        target = record.scalars.get("logit_diff_uncapped", record.scalars["logit_diff"])
        for name, what in (("dla_layers_error", "the layer components"), ("dla_heads_error", "the heads and other components"),
                           ("logit_lens_linear_error", "the linearised logit lens at final_post")):
            error = record.scalars.get(name)
            if error is None:
                continue
            if math.isnan(error):
                raise ModelError(
                    f"example {record.index}: the decomposition produced NaN (the activations overflow in "
                    f"{self.model.dtype}); run in float32 (--dtype float32)"
                )
            if abs(error) > self.experiment.tolerance:
                note(
                    f"WARNING: example {record.index}: {what} sum to {target + error:.6g} but the model's "
                    f"logit difference is {target:.6g} (error {error:.3g} > tolerance {self.experiment.tolerance:g}); "
                    "the decomposition does not explain this model exactly: check its ArchSpec (attn_out, "
                    "mlp_out, final_norm), or run in float32"
                )

