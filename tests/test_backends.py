"""Every experiment family gives the same numbers on every backend.

`remote-local` is nnsight's in-process check of the remote path: each chunk's traces
are serialised into one session request and deserialised with nnexp's own modules
hidden, as on a server that has only torch, transformers and nnsight. The remote
runs against a real server on 127.0.0.1 are in tests/test_remote.py.
"""

from __future__ import annotations

import json

import pytest
import torch

import nnexp
from tests.conftest import tiny_model
from tests.test_gradient_attribution import gpt2_facts


def facts_file(tmp_path, tokenizer, n=3):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(f.to_json()) + "\n" for f in gpt2_facts(tokenizer, n)))
    return str(path)


def family_experiments(tmp_path, tokenizer) -> dict:
    """One small experiment of each family, on data a random GPT-2 can take."""
    from nnexp.registry import EXPERIMENTS

    facts = facts_file(tmp_path, tokenizer)
    return {
        "ioi-patching": EXPERIMENTS["ioi-patching"](sites=("resid_post", "head_out"), n_examples=2),
        "logit-attribution": EXPERIMENTS["logit-attribution"](),
        "counterfact-attribution": EXPERIMENTS["counterfact-attribution"](data=facts),
        "attention-knockout": EXPERIMENTS["attention-knockout"](data=facts, window=2),
        "attribute-extraction": EXPERIMENTS["attribute-extraction"](data=facts, top_k=3),
        "sublayer-knockout": EXPERIMENTS["sublayer-knockout"](data=facts, ablation="mean", window=2),
        "causal-tracing": EXPERIMENTS["causal-tracing"](data=facts, samples=2, window=2),
    }


def assert_same_records(a, b, exact=True):
    assert [r.index for r in a] == [r.index for r in b]
    for ra, rb in zip(a, b):
        assert ra.tensors.keys() == rb.tensors.keys()
        for name in ra.tensors:
            x, y = ra[name].values, rb[name].values
            if exact:
                assert torch.equal(x, y) or torch.equal(torch.nan_to_num(x), torch.nan_to_num(y)), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        tolerance = dict(rel=1e-5, abs=1e-6) if exact else dict(rel=1e-3, abs=1e-4)
        assert ra.scalars == pytest.approx(rb.scalars, nan_ok=True, **tolerance)


FAMILIES = ["ioi-patching", "logit-attribution", "counterfact-attribution", "attention-knockout",
            "attribute-extraction", "sublayer-knockout", "causal-tracing"]


@pytest.mark.parametrize("name", FAMILIES)
def test_remote_local_equals_local(name, tmp_path):
    model = tiny_model("gpt2")
    experiment = family_experiments(tmp_path, model.tokenizer)[name]
    local = nnexp.run(experiment, model, out=tmp_path / "local", limit=3, figures=False)
    remote = nnexp.run(experiment, model, out=tmp_path / "remote", limit=3, figures=False, backend="remote-local")
    assert model.executor.kind == "remote-local"
    assert len(local) > 0
    assert_same_records(list(local), list(remote))
