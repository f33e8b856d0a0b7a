"""Every experiment family gives the same numbers on every backend.

`remote-local` is nnsight's in-process check of the remote path: each chunk's traces
are serialised into one session request and deserialised with nnexp's own modules
hidden, as on a server that has only torch, transformers and nnsight. The remote
runs against a real server on 127.0.0.1 are in tests/test_remote.py.
"""

from __future__ import annotations

import pytest

import nnexp
from tests.helpers import KINDS, assert_same_records, kind_experiments, tiny_model


@pytest.mark.parametrize("name", KINDS)
def test_remote_local_equals_local(name, tmp_path):
    model = tiny_model("gpt2")
    experiment = kind_experiments(tmp_path, model.tokenizer)[name]
    local = nnexp.run(experiment, model, out=tmp_path / "local", limit=3, figures=False)
    remote = nnexp.run(experiment, model, out=tmp_path / "remote", limit=3, figures=False, backend="remote-local")
    assert model.executor.kind == "remote-local"
    assert len(local) > 0
    assert_same_records(list(local), list(remote))
