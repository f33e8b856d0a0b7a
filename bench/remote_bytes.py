"""Bytes a remote run sends and receives per example, for each experiment family.

Starts the loopback NDIF test server (tests/ndif_server.py) on 127.0.0.1 serving a
built-in alias under its original repo id, runs each family's default experiment
remotely for a few examples, and prints what travelled: the request blobs sent (the
serialised session, nnexp's code by value included) and the results received, per
example. Results are what the traces reduce to on the server (a metric per row, the
last position, per-position attributions), so they are small; read-out weights that
logit attribution and attribute extraction fetch once per run are counted apart.

    .venv/bin/python bench/remote_bytes.py [--model smollm2-135m] [--limit 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nnexp  # noqa: E402
from nnexp.registry import EXPERIMENTS  # noqa: E402
from nnexp.models.aliases import ALIASES, alias_folder  # noqa: E402
from tests.ndif_fixture import start_ndif_server  # noqa: E402

FAMILIES = {
    "ioi-patching": {},
    "logit-attribution": {},
    "counterfact-attribution": {},
    "attention-knockout": {},
    "attribute-extraction": {},
    "sublayer-knockout": {},
    "causal-tracing": {"samples": 3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(ALIASES))
    parser.add_argument("--limit", type=int, default=4)
    args = parser.parse_args()
    repo_id = ALIASES[args.model].hub_id
    with tempfile.TemporaryDirectory() as tmp:
        server = start_ndif_server({repo_id: alias_folder(args.model)}, Path(tmp))
        try:
            rows = []
            for name, params in FAMILIES.items():
                server.reset()
                experiment = EXPERIMENTS[name](**params)
                out = Path(tmp) / name
                results = nnexp.run(experiment, args.model, backend="remote", remote={"host": server.url},
                                    out=out, limit=args.limit, figures=False)
                traffic = json.loads((out / "remote.json").read_text())
                jobs = server.stats()["jobs"]
                chunk_jobs = jobs[-_chunks(len(results), experiment.examples_per_trace):]
                sent = sum(job["blob_bytes"] for job in chunk_jobs)
                prep = sum(job["result_bytes"] or 0 for job in jobs[: len(jobs) - len(chunk_jobs)])
                rows.append((name, len(results), len(chunk_jobs), sent // len(results),
                             traffic["bytes_per_example"], prep))
        finally:
            server.stop()
    print(f"model: {args.model} served as {repo_id}; {args.limit} examples per family; compressed bytes\n")
    print("| experiment | examples | requests | sent / example | received / example | preparatory passes received |")
    print("|---|---|---|---|---|---|")
    for name, n, requests, sent, received, prep in rows:
        print(f"| {name} | {n} | {requests} | {sent:,} | {received:,} | {prep:,} |")


def _chunks(n: int, per: int) -> int:
    return -(-n // per)


if __name__ == "__main__":
    main()
