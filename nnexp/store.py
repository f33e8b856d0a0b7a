"""The results directory: spec, one safetensors file per example, an index, figures.

Layout of `results/<experiment>/<model>/<run>/`:

    spec.json                  experiment (class + every parameter), model, data, versions
    examples/000000.safetensors  one file per finished example: its tensors, and in the
                               header metadata its axis names, labels, scalars and info
                               (prompts, token ids, token strings, answer, foil)
    examples.jsonl             a readable index: one line per stored example
    jobs.json                  remote runs: chunks submitted without waiting: job id, examples,
                               row limit and plan fingerprint (what decoding them needs)
    remote.json                remote runs: the host, and bytes received per example
    figures/                   plotly HTML (and PNG when a renderer is available)

Each example file is written to a temporary name and renamed into place, so a run
killed at any moment leaves only complete examples; rerunning the same command
finds them and computes only the rest. Nothing here is pickled: tensors are
safetensors, everything else JSON.

The `<run>` name is a hash of what determines the numbers (experiment parameters,
model, dtype, data content), so the same command always lands in the same directory
and resumes, while a changed parameter starts a new run beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .console import note
from .errors import ResultsError
from .labelled import LabelledTensor
from .results import ExampleRecord, Results

FORMAT = "nnexp-results/1"


def identity(spec: dict) -> dict:
    """The parts of a spec that determine the numbers (not device, limits or versions)."""
    params = dict(spec["experiment"]["params"])
    params.pop("data", None)  # the data file is identified by its content below
    data = {k: v for k, v in spec["data"].items() if k not in ("path", "n_examples")}
    model = spec["model"]
    return {
        # The class by name, not by module path: the same class imported as a module or
        # loaded from its file by `nnexp run file.py` is the same experiment.
        "experiment": {
            "name": spec["experiment"]["name"],
            "class": spec["experiment"]["class"].rpartition(":")[2],
            "params": params,
        },
        "model": {"name": model["name"], "source": model["source"], "dtype": model["dtype"],
                  **({"quantization": model["quantization"]} if model.get("quantization") else {})},
        "data": data,
    }


def run_id(spec: dict) -> str:
    blob = json.dumps(identity(spec), sort_keys=True).encode()
    return "run-" + hashlib.sha256(blob).hexdigest()[:10]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class SubmittedJob:
    """What decoding a submitted chunk needs, whatever the options of the command that
    collects it: its examples, the row limit it was planned under, and the fingerprint
    of that plan (`nnexp.contract.ChunkPlan.fingerprint`)."""

    examples: list[int]
    row_limit: int | None
    layout: str


class RunDirectory:
    def __init__(self, path) -> None:
        self.path = Path(path)
        self.examples_dir = self.path / "examples"
        self.figures_dir = self.path / "figures"
        self.spec_path = self.path / "spec.json"

    # -- spec ---------------------------------------------------------------------

    def read_spec(self) -> dict:
        if not self.spec_path.is_file():
            raise ResultsError(
                f"{self.path} is not an nnexp results directory (no spec.json); "
                "give the directory that `nnexp run` printed"
            )
        try:
            spec = json.loads(self.spec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ResultsError(f"{self.spec_path} is not valid JSON ({error.msg}); restore or delete it") from None
        if spec.get("format") != FORMAT:
            raise ResultsError(f"{self.spec_path} has format {spec.get('format')!r}; this nnexp reads {FORMAT}")
        return spec

    def open(self, spec: dict) -> None:
        """Create the directory for `spec`, or check that an existing one holds the same run."""
        if self.spec_path.exists():
            stored = self.read_spec()
            if identity(stored) != identity(spec):
                differ = _differences(identity(stored), identity(spec))
                raise ResultsError(
                    f"{self.path} holds results of a different run (differs in {', '.join(differ)}); "
                    "choose another --out directory, or delete this one to start over"
                )
            return
        self.examples_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.spec_path, json.dumps(spec, indent=2) + "\n")

    # -- examples -------------------------------------------------------------------

    def example_path(self, index: int) -> Path:
        return self.examples_dir / f"{index:06d}.safetensors"

    def done(self) -> set[int]:
        """Indices of examples already stored (complete files only)."""
        if not self.examples_dir.is_dir():
            return set()
        out = set()
        for path in self.examples_dir.glob("*.safetensors"):
            if path.name.startswith(".") or not path.stem.isdigit():
                continue
            try:
                with safe_open(str(path), "pt") as handle:
                    handle.metadata()
            except Exception:  # noqa: BLE001 - any unreadable file is recomputed
                note(f"{path} is unreadable; treating that example as not yet computed")
                continue
            out.add(int(path.stem))
        return out

    def write_example(self, record: ExampleRecord) -> None:
        tensors = {name: t.values.detach().to("cpu").contiguous() for name, t in record.tensors.items()}
        header = {
            "index": record.index,
            "dims": {name: list(t.dims) for name, t in record.tensors.items()},
            "coords": {name: t.coords for name, t in record.tensors.items()},
            "scalars": record.scalars,
            "info": record.info,
        }
        path = self.example_path(record.index)
        tmp = path.with_name(f".tmp-{path.name}")
        save_file(tensors, str(tmp), metadata={"nnexp": json.dumps(header)})
        os.replace(tmp, path)

    def read_example(self, path: Path) -> ExampleRecord:
        try:
            with safe_open(str(path), "pt") as handle:
                header = json.loads(handle.metadata()["nnexp"])
                tensors = {
                    name: LabelledTensor(handle.get_tensor(name), tuple(dims), header["coords"].get(name, {}))
                    for name, dims in header["dims"].items()
                }
        except Exception as error:  # noqa: BLE001
            raise ResultsError(f"cannot read {path} ({error}); delete it and rerun to recompute that example") from None
        return ExampleRecord(header["index"], tensors, header["scalars"], header["info"])

    def read_records(self) -> list[ExampleRecord]:
        return [self.read_example(self.example_path(i)) for i in sorted(self.done())]

    # -- remote jobs ----------------------------------------------------------------

    @property
    def jobs_path(self) -> Path:
        return self.path / "jobs.json"

    def read_jobs(self) -> dict[str, SubmittedJob]:
        """Submitted chunks not yet collected, by job id."""
        if not self.jobs_path.is_file():
            return {}
        try:
            data = json.loads(self.jobs_path.read_text(encoding="utf-8"))
            jobs = {str(job): SubmittedJob([int(i) for i in entry["examples"]],
                                           None if entry["row_limit"] is None else int(entry["row_limit"]),
                                           str(entry["layout"]))
                    for job, entry in data["jobs"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise ResultsError(f"{self.jobs_path} is not a valid job list (or was written by an older nnexp); delete "
                               "it and run `nnexp resume` to resubmit its examples") from None
        return jobs

    def _write_jobs(self, jobs: dict[str, SubmittedJob]) -> None:
        if not jobs:
            self.jobs_path.unlink(missing_ok=True)
            return
        data = {"jobs": {job: dataclasses.asdict(entry) for job, entry in jobs.items()}}
        _atomic_write_text(self.jobs_path, json.dumps(data, indent=1) + "\n")

    def add_job(self, job_id: str, job: SubmittedJob) -> None:
        jobs = self.read_jobs()
        jobs[job_id] = job
        self._write_jobs(jobs)

    def forget_job(self, job_id: str) -> None:
        jobs = self.read_jobs()
        jobs.pop(job_id, None)
        self._write_jobs(jobs)

    def add_remote_traffic(self, description: dict, received: int, examples: int) -> dict:
        """Add to the bytes received from a server and the examples they carried."""
        path = self.path / "remote.json"
        stats = {"bytes_received": 0, "examples_received": 0}
        if path.is_file():
            try:
                stats.update(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError:
                pass
        stats.update(description)
        stats["bytes_received"] += received
        stats["examples_received"] += examples
        if stats["examples_received"]:
            stats["bytes_per_example"] = round(stats["bytes_received"] / stats["examples_received"])
        _atomic_write_text(path, json.dumps(stats, indent=2) + "\n")
        return stats

    def write_index(self, records: list[ExampleRecord]) -> None:
        lines = [json.dumps({"index": r.index, **r.scalars, **r.info}) for r in records]
        _atomic_write_text(self.path / "examples.jsonl", "".join(line + "\n" for line in lines))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        name = f"{prefix}{key}"
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], name + ".")
        elif a.get(key) != b.get(key):
            out.append(name)
    return out


def load_results(path) -> Results:
    """Load a results directory written by `nnexp run` (or `nnexp.run`)."""
    directory = RunDirectory(path)
    spec = directory.read_spec()
    return Results(directory.path, spec, directory.read_records())
