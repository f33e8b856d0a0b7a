"""Does AtP*'s QK fix bring query and key estimates closer to exact patching? On the
built-in IOI pairs:

    python -m bench.atp_qk_fix [--model smollm2-135m] [--n-examples 4] [--top-k 20] [--sample 40] [--out DIR]

`ioi-attribution-patching` on sites q and k (every layer x head x position cell; k per
key/value head), without GradDrop; the top-k cells by |AtP| and a seeded sample of the
rest are patched exactly. Over the verified cells of every pair, per site: Spearman's
correlation of the signed estimate with the exact effect, and the mean |estimate -
exact|, for plain AtP (`{site}.atp`, the gradient through the softmax) and the QK fix
(`{site}.atp_qk`, the pattern row recomputed exactly). Effects are normalised as
activation patching's. The verified cells are chosen by |AtP|, so the comparison is
over AtP's own top cells plus a random sample.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import nnexp
from nnexp.registry import EXPERIMENTS
from nnexp.statistics import spearman


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-examples", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--sample", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model = nnexp.load_model(args.model)
    experiment = EXPERIMENTS["ioi-attribution-patching"](sites=("q", "k"), n_examples=args.n_examples,
                                                         top_k=args.top_k, sample=args.sample, graddrop=False)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "atp-qk"
    results = nnexp.run(experiment, model, out=out, figures=False)
    for site in ("q", "k"):
        exact, estimates = [], {"atp": [], "atp_qk": []}
        for record in results:
            values = record[f"{site}.exact"].values
            known = ~torch.isnan(values)
            exact.append(values[known])
            for name in estimates:
                estimates[name].append(record[f"{site}.{name}"].values[known])
        exact = torch.cat(exact)
        line = [f"{site}: {len(exact)} verified cells over {len(results)} pairs (max |exact| "
                f"{float(exact.abs().max()):.3f})"]
        for name, label in (("atp", "AtP"), ("atp_qk", "QK fix")):
            values = torch.cat(estimates[name])
            line.append(f"{label}: Spearman {spearman(values.tolist(), exact.tolist()):.3f}, mean |estimate - exact| "
                        f"{float((values - exact).abs().mean()):.4f}")
        print("; ".join(line))


if __name__ == "__main__":
    main()
