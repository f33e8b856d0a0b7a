"""Remote runs end to end: the unmodified nnsight client against a server on 127.0.0.1.

The server (tests/ndif_server.py) speaks NDIF's protocol for the pinned nnsight, runs
each request with nnsight's own server-side pieces on a model loaded from a folder,
and cannot import nnexp, like NDIF. The client side loads only the folder's config and
tokenizer (the module tree lives on the meta device) and sends every chunk of examples
as one session request. Every family's numbers must equal a local run's exactly, and
each fault the server can inject must give a clear error, a retry, or a resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

import nnexp
from nnexp import console
from nnexp.remote import RemoteRunError
from nnexp.store import RunDirectory
from tests.helpers import KINDS, REPO, assert_same_records, kind_experiments, make_gpt2_tokenizer, tiny_hf_model
from tests.ndif_fixture import start_ndif_server

SERVED = "test/tiny-gpt2"
SECRET = "sk-nnexp-test-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ndif")
    handle = start_ndif_server({SERVED: (tiny_hf_model("gpt2"), make_gpt2_tokenizer())}, root)
    handle.folder = root / f"model-0-{SERVED.replace('/', '--')}"
    assert (handle.folder / "config.json").exists()
    yield handle
    handle.stop()


@pytest.fixture
def ndif(server, monkeypatch):
    server.reset()
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    yield server
    server.reset()


def remote_model(server, **options):
    options = {"host": server.url, "retries": 2, "backoff": 0.05, "timeout": 30, **options}
    return nnexp.load_model(str(server.folder), backend="remote", remote_model=SERVED, **options)


def chunk_jobs(server) -> list[dict]:
    return [job for job in server.stats()["jobs"] if job["session"] or job["status"] != "ERROR"]


@pytest.mark.parametrize("name", KINDS)
def test_every_family_remote_equals_local(name, ndif, tmp_path):
    local_model = nnexp.load_model(str(ndif.folder))
    model = remote_model(ndif)
    assert all(p.is_meta for p in model.hf.transformer.h.parameters())  # no weights loaded here
    experiment = kind_experiments(tmp_path, local_model.tokenizer)[name]
    local = nnexp.run(experiment, local_model, out=tmp_path / "local", limit=3, figures=False)
    remote = nnexp.run(experiment, model, out=tmp_path / "remote", limit=3, figures=False)
    assert_same_records(list(local), list(remote))
    # one request per chunk (plus the preparatory passes: predictions, means, read-out weights)
    chunks = -(-len(remote) // experiment.examples_per_trace)
    jobs = ndif.stats()["jobs"]
    assert len(jobs) >= chunks and all(job["status"] == "COMPLETED" for job in jobs)
    traffic = json.loads((tmp_path / "remote" / "remote.json").read_text())
    assert traffic["host"] == ndif.url and traffic["model"] == SERVED
    assert traffic["examples_received"] == len(remote) and traffic["bytes_per_example"] > 0
    spec = json.loads((tmp_path / "remote" / "spec.json").read_text())
    assert spec["run"]["backend"] == {"kind": "remote", "host": ndif.url, "model": SERVED}
    assert spec["model"]["source"]["kind"] == "remote"


@nnexp.register_edit("test_remote_squash", "scale * tanh(x / scale): a user's edit the server has never seen")
def remote_squash(x, scale):
    return scale[:, None] * torch.tanh(x / scale[:, None])


@dataclass
class UserEdits(nnexp.InterventionExperiment):
    """A user's experiment with a user's edit, a Mean vector, a probe and reference metrics."""

    name = "test-remote-user-edits"
    metrics: tuple[str, ...] = ("logit_diff", "kl", "top10_overlap")
    reference: str | None = "clean"

    def default_examples(self):
        return [nnexp.InterventionExample(prompt=p, answer=a, foil=f) for p, a, f in
                (("The capital of France is", " Paris", " London"), ("I think dogs are", " great", " bad"))]

    def runs(self, example, model):
        probe = [1.0] * model.d_model
        return {
            "clean": nnexp.Run(reads=(nnexp.Read("probe", "mlp_out", 1, positions="all", direction=probe),)),
            "edited": nnexp.Grid(lambda layer: nnexp.Run(
                nnexp.Apply("test_remote_squash", scale=0.5, site="mlp_out", layer=layer),
                nnexp.Set(nnexp.Mean(), site="attn_out", layer=layer, positions="last")), layer=range(model.n_layers)),
        }


def test_a_users_experiment_and_edit_ship_to_the_server(ndif, tmp_path):
    """The server has neither nnexp nor this test module: the user's edit function travels
    by value with the request, and the numbers equal a local run's exactly."""
    local = nnexp.run(UserEdits(), nnexp.load_model(str(ndif.folder)), out=tmp_path / "local", figures=False)
    remote = nnexp.run(UserEdits(), remote_model(ndif), out=tmp_path / "remote", figures=False)
    assert_same_records(list(local), list(remote))
    assert local[0].scalars == remote[0].scalars
    assert remote[0]["edited.kl"].values.min() > 0  # the edits did something


