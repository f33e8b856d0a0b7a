"""Parity with Inseq 0.7.1's `layer_gradient_x_activation` (contrastive attribution).

Inseq runs in its own virtual environment (it cannot share one with TransformerLens;
see tests/inseq_env.py), built on first use and cached, as a subprocess on the same
saved weights. For each fact, layer and metric, Inseq attributes the prompt with the
true target as the generated token and the false target as the contrast; nnexp
computes every layer from one trace. They must agree to 1e-4 (relative to the
attribution's scale) per hidden unit, summed over the hidden dimension, and after
Inseq's default aggregation (L2 norm over the hidden dimension, normalised over the
positions), and the metric values must agree too.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from safetensors.torch import load_file

from nnexp.counterfact import builtin_facts
from nnexp.kinds.gradient_attribution import GradientAttributionExperiment
from tests.helpers import assert_close_relative, gpt2_facts, save_tiny_model
from tests.inseq_env import inseq_python

ORACLE = __import__("pathlib").Path(__file__).with_name("inseq_oracle.py")
METRICS = ["contrast_prob_diff", "contrast_logits_diff"]


@pytest.fixture(scope="session")
def inseq():
    return inseq_python()


def run_inseq(python, folder, module: str, layers, facts, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps({
        "model": str(folder), "module": module, "layers": layers, "metrics": METRICS,
        "examples": [{"prompt": f.prompt, "target": f.target_true, "contrast": f.target_false} for f in facts],
    }))
    out = tmp_path / "inseq.safetensors"
    result = subprocess.run([str(python), str(ORACLE), str(request), str(out)], capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out)


def compare(model, facts, layers, inseq_out):
    for metric in METRICS:
        experiment = GradientAttributionExperiment(metric=metric, layers=tuple(layers), keep_hidden=True)
        compiled = experiment.compile(model)
        records = compiled.run([compiled.prepare(f, i) for i, f in enumerate(facts)])  # one trace, padded
        for i, record in enumerate(records):
            assert record.info["ids"] == inseq_out[f"tokens.{i}"].tolist(), "Inseq saw different tokens"
            assert record.scalars["metric"] == pytest.approx(float(inseq_out[f"score.{metric}.{i}"][0]), rel=1e-4, abs=1e-7)
            for row, layer in enumerate(layers):
                raw = inseq_out[f"raw.{metric}.{i}.{layer}"]
                what = f"{metric} fact {i} layer {layer}"
                assert_close_relative(record["attribution_hidden"].values[row], raw, what + " per hidden unit")
                assert_close_relative(record["attribution"].values[row], raw.sum(-1), what + " summed")
                assert_close_relative(record["attribution_norm"].values[row], inseq_out[f"agg.{metric}.{i}.{layer}"],
                                      what + " aggregated as Inseq does")


def test_random_gpt2_matches_inseq(inseq, tmp_path):
    folder = save_tiny_model("gpt2", tmp_path / "gpt2", seed=5)
    from nnexp import load_model

    model = load_model(str(folder))
    facts = gpt2_facts(model.tokenizer, 4)
    layers = [0, 1, 2]
    compare(model, facts, layers, run_inseq(inseq, folder, "transformer.h.{layer}.mlp", layers, facts, tmp_path))


@pytest.mark.slow
def test_smollm2_matches_inseq(inseq, smollm2, tmp_path):
    from nnexp.models.aliases import alias_folder

    facts = [f for f in builtin_facts() if f.relation_id in ("P36", "P176")][::6][:3]
    layers = [0, 9, 19, 29]
    out = run_inseq(inseq, alias_folder("smollm2-135m"), "model.layers.{layer}.mlp", layers, facts, tmp_path)
    compare(smollm2, facts, layers, out)
    # the real model prefers the true attribute on these facts, so the metric is not noise
    assert all(float(out[f"score.contrast_logits_diff.{i}"][0]) > 0 for i in range(len(facts)))
