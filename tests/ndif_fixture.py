"""Run the loopback NDIF test server (tests/ndif_server.py) in a subprocess, for tests.

    server = start_ndif_server({"test/tiny-gpt2": (hf_model, tokenizer)}, tmp_path)
    backend = RemoteBackend(remote_model_key(nn, "test/tiny-gpt2"), host=server.url, env=nn._remoteable_get_env())
    server.control(error_jobs=1)   # faults: see DEFAULT_SETTINGS in tests/ndif_server.py
    server.stats()["jobs"]         # what the server saw and sent back
    server.stop()

The server runs in its own process, as NDIF does: nnsight keeps per-process caches and global
state, the server refuses to import the project's packages, and a hung job must not hang the tests.
For pytest, `ndif_server_fixture` makes a fixture that serves what a function returns for a whole
scope and stops the server at teardown; tests sharing that server should take it through
`reset_between` (or call `server.reset()`) so one test's faults and statistics do not leak into the
next.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import pytest

SERVER_SCRIPT = Path(__file__).with_name("ndif_server.py")
LISTENING = "NDIF test server listening on"  # the one line the server prints to stdout when ready

ModelSpec = Union[Path, str, tuple]  # a save_pretrained folder, or (hf_model, tokenizer) to save


def remote_model_key(model: Any, repo_id: str, revision: str = "main") -> str:
    """The key the client sends for `model` served as `repo_id`.

    nnsight builds it by asking the model hub to canonicalise the repo id, which fails offline and
    for local folders; this is the same string without the hub.
    """
    from nnsight.util import to_import_path

    return f"{to_import_path(type(model))}:" + json.dumps({"repo_id": repo_id, "revision": revision})


def save_models(models: dict[str, ModelSpec], root: Path) -> dict[str, Path]:
    """Write each (hf_model, tokenizer) pair to its own folder under `root`; folders pass through."""
    folders: dict[str, Path] = {}
    for index, (repo_id, spec) in enumerate(models.items()):
        if isinstance(spec, (str, Path)):
            folders[repo_id] = Path(spec)
            continue
        hf_model, tokenizer = spec
        folder = Path(root) / f"model-{index}-{repo_id.replace('/', '--')}"
        folder.mkdir(parents=True, exist_ok=True)
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[repo_id] = folder
    return folders


class NDIFServer:
    """A running test server: its URL, its control API, and how to stop it."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, stdout: list[str]) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        self.stdout = stdout  # what the server printed after the listening line (should be nothing)

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> Any:
        import httpx

        response = httpx.request(method, f"{self.url}{path}", json=body, timeout=30)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return response.json()

    def control(self, **settings: Any) -> dict:
        """Merge fault/behaviour settings; returns all settings now in force."""
        return self._call("POST", "/_control", settings)

    def reset(self) -> dict:
        """Default settings, empty statistics, jobs forgotten."""
        return self._call("POST", "/_control/reset")

    def disconnect(self) -> int:
        """Abort every open /subscribe websocket (no close frame); returns how many."""
        return self._call("POST", "/_control/disconnect")["aborted"]

    def stats(self) -> dict:
        return self._call("GET", "/_stats")

    def log(self) -> str:
        """The server's stderr so far (tracebacks of failed jobs, warnings)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> NDIFServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_ndif_server(
    models: dict[str, ModelSpec],
    root: Optional[Path] = None,
    timeout: float = 120,
    extra_args: tuple[str, ...] = (),
) -> NDIFServer:
    """Save the models (if given as objects), start the server on a free port, wait until it listens.

    Raises RuntimeError with the server's stderr if it exits or stays silent past `timeout` seconds.
    """
    root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ndif-test-"))
    folders = save_models(models, root)
    log_path = root / "ndif-server.log"
    command = [sys.executable, str(SERVER_SCRIPT), "--port", "0", "--exit-with-parent", *extra_args]
    for repo_id, folder in folders.items():
        command += ["--model", f"{repo_id}={folder}"]
    log = open(log_path, "wb")
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
    finally:
        log.close()  # the child holds its own descriptor

    # Read stdout on a thread: the first line is the URL, and anything after it must keep draining
    # so the child never blocks on a full pipe.
    lines: queue.Queue[Optional[str]] = queue.Queue()
    later: list[str] = []

    def drain() -> None:
        first = True
        for line in process.stdout:
            if first:
                lines.put(line)
                first = False
            else:
                later.append(line)
        lines.put(None)

    threading.Thread(target=drain, name="ndif-test-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout
    line: Optional[str] = None
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
            break
        except queue.Empty:
            if process.poll() is not None:
                break
    if not line or not line.startswith(LISTENING):
        stopped = process.poll() is not None
        if not stopped:
            process.kill()
            process.wait()
        why = f"exited with {process.returncode}" if stopped else f"did not listen within {timeout:.0f} s"
        stderr = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"NDIF test server {why}; stdout: {line!r}\nstderr:\n{stderr}")
    return NDIFServer(process, line[len(LISTENING):].strip(), log_path, later)


def ndif_server_fixture(
    build_models: Callable[[], dict[str, ModelSpec]], scope: str = "session", name: Optional[str] = None
):
    """A pytest fixture that serves `build_models()` for the whole `scope`.

        ndif_server = ndif_server_fixture(lambda: {"test/tiny-gpt2": (tiny_hf_model("gpt2"), make_gpt2_tokenizer())})

    `build_models` runs once, when the fixture is first used, so tests that do not need the server
    pay nothing.
    """

    @pytest.fixture(scope=scope, name=name)
    def _server(tmp_path_factory):
        server = start_ndif_server(build_models(), tmp_path_factory.mktemp("ndif-server"))
        try:
            yield server
        finally:
            server.stop()

    return _server


def reset_between(server_fixture_name: str = "ndif_server", name: str = "ndif"):
    """A function-scoped fixture giving the shared server back with default settings and stats."""

    @pytest.fixture(name=name)
    def _reset(request):
        server = request.getfixturevalue(server_fixture_name)
        server.reset()
        yield server
        server.reset()

    return _reset