@pytest.mark.parametrize("name", KINDS)
def test_collected_with_other_options_decodes_as_submitted(name, ndif, tmp_path):
    """A chunk submitted under one row limit and collected by a command with another
    (and a smaller --limit) is decoded with the layout it was planned with: every
    example of the job is stored, with a local run's numbers."""
    local_model = nnexp.load_model(str(ndif.folder))
    experiment = kind_experiments(tmp_path, local_model.tokenizer)[name]
    # the local run traces the same rows together (batch composition changes float rounding)
    local = nnexp.run(experiment, local_model, out=tmp_path / "local", limit=3, max_rows=9, examples_per_trace=3,
                      figures=False)
    out = tmp_path / "remote"
    nnexp.run(experiment, remote_model(ndif), out=out, limit=3, max_rows=9, examples_per_trace=3, figures=False,
              wait=False)
    assert RunDirectory(out).done() == set() and RunDirectory(out).read_jobs()
    collected = nnexp.run(experiment, remote_model(ndif), out=out, limit=1, max_rows=8, figures=False,
                          collect_only=True)
    assert not (out / "jobs.json").exists()
    assert_same_records(list(local), list(collected))


def test_a_job_planned_otherwise_is_refused(ndif, tmp_path):
    from nnexp.errors import ResultsError

    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    out = tmp_path / "run"
    nnexp.run(experiment, remote_model(ndif), out=out, limit=1, max_rows=9, figures=False, wait=False)
    jobs = json.loads((out / "jobs.json").read_text())
    for entry in jobs["jobs"].values():
        entry["row_limit"] = 8  # as if the layout were recomputed from another command's options
    (out / "jobs.json").write_text(json.dumps(jobs))
    with pytest.raises(ResultsError, match="was planned differently"):
        nnexp.run(experiment, remote_model(ndif), out=out, figures=False, collect_only=True)
    assert RunDirectory(out).done() == set()


def test_inline_and_downloaded_results_and_log_messages(ndif, tmp_path, capsys):
    console.set_quiet(False)  # notes carry the server's LOG messages
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    inline = nnexp.run(experiment, remote_model(ndif), out=tmp_path / "a", limit=2, figures=False)
    assert {job["delivery"] for job in ndif.stats()["jobs"]} == {"inline"}
    before = len(ndif.stats()["jobs"])
    ndif.control(results="url", log=True)
    downloaded = nnexp.run(experiment, remote_model(ndif), out=tmp_path / "b", limit=2, figures=False)
    assert_same_records(list(inline), list(downloaded))
    assert {job["delivery"] for job in ndif.stats()["jobs"][before:]} == {"url"}
    assert "server: hello from the test server" in capsys.readouterr().err


# -- faults -------------------------------------------------------------------------------


