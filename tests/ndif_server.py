"""A loopback NDIF server for tests: nnsight 0.8.1's wire protocol, local models, fault injection.

    .venv/bin/python tests/ndif_server.py --model test/tiny-gpt2=/path/to/folder [--model ...] [--port 0]

It speaks, to the unmodified nnsight client (`nnsight.intervention.backends.remote.RemoteBackend`),
the protocol that client expects from NDIF:

* websocket ``/subscribe``: the first message is ``{"session_id": ...}``; the statuses of jobs posted
  with that session id follow as text frames (``ResponseModel`` JSON), except a COMPLETED that carries
  its result inline, which is a binary frame (``ResponseModel.pickle()``, ``data`` = the result bytes).
* ``POST /request``: multipart form, field ``data`` (``RequestModel`` JSON: model_key, session_id,
  compress, env) and file ``blob`` (the serialized trace); headers ``ndif-api-key``,
  ``nnsight-version``, ``python-version``. Answers RECEIVED; the job then runs on one worker thread
  (jobs run one at a time, as on one NDIF model replica): QUEUED, RUNNING, [LOG...], COMPLETED or ERROR.
* ``GET /response/{id}``: the latest status of a job, for the non-blocking client that polls instead of
  subscribing. A stored COMPLETED carries a download URL in ``data`` (JSON cannot carry bytes).
* ``GET /result/{id}``: the result bytes behind that URL, like NDIF's presigned object-store URLs
  (unauthenticated; the id is an unguessable uuid).

A job is executed the way NDIF's model deployment does it, with nnsight's own server-side pieces:
``RequestModel.deserialize(blob, model._remoteable_persistent_objects(), compress)`` rebuilds the
tracer, ``tracer.execute(tracer.info.code)`` runs it inside one trace scope (``inc``/``dec``), and the
result is every variable of the block's frame whose object was marked by ``.save()``, as a dict
``name -> value``, ``torch.save``d and zstd-compressed when the request asked for compression. The
client pushes that dict back into the caller's frame.

Like the real server, this process cannot import the project's own packages (``nnexp``,
``experiments``, ``tests``): a ``sys.meta_path`` finder refuses them, so client code using them must
be shipped by value (``nnsight.register``), exactly as on NDIF. It binds 127.0.0.1 only: it executes
the code it receives.

Faults and statistics go through a control API that tests share across one server process:
``POST /_control`` (merge settings, see ``DEFAULT_SETTINGS``), ``POST /_control/reset`` (defaults,
empty statistics), ``POST /_control/disconnect`` (abort every open websocket) and ``GET /_stats``.

Beyond nnsight's public API this server touches: ``nnsight.tracing.tracer.inc``/``dec``/``_saves``
(the trace scope and the set of saved object ids, as NDIF's backend reads ``Globals.saves``) and
``nnsight.tracing.globals.SOURCES``/``BLOCKS`` (per-process source caches that must be emptied
between requests: two requests from the same client file would otherwise share them). Aborting a
websocket without a close frame reaches into uvicorn's connection set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.abc
import io
import json
import logging
import os
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# At module level, not in _build_app: FastAPI resolves the endpoints' (string) annotations here.
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.websockets import WebSocketDisconnect

LISTENING = "NDIF test server listening on"

# The project's own top-level packages. The real NDIF server has only torch, transformers and
# nnsight installed, so a request that needs these must carry them by value.
PROJECT_PACKAGES = ("nnexp", "experiments", "tests")

# What each fault setting starts as; /_control merges into a copy, /_control/reset restores it.
DEFAULT_SETTINGS: dict[str, Any] = {
    "api_key": None,  # str: POST /request, GET /response (and /subscribe, below) need this ndif-api-key
    "subscribe_requires_key": True,  # whether /subscribe checks the key too (NDIF's socket never did)
    "nnsight_version": None,  # str: refuse clients whose nnsight-version header differs
    "fail_requests": 0,  # the next n POST /request answer fail_status (a transient outage)
    "fail_status": 503,
    "error_jobs": 0,  # the next n jobs end in ERROR "simulated server error"
    "hang_jobs": 0,  # the next n jobs send RUNNING and then nothing, ever
    "drop_jobs": 0,  # the next n jobs: RUNNING, then the session's websocket is aborted, job not run
    "results": "auto",  # "auto" (inline up to inline_max_bytes, else URL) | "inline" | "url"
    "inline_max_bytes": 1 << 20,
    "result_url_base": None,  # str: download URLs point there instead of at this server
    "log": False,  # send one LOG status per job
    "delay_s": 0.0,  # sleep before executing each job
    # NDIF runs its models with requires_grad_(False). Off by default here, where results are
    # compared bit for bit with local runs (whose weights from_pretrained leaves trainable): frozen
    # weights were seen to change nnexp's activation-patching results in the last bits on the tiny
    # GPT-2, though not a plain forward pass.
    "freeze_weights": False,
}

_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "api_key": (str, type(None)),
    "subscribe_requires_key": (bool,),
    "nnsight_version": (str, type(None)),
    "fail_requests": (int,),
    "fail_status": (int,),
    "error_jobs": (int,),
    "hang_jobs": (int,),
    "drop_jobs": (int,),
    "results": (str,),
    "inline_max_bytes": (int,),
    "result_url_base": (str, type(None)),
    "log": (bool,),
    "delay_s": (int, float),
    "freeze_weights": (bool,),
}

TRACEBACK_FRAMES = 4  # how much of the server-side traceback an ERROR description carries


class _RefuseProjectImports(importlib.abc.MetaPathFinder):
    """Make the project's packages unimportable, even through the editable install's finder."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in PROJECT_PACKAGES:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (not installed on this NDIF test server; "
                "ship it by value with nnsight.register)",
                name=fullname,
            )
        return None


