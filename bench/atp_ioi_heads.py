"""Do AtP and AtP* find the heads that exact patching finds? On the built-in IOI pairs:

    python -m bench.atp_ioi_heads [--model smollm2-135m] [--n-examples 16] [--out DIR]

1. Exact: activation patching of each head's output at every position at once
   (`ioi-patching`, sites head_out, head_positions "all": n_layers x n_heads rows per
   pair), the normalised effect averaged over the pairs.
2. AtP and AtP*: `ioi-attribution-patching` on head_out (every layer x head x position
   cell, the top 50 cells per variant and 50 sampled cells verified exactly); a head's
   score is its estimate summed over positions (for AtP, the first-order estimate of
   patching the head at every position at once; for AtP*, a sum of magnitudes, a
   ranking score), averaged over the pairs.

Prints the exact top-10 heads by |mean effect|, how many of them each variant's
top-10 by |mean score| recovers, the Spearman correlation of |score| with |exact| over
every head, the heads where they disagree, and the per-cell verification summaries.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import nnexp
from nnexp import console
from nnexp.kinds.attribution_patching.summaries import head_totals
from nnexp.registry import EXPERIMENTS
from nnexp.statistics import spearman


def top(values: torch.Tensor, k: int) -> list[tuple[int, int]]:
    flat = values.abs().flatten()
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    heads = values.shape[1]
    return [(int(i) // heads, int(i) % heads) for i in order]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-examples", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    console.set_quiet(True)
    model = nnexp.load_model(args.model)
    out = Path(args.out or tempfile.mkdtemp())
    exact_run = nnexp.run(EXPERIMENTS["ioi-patching"](sites=("head_out",), head_positions="all",
                                                      n_examples=args.n_examples),
                          model, out=out / "exact", figures=False)
    atp_run = nnexp.run(EXPERIMENTS["ioi-attribution-patching"](sites=("head_out",), n_examples=args.n_examples),
                        model, out=out / "atp", figures=True)
    exact = torch.stack([r["head_out"].values.double() for r in exact_run]).nanmean(0)
    scores = {v: torch.stack([head_totals(r, v).values.double() for r in atp_run]).nanmean(0)
              for v in ("atp", "atp_star")}
    truth = top(exact, args.k)
    print(f"{args.model}: {len(exact_run)} IOI pairs; exact top-{args.k} heads by |mean normalised effect| "
          f"(head_out, all positions):")
    print("  " + ", ".join(f"L{layer}H{head} ({exact[layer, head]:.3f})" for layer, head in truth))
    for variant, score in scores.items():
        found = top(score, args.k)
        hits = set(found) & set(truth)
        rho = spearman(score.abs().flatten().numpy(), exact.abs().flatten().numpy())
        signed = spearman(score.flatten().numpy(), exact.flatten().numpy()) if variant == "atp" else float("nan")
        print(f"{variant}: recovers {len(hits)} of the exact top-{args.k}; Spearman |score| vs |exact| over "
              f"{exact.numel()} heads {rho:.3f}" + ("" if np.isnan(signed) else f" (signed {signed:.3f})"))
        print(f"  its top-{args.k}: " + ", ".join(f"L{l}H{h} ({score[l, h]:.3f}; exact {exact[l, h]:.3f})"
                                              for l, h in found))
        missed = [c for c in truth if c not in hits]
        if missed:
            print("  missed: " + ", ".join(
                f"L{l}H{h} (exact {exact[l, h]:.3f}, {variant} {score[l, h]:.3f}, rank "
                f"{int((score.abs() > score[l, h].abs()).sum()) + 1})" for l, h in missed))
    records = list(atp_run)
    for variant in ("atp", "atp_star"):
        recall = np.mean([r.scalars[f"recall_{variant}"] for r in records])
        rho = np.mean([r.scalars[f"spearman_{variant}"] for r in records])
        print(f"per cell (layer x head x position), mean over pairs: {variant} recall@50 {recall:.3f}, Spearman "
              f"{rho:.3f} over the verified cells")
    print(f"results and figures in {out}")


if __name__ == "__main__":
    main()
