"""The store under stress: a run's identity, checksums, missing examples, several
writers in one directory, failed writes, and unknown model names.

Each test here was a reproduced failure first: a resumed run that mixed old and new
parameters, simultaneous writers crashing each other, damaged files read as numbers,
raw tracebacks for a full disk, and a minute of hub retries for a mistyped name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import nnexp
from nnexp import LabelledTensor, ResultsError
from nnexp.claims import Claims
from nnexp.disk import check_writable
from nnexp.errors import ModelError, StoreWriteError
from nnexp.example_file import DamagedExampleError, ForeignExampleError
from nnexp.results import ExampleRecord
from nnexp.store import FORMAT, RunDirectory, load_results
from tests.helpers import (
    NNEXP,
    REPO,
    cli,
    example_writer,
    flip_tensor_byte,
    one_line_error,
    write_ioi_pairs,
)

# -- without a model ------------------------------------------------------------------------


def spec(n_examples: int = 3, limit=None, **params) -> dict:
    return {
        "format": FORMAT,
        "experiment": {"name": "x", "class": "mod:X", "params": {"metric": "logit_diff", "seed": 0, **params}},
        "model": {"name": "m", "source": {"kind": "alias"}, "dtype": "float32"},
        "data": {"kind": "builtin", "experiment": "x", "n_examples": n_examples},
        "run": {"examples_per_trace": 1, "limit": limit},
    }


def record(index: int) -> ExampleRecord:
    tensor = LabelledTensor(torch.arange(6.0).reshape(2, 3) + index, ("layer", "position"),
                            {"layer": [0, 5], "position": [0, 1, 2]})
    return ExampleRecord(index, {"effect": tensor}, {"clean": 1.5}, {"tokens": ["a", "b", "c"]})


def stored_run(path: Path, n: int = 3, indices=None, **params) -> RunDirectory:
    directory = RunDirectory(path)
    directory.open(spec(n, **params))
    for index in range(n) if indices is None else indices:
        directory.write_example(record(index))
    return directory


@pytest.mark.fast
def test_simultaneous_writers_of_one_example_both_succeed(tmp_path, monkeypatch):
    """Two writers of the same example, the first renaming its file into place only after
    the second has written and renamed its own: with one shared temporary name the
    first finds its file gone (FileNotFoundError, about 1% of simultaneous writes)."""
    directory = stored_run(tmp_path / "run", indices=[])
    real_replace = os.replace
    first_waiting, second_done = threading.Event(), threading.Event()
    sources: list[str] = []
    order_lock = threading.Lock()

    def replace(src, dst):
        if not str(dst).endswith(".safetensors"):
            return real_replace(src, dst)
        with order_lock:
            sources.append(str(src))
            order = len(sources)
        if order == 1:
            first_waiting.set()
            assert second_done.wait(60), "the second writer never finished"
            return real_replace(src, dst)
        try:
            return real_replace(src, dst)
        finally:
            second_done.set()

    monkeypatch.setattr(os, "replace", replace)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            directory.write_example(record(1))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    first = threading.Thread(target=write)
    first.start()
    assert first_waiting.wait(60)
    second = threading.Thread(target=write)
    second.start()
    second.join(60)
    first.join(60)
    assert errors == []
    assert len(set(sources)) == 2  # each writer its own temporary file
    assert directory.done() == {1} and not list(directory.examples_dir.glob(".tmp-*"))


@pytest.mark.fast
def test_flipped_bytes_are_found_and_named(tmp_path):
    directory = stored_run(tmp_path / "run")
    flip_tensor_byte(directory.example_path(1))
    with pytest.raises(DamagedExampleError, match=r"000001.safetensors is damaged \(its contents do not match"):
        directory.read_example(directory.example_path(1))
    with pytest.raises(ResultsError, match=r"missing 1 of the 3 examples of its run \(1; damaged: 000001.safetensors"):
        load_results(directory.path)
    assert directory.done() == {0, 2}  # so resuming computes it again
    partial = load_results(directory.path, allow_missing=True)
    assert [r.index for r in partial] == [0, 2] and partial.missing == [1]
    assert "1 missing (1)" in repr(partial)
    # damage to the header's JSON (a scalar) and to the file's framing is found too
    data = directory.example_path(0).read_bytes()
    assert data.count(b'clean\\": 1.5') == 1  # the header is JSON inside safetensors' JSON
    directory.example_path(0).write_bytes(data.replace(b'clean\\": 1.5', b'clean\\": 1.7'))
    directory.example_path(2).write_bytes(directory.example_path(2).read_bytes()[:-7])
    assert directory.done() == set()


@pytest.mark.fast
def test_a_partial_set_is_refused_unless_asked(tmp_path):
    directory = stored_run(tmp_path / "run", n=40)
    for index in (3, 9, 20, 33):
        flip_tensor_byte(directory.example_path(index))
    with pytest.raises(ResultsError, match=r"missing 4 of the 40 examples .*nnexp resume .*allow_missing=True"):
        load_results(directory.path)
    results = load_results(directory.path, allow_missing=True)
    assert len(results) == 36 and results.missing == [3, 9, 20, 33]
    # examples never computed are missing too; those beyond the run's limit are not
    limited = stored_run(tmp_path / "limited", n=10, indices=[0, 1, 3], limit=4)
    with pytest.raises(ResultsError, match=r"missing 1 of the 4 examples of its run \(2\)"):
        load_results(limited.path)
    # nor those the experiment chose not to compute (only_correct, multi_token=skip)
    limited.add_skipped({2})
    assert load_results(limited.path).missing == []


@pytest.mark.fast
@pytest.mark.parametrize("key, value", [("metric", "prob"), ("seed", 1)])
def test_an_edited_spec_is_refused(tmp_path, key, value):
    directory = stored_run(tmp_path / "run")
    edited = json.loads(directory.spec_path.read_text())
    edited["experiment"]["params"][key] = value
    directory.spec_path.write_text(json.dumps(edited))
    with pytest.raises(ResultsError, match=r"no longer describes the run it belongs to: the run was started as run-"):
        RunDirectory(directory.path).read_spec()
    with pytest.raises(ResultsError, match="edited"):
        load_results(directory.path)
    # the run's own options (its limit) are not part of its identity
    edited["experiment"]["params"][key] = spec()["experiment"]["params"][key]
    edited["run"]["limit"] = 2
    directory.spec_path.write_text(json.dumps(edited))
    assert len(load_results(directory.path)) == 3


@pytest.mark.fast
def test_an_example_of_another_run_is_refused(tmp_path):
    ours = stored_run(tmp_path / "ours", indices=[0])
    theirs = stored_run(tmp_path / "theirs", metric="prob")
    shutil.copy(theirs.example_path(1), ours.example_path(1))
    with pytest.raises(ForeignExampleError, match=r"000001.safetensors was written by another run \(run-\w+\) .*delete it"):
        RunDirectory(ours.path).done()
    with pytest.raises(ForeignExampleError):
        load_results(ours.path, allow_missing=True)
    # an example renamed to another index of the same run is damaged, not trusted
    ours.example_path(1).unlink()
    shutil.copy(ours.example_path(0), ours.example_path(2))
    assert RunDirectory(ours.path).done() == {0}


@pytest.mark.fast
def test_results_of_an_older_nnexp_are_refused_with_the_fix(tmp_path):
    directory = stored_run(tmp_path / "run")
    old = json.loads(directory.spec_path.read_text())
    old["format"] = "nnexp-results/1"
    directory.spec_path.write_text(json.dumps(old))
    with pytest.raises(ResultsError, match=r"written by an older nnexp .*run the experiment again into a new directory"):
        load_results(directory.path)


@pytest.mark.fast
def test_a_claim_is_held_by_one_writer_at_a_time(tmp_path):
    ours, theirs = Claims(tmp_path / ".claims"), Claims(tmp_path / ".claims")
    claim = ours.try_claim(3)
    assert claim is not None and theirs.try_claim(3) is None
    other = theirs.try_claim(4)
    assert other is not None
    claim.release(stored=True)
    assert not (tmp_path / ".claims" / "000003.lock").exists()
    again = theirs.try_claim(3)
    assert again is not None
    again.release(stored=False)
    other.release(stored=False)


@pytest.mark.fast
def test_an_unwritable_place_is_refused(tmp_path, monkeypatch):
    from nnexp import disk

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreWriteError, match=r"a-file is a file, not a folder; choose another --out"):
        check_writable(tmp_path / "a-file" / "run")
    check_writable(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == [tmp_path / "a-file"]

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(disk, "_write_bytes", full)
    with pytest.raises(StoreWriteError, match=r"No space left on device\): free disk space, or choose another --out"):
        check_writable(tmp_path / "new" / "run")


@pytest.mark.fast
def test_an_unknown_model_name_fails_at_once_when_the_hub_is_unreachable(monkeypatch):
    import socket

    from nnexp.models import hub
    from nnexp.models.aliases import closest_alias

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setattr(hub, "_address", lambda: ("127.0.0.1", port, "the test's closed port"))
    monkeypatch.setattr(hub, "offline_by_choice", lambda: False)
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"could not load model 'no-such-model-xyz': .*the Hugging Face Hub is "
                                         r"unreachable from here \(cannot connect to the test's closed port"):
        nnexp.load_model("no-such-model-xyz")
    with pytest.raises(ModelError, match=r"unreachable .*; did you mean 'smollm2-135m'\?$"):
        nnexp.load_model("smolm2-135m")
    assert time.monotonic() - start < 5
    assert closest_alias("gemma3") == "gemma3-270m" and closest_alias("HuggingFaceTB/SmolLM2-135M") == "smollm2-135m"
    assert closest_alias("no-such-model-xyz") is None


# -- with a tiny model, through the command line ---------------------------------------------


def mtimes(out: Path) -> dict:
    return {path.name: path.stat().st_mtime_ns for path in (out / "examples").glob("*.safetensors")}


@pytest.mark.parametrize("key, value", [("metric", "prob"), ("seed", 1)])
def test_resume_refuses_a_spec_edited_after_the_run_started(tmp_path, tiny_gpt2_folder, key, value):
    out = tmp_path / "run"
    args = ["run", "ioi-patching", "--model", tiny_gpt2_folder, "--set", "n_examples=6", "--limit", 3,
            "--sites", "resid_post", "--out", out, "--no-figures"]
    assert cli(*args).returncode == 0
    spec = json.loads((out / "spec.json").read_text())
    spec["experiment"]["params"][key] = value
    (out / "spec.json").write_text(json.dumps(spec))
    before = mtimes(out)
    one_line_error(cli("resume", out, "--no-figures", "--limit", 6), "spec.json no longer describes the run", "edited")
    one_line_error(cli(*args), "no longer describes the run")  # nor does a rerun of the original command add to it
    assert mtimes(out) == before


def test_resume_continues_the_limit_the_run_started_with(tmp_path, tiny_gpt2_folder):
    data = write_ioi_pairs(tmp_path / "pairs.jsonl", 6)
    out = tmp_path / "run"
    started = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", data, "--limit", 2, "--sites",
                  "resid_post", "--out", out, "--no-figures")
    assert started.returncode == 0, started.stderr
    resumed = cli("resume", out, "--no-figures")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 2 examples already stored; the run is limited to its first 2 of 6 examples" in resumed.stderr
    assert RunDirectory(out).done() == {0, 1}
    extended = cli("resume", out, "--no-figures", "--limit", 4)
    assert extended.returncode == 0, extended.stderr
    assert RunDirectory(out).done() == {0, 1, 2, 3}
    assert json.loads((out / "spec.json").read_text())["run"]["limit"] == 4
    assert len(load_results(out)) == 4


def test_plot_refuses_a_partial_set_unless_asked(tmp_path, tiny_gpt2_folder):
    data = write_ioi_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    assert cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", data, "--sites", "resid_post", "--out",
               out, "--no-figures").returncode == 0
    for index in (3, 5):
        flip_tensor_byte(RunDirectory(out).example_path(index))
    one_line_error(cli("plot", out), "missing 2 of the 8 examples of its run (3, 5; damaged: 000003.safetensors",
                   "--allow-missing")
    assert not (out / "figures").exists()
    drawn = cli("plot", out, "--allow-missing")
    assert drawn.returncode == 0, drawn.stderr
    assert "drawing the 6 examples there are; 2 of the run's are missing (3, 5)" in drawn.stderr
    assert (out / "figures" / "example-0000-resid_post.html").exists()


def test_a_damaged_example_is_named_and_computed_again(tmp_path, gpt2_tiny, capsys):
    from nnexp_experiments.ioi_patching import IOIPatching

    from nnexp import console

    out = tmp_path / "run"
    experiment = IOIPatching(sites=("resid_post",), n_examples=4)
    first = nnexp.run(experiment, gpt2_tiny, out=out, figures=False)[2]["resid_post"].values.clone()
    flip_tensor_byte(RunDirectory(out).example_path(2))
    before = mtimes(out)
    console.set_quiet(False)
    again = nnexp.run(experiment, gpt2_tiny, out=out, figures=False)
    err = capsys.readouterr().err
    assert re.search(r"000002.safetensors is damaged \(its contents do not match the checksum.*\); example 2 is "
                     "computed again", err), err
    assert "3 of 4 examples already stored" in err
    assert torch.equal(again[2]["resid_post"].values, first)
    after = mtimes(out)
    assert {name for name in before if before[name] != after[name]} == {"000002.safetensors"}


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free disk space"), (errno.EROFS, "make the folder writable")])
def test_a_failed_write_mid_run_is_one_line_and_a_rerun_fails_before_loading(tmp_path, tiny_gpt2_folder, monkeypatch,
                                                                               capsys, code, fix):
    from nnexp import disk, runner
    from nnexp.cli import main

    real = disk._write_bytes
    examples_written = []

    def fails_after_two_examples(path, data):
        if path.name.endswith(".safetensors"):
            if len(examples_written) == 2:
                raise OSError(code, os.strerror(code), str(path))
            examples_written.append(path)
        return real(path, data)

    monkeypatch.setattr(disk, "_write_bytes", fails_after_two_examples)
    out = tmp_path / "run"
    args = ["run", "ioi-patching", "--model", str(tiny_gpt2_folder), "--data", str(write_ioi_pairs(tmp_path / "p", 5)),
            "--sites", "resid_post", "--out", str(out), "--no-figures"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("nnexp: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert os.strerror(code) in errors[0] and "the 2 examples stored in" in errors[0], errors[0]
    assert f"{fix}, then `nnexp resume {out}` continues from there" in errors[0]
    assert RunDirectory(out).done() == {0, 1} and not list((out / "examples").glob(".tmp-*"))

    def fails(path, data):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(disk, "_write_bytes", fails)
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(args) == 2
    assert f"cannot write results into {out / 'examples'} ({os.strerror(code)}): {fix}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["resume", str(out), "--no-figures"]) == 0
    assert RunDirectory(out).done() == {0, 1, 2, 3, 4}


def test_an_unwritable_results_folder_is_refused_before_the_model_loads(tmp_path, tiny_gpt2_folder, monkeypatch,
                                                                         capsys):
    from nnexp import runner
    from nnexp.cli import main

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["run", "ioi-patching", "--model", str(tiny_gpt2_folder), "--out", str(tmp_path / "a-file" / "run")]) == 2
    assert "a-file is a file, not a folder; choose another --out" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_results_folder_is_refused_before_the_model_loads(tmp_path, tiny_gpt2_folder):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line_error(cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--out", folder / "run"),
                       "cannot write results into", "make the folder writable")
    finally:
        folder.chmod(0o700)


def test_an_unknown_model_name_is_one_line_without_retries(tmp_path):
    start = time.monotonic()
    result = cli("run", "ioi-patching", "--model", "no-such-model-xyz", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"},
                 timeout=120)
    elapsed = time.monotonic() - start
    one_line_error(result, "could not load model 'no-such-model-xyz'", "Hugging Face Hub")
    assert "Retry" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert elapsed < 30  # the retry wall took 50 s; what is left is starting Python and importing torch
    one_line_error(cli("run", "ioi-patching", "--model", "smolm2-135m", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"}),
                   "did you mean 'smollm2-135m'?")


def test_a_cached_hub_model_loads_while_the_hub_is_unreachable(tmp_path, tiny_gpt2_folder):
    """Unreachable hub (an endpoint where nothing listens), HF_HUB_OFFLINE not set: a
    model downloaded before is read from the hub cache, without a wall of retries."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nnexp-test--tiny-gpt2"
    shutil.copytree(tiny_gpt2_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = "from nnexp import load_model; print(load_model('nnexp-test/tiny-gpt2').arch.n_layers)"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(proxy, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "3" and "Retry" not in result.stderr


# -- several processes in one directory ------------------------------------------------------


@pytest.mark.parametrize("stores_it", [False, True], ids=["holder-stopped", "holder-stored"])
def test_a_waiting_process_computes_what_a_stopped_holder_left(tmp_path, gpt2_tiny, monkeypatch, stores_it):
    """Example 1 is claimed by someone else. The run computes the others, waits, and when
    the holder lets go without storing it (it failed, or was killed), computes it too;
    when the holder stores it, it is not computed again."""
    from nnexp_experiments.ioi_patching import IOIPatching

    experiment = IOIPatching(sites=("resid_post",), n_examples=4)
    reference = nnexp.run(experiment, gpt2_tiny, out=tmp_path / "reference", figures=False)
    out = tmp_path / "shared"
    RunDirectory(out).open(json.loads((tmp_path / "reference" / "spec.json").read_text()))
    holder = Claims(out / ".claims").try_claim(1)
    real_wait = RunDirectory.wait_claim
    waited = []

    def holder_lets_go(self, index):
        waited.append(index)
        if stores_it:
            shutil.copy(tmp_path / "reference" / "examples" / "000001.safetensors", self.example_path(1))
        holder.release(stored=stores_it)
        return real_wait(self, index)

    monkeypatch.setattr(RunDirectory, "wait_claim", holder_lets_go)
    messages = []
    monkeypatch.setattr("nnexp.runner.note", messages.append)
    results = nnexp.run(experiment, gpt2_tiny, out=out, figures=False)
    assert waited == [1] and [r.index for r in results] == [0, 1, 2, 3] and results.missing == []
    assert "waiting for 1 examples another process is computing" in " ".join(messages)
    summary = "computed 3 examples here; 1 were computed by another process" if stores_it else "computed 4 examples here"
    assert summary in messages, messages
    for a, b in zip(reference, results):
        assert torch.equal(a["resid_post"].values, b["resid_post"].values)


def test_a_killed_holder_leaves_no_claim_behind(tmp_path):
    script = ("import sys, time; from nnexp.claims import Claims; "
              "c = Claims(sys.argv[1]).try_claim(7); print('held' if c else 'busy', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Claims(tmp_path).try_claim(7) is None
    finally:
        holder.kill()
        holder.wait(60)
    claim = Claims(tmp_path).try_claim(7)  # the OS let go of the lock with the process
    assert claim is not None
    claim.release(stored=False)


def _stored_by(out: Path) -> dict[int, int | None]:
    return {int(path.stem): example_writer(path) for path in (out / "examples").glob("[0-9]*.safetensors")}


def test_processes_sharing_a_directory_compute_each_example_once(tmp_path, tiny_gpt2_folder):
    """Three `nnexp run`s of one command into one directory, one killed mid-way: the two
    others finish the run between them, no example is computed twice, nobody crashes,
    and the results equal a single process's."""
    n = 60  # about 10 s of work for one process on 2 cores: far longer than the processes' start-up skew
    data = write_ioi_pairs(tmp_path / "pairs.jsonl", n, seed=4)
    out = tmp_path / "shared"
    args = ["run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", data, "--out", out, "--no-figures",
            "--sites", "resid_post"]

    def start():
        # stderr to a file, not a pipe nobody reads while the run goes on (a full pipe would block it)
        log = (tmp_path / f"stderr-{len(list(tmp_path.glob('stderr-*')))}").open("w")
        process = subprocess.Popen(NNEXP + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=log)
        process.log = Path(log.name)
        log.close()
        return process

    def wait_until(condition, what):
        deadline = time.monotonic() + 240
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting until {what}"
            assert victim.poll() is None, "the first process finished before it could be killed"
            time.sleep(0.01)

    victim, *others = processes = [start(), start(), start()]
    try:
        wait_until(lambda: list(_stored_by(out).values()).count(victim.pid) >= 2, "the first process stored examples")
        for other in others:
            wait_until(lambda pid=other.pid: pid in _stored_by(out).values(), "every process stored an example")
        victim.send_signal(signal.SIGKILL)
        victim.wait(60)
        for other in others:
            other.wait(600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    finished = [other.log.read_text() for other in others]
    for other, err in zip(others, finished):
        assert other.returncode == 0 and "Traceback" not in err, err
    writers = _stored_by(out)
    assert sorted(writers) == list(range(n))
    # each survivor stored exactly the examples it says it computed: none was written twice
    for other, err in zip(others, finished):
        computed = int(re.search(r"computed (\d+) examples here", err).group(1))
        assert computed == list(writers.values()).count(other.pid), err
    assert set(writers.values()) <= {victim.pid, *(other.pid for other in others)}

    single = tmp_path / "single"
    assert cli(*[single if a == out else a for a in args]).returncode == 0
    shared, alone = load_results(out), load_results(single)
    assert [r.index for r in shared] == [r.index for r in alone] == list(range(n))
    for a, b in zip(shared, alone):
        for name in a.tensors:
            assert torch.equal(a[name].values, b[name].values), (a.index, name)