def refuse_project_imports() -> None:
    # Running as a script put tests/ itself on sys.path; the real server has no project files at all.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(here)]
    for name in list(sys.modules):
        if name.partition(".")[0] in PROJECT_PACKAGES:
            del sys.modules[name]
    sys.meta_path.insert(0, _RefuseProjectImports())


def describe_exception(exc: BaseException) -> str:
    """Type and message first (what a user reads), then the last frames of the server-side traceback."""
    report = traceback.TracebackException.from_exception(exc)
    frames = "".join(report.stack.format()[-TRACEBACK_FRAMES:])
    final = "".join(report.format_exception_only()).rstrip()
    return f"{type(exc).__name__}: {exc}\n\nServer traceback (most recent call last, truncated):\n{frames}{final}"


def repo_id_of(model_key: str) -> str:
    """``"nnsight.modeling.transformers.TransformersModel:{json}"`` -> the JSON's repo_id."""
    _, sep, suffix = model_key.partition(":")
    if not sep:
        raise ValueError(f"malformed model_key {model_key!r}: expected 'import.path:{{json}}'")
    try:
        return json.loads(suffix)["repo_id"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed model_key {model_key!r}: {exc}") from None


@dataclass
class Job:
    id: str
    repo_id: str
    session_id: str
    compress: bool
    env: dict
    blob: bytes
    nnsight_version: str
    status: str = "RECEIVED"
    response_json: str = ""  # the latest status, as GET /response/{id} returns it
    result: Optional[bytes] = None  # what GET /result/{id} serves
    delivery: Optional[str] = None  # "inline" | "url"
    fault: Optional[str] = None  # "error" | "hang" | "drop"
    downloads: int = 0

    def stats(self) -> dict:
        return {
            "id": self.id,
            "model": self.repo_id,
            "session": bool(self.session_id),
            "status": self.status,
            "blob_bytes": len(self.blob),
            "result_bytes": None if self.result is None else len(self.result),
            "delivery": self.delivery,
            "fault": self.fault,
            "downloads": self.downloads,
            "compress": self.compress,
            "nnsight_version": self.nnsight_version,
        }


@dataclass
class Stats:
    requests: int = 0  # POST /request received, refused ones included
    refused: int = 0
    subscriptions: int = 0
    jobs_executed: int = 0  # jobs whose block actually ran (completed or raised)
    downloads: int = 0
    jobs: list = field(default_factory=list)


class _QuietDenials(logging.Filter):
    """Drop uvicorn's complaint about a websocket refused with an HTTP answer.

    uvicorn 0.54's sansio websocket protocol does not count a denial response (the 401 sent to a
    subscriber with a bad key) as a finished handshake and logs an error, though the client got the
    401 intact.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing handshake" not in record.getMessage()


class _LogStream(io.TextIOBase):
    """stdout during a job: each printed line goes back to the client as a LOG status, as on NDIF."""

    def __init__(self, emit) -> None:
        self.emit = emit
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            line, self.pending = self.pending, ""
            self.emit(line)


class TestNDIF:
    """The server's state, its HTTP/websocket app, and the worker thread that runs jobs."""

    __test__ = False  # not a pytest test class, should anything collect this module

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self.models: dict[str, Any] = {}  # repo id -> loaded nnsight.TransformersModel
        self.lock = threading.Lock()  # settings, stats and jobs: shared by the loop and the worker
        self.settings = dict(DEFAULT_SETTINGS)
        self.stats = Stats()
        self.jobs: dict[str, Job] = {}
        # session id -> (starlette WebSocket, the lock that keeps its frames in order); loop only
        self.sessions: dict[str, tuple[Any, asyncio.Lock]] = {}
        self.work: queue.Queue[Job] = queue.Queue()
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.server: Any = None  # the uvicorn.Server, to find a websocket's transport
        self.base_url = ""
        self.app = self._build_app()

    # -- settings and faults ------------------------------------------------------------------

    def setting(self, name: str) -> Any:
        with self.lock:
            return self.settings[name]

    def take(self, counter: str) -> bool:
        """Consume one unit of a fault counter; True when it was armed."""
        with self.lock:
            if self.settings[counter] > 0:
                self.settings[counter] -= 1
                return True
            return False

    def update_settings(self, changes: dict) -> dict:
        for name, value in changes.items():
            if name not in DEFAULT_SETTINGS:
                raise ValueError(f"unknown setting {name!r}; known: {', '.join(DEFAULT_SETTINGS)}")
            types = _SETTING_TYPES[name]
            # bool is an int: don't let `"fail_requests": true` through as 1
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ValueError(f"setting {name!r} must be {' or '.join(t.__name__ for t in types)}")
            if name == "results" and value not in ("auto", "inline", "url"):
                raise ValueError("setting 'results' must be 'auto', 'inline' or 'url'")
        with self.lock:
            self.settings.update(changes)
            return dict(self.settings)

    def reset(self) -> None:
        with self.lock:
            self.settings = dict(DEFAULT_SETTINGS)
            self.stats = Stats()
            # Hung or dropped jobs are never finished; forgetting them is all a reset can do.
            self.jobs.clear()

    def stats_json(self) -> dict:
        with self.lock:
            return {
                "requests": self.stats.requests,
                "refused": self.stats.refused,
                "subscriptions": self.stats.subscriptions,
                "open_sessions": len(self.sessions),
                "jobs_executed": self.stats.jobs_executed,
                "downloads": self.stats.downloads,
                "jobs": [job.stats() for job in self.stats.jobs],
            }

    # -- status delivery ---------------------------------------------------------------------

    def result_url(self, job: Job) -> str:
        base = self.setting("result_url_base") or self.base_url
        return f"{base.rstrip('/')}/result/{job.id}"

    async def _send(self, session_id: str, message: str | bytes) -> None:
        session = self.sessions.get(session_id)
        if session is None:  # the client went away; NDIF drops the update too
            return
        websocket, lock = session
        async with lock:
            try:
                if isinstance(message, bytes):
                    await websocket.send_bytes(message)
                else:
                    await websocket.send_text(message)
            except Exception as exc:  # a socket closing under us is the client's problem
                print(f"[ndif-test] send to session {session_id} failed: {exc!r}", file=sys.stderr)

    def _record(self, job: Job, status: str, description: str, data: Any = None) -> Any:
        from nnsight.schema.response import ResponseModel, Status

        response = ResponseModel(id=job.id, status=Status(status), description=description, data=data)
        with self.lock:
            job.status = status
            job.response_json = response.model_dump_json()
        return response

    def emit(self, job: Job, status: str, description: str) -> None:
        """From the worker thread: store a status and push it to the job's session, in order."""
        response = self._record(job, status, description)
        if job.session_id:
            self._wait(self._send(job.session_id, response.model_dump_json()))

    def _wait(self, coroutine) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def complete(self, job: Job, result: bytes) -> None:
        from nnsight.schema.response import ResponseModel, Status

        mode = self.setting("results")
        if mode == "auto":
            mode = "inline" if len(result) <= self.setting("inline_max_bytes") else "url"
        with self.lock:
            job.result = result
            # Only a subscribed job can take its result inline; a polled one always gets the URL.
            job.delivery = mode if job.session_id else "url"
        url = self.result_url(job)
        done = "Your job has been completed."
        self._record(job, "COMPLETED", done, data=url)
        if not job.session_id:
            return
        if job.delivery == "inline":
            frame = ResponseModel(id=job.id, status=Status.COMPLETED, description=done, data=result)
            self._wait(self._send(job.session_id, frame.pickle()))
        else:
            frame = ResponseModel(id=job.id, status=Status.COMPLETED, description=done, data=url)
            self._wait(self._send(job.session_id, frame.model_dump_json()))

    async def abort_session(self, session_id: str) -> None:
        """Cut a session's connection without a close frame, like a crashed server or lost network."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        websocket, _ = session
        transport = None
        # uvicorn does not hand the transport to the app; find the connection by client address.
        for connection in list(getattr(getattr(self.server, "server_state", None), "connections", ())):
            if getattr(connection, "client", None) == tuple(websocket.client or ()) and hasattr(
                connection, "transport"
            ):
                transport = connection.transport
                break
        if transport is not None:
            transport.abort()
        else:  # fall back to a close frame with "internal error"
            with contextlib.suppress(Exception):
                await websocket.close(code=1011)

    # -- execution ---------------------------------------------------------------------------

    def model(self, repo_id: str) -> Any:
        if repo_id not in self.models:
            import nnsight
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = str(self.folders[repo_id])
            hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            hf_model.eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            self.models[repo_id] = nnsight.TransformersModel(hf_model, tokenizer=tokenizer)
        return self.models[repo_id]

    def execute(self, job: Job) -> bytes:
        """Run one request as NDIF does and return the result blob (compressed if asked)."""
        import torch
        from nnsight.schema.request import RequestModel
        from nnsight.tracing import globals as tracing_globals
        from nnsight.tracing.tracer import _saves, dec, inc

        model = self.model(job.repo_id)
        model._remoteable_set_env(job.env)
        model._module.requires_grad_(not self.setting("freeze_weights"))
        # deserialize() registers the block's source in linecache under the client's file name,
        # and nnsight caches sources and compiled blocks per (file, line) for the process: a nested
        # trace in this request must not see the previous request's block from the same file.
        tracing_globals.SOURCES.clear()
        tracing_globals.BLOCKS.clear()
        tracer = RequestModel.deserialize(job.blob, model._remoteable_persistent_objects(), job.compress)
        with self.lock:
            self.stats.jobs_executed += 1
        log = _LogStream(lambda line: self.emit(job, "LOG", line))
        # One trace scope around the block, as Tracer.__exit__ opens around a local run: the outermost
        # push_result then writes only save()-marked values into the frame, and those are read off
        # before dec() clears the saved set (NDIF's backend does the same with Globals.saves).
        inc()
        try:
            with contextlib.redirect_stdout(log):
                tracer.execute(tracer.info.code)
            saved = _saves()
            saves = {name: value for name, value in tracer.info.frame.f_locals.items() if id(value) in saved}
        finally:
            log.flush()  # a last unterminated line, even when the block raised
            dec()
        buffer = io.BytesIO()
        torch.save(saves, buffer)
        data = buffer.getvalue()
        if job.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data

    def run_job(self, job: Job) -> None:
        self.emit(job, "RUNNING", "Your job has started running.")
        if self.take("drop_jobs"):
            job.fault = "drop"
            if job.session_id:
                self._wait(self.abort_session(job.session_id))
            return
        if self.take("hang_jobs"):
            job.fault = "hang"
            return
        if self.setting("log"):
            self.emit(job, "LOG", "hello from the test server")
        delay = self.setting("delay_s")
        if delay:
            time.sleep(delay)
        if self.take("error_jobs"):
            job.fault = "error"
            self.emit(job, "ERROR", "simulated server error")
            return
        try:
            result = self.execute(job)
        except BaseException as exc:  # the user's code raised, or the request would not load
            self.emit(job, "ERROR", describe_exception(exc))
            return
        self.complete(job, result)

    def worker(self) -> None:
        while True:
            job = self.work.get()
            try:
                self.run_job(job)
            except Exception:  # never let one job kill the worker; say why on stderr
                traceback.print_exc()
            finally:
                gc.collect()  # a request's activations should not outlive it

    # -- the app -----------------------------------------------------------------------------

    def _build_app(self):
        app = FastAPI(title="NDIF test server")

        def refuse(status: int, detail: str) -> JSONResponse:
            with self.lock:
                self.stats.refused += 1
            return JSONResponse(status_code=status, content={"detail": detail})

        def key_ok(headers) -> bool:
            expected = self.setting("api_key")
            return expected is None or headers.get("ndif-api-key") == expected

        # Never echo the key that was sent: error messages end up in logs.
        bad_key = "Invalid API key: the ndif-api-key header is missing or not accepted by this server."

        @app.get("/ping")
        async def ping():
            return PlainTextResponse("pong")

        @app.websocket("/subscribe")
        async def subscribe(websocket: WebSocket):
            if self.setting("subscribe_requires_key") and not key_ok(websocket.headers):
                # An HTTP answer instead of the upgrade (the websocket denial-response extension).
                await websocket.send_denial_response(JSONResponse(status_code=401, content={"detail": bad_key}))
                return
            await websocket.accept()
            session_id = uuid.uuid4().hex
            self.sessions[session_id] = (websocket, asyncio.Lock())
            with self.lock:
                self.stats.subscriptions += 1
            try:
                await websocket.send_text(json.dumps({"session_id": session_id}))
                while True:  # the client never talks; wait for it to leave
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
            except (WebSocketDisconnect, RuntimeError):
                pass
            finally:
                self.sessions.pop(session_id, None)

        @app.post("/request")
        async def post_request(request: Request):
            from nnsight.schema.request import RequestModel

            with self.lock:
                self.stats.requests += 1
            if self.take("fail_requests"):
                return refuse(self.setting("fail_status"), "NDIF test server: simulated outage, try again later.")
            if not key_ok(request.headers):
                return refuse(401, bad_key)
            wanted = self.setting("nnsight_version")
            sent = request.headers.get("nnsight-version", "")
            if wanted is not None and sent != wanted:
                return refuse(
                    400,
                    f"client nnsight {sent or '(unknown)'} does not match server nnsight {wanted}: "
                    f"install nnsight=={wanted} to use this server.",
                )
            form = await request.form()
            try:
                envelope = RequestModel.model_validate_json(form["data"])
                blob = await form["blob"].read()
                repo_id = repo_id_of(envelope.model_key)
            except (KeyError, ValueError, AttributeError) as exc:
                return refuse(400, f"malformed request: {exc}")
            if repo_id not in self.folders:
                return refuse(
                    404, f"model {repo_id!r} is not served here; served: {', '.join(sorted(self.folders))}"
                )
            job = Job(
                id=uuid.uuid4().hex,
                repo_id=repo_id,
                session_id=envelope.session_id,
                compress=envelope.compress,
                env=dict(envelope.env),
                blob=blob,
                nnsight_version=sent,
            )
            with self.lock:
                self.jobs[job.id] = job
                self.stats.jobs.append(job)
            received = self._record(job, "RECEIVED", "Your job has been received and is waiting to be queued.")
            queued = self._record(job, "QUEUED", "Your job has been queued.")
            if job.session_id:
                await self._send(job.session_id, queued.model_dump_json())
            self.work.put(job)
            return JSONResponse(content=json.loads(received.model_dump_json()))

        @app.get("/response/{job_id}")
        async def get_response(job_id: str, request: Request):
            if not key_ok(request.headers):  # not counted: "refused" counts POST /request only
                return JSONResponse(status_code=401, content={"detail": bad_key})
            with self.lock:
                job = self.jobs.get(job_id)
                body = None if job is None else job.response_json
            if body is None:
                return JSONResponse(status_code=404, content={"detail": f"no job {job_id!r}"})
            return Response(content=body, media_type="application/json")

        @app.get("/result/{job_id}")
        async def get_result(job_id: str):
            with self.lock:
                job = self.jobs.get(job_id)
                data = None if job is None else job.result
                if data is not None:
                    job.downloads += 1
                    self.stats.downloads += 1
            if data is None:
                return JSONResponse(status_code=404, content={"detail": f"no result for job {job_id!r}"})
            return Response(content=data, media_type="application/octet-stream")

        @app.post("/_control")
        async def control(request: Request):
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object of settings")
                return self.update_settings(changes)
            except ValueError as exc:
                return JSONResponse(status_code=400, content={"detail": str(exc)})

        @app.post("/_control/reset")
        async def control_reset():
            self.reset()
            return dict(self.settings)

        @app.post("/_control/disconnect")
        async def control_disconnect():
            sessions = list(self.sessions)
            for session_id in sessions:
                await self.abort_session(session_id)
            return {"aborted": len(sessions)}

        @app.get("/_stats")
        async def stats():
            return self.stats_json()

        return app

    # -- running -----------------------------------------------------------------------------

    async def serve(self, port: int) -> None:
        import uvicorn

        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self.worker, name="ndif-test-worker", daemon=True).start()
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ws="websockets-sansio",
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        logging.getLogger("uvicorn.error").addFilter(_QuietDenials())
        serving = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if serving.done():  # failed to bind: let its exception (or exit) surface
                await serving
                raise SystemExit("NDIF test server failed to start")
            await asyncio.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        print(f"{LISTENING} {self.base_url}", flush=True)
        await serving


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="REPO_ID=FOLDER",
        help="serve the save_pretrained model and tokenizer in FOLDER under REPO_ID (repeatable)",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--host", default="127.0.0.1", help="only 127.0.0.1 is accepted")
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when the process that started this one goes away (a test run killed mid-way)",
    )
    args = parser.parse_args(argv)
    if args.host != "127.0.0.1":
        parser.error(f"--host {args.host!r} refused: this server executes the code it receives, so it binds 127.0.0.1 only")
    folders: dict[str, Path] = {}
    for spec in args.model:
        repo_id, sep, folder = spec.partition("=")
        if not sep or not repo_id or not folder:
            parser.error(f"--model {spec!r}: expected REPO_ID=FOLDER")
        if not Path(folder).is_dir():
            parser.error(f"--model {spec!r}: {folder} is not a folder")
        folders[repo_id] = Path(folder).resolve()
    args.folders = folders
    return args


def exit_with_parent() -> None:
    """Poll for the parent's death: a killed test run cannot stop its server, and it must not linger."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=watch, name="ndif-test-parent-watch", daemon=True).start()


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.exit_with_parent:
        exit_with_parent()
    refuse_project_imports()
    server = TestNDIF(args.folders)
    asyncio.run(server.serve(args.port))


if __name__ == "__main__":
    main()
