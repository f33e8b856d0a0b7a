"""The loopback NDIF test server (tests/ndif_server.py) against the unmodified nnsight client.

One server process serves a seeded random GPT-2 for the whole module; each test resets its
settings. The client is nnsight's own `RemoteBackend`, pointed at the server; results are compared
with a local trace of the same model. The fault tests pin down how nnsight 0.8.1's client reacts to
each failure, which is what code wrapping it has to handle:

* job ERROR (simulated or raised by the block) -> `RemoteError(description)`;
* POST /request refused (bad key, version mismatch, outage, unknown model) ->
  `RemoteError("Failed to send request: <detail>")`;
* /subscribe refused (bad key) -> `websocket.WebSocketBadStatusException` (status 401), not RemoteError;
* websocket cut mid-job -> `websocket.WebSocketConnectionClosedException`;
* a job that never finishes -> the blocking client waits forever: it treats every websocket timeout
  as "refresh the display and keep waiting", whatever `websocket.setdefaulttimeout` says;
* a poll with a bad key -> `httpx.HTTPStatusError` (poll() does not wrap it in RemoteError).

Trace bodies are re-read from this file by nnsight, so they must stay real `with` blocks here.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import time

import httpx
import nnsight
import pytest
import torch
import websocket
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.config import CONFIG

import nnexp.metrics
from nnexp.metrics import logit_diff
from tests.helpers import make_gpt2_tokenizer, tiny_hf_model
from tests.ndif_fixture import SERVER_SCRIPT, ndif_server_fixture, remote_model_key, reset_between

REPO_ID = "test/tiny-gpt2"
PROMPT = "The Eiffel Tower is in the city of"
OTHER_PROMPT = "When Mary and John went to the store, John gave a drink to"


@functools.cache
def tiny_gpt2():
    """The seeded random GPT-2 and its tokenizer: served by the server, wrapped by the client."""
    return tiny_hf_model("gpt2", seed=0), make_gpt2_tokenizer()


server = ndif_server_fixture(lambda: {REPO_ID: tiny_gpt2()}, scope="module", name="server")
ndif = reset_between("server", name="ndif")


@pytest.fixture(scope="module")
def nn():
    hf_model, tokenizer = tiny_gpt2()
    return nnsight.TransformersModel(hf_model, tokenizer=tokenizer)


def backend(nn, server, repo_id: str = REPO_ID, **kwargs) -> RemoteBackend:
    return RemoteBackend(remote_model_key(nn, repo_id), host=server.url, env=nn._remoteable_get_env(), **kwargs)


def local_run(nn, prompt: str = PROMPT):
    with nn.trace(prompt):
        hidden = nn.transformer.h[0].output.save()
        logits = nn.lm_head.output.save()
    return hidden, logits


def remote_run(nn, server, prompt: str = PROMPT, **kwargs):
    with nn.trace(prompt, backend=backend(nn, server, **kwargs)):
        hidden = nn.transformer.h[0].output.save()
        logits = nn.lm_head.output.save()
    return hidden, logits


def assert_identical(a, b) -> None:
    if isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    else:
        assert isinstance(a, torch.Tensor) and torch.equal(a, b)


def only_job(ndif) -> dict:
    jobs = ndif.stats()["jobs"]
    assert len(jobs) == 1, jobs
    return jobs[0]


def test_blocking_trace_matches_local(nn, ndif):
    hidden, logits = remote_run(nn, ndif)
    local_hidden, local_logits = local_run(nn)
    assert_identical(hidden, local_hidden)
    assert_identical(logits, local_logits)
    job = only_job(ndif)
    assert job["status"] == "COMPLETED" and job["session"] and job["nnsight_version"] == nnsight.__version__
    assert ndif.stats()["jobs_executed"] == 1


def test_session_with_two_traces(nn, ndif):
    with nn.session(backend=backend(nn, ndif)):
        with nn.trace(PROMPT):
            first = nn.lm_head.output.save()
        with nn.trace(OTHER_PROMPT):
            second = nn.transformer.h[1].output.save()
    with nn.trace(PROMPT):
        local_first = nn.lm_head.output.save()
    with nn.trace(OTHER_PROMPT):
        local_second = nn.transformer.h[1].output.save()
    assert_identical(first, local_first)
    assert_identical(second, local_second)
    assert only_job(ndif)["status"] == "COMPLETED"  # the whole session is one job


def test_results_inline_and_by_url_compressed_or_not(nn, ndif, monkeypatch):
    _, local_logits = local_run(nn)
    sizes = {}
    for compress in (True, False):
        monkeypatch.setattr(CONFIG.API, "COMPRESS", compress)  # read by RemoteBackend.__init__
        for delivery in ("inline", "url"):
            ndif.reset()
            ndif.control(results=delivery)
            _, logits = remote_run(nn, ndif)
            assert_identical(logits, local_logits)
            job = only_job(ndif)
            assert (job["delivery"], job["compress"], job["downloads"]) == (delivery, compress, delivery == "url")
            sizes[compress, delivery] = job["result_bytes"]
    # The same saves either way; zstd shrinks them (random weights compress a little, not much).
    assert sizes[True, "inline"] == sizes[True, "url"] < sizes[False, "inline"] == sizes[False, "url"]

    # "auto" sends small results inline and large ones by URL, like NDIF.
    ndif.reset()
    ndif.control(inline_max_bytes=sizes[True, "url"] - 1)
    remote_run(nn, ndif)
    assert only_job(ndif)["delivery"] == "url"


def test_non_blocking_submit_then_poll(nn, ndif):
    ndif.control(delay_s=1.0)
    submitter = backend(nn, ndif, blocking=False)
    with nn.trace(PROMPT, backend=submitter):
        logits = nn.lm_head.output.save()  # noqa: F841 - the name is what the server saves
    assert submitter.job_id and only_job(ndif)["session"] is False

    poller = backend(nn, ndif, blocking=False, job_id=submitter.job_id)
    assert poller() is None  # still queued or sleeping before it runs
    assert poller.status.value in ("QUEUED", "RUNNING")
    deadline = time.monotonic() + 30
    while (result := poller()) is None:
        assert time.monotonic() < deadline, f"job still {poller.status}"
        time.sleep(0.1)
    assert set(result) == {"logits"}
    assert_identical(result["logits"], local_run(nn)[1])
    job = only_job(ndif)
    assert job["delivery"] == "url" and job["downloads"] == 1  # a polled result is always a download

    unknown = backend(nn, ndif, blocking=False, job_id="no-such-job")
    assert unknown() is None  # 404: "no status yet"


def test_error_status_becomes_remote_error(nn, ndif):
    ndif.control(error_jobs=1)
    with pytest.raises(RemoteError, match="^simulated server error$"):
        remote_run(nn, ndif)
    remote_run(nn, ndif)  # the fault was for one job only
    assert [job["status"] for job in ndif.stats()["jobs"]] == ["ERROR", "COMPLETED"]


def test_exception_in_the_block_comes_back(nn, ndif):
    with pytest.raises(RemoteError) as caught:
        with nn.trace(PROMPT, backend=backend(nn, ndif)):
            hidden = nn.transformer.h[7].output.save()  # noqa: F841 -- GPT-2 here has 3 layers
    message = str(caught.value)
    assert message.startswith("AttributeError: ") and "'7'" in message
    # the server-side traceback ends at the user's line, shipped in the block's source
    assert "Server traceback" in message and "nn.transformer.h[7].output.save()" in message
    assert only_job(ndif)["status"] == "ERROR"


def test_wrong_api_key(nn, ndif):
    ndif.control(api_key="the-right-key-123")
    secret = "my-wrong-key-456"

    # The blocking client subscribes first, and a refused websocket is not a RemoteError.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        remote_run(nn, ndif, api_key=secret)
    assert refused.value.status_code == 401 and "Invalid API key" in str(refused.value)
    assert secret not in str(refused.value)

    # NDIF's socket never checked keys; then the POST is what refuses, as a RemoteError.
    ndif.control(subscribe_requires_key=False)
    with pytest.raises(RemoteError, match="^Failed to send request: Invalid API key") as caught:
        remote_run(nn, ndif, api_key=secret)
    assert secret not in str(caught.value) and "the-right-key-123" not in str(caught.value)

    with pytest.raises(RemoteError, match="Invalid API key"):
        with nn.trace(PROMPT, backend=backend(nn, ndif, api_key=secret, blocking=False)):
            logits = nn.lm_head.output.save()  # noqa: F841
    with pytest.raises(httpx.HTTPStatusError, match="401"):  # polling is not wrapped
        backend(nn, ndif, api_key=secret, blocking=False, job_id="any")()

    ndif.control(subscribe_requires_key=True)
    remote_run(nn, ndif, api_key="the-right-key-123")
    assert ndif.stats()["refused"] == 2 and ndif.stats()["jobs_executed"] == 1


def test_nnsight_version_mismatch(nn, ndif):
    ndif.control(nnsight_version="0.0.1")
    with pytest.raises(RemoteError, match=rf"client nnsight {nnsight.__version__} does not match server nnsight 0\.0\.1"):
        remote_run(nn, ndif)
    ndif.control(nnsight_version=nnsight.__version__)
    remote_run(nn, ndif)


def test_transient_outage(nn, ndif):
    ndif.control(fail_requests=1)
    with pytest.raises(RemoteError, match="^Failed to send request: .*simulated outage"):
        remote_run(nn, ndif)
    remote_run(nn, ndif)  # the next attempt gets through
    stats = ndif.stats()
    assert (stats["requests"], stats["refused"], stats["jobs_executed"]) == (2, 1, 1)


def test_unknown_model_is_refused(nn, ndif):
    with pytest.raises(RemoteError, match=r"model 'test/absent' is not served here; served: test/tiny-gpt2"):
        remote_run(nn, ndif, repo_id="test/absent")


def test_log_statuses_reach_the_display(nn, ndif, capsys, monkeypatch):
    monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", True)
    ndif.control(log=True)
    with nn.trace(PROMPT, backend=backend(nn, ndif)):
        print("printed inside the block")  # NDIF sends a block's prints back as LOG too
        logits = nn.lm_head.output.save()
    assert_identical(logits, local_run(nn)[1])
    out = capsys.readouterr().out
    assert "hello from the test server" in out and "printed inside the block" in out


def test_dropped_websocket(nn, ndif):
    ndif.control(drop_jobs=1)
    with pytest.raises(websocket.WebSocketConnectionClosedException, match="Connection to remote host was lost"):
        remote_run(nn, ndif)
    assert only_job(ndif)["fault"] == "drop" and ndif.stats()["jobs_executed"] == 0


def test_hung_job_blocks_the_client_until_the_connection_drops(nn, ndif):
    ndif.control(hang_jobs=1)
    outcome: dict = {}

    def run() -> None:
        try:
            remote_run(nn, ndif)
        except BaseException as exc:  # reported to the test below
            outcome["error"] = exc

    # A socket timeout does not help: the client catches WebSocketTimeoutException and keeps waiting.
    previous = websocket.getdefaulttimeout()
    websocket.setdefaulttimeout(0.2)
    try:
        client = threading.Thread(target=run, daemon=True)
        client.start()
        client.join(2.0)
        assert client.is_alive(), outcome
        assert only_job(ndif)["status"] == "RUNNING"
        assert ndif.disconnect() == 1  # only cutting the connection ends the wait
        client.join(10)
    finally:
        websocket.setdefaulttimeout(previous)
    assert not client.is_alive()
    assert isinstance(outcome.get("error"), websocket.WebSocketConnectionClosedException)


def test_result_url_elsewhere_is_followed(nn, ndif):
    # The client downloads from whatever URL COMPLETED names; it does not check the host.
    ndif.control(results="url", result_url_base="http://127.0.0.1:1")
    with pytest.raises(httpx.ConnectError):
        remote_run(nn, ndif)
    assert ndif.stats()["downloads"] == 0


def test_server_cannot_import_the_project(nn, ndif):
    # nnsight's pull_env() registers for by-value pickling only modules it finds on sys.path
    # outside site-packages that are not an installed distribution. Here that is `tests` (found
    # through the working directory), so this file's helpers ship by value; `nnexp` and
    # `experiments` are an installed (editable) distribution, so pull_env leaves them alone and
    # they are pickled by reference: the server must have them, and this one, like NDIF, does not.
    from nnsight.ndif import get_local_env

    packages = get_local_env()["packages"]
    assert packages["nnexp"] != "local" and packages["tests"] == "local"

    # nnexp's remote executor registers the whole package for shipping in this process once
    # it has run; take that back for this test (and restore it after).
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    registered = {name for name in _PICKLE_BY_VALUE_MODULES if name.partition(".")[0] == "nnexp"}
    _PICKLE_BY_VALUE_MODULES.difference_update(registered)
    answer, foil = torch.tensor([5]), torch.tensor([7])
    try:
        with pytest.raises(RemoteError, match=r"ModuleNotFoundError: No module named 'nnexp'"):
            with nn.trace(PROMPT, backend=backend(nn, ndif)):
                diff = logit_diff(nn.lm_head.output[:, -1], answer, foil).save()
    finally:
        _PICKLE_BY_VALUE_MODULES.update(registered)

    import cloudpickle

    nnsight.register(nnexp.metrics)
    try:
        with nn.trace(PROMPT, backend=backend(nn, ndif)):
            diff = logit_diff(nn.lm_head.output[:, -1], answer, foil).save()
    finally:
        cloudpickle.unregister_pickle_by_value(nnexp.metrics)
    with nn.trace(PROMPT):
        local_diff = logit_diff(nn.lm_head.output[:, -1], answer, foil).save()
    assert_identical(diff, local_diff)


def test_control_rejects_unknown_settings(ndif):
    with pytest.raises(RuntimeError, match="unknown setting 'hang'"):
        ndif.control(hang=1)
    with pytest.raises(RuntimeError, match="'results' must be"):
        ndif.control(results="sometimes")


def test_binds_loopback_only(server, tmp_path):
    assert server.url.startswith("http://127.0.0.1:")
    refused = subprocess.run(
        [sys.executable, str(SERVER_SCRIPT), "--host", "0.0.0.0", "--model", f"{REPO_ID}={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "binds 127.0.0.1 only" in refused.stderr
    assert "listening" not in refused.stdout
