"""Running nnexp's traces on an NDIF server with nnsight's own client.

`RemoteExecutor` sends each chunk of examples as ONE nnsight session (all its traces)
through nnsight's `RemoteBackend`, to the configured host. Around that client it adds
what a long dataset run needs:

* transient failures (connection refused or dropped, HTTP 5xx/429, no word from the
  server for `timeout` seconds) are retried with exponential backoff; the rest
  (a rejected key, a version mismatch, an error raised by the request on the server)
  fail at once with an error that says what to do;
* non-blocking submission: `submit` sends a chunk and returns its job id, which the
  runner stores in the results directory; `poll` fetches the result later;
* the API key (from `NDIF_API_KEY` or nnsight's config) is sent in the request header
  only: it is scrubbed from every message nnexp shows or stores;
* results are downloaded only from the configured host (or hosts the user trusts
  explicitly): nnsight loads them with `torch.load(weights_only=False)`, which can run
  code, so a download URL that points elsewhere is refused;
* the bytes received are counted, so a run can report what each example cost on the wire.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlsplit

from ..console import note
from ..errors import ConfigError, NnexpError
from ..tracing.jobs import SubmittingExecutor

DEFAULT_TIMEOUT_S = 900.0  # seconds without any message from the server
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 2.0


class RemoteRunError(NnexpError):
    """A remote request that failed (after retries where a retry could help)."""


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class _SilenceWatch:
    """Wraps nnsight's status display: every status resets the clock, and the redraw
    that follows each websocket timeout raises once the server has been silent too long."""

    def __init__(self, display, limit: float) -> None:
        self.display = display
        self.limit = limit
        self.last = time.monotonic()

    def update(self, response):
        self.last = time.monotonic()
        return self.display.update(response)

    def refresh(self):
        if time.monotonic() - self.last > self.limit:
            raise TimeoutError(f"no word from the server for {self.limit:g} s")
        return self.display.refresh()

    def __getattr__(self, name):
        return getattr(self.display, name)


def _backend_class():
    from nnsight.intervention.backends.remote import RemoteBackend

    class GuardedRemoteBackend(RemoteBackend):
        """nnsight's RemoteBackend that downloads results only from trusted hosts and
        counts the bytes it receives."""

        def __init__(self, *args, trusted_hosts=(), **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.trusted = {_origin(self.host), *(_origin(h) for h in trusted_hosts)}
            self.received = 0
            # nnexp shows its own progress, not nnsight's spinner
            self.display.enabled = False

        def watch(self, limit: float):
            """Give up when the server says nothing for `limit` seconds. nnsight's client
            treats a websocket timeout as a cue to redraw its display and waits on, so the
            check goes where it redraws."""
            self.display = _SilenceWatch(self.display, limit)
            return self

        def note(self, response):
            from nnsight.schema.response import Status

            if response.status == Status.LOG and response.description:
                note(f"server: {response.description}")
            return super().note(response)

        def download_result(self, url):
            if isinstance(url, str) and url and _origin(url) not in self.trusted:
                parts = urlsplit(url)
                raise RemoteRunError(
                    f"the server at {self.host} sent its result as a download from {parts.scheme}://{parts.netloc}, "
                    "another host; nnexp loads results only from the configured host, because loading one can run "
                    "code. If you trust that host, add it with --trust-result-host"
                )
            return super().download_result(url)

        def finalize(self, content: bytes):
            self.received += len(content)
            return super().finalize(content)

    return GuardedRemoteBackend


class RemoteExecutor(SubmittingExecutor):
    """Runs a model's trace jobs on an NDIF server (see the module docstring).

    Args:
        model: the `Model` (its module tree may live on the meta device).
        host: the server's URL; default nnsight's `CONFIG.API.HOST` (env `NDIF_HOST`).
        timeout: seconds to wait for any message from the server before giving up on a try.
        retries: how many times a transient failure is retried.
        backoff: seconds before the first retry; doubled for each further one.
        trusted_hosts: other URLs results may be downloaded from.
    """

    kind = "remote"

    def __init__(self, model, host: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF_S, trusted_hosts=()) -> None:
        from nnsight import CONFIG

        super().__init__(model)
        self.host = (host or CONFIG.API.HOST).rstrip("/")
        if not self.host.startswith(("http://", "https://")) or not urlsplit(self.host).hostname:
            raise ConfigError(f"remote host {self.host!r} is not a URL; give one like https://api.ndif.us "
                              "or http://127.0.0.1:8000")
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigError("remote retries and backoff must be >= 0 and the timeout > 0")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.trusted_hosts = tuple(trusted_hosts)
        self.bytes_received = 0

    # -- what the request carries -----------------------------------------------------

    @property
    def api_key(self) -> str:
        from nnsight import CONFIG

        return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or ""

    def model_key(self) -> str:
        """The key NDIF knows the model by, as nnsight's own client mints it for a
        `TransformersModel` of a hub repo (without asking the hub to canonicalise the id)."""
        from nnsight.util import to_import_path

        nn = self.model.nn
        data = {"repo_id": self.model.remote_id, "revision": None, "task": "text-generation"}
        return f"{to_import_path(nn._remoteable_class())}:{json.dumps(data)}"

    def describe(self) -> dict:
        # never the key
        return {"kind": self.kind, "host": self.host, "model": self.model.remote_id}

    def _backend(self, blocking: bool = True, job_id: str | None = None):
        backend = _backend_class()(self.model_key(), host=self.host, api_key=self.api_key or None,
                                   env=self.model.nn._remoteable_get_env(), blocking=blocking, job_id=job_id,
                                   trusted_hosts=self.trusted_hosts)
        return backend.watch(self.timeout)

    # -- running ------------------------------------------------------------------------

    def run(self, jobs: list) -> list:
        """Send `jobs` as one session request and wait for their values."""
        from ..tracing.jobs import _body_modules, register_for_shipping, run_session

        register_for_shipping(_body_modules(jobs))

        def blocking():
            backend = self._backend()
            try:
                return run_session(self.model.nn, jobs, backend)
            finally:
                self.bytes_received += backend.received

        return self._with_retries(blocking, "running a request")

    def submit(self, jobs: list) -> str:
        """Send `jobs` as one session request without waiting; its job id."""
        from ..tracing.jobs import _body_modules, register_for_shipping, run_session

        register_for_shipping(_body_modules(jobs))

        def submit():
            backend = self._backend(blocking=False)
            run_session(self.model.nn, jobs, backend)
            return backend.job_id

        return self._with_retries(submit, "submitting a request")

    def poll(self, job_id: str) -> tuple[list | None, str]:
        """(each job's saved values, "COMPLETED") for a finished request, or (None, its
        status) while it runs."""
        backend = self._backend(blocking=False, job_id=job_id)
        try:
            result = self._with_retries(backend, f"fetching job {job_id}")
        finally:
            self.bytes_received += backend.received
        if result is None:
            return None, (backend.status.value if backend.status is not None else "not started")
        if "results" not in result:
            raise RemoteRunError(f"job {job_id} completed without nnexp's results; resubmit it "
                                 "(delete jobs.json in the results directory and resume)")
        return result["results"], "COMPLETED"

    def _with_retries(self, action, what: str):
        import websocket

        previous = websocket.getdefaulttimeout()
        # nnsight's client waits on its websocket with the default timeout; each expiry is
        # when the silence watch (above) looks at the clock.
        websocket.setdefaulttimeout(min(self.timeout, 5.0))
        try:
            for attempt in range(self.retries + 1):
                try:
                    return action()
                except RemoteRunError:
                    raise
                except Exception as error:  # noqa: BLE001 - every failure is explained below
                    message, transient = self.explain(error)
                    if not transient:
                        raise RemoteRunError(f"{what} on {self.host} failed: {message}") from None
                    if attempt == self.retries:
                        raise RemoteRunError(
                            f"{what} on {self.host} failed {self.retries + 1} times: {message}; every finished "
                            "example is stored, so run the same command again (or nnexp resume) once the "
                            "server is back"
                        ) from None
                    delay = self.backoff * 2**attempt
                    note(f"{what} on {self.host}: {message}; retrying in {delay:g} s "
                         f"(attempt {attempt + 2} of {self.retries + 1})")
                    time.sleep(delay)
        finally:
            websocket.setdefaulttimeout(previous)

    # -- explaining failures --------------------------------------------------------------

    def scrub(self, text: str) -> str:
        key = self.api_key
        return text.replace(key, "***") if key else text

    def explain(self, error: Exception) -> tuple[str, bool]:
        """(a one-line explanation without the API key, whether retrying may help)."""
        import httpx
        import websocket
        from nnsight.intervention.backends.remote import RemoteError

        text = self.scrub(str(error).strip() or type(error).__name__)
        cause = error.__cause__
        status = None
        if isinstance(cause, httpx.HTTPStatusError):
            status = cause.response.status_code
        elif isinstance(error, websocket.WebSocketBadStatusException):
            status = error.status_code
        elif isinstance(error, httpx.HTTPStatusError):
            status = error.response.status_code
        if status is not None:
            if status in (401, 403):
                return (f"the server rejected the API key (HTTP {status}: {text}); set NDIF_API_KEY, or nnsight's "
                        "CONFIG.API.APIKEY, to a valid key", False)
            lower = text.lower()
            if "version" in lower or ("nnsight" in lower and "match" in lower):
                from importlib.metadata import version

                return (f"the server refuses this client's version (HTTP {status}: {text}); nnexp pins "
                        f"nnsight=={version('nnsight')}, so use a server that runs it", False)
            if status == 404:
                return (f"the server does not serve model {self.model.remote_id!r} (HTTP 404: {text}); check "
                        "--remote-model, and the models the server lists", False)
            if status >= 500 or status == 429:
                return f"the server is unavailable (HTTP {status}: {text})", True
            return f"the server refused the request (HTTP {status}: {text})", False
        if isinstance(error, (websocket.WebSocketTimeoutException, TimeoutError, httpx.TimeoutException)):
            return f"no word from the server for {self.timeout:g} s", True
        if isinstance(error, websocket.WebSocketConnectionClosedException):
            return "the server closed the connection before the job finished", True
        if isinstance(error, (ConnectionError, httpx.TransportError, websocket.WebSocketException, OSError)):
            return f"cannot reach the server ({text})", True
        if isinstance(error, RemoteError):
            if isinstance(cause, httpx.TransportError):
                return f"cannot reach the server ({text})", True
            return f"the request failed on the server: {text}", False
        return f"{type(error).__name__}: {text}", False
