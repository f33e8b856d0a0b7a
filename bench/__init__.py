"""nnexp's benchmarks: `python -m bench.run` (see bench/RESULTS.md)."""

import os

# TransformerLens' per-cell loops draw progress bars. tqdm reads this when it is first
# imported, so it is set here, before any benchmark module imports it.
os.environ.setdefault("TQDM_DISABLE", "1")