def test_server_error_is_clear_and_not_retried(ndif, tmp_path):
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    ndif.control(error_jobs=1)
    with pytest.raises(RemoteRunError, match="the request failed on the server: .*simulated server error"):
        nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", limit=2, figures=False)
    assert ndif.stats()["requests"] == 1


@pytest.mark.parametrize("fault", [{"fail_requests": 2}, {"drop_jobs": 1}, {"hang_jobs": 1}])
def test_transient_faults_are_retried(fault, ndif, tmp_path, capsys):
    console.set_quiet(False)  # the retries are announced in notes
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    expected = nnexp.run(experiment, nnexp.load_model(str(ndif.folder)), out=tmp_path / "local", limit=1, figures=False)
    ndif.control(**fault)
    model = remote_model(ndif, timeout=3)
    results = nnexp.run(experiment, model, out=tmp_path / "run", limit=1, figures=False)
    assert_same_records(list(expected), list(results))
    err = capsys.readouterr().err
    assert "retrying in" in err
    reason = {"fail_requests": "unavailable (HTTP 503", "drop_jobs": "closed the connection",
              "hang_jobs": "no word from the server for 3 s"}[next(iter(fault))]
    assert reason in err


def test_outage_keeps_finished_examples_and_resumes(ndif, tmp_path):
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]  # 2 examples
    model = remote_model(ndif)
    calls = {"n": 0}
    real = model.executor.run

    def outage_after_first_chunk(jobs):
        calls["n"] += 1
        if calls["n"] == 2:  # the server goes down after the first example
            ndif.control(fail_requests=1000)
        return real(jobs)

    model.executor.run = outage_after_first_chunk
    with pytest.raises(RemoteRunError, match="failed 3 times: the server is unavailable.*every finished example is stored"):
        nnexp.run(experiment, model, out=tmp_path / "run", figures=False)
    assert RunDirectory(tmp_path / "run").done() == {0}
    ndif.reset()
    model.executor.run = real
    results = nnexp.run(experiment, model, out=tmp_path / "run", figures=False)
    assert [r.index for r in results] == [0, 1]
    assert len(ndif.stats()["jobs"]) == 1  # only the missing example was computed


