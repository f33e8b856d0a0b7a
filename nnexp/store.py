"""The results directory: spec, one safetensors file per example, an index, figures.

Layout of `results/<experiment>/<model>/<run>/`:

    spec.json                  experiment (class + every parameter), model, data, versions,
                               the run's identity (`run_id`) and the options of its latest
                               command (its --limit, ci and n_boot among them)
    summary.csv                every dataset-level mean with its bootstrap interval
                               (`Results.summary()`, `nnexp.statistics`)
    examples/000000.safetensors  one file per finished example: its tensors, and in the
                               header metadata its axis names, labels, scalars, info
                               (prompts, token ids, token strings, answer, foil), the run's
                               identity and a checksum (`nnexp.example_file`)
    examples.jsonl             a readable index: one line per stored example
    skipped.json               examples the experiment chose not to compute (only_correct,
                               multi_token=skip), so that they do not count as missing, and why
    report.html                the run in one page: what was run, on what, the summary with its
                               intervals, every figure (`nnexp.report`)
    jobs.json                  remote runs: chunks submitted without waiting: job id, examples,
                               row limit and plan fingerprint (what decoding them needs)
    remote.json                remote runs: the host, and bytes received per example
    figures/                   plotly HTML (and PNG when a renderer is available)
    .claims/, .nnexp.lock      which process computes which example, and a lock for the
                               short updates of the files above (`nnexp.claims`)

Each file is written under a temporary name unique to its writer and renamed into
place, so a run killed at any moment leaves only complete files, and several
processes writing into one directory never trip over each other's files; rerunning
the same command finds the stored examples and computes only the rest.
Nothing here is pickled: tensors are safetensors, everything else JSON.

The `<run>` name is a hash of what determines the numbers (experiment parameters,
model, dtype, data content), so the same command always lands in the same directory
and resumes, while a changed parameter starts a new run beside it. The same hash is
stored in spec.json and in every example, and checked whenever either is read: a
spec.json edited after the run started, or an example another run wrote, is refused
rather than mixed into this run's numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .claims import Claim, Claims
from .console import note
from .disk import failure_fix, failure_reason, write_atomically
from .errors import ResultsError, StoreWriteError
from .example_file import DamagedExampleError, decode, encode
from .results import ExampleRecord, Results
from .statistics import STATISTICS_PARAMS

FORMAT = "nnexp-results/2"
OLDER_FORMATS = ("nnexp-results/1",)  # without run identity or checksums


def identity(spec: dict) -> dict:
    """The parts of a spec that determine the numbers (not device, limits or versions)."""
    params = dict(spec["experiment"]["params"])
    params.pop("data", None)  # the data file is identified by its content below
    for name in STATISTICS_PARAMS:  # how results are summarised (ci, n_boot), not what is computed
        params.pop(name, None)
    params.pop("prefix_sharing", None)  # how fast the numbers come, not what they are
    data = {k: v for k, v in spec["data"].items() if k not in ("path", "n_examples")}
    model = spec["model"]
    return {
        # The class by name, not by module path: the same class imported as a module or
        # loaded from its file by `nnexp run file.py` is the same experiment.
        "experiment": {
            "name": spec["experiment"]["name"],
            "class": spec["experiment"]["class"].rpartition(":")[2],
            "params": params,
            # what a user's experiment declared beyond its parameters (its runs)
            **({"declared": spec["experiment"]["declared"]} if "declared" in spec["experiment"] else {}),
        },
        "model": {"name": model["name"], "source": model["source"], "dtype": model["dtype"],
                  **({"quantization": model["quantization"]} if model.get("quantization") else {})},
        "data": data,
    }


def run_id(spec: dict) -> str:
    blob = json.dumps(identity(spec), sort_keys=True).encode()
    return "run-" + hashlib.sha256(blob).hexdigest()[:10]


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
        self.claims = Claims(self.path / ".claims")
        self.run_id: str | None = None  # known once the spec is read or written
        self._lock: FileLock | None = None

    def lock(self) -> FileLock:
        """A lock on the directory's shared files (spec, job list, skipped examples,
        figures), held for the moment one process updates them."""
        if self._lock is None:
            self._lock = FileLock(self.path / ".nnexp.lock", thread_local=False)
        return self._lock

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomically(path, data)
        except OSError as error:
            raise self.write_error(path, error) from None

    def _write_json(self, path: Path, data) -> None:
        self._write(path, (json.dumps(data, indent=2) + "\n").encode())

    def write_error(self, path: Path, error: OSError) -> StoreWriteError:
        """What a failed write says: what is stored, and what to do."""
        return StoreWriteError(
            f"cannot write {path} ({failure_reason(error)}); the {self.count_files()} examples stored in {self.path} are "
            f"complete: {failure_fix(error)}, then `nnexp resume {self.path}` continues from there")

    # -- spec ---------------------------------------------------------------------

    def read_spec(self) -> dict:
        """The spec, checked: a known format, and contents that still match the identity
        the run was started under."""
        if not self.spec_path.is_file():
            raise ResultsError(
                f"{self.path} is not an nnexp results directory (no spec.json); "
                "give the directory that `nnexp run` printed"
            )
        try:
            spec = json.loads(self.spec_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ResultsError(f"{self.spec_path} is not valid JSON ({error.msg}); restore or delete it") from None
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            found = spec.get("format") if isinstance(spec, dict) else None
            if found in OLDER_FORMATS:
                raise ResultsError(
                    f"{self.path} was written by an older nnexp ({found}: no run identity or checksums to check its "
                    f"examples by); this nnexp reads {FORMAT}: run the experiment again into a new directory")
            raise ResultsError(f"{self.spec_path} has format {found!r}; this nnexp reads {FORMAT}")
        try:
            computed = run_id(spec)
        except (KeyError, TypeError, AttributeError):
            raise ResultsError(f"{self.spec_path} lacks parts of a run's description; restore it") from None
        if spec.get("run_id") != computed:
            raise ResultsError(
                f"{self.spec_path} no longer describes the run it belongs to: the run was started as "
                f"{spec.get('run_id')}, but its parameters now make {computed} (it was edited); restore it, or run "
                "the changed experiment into a new directory")
        self.run_id = computed
        return spec

    def open(self, spec: dict) -> dict:
        """Create the directory for `spec`, or check that an existing one holds the same
        run. Records the run's identity in the spec, and the spec's latest options (its
        limit, when `spec["run"]` has one) in an existing directory. Returns the spec."""
        spec = {**spec, "run_id": run_id(spec)}
        try:
            self.examples_dir.mkdir(parents=True, exist_ok=True)
            with self.lock():
                if not self.spec_path.exists():
                    self._write_json(self.spec_path, spec)
                    self.run_id = spec["run_id"]
                    return spec
                stored = self.read_spec()
                if identity(stored) != identity(spec):
                    differ = _differences(identity(stored), identity(spec))
                    raise ResultsError(
                        f"{self.path} holds results of a different run (differs in {', '.join(differ)}); "
                        "choose another --out directory, or delete this one to start over"
                    )
                changed = False
                if "limit" in spec["run"] and stored.get("run", {}).get("limit") != spec["run"]["limit"]:
                    stored = {**stored, "run": {**stored.get("run", {}), "limit": spec["run"]["limit"]}}
                    changed = True
                # the latest ci / n_boot summarise the run (`nnexp plot`, `results.summary()`)
                given = {k: v for k, v in spec["experiment"]["params"].items() if k in STATISTICS_PARAMS}
                if any(stored["experiment"]["params"].get(k) != v for k, v in given.items()):
                    params = {**stored["experiment"]["params"], **given}
                    stored = {**stored, "experiment": {**stored["experiment"], "params": params}}
                    changed = True
                if changed:
                    self._write_json(self.spec_path, stored)
                return stored
        except OSError as error:  # creating the folders or the lock file
            raise self.write_error(Path(getattr(error, "filename", None) or self.path), error) from None

    def _known_run_id(self) -> str:
        if self.run_id is None:
            self.read_spec()
        return self.run_id

    # -- examples -------------------------------------------------------------------

    def example_path(self, index: int) -> Path:
        return self.examples_dir / f"{index:06d}.safetensors"

    def example_files(self) -> dict[int, Path]:
        """Every stored example file by index (complete files: temporary ones start with a dot)."""
        if not self.examples_dir.is_dir():
            return {}
        return {int(path.stem): path for path in self.examples_dir.glob("*.safetensors")
                if not path.name.startswith(".") and path.stem.isdigit()}

    def count_files(self) -> int:
        return len(self.example_files())

    def read_example(self, path: Path) -> ExampleRecord:
        """The example in `path`, checked (`nnexp.example_file.decode`): DamagedExampleError
        for a damaged file, ForeignExampleError for one another run wrote."""
        record = decode(path, self._known_run_id())
        if path.stem.isdigit() and record.index != int(path.stem):
            raise DamagedExampleError(path, f"it holds example {record.index}, not {int(path.stem)}")
        return record

    def read_all(self) -> tuple[list[ExampleRecord], dict[int, DamagedExampleError]]:
        """Every intact example, and the damaged ones by index; an example another run
        wrote is an error (ForeignExampleError)."""
        if not self.spec_path.is_file():
            return [], {}
        records, damaged = [], {}
        for index, path in sorted(self.example_files().items()):
            try:
                records.append(self.read_example(path))
            except DamagedExampleError as error:
                damaged[index] = error
        return records, damaged

    def scan(self) -> tuple[set[int], dict[int, DamagedExampleError]]:
        """Indices of the intact stored examples, and the damaged files by index."""
        records, damaged = self.read_all()
        return {record.index for record in records}, damaged

    def done(self) -> set[int]:
        """Indices of examples already stored (intact files only)."""
        return self.scan()[0]

    def is_stored(self, index: int) -> bool:
        """Whether example `index` is stored, intact, by this run."""
        path = self.example_path(index)
        if not path.is_file():
            return False
        try:
            self.read_example(path)
        except DamagedExampleError:
            return False
        return True

    def write_example(self, record: ExampleRecord) -> None:
        self._write(self.example_path(record.index), encode(record, self._known_run_id()))

    def read_records(self) -> list[ExampleRecord]:
        return self.read_all()[0]

    # -- claims (which process computes which example) --------------------------------

    def try_claim(self, index: int) -> Claim | None:
        """The claim on example `index`, or None when another process holds it."""
        try:
            return self.claims.try_claim(index)
        except OSError as error:
            raise self.write_error(self.claims.folder, error) from None

    def wait_claim(self, index: int) -> Claim:
        """The claim on example `index`, once the process holding it lets it go."""
        try:
            return self.claims.wait(index)
        except OSError as error:
            raise self.write_error(self.claims.folder, error) from None

    # -- what the run computes: its limit, and the examples it chose not to -------------

    @property
    def skipped_path(self) -> Path:
        return self.path / "skipped.json"

    def read_skipped(self) -> set[int]:
        if not self.skipped_path.is_file():
            return set()
        try:
            return {int(i) for i in json.loads(self.skipped_path.read_text(encoding="utf-8"))["examples"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ResultsError(f"{self.skipped_path} is not a valid list of skipped examples; delete it and run "
                               f"`nnexp resume {self.path}` to decide again which examples to compute") from None

    def add_skipped(self, indices, reasons: dict[int, str] | None = None) -> None:
        """Record examples the experiment chose not to compute (they are not missing), and
        why, per example, when `reasons` says (read by the report)."""
        indices = set(indices)
        if not indices:
            return
        with self.lock():
            known = self.read_skipped()
            if not indices <= known:
                stored = self.read_skip_reasons()
                stored.update({str(i): why for i, why in (reasons or {}).items() if i in indices})
                self._write_json(self.skipped_path, {
                    "examples": sorted(known | indices),
                    "why": "not selected by the experiment (e.g. only_correct, multi_token=skip)",
                    **({"reasons": dict(sorted(stored.items(), key=lambda kv: int(kv[0])))} if stored else {})})

    def read_skip_reasons(self) -> dict[str, str]:
        """{index (as text): why} for skipped examples; empty for runs that did not record it."""
        if not self.skipped_path.is_file():
            return {}
        try:
            reasons = json.loads(self.skipped_path.read_text(encoding="utf-8")).get("reasons", {})
            return {str(k): str(v) for k, v in reasons.items()} if isinstance(reasons, dict) else {}
        except (json.JSONDecodeError, AttributeError):
            return {}

    def record_timings(self, timings: dict) -> None:
        """The latest command's timings, in spec.json's "run" part (not part of the run's
        identity, like its limit)."""
        with self.lock():
            stored = self.read_spec()
            self._write_json(self.spec_path, {**stored, "run": {**stored.get("run", {}), "timings": timings}})

    def expected(self, spec: dict) -> list[int]:
        """The examples the run computes: those within its limit it did not skip."""
        total = int(spec["data"]["n_examples"])
        limit = spec.get("run", {}).get("limit")
        wanted = total if limit is None else min(int(limit), total)
        skipped = self.read_skipped()
        return [index for index in range(wanted) if index not in skipped]

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
        self._write(self.jobs_path, (json.dumps(data, indent=1) + "\n").encode())

    def add_job(self, job_id: str, job: SubmittedJob) -> None:
        with self.lock():
            jobs = self.read_jobs()
            jobs[job_id] = job
            self._write_jobs(jobs)

    def forget_job(self, job_id: str) -> None:
        with self.lock():
            jobs = self.read_jobs()
            jobs.pop(job_id, None)
            self._write_jobs(jobs)

    def add_remote_traffic(self, description: dict, received: int, examples: int) -> dict:
        """Add to the bytes received from a server and the examples they carried."""
        path = self.path / "remote.json"
        with self.lock():
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
            self._write_json(path, stats)
        return stats

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.csv"

    def write_summary(self, text: str) -> Path:
        """The run's summary table (`Results.summary()`) as summary.csv."""
        self._write(self.summary_path, text.encode())
        return self.summary_path

    def write_text(self, path: Path, text: str) -> None:
        """A text file of the run (its report), written atomically."""
        self._write(path, text.encode("utf-8"))

    def write_index(self, records: list[ExampleRecord]) -> None:
        lines = [json.dumps({"index": r.index, **r.scalars, **r.info}) for r in records]
        self._write(self.path / "examples.jsonl", "".join(line + "\n" for line in lines).encode())


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


