"""The benchmark harness runs end to end on a tiny model: every section, every
contender, and the checks inside it that each contender computes nnexp's numbers
(TransformerLens' per-cell patching included). Timings are not asserted: speed is
measured by `python -m bench.run`, not by tests."""

from __future__ import annotations

import pytest

pytest.importorskip("transformer_lens", reason="pip install -e '.[test]' installs TransformerLens")


def test_harness_runs_every_section(tmp_path, capsys):
    from bench.run import main

    out = tmp_path / "tiny.md"
    main(["--model", "gpt2-tiny-shape", "--reps", "1", "--examples", "24", "--batches", "1,8", "--facts", "4",
          "--transformer-lens", "--tl-cells", "4", "--loop-cells", "4", "--loop-layers", "1", "--out", str(out)])
    text = out.read_text()
    for title in ("IOI patching, residual stream", "IOI patching, heads", "All-layer contrastive attribution",
                  "Dataset throughput", "Memory budget", "Attribution patching: every head x position cell"):
        assert title in text
    for contender in ("floor: one plain forward", "nnexp: one trace", "one invoke per patched run",
                      "a loop of separate traces", "TransformerLens: one forward per cell", "per-layer loop"):
        assert contender in text