def test_unreachable_server(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    folder = tmp_path / "model"
    tiny_hf_model("gpt2").save_pretrained(folder)
    make_gpt2_tokenizer().save_pretrained(folder)
    model = nnexp.load_model(str(folder), backend="remote", remote_model=SERVED, host=f"http://127.0.0.1:{port}",
                             retries=1, backoff=0.01)
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    with pytest.raises(RemoteRunError, match=r"failed 2 times: cannot reach the server"):
        nnexp.run(experiment, model, out=tmp_path / "run", limit=1, figures=False)


def test_rejected_key_never_shows_the_key(ndif, tmp_path, monkeypatch):
    ndif.control(api_key="the-right-key")
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    with pytest.raises(RemoteRunError, match="rejected the API key") as error:
        nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", limit=1, figures=False)
    assert SECRET not in str(error.value)
    # with the right key it runs, and the key is in nothing it wrote
    monkeypatch.setenv("NDIF_API_KEY", "the-right-key")
    nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", limit=1, figures=False)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"the-right-key" not in path.read_bytes(), path


def test_version_mismatch_is_clear(ndif, tmp_path):
    ndif.control(nnsight_version="0.0.1")
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    with pytest.raises(RemoteRunError, match=r"refuses this client's version .*nnexp pins nnsight==0\.8\.1"):
        nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", limit=1, figures=False)


def test_results_from_another_host_are_refused(ndif, tmp_path):
    ndif.control(results="url", result_url_base="http://127.0.0.2:9")
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["patching"]
    with pytest.raises(RemoteRunError, match=r"download from http://127\.0\.0\.2:9, another host.*--trust-result-host"):
        nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", limit=1, figures=False)


def test_folder_needs_a_remote_id_and_budget_is_local_only(ndif, tmp_path):
    from nnexp.errors import ConfigError, ModelError

    with pytest.raises(ModelError, match="--remote-model owner/name"):
        nnexp.load_model(str(ndif.folder), backend="remote", host=ndif.url)
    experiment = kind_experiments(tmp_path, make_gpt2_tokenizer())["gradient-attribution"]
    with pytest.raises(ConfigError, match="bound its traces with --max-rows"):
        nnexp.run(experiment, remote_model(ndif), out=tmp_path / "run", memory_budget="1GB", figures=False)


# -- the command line: submit without waiting, fetch, kill and resume ------------------------


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnexp.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_submit_without_waiting_then_fetch(ndif, tmp_path):
    out = tmp_path / "run"
    ndif.control(delay_s=0.5)
    common = ["--model", ndif.folder, "--remote-model", SERVED, "--backend", "remote", "--remote-host", ndif.url]
    result = cli("run", "ioi-patching", *common, "--limit", 3, "--sites", "resid_post", "--out", out, "--no-wait")
    assert result.returncode == 0, result.stderr
    assert "collect them with: nnexp fetch" in result.stderr
    jobs = json.loads((out / "jobs.json").read_text())["jobs"]
    assert sorted(i for entry in jobs.values() for i in entry["examples"]) == [0, 1, 2]
    assert RunDirectory(out).done() == set()
    result = cli("fetch", out, "--wait")
    assert result.returncode == 0, result.stderr
    assert RunDirectory(out).done() == {0, 1, 2} and not (out / "jobs.json").exists()
    assert (out / "figures" / "example-0000-resid_post.html").exists()
    from nnexp.registry import EXPERIMENTS

    local = nnexp.run(EXPERIMENTS["ioi-patching"](sites=("resid_post",)), nnexp.load_model(str(ndif.folder)),
                      out=tmp_path / "local", limit=3, figures=False)
    assert_same_records(list(local), list(nnexp.load_results(out)))
    assert len(ndif.stats()["jobs"]) == 3  # each chunk computed once


def test_cli_fetch_keeps_the_runs_limit(ndif, tmp_path):
    """A run submitted with --limit 2 is collected as that run: the examples beyond the
    limit are named as such, not as "never submitted"."""
    out = tmp_path / "run"
    common = ["--model", ndif.folder, "--remote-model", SERVED, "--backend", "remote", "--remote-host", ndif.url]
    result = cli("run", "ioi-patching", *common, "--limit", 2, "--sites", "resid_post", "--out", out, "--no-wait")
    assert result.returncode == 0, result.stderr
    result = cli("fetch", out, "--wait")
    assert result.returncode == 0, result.stderr
    assert "never submitted" not in result.stderr
    assert f"examples 2 to 7 lie beyond this run's --limit 2; `nnexp resume {out} --limit 8` computes them" in result.stderr
    assert RunDirectory(out).done() == {0, 1} and len(nnexp.load_results(out)) == 2


def test_cli_killed_mid_dataset_resumes_without_recomputing(ndif, tmp_path):
    out = tmp_path / "run"
    ndif.control(delay_s=1.0)
    command = [sys.executable, "-m", "nnexp.cli", "run", "ioi-patching", "--model", str(ndif.folder), "--remote-model",
               SERVED, "--backend", "remote", "--remote-host", ndif.url, "--limit", "4", "--sites", "resid_post",
               "--out", str(out), "--no-figures", "--quiet"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(RunDirectory(out).done()) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.kill()
    process.wait()
    finished = RunDirectory(out).done()
    assert 2 <= len(finished) < 4
    ndif.control(delay_s=0.0)
    before = len(ndif.stats()["jobs"])
    result = cli("resume", out, "--no-figures", "--limit", 4)
    assert result.returncode == 0, result.stderr
    assert f"{len(finished)} of 4 examples already stored" in result.stderr
    assert RunDirectory(out).done() == {0, 1, 2, 3}
    assert len(ndif.stats()["jobs"]) - before == 4 - len(finished)