def describe_indices(indices: list[int], shown: int = 8) -> str:
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


def load_results(path, allow_missing: bool = False) -> Results:
    """Load a results directory written by `nnexp run` (or `nnexp.run`).

    Every example is checked against its checksum and the run's identity. A run with
    examples missing (not computed yet, or damaged) is refused unless `allow_missing`;
    then the `Results` holds the examples there are, and `results.missing` names the
    others.
    """
    directory = RunDirectory(path)
    spec = directory.read_spec()
    records, damaged = directory.read_all()
    have = {record.index for record in records}
    expected = directory.expected(spec)
    missing = [index for index in expected if index not in have]
    broken = [damaged[index] for index in missing if index in damaged]
    if missing and not allow_missing:
        detail = f"; damaged: {'; '.join(f'{e.path.name} ({e.why})' for e in broken[:3])}" if broken else ""
        raise ResultsError(
            f"{directory.path} is missing {len(missing)} of the {len(expected)} examples of its run "
            f"({describe_indices(missing)}{detail}); compute them with `nnexp resume {directory.path}`, "
            "or load the others with load_results(..., allow_missing=True) (nnexp plot --allow-missing)")
    for error in broken:
        note(f"{error.path} is damaged ({error.why}); that example is left out")
    return Results(directory.path, spec, records, missing=missing)
