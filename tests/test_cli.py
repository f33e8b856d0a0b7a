"""The `nnexp` command as a user runs it: list, run, load, errors, interruption and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nnexp
from nnexp.store import RunDirectory
from nnexp_experiments.ioi import generate_ioi
from tests.helpers import NNEXP, cli, one_line_error


def write_pairs(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
    return path


def test_list_shows_experiments_and_aliases():
    result = cli("list")
    assert result.returncode == 0, result.stderr
    for text in ("ioi-patching", "smollm2-135m", "gemma3-270m", "head_out", "logit_diff"):
        assert text in result.stdout


def test_run_then_load_results(tmp_path, tiny_gpt2_folder):
    out = tmp_path / "run"
    result = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 3, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    results = nnexp.load_results(out)
    assert len(results) == 3
    record = results[0]
    assert record["resid_post"].dims == ("layer", "position")
    assert record["resid_post"].shape == (3, len(record.tokens))
    assert record["head_out"].dims == ("layer", "head")
    assert record["head_out"].shape == (3, 4)
    assert record.info["clean"] == generate_ioi(1)[0].clean
    assert record.tokens[0] == record.info["clean"].split()[0]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["experiment"]["name"] == "ioi-patching"
    assert spec["experiment"]["params"]["sites"] == ["resid_post", "attn_out", "mlp_out", "head_out"]
    assert spec["model"]["source"] == {"kind": "folder", "path": str(tiny_gpt2_folder.resolve())}
    lines = (out / "examples.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    assert (out / "figures" / "example-0000-resid_post.html").exists()
    assert (out / "figures" / "mean-all-head_out.html").exists()  # layer x head over every example
    # the effect at the last layer and last position is exactly the clean run's (effect 1)
    assert torch.isclose(record["resid_post"].values[-1, -1], torch.tensor(1.0), atol=1e-5)


def test_default_directory_is_stable_and_resumes(tmp_path, tiny_gpt2_folder):
    first = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 2, "--sites", "resid_post", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / first.stdout.strip()
    assert run_dir.parent == tmp_path / "results" / "ioi-patching" / tiny_gpt2_folder.name
    second = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 4, "--sites", "resid_post", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == first.stdout.strip()
    assert "2 of 4 examples already stored" in second.stderr
    assert len(nnexp.load_results(run_dir)) == 4
    other = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 1, "--sites", "mlp_out", cwd=tmp_path)
    assert other.stdout.strip() != first.stdout.strip()


def test_other_run_in_same_directory_is_refused(tmp_path, tiny_gpt2_folder):
    out = tmp_path / "run"
    assert cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 1, "--out", out, "--no-figures").returncode == 0
    result = cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 1, "--out", out, "--sites", "mlp_out")
    assert result.returncode == 2
    assert "holds results of a different run" in result.stderr and "experiment.params.sites" in result.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["run", "no-such-experiment"], ["unknown experiment 'no-such-experiment'", "ioi-patching"]),
        (["run", "ioi-patching", "--sites", "resid_post,residual"], ["unknown site 'residual'", "resid_pre"]),
        (["run", "ioi-patching", "--layers", "0,3"], ["layer 3 is out of range", "3 layers"]),
        (["run", "ioi-patching", "--heads", "4"], ["head 4 is out of range", "4 attention heads"]),
        (["run", "ioi-patching", "--layers", "zero"], ["parameter layers is 'zero'", "integers, comma-separated"]),
        (["run", "ioi-patching", "--set", "n_examples=4.0"], ["parameter n_examples is '4.0'", "an integer"]),
        (["run", "ioi-patching", "--set", "skip_shared_prefix=no"], ["parameter skip_shared_prefix is 'no'", "true or false"]),
        (["run", "ioi-patching", "--metric", "accuracy"], ["unknown metric 'accuracy'", "logit_diff"]),
        (["run", "ioi-patching", "--positions", "99"], ["position 99 is out of range", "example 0"]),
        (["run", "ioi-patching", "--positions", "3,3"], ["name a position twice"]),
        (["run", "ioi-patching", "--layers", "1,-2"], ["name the same layer twice"]),
        (["run", "ioi-patching", "--sites", ""], ["sites is empty"]),
        (["run", "ioi-patching", "--set", "dataset=weird"], ["dataset must be"]),
        (["run", "ioi-patching", "--set", "colour=red"], ["no parameter(s) colour"]),
        (["run", "ioi-patching", "--dtype", "float8"], ["unknown dtype"]),
        (["run", "ioi-patching", "--device", "cuda:0"], ["no CUDA GPU"]),
    ],
)
def test_bad_options_give_one_line_errors(tmp_path, tiny_gpt2_folder, args, fragments):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = cli(*args, "--model", tiny_gpt2_folder, "--limit", 1, "--out", tmp_path / "out", cwd=tmp_path)
    one_line_error(result, *fragments)


def test_bad_models_give_one_line_errors(tmp_path):
    one_line_error(cli("run", "ioi-patching", "--model", "not a model!", cwd=tmp_path), "unknown model 'not a model!'")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    one_line_error(cli("run", "ioi-patching", "--model", empty, cwd=tmp_path), "no config.json")
    # offline, a well-formed hub id that is not cached fails fast with the reason
    result = cli("run", "ioi-patching", "--model", "nnexp-test/no-such-model", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    one_line_error(result, "could not load model 'nnexp-test/no-such-model'", "Hugging Face Hub")


@pytest.mark.parametrize(
    "record, fragments",
    [
        ({"corrupted": "When Tom and James went to the park, Christopherson gave the ball to"}, ["pairs.jsonl:2", "same length"]),
        ({"answer": " Christopherson"}, ["pairs.jsonl:2", "answer ' Christopherson'", "one token"]),
        ({"foil": " Tom"}, ["pairs.jsonl:2", "same token"]),
    ],
)
def test_bad_examples_fail_before_computing(tmp_path, tiny_gpt2_folder, record, fragments):
    good = {"clean": "When Tom and James went to the park, James gave the ball to",
            "corrupted": "When Tom and James went to the park, Tom gave the ball to", "answer": " Tom", "foil": " James"}
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, **record}) + "\n")
    out = tmp_path / "out"
    one_line_error(cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", data, "--out", out), *fragments)
    assert not out.exists()  # validated before anything was written


def test_bad_data_files(tmp_path, tiny_gpt2_folder):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", empty), "is empty")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"clean": "x"\n')
    one_line_error(cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", broken), "broken.jsonl:1: not valid JSON")
    one_line_error(cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", tmp_path / "missing.jsonl"), "does not exist")


def _ctrl_c_as_in_a_terminal() -> None:
    """Give the child SIGINT's default disposition, as a shell gives a command it starts
    in a terminal. A test runner started in the background without job control (`cmd &`
    in a script, nohup) inherits SIGINT ignored, and so would the child: Python then
    never turns Ctrl-C into KeyboardInterrupt, rightly, since the user asked for that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises():
    """Within the test, SIGINT raises KeyboardInterrupt in this process, whatever
    disposition the test runner inherited (see `_ctrl_c_as_in_a_terminal`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _start_and_interrupt(args, out: Path, sig) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(NNEXP + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ctrl_c_as_in_a_terminal)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "examples").glob("0*.safetensors"))) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_run_keeps_finished_examples_and_resumes(tmp_path, tiny_gpt2_folder, sig):
    data = write_pairs(tmp_path / "pairs.jsonl", generate_ioi(300, seed=4))
    out = tmp_path / "run"
    args = ["run", "ioi-patching", "--model", tiny_gpt2_folder, "--data", data, "--out", out, "--no-figures",
            "--sites", "resid_post,attn_out,mlp_out,head_out", "--head-positions", "each"]
    interrupted = _start_and_interrupt(args, out, sig)
    if sig == signal.SIGINT:
        assert interrupted.returncode == 130
        assert "interrupted:" in interrupted.stderr and "run the same command again to resume" in interrupted.stderr
    stored = RunDirectory(out).done()
    assert 2 <= len(stored) < 300
    assert not list((out / "examples").glob(".tmp-*")) or sig == signal.SIGKILL
    before = {i: RunDirectory(out).example_path(i).stat().st_mtime_ns for i in stored}

    resumed = cli("resume", out, "--no-figures", "--limit", 20 + max(stored))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len([i for i in stored if i < 20 + max(stored)])} of {20 + max(stored)} examples already stored" in resumed.stderr
    for i, mtime in before.items():
        assert RunDirectory(out).example_path(i).stat().st_mtime_ns == mtime, "a stored example was recomputed"

    # the stitched-together run equals an uninterrupted one
    fresh = tmp_path / "fresh"
    limit = 20 + max(stored)
    fresh_args = [fresh if a == out else a for a in args] + ["--limit", limit]
    assert cli(*fresh_args).returncode == 0
    a, b = nnexp.load_results(out), nnexp.load_results(fresh)
    assert [r.index for r in a] == [r.index for r in b] == list(range(limit))
    for ra, rb in zip(a, b):
        for name in ra.tensors:
            assert torch.allclose(ra[name].values, rb[name].values, atol=1e-6, equal_nan=True)


def test_error_mid_run_keeps_finished_examples(tmp_path, gpt2_tiny, monkeypatch):
    """An exception in the middle of a run (say, out of memory) loses nothing finished."""
    from nnexp_experiments.ioi_patching import IOIPatching

    calls = {"n": 0}
    real = gpt2_tiny.executor.run

    def failing(jobs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(jobs)

    monkeypatch.setattr(gpt2_tiny.executor, "run", failing)
    experiment = IOIPatching(sites=("resid_post",), n_examples=5)
    with pytest.raises(RuntimeError, match="simulated"):
        nnexp.run(experiment, gpt2_tiny, out=tmp_path / "run", figures=False)
    assert RunDirectory(tmp_path / "run").done() == {0, 1}
    monkeypatch.setattr(gpt2_tiny.executor, "run", real)
    results = nnexp.run(experiment, gpt2_tiny, out=tmp_path / "run", figures=False)
    assert [r.index for r in results] == [0, 1, 2, 3, 4]


def test_ctrl_c_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, gpt2_tiny, monkeypatch, ctrl_c_raises):
    """Python drops a KeyboardInterrupt raised inside a finalizer ("Exception ignored in ...");
    nnsight and torch free a trace's state through finalizers, so a Ctrl-C can land in one.
    The run must stop at the next chunk boundary all the same, keeping what it finished."""
    from nnexp_experiments.ioi_patching import IOIPatching

    handler = signal.getsignal(signal.SIGINT)
    swallowed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))

    class PressesCtrlCWhenFreed:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # Python runs the signal handler here, inside the finalizer
                pass

    def free_a_finalizer_once(module, args, output):
        handle.remove()
        PressesCtrlCWhenFreed()

    handle = gpt2_tiny.hf.lm_head.register_forward_hook(free_a_finalizer_once)
    try:
        with pytest.raises(KeyboardInterrupt):
            nnexp.run(IOIPatching(sites=("resid_post",), n_examples=6), gpt2_tiny, out=tmp_path / "run",
                      figures=False, examples_per_trace=2)
    finally:
        handle.remove()
    assert swallowed == [KeyboardInterrupt]  # the interrupt really was lost where it was raised
    assert RunDirectory(tmp_path / "run").done() == {0, 1}  # the chunk that was running is kept
    assert signal.getsignal(signal.SIGINT) is handler  # and Ctrl-C is handled as before the run


def test_plot_redraws_figures(tmp_path, tiny_gpt2_folder):
    out = tmp_path / "run"
    assert cli("run", "ioi-patching", "--model", tiny_gpt2_folder, "--limit", 2, "--out", out, "--no-figures").returncode == 0
    assert not (out / "figures").exists()
    result = cli("plot", out)
    assert result.returncode == 0, result.stderr
    assert (out / "figures" / "example-0001-head_out.html").exists()
    one_line_error(cli("plot", tmp_path), "not an nnexp results directory")


def test_user_experiment_file(tmp_path, tiny_gpt2_folder):
    """A new patching experiment is a short class in a file; the CLI runs it by path."""
    (tmp_path / "my_experiment.py").write_text(
        "from dataclasses import dataclass\n"
        "from nnexp import PatchingExperiment, PromptPair\n\n"
        "@dataclass\n"
        "class Capitals(PatchingExperiment):\n"
        "    name = 'capitals'\n"
        "    sites: tuple = ('resid_post', 'head_out')\n\n"
        "    def default_examples(self):\n"
        "        return [PromptPair(clean='The capital of France is the city of', corrupted='The capital of Italy is the city of',\n"
        "                           answer=' Paris', foil=' Rome')]\n"
    )
    result = cli("run", tmp_path / "my_experiment.py", "--model", tiny_gpt2_folder, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    results = nnexp.load_results(tmp_path / "run")
    assert results.spec["experiment"]["name"] == "capitals"
    assert results[0]["head_out"].dims == ("layer", "head")
    resumed = cli("resume", tmp_path / "run")
    assert resumed.returncode == 0 and "1 of 1 examples already stored" in resumed.stderr
