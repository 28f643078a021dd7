"""``ultrasam serve``: the engine as an HTTP service, so inference never runs in Slicer's process.

The server holds one model (:class:`~ultrasam.volume_embeddings.VolumeEmbeddingCache` over a
:class:`~ultrasam.predictor.Predictor`) and one :class:`~ultrasam.session.SegmentationSession` per
opened volume. All model work runs on one thread, in arrival order; HTTP handlers only queue it
and wait a bounded time, so a client polls long work (propagation) instead of blocking on it.

Operations (JSON unless said; every error is ``{"error": "what to do"}`` with a 4xx/5xx status):

- ``GET /info``: server, protocol and model versions.
- ``POST /sessions``: a volume body (:mod:`ultrasam.wire`) -> ``{"session": id}``.
- ``POST /uploads``: a volume header -> ``{"upload": id, "total": voxels}``; then ``POST
  /uploads/{id}`` per chunk body, in order -> ``{"received": voxels, "total": voxels}``, and for the
  last chunk ``{"session": id}``; ``DELETE /uploads/{id}``. A client sends a large volume in short
  requests this way (Slicer's main thread never waits on a whole upload).
- ``POST /sessions/{id}/run``: prompts, propagate, axis, span, stop rules -> the run's state.
- ``GET /sessions/{id}/run?base=V&wait=S``: the run's state; once done, the mask slices that
  changed since the client's version ``V`` (all slices if the server no longer holds ``V``).
- ``POST /sessions/{id}/cancel``; ``GET /sessions/{id}/mask``: the whole mask;
  ``DELETE /sessions/{id}``.

Safety: binds 127.0.0.1 unless told otherwise, and any other address needs a token (compared in
constant time); bodies are size-limited before they are read; sessions are bounded in memory and
expire when idle, as do unfinished uploads; no operation reads or writes a file named by the client.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ultrasam import __version__
from ultrasam.wire import PROTOCOL, WireError, check_volume_header, decode_chunk, decode_volume, encode_slices

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_HEADER = "Authorization"  # "Bearer <token>"
CHUNK_OVERHEAD = 1 << 16  # a chunk's header, and zlib's framing of voxels that do not compress
MAX_WAIT_S = 5.0  # longest a request may hold its connection waiting for a run


class ApiError(Exception):
    """An answer with a status and a message saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """What one server accepts.

    Attributes:
        upload_bytes: largest compressed request body; also the largest volume once inflated.
        chunk_bytes: largest chunk of a chunked upload, compressed or inflated.
        json_bytes: largest JSON request body.
        session_bytes: voxels (as float32 slices are built from them) of all open sessions.
        idle_seconds: a session unused this long is closed.
    """

    upload_bytes: int = 1 << 30
    chunk_bytes: int = 64 << 20
    json_bytes: int = 1 << 20
    session_bytes: int = 8 << 30
    idle_seconds: float = 1800.0


@dataclass
class Run:
    """One run of a session on the model thread; progress is written there and read anywhere."""

    propagate: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, int] = (0, 0)
    future: Future | None = None
    collected: bool = False  # its result became a mask version


@dataclass
class OpenSession:
    """A volume being segmented, with the masks the client may hold (``version`` -> mask)."""

    session: object  # ultrasam.session.SegmentationSession
    bytes: int
    last_used: float = field(default_factory=time.monotonic)
    run: Run | None = None
    embed: Run | None = None
    versions: dict[int, np.ndarray] = field(default_factory=dict)
    version: int = 0
    result: object = None  # the latest run's ultrasam.session.SessionResult; its mask is versions[version]


@dataclass
class PendingUpload:
    """A volume arriving in chunks: its header, its voxels so far (flat, C order) and their count."""

    header: dict
    voxels: np.ndarray
    bytes: int  # session memory reserved for it
    received: int = 0
    last_used: float = field(default_factory=time.monotonic)


class Engine:
    """The model, the sessions, and the one thread that runs the model. Framework-free."""

    def __init__(self, cache, description: str, limits: Limits = Limits()) -> None:
        self.cache, self.description, self.limits = cache, description, limits
        self.sessions: dict[str, OpenSession] = {}
        self.uploads: dict[str, PendingUpload] = {}
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="UltraSamModel")
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"server": "ultrasam", "version": __version__, "protocol": PROTOCOL, "model": self.description,
                "device": str(self.cache.predictor.device), "sessions": len(self.sessions)}

    def open(self, body: bytes) -> dict:
        """Decode a volume body and open a session on it (called off the event loop)."""
        try:
            header, voxels = decode_volume(body, self.limits.upload_bytes)
        except WireError as error:
            raise ApiError(400, str(error)) from None
        return self._open_voxels(header, voxels)

    def begin_upload(self, header: dict) -> dict:
        """Reserve room for a volume that arrives in chunks (:meth:`add_chunk`)."""
        try:
            shape, dtype, _ = check_volume_header(header, self.limits.upload_bytes)
            _geometry(header)
        except (WireError, ValueError, TypeError) as error:
            raise ApiError(400, str(error)) from None
        total = int(np.prod(shape))
        size = total * 4  # as the session it becomes: reserved now, so its last chunk finds room
        self._make_room(size)
        upload_id = secrets.token_urlsafe(12)
        with self._lock:
            self.uploads[upload_id] = PendingUpload(header, np.empty(total, dtype), size)
        return {"upload": upload_id, "total": total, "chunk_bytes": self.limits.chunk_bytes}

    def add_chunk(self, upload_id: str, body: bytes) -> dict:
        """Store the next chunk of an upload; the last one opens the session (called off the event loop)."""
        upload = self.pending(upload_id)
        try:
            offset, part = decode_chunk(body, upload.voxels.dtype, self.limits.chunk_bytes)
        except WireError as error:
            raise ApiError(400, str(error)) from None
        with self._lock:  # chunks of one upload are taken in order, one at a time
            expected, total = upload.received, upload.voxels.size
            if offset != expected:
                sent = "was received already" if offset < expected else "is ahead of the next one"
                raise ApiError(409, f"the chunk at voxel {offset} {sent}: send the chunk at voxel {expected} next "
                                    "(chunks go in order, each once), or begin the upload again")
            if offset + part.size > total:
                raise ApiError(400, f"the chunk ends at voxel {offset + part.size}, past the volume's {total}: "
                                    "send only the voxels of the shape given when the upload began")
            upload.voxels[offset:offset + part.size] = part
            upload.received = offset + part.size
            upload.last_used = time.monotonic()
            if upload.received < total:
                return {"received": upload.received, "total": total}
            self.uploads.pop(upload_id, None)
        shape, _, _ = check_volume_header(upload.header, self.limits.upload_bytes)
        return self._open_voxels(upload.header, upload.voxels.reshape(shape))

    def cancel_upload(self, upload_id: str) -> None:
        self.pending(upload_id)
        with self._lock:
            self.uploads.pop(upload_id, None)

    def pending(self, upload_id: str) -> PendingUpload:
        upload = self.uploads.get(upload_id)
        if upload is None:
            raise ApiError(404, f"unknown upload {upload_id!r} (finished, cancelled, expired, or the server "
                                "restarted): begin the upload again")
        return upload

    def _open_voxels(self, header: dict, voxels: np.ndarray) -> dict:
        """A session on (K, J, I) ``voxels`` with the header's geometry and name."""
        from ultrasam.geometry import Volume
        from ultrasam.session import SegmentationSession

        try:
            geometry = _geometry(header)
        except (ValueError, TypeError) as error:
            raise ApiError(400, str(error)) from None
        size = voxels.size * 4  # the float32 slices and uint8 masks built from the voxels, roughly
        self._make_room(size)
        try:
            session = SegmentationSession(Volume(voxels, geometry, str(header.get("name", ""))), self.cache)
        except ValueError as error:  # a blank or non-finite volume: nothing to segment
            raise ApiError(422, str(error)) from None
        session_id = secrets.token_urlsafe(12)
        opened = OpenSession(session, size)
        opened.versions[0] = np.zeros(voxels.shape, np.uint8)
        with self._lock:
            self.sessions[session_id] = opened
        return {"session": session_id, "shape": list(voxels.shape)}

    def get(self, session_id: str) -> OpenSession:
        opened = self.sessions.get(session_id)
        if opened is None:
            raise ApiError(404, f"unknown session {session_id!r} (closed, expired, or the server restarted): "
                                "open the volume again")
        opened.last_used = time.monotonic()
        return opened

    def start(self, session_id: str, request: dict) -> OpenSession:
        """Queue a run of the session's prompts; 409 while one of its runs is unfinished."""
        opened = self.get(session_id)
        if opened.run is not None and not opened.run.future.done():
            raise ApiError(409, "a run of this session is still going: poll it, or cancel it first")
        prompts, propagate, axis, span, rules = parse_run_request(request, opened.session.volume.shape_kji)
        if opened.embed is not None:
            opened.embed.cancel.set()  # prompts never wait behind embedding ahead of time
        run = Run(propagate)

        def work():
            session = opened.session
            session.set_rules(rules)
            session.set_axis(axis)
            return session.run(prompts, propagate, span, run.cancel.is_set,
                               lambda done, total: setattr(run, "progress", (done, total)))

        run.future = self._model_thread.submit(work)
        opened.run = run
        return opened

    def state(self, session_id: str, base: int | None) -> dict:
        """The session's last run: running, or its result as slices changed since ``base``."""
        from ultrasam.propagation import PropagationCancelled

        opened = self.get(session_id)
        run = opened.run
        if run is None:
            return {"state": "idle", "version": opened.version}
        if not run.future.done():
            return {"state": "running", "progress": list(run.progress), "propagate": run.propagate}
        error = run.future.exception()
        if isinstance(error, PropagationCancelled):
            return {"state": "cancelled", "version": opened.version}
        if isinstance(error, (ValueError, IndexError)):
            return {"state": "failed", "error": str(error), "version": opened.version}
        if error is not None:
            return {"state": "failed", "error": f"the server failed: {error!r} (its log has the details)",
                    "version": opened.version}
        if not run.collected:
            self._keep_result(opened, run.future.result())
            run.collected = True
            self._embed_ahead(opened)
        result = opened.result
        return {"state": "done", "version": opened.version, "summary": result.summary(), "axis": result.axis,
                "propagated": result.propagated, "slices": result.rows, "warnings": result.warnings,
                "masks": self._changes(opened, base)}

    def mask(self, session_id: str) -> dict:
        opened = self.get(session_id)
        return {"version": opened.version, "masks": self._changes(opened, None)}

    def cancel(self, session_id: str) -> None:
        run = self.get(session_id).run
        if run is not None:
            run.cancel.set()

    def close(self, session_id: str) -> None:
        opened = self.get(session_id)
        for run in (opened.run, opened.embed):
            if run is not None:
                run.cancel.set()
        with self._lock:
            self.sessions.pop(session_id, None)

    def expire_idle(self) -> list[str]:
        """Close sessions unused for ``limits.idle_seconds`` and not running, and drop uploads
        unfinished that long; returns their ids."""
        now = time.monotonic()
        idle = [sid for sid, opened in list(self.sessions.items())
                if now - opened.last_used > self.limits.idle_seconds and not _running(opened)]
        for session_id in idle:
            self.close(session_id)
        stalled = [uid for uid, upload in list(self.uploads.items())
                   if now - upload.last_used > self.limits.idle_seconds]
        with self._lock:
            for upload_id in stalled:
                self.uploads.pop(upload_id, None)
        return idle + stalled

    def shutdown(self) -> None:
        for session_id in list(self.sessions):
            self.close(session_id)
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    def _make_room(self, size: int) -> None:
        """Close the least recently used idle sessions until ``size`` more bytes fit, or refuse."""
        if size > self.limits.session_bytes:
            raise ApiError(413, f"this volume needs {size / 2**30:.1f} GiB of session memory, more than the server's "
                                f"{self.limits.session_bytes / 2**30:.1f} GiB: crop it, or start the server with a "
                                "larger --session-memory-gib")
        for session_id, opened in sorted(self.sessions.items(), key=lambda item: item[1].last_used):
            if self._bytes_used() + size <= self.limits.session_bytes:
                return
            if not _running(opened):
                self.close(session_id)
        if self._bytes_used() + size > self.limits.session_bytes:
            raise ApiError(503, "the server's session memory is full of running sessions: wait for them, "
                                "or start the server with a larger --session-memory-gib")

    def _bytes_used(self) -> int:
        return sum(o.bytes for o in self.sessions.values()) + sum(u.bytes for u in list(self.uploads.values()))

    def _keep_result(self, opened: OpenSession, result) -> None:
        opened.version += 1
        opened.versions = {opened.version - 1: opened.versions.get(opened.version - 1),
                           opened.version: np.asarray(result.mask, np.uint8)}
        opened.result = result

    def _changes(self, opened: OpenSession, base: int | None) -> dict:
        current = opened.versions[opened.version]
        axis = opened.result.axis if opened.result is not None else 0  # masks travel as the result's slices
        previous = opened.versions.get(base) if base is not None else None
        if previous is None:
            indices = range(current.shape[axis])
        else:
            other_axes = tuple(a for a in range(3) if a != axis)
            indices = np.flatnonzero(np.any(current != previous, axis=other_axes))
        return encode_slices(current, axis, indices)

    def _embed_ahead(self, opened: OpenSession) -> None:
        """On a GPU, embed the session's remaining slices while nothing else runs; any run stops it."""
        if self.cache.predictor.device.type != "cuda" or _running(opened):
            return
        embed = Run(False)
        embed.future = self._model_thread.submit(opened.session.embed_all, embed.cancel.is_set)
        opened.embed = embed


def _geometry(header: dict):
    """The :class:`ultrasam.geometry.Geometry` of a volume header (ValueError/TypeError if invalid)."""
    from ultrasam.geometry import Geometry

    return Geometry(header.get("origin_lps", np.zeros(3)), header.get("spacing", np.ones(3)),
                    header.get("direction_lps", np.eye(3)))


def _running(opened: OpenSession) -> bool:
    return opened.run is not None and not opened.run.future.done()


def parse_run_request(request: dict, shape_kji) -> tuple:
    """A run request -> (VolumePrompts, propagate, axis, Span, StopRules); 400 saying what is wrong."""
    from ultrasam.prompts3d import Roi, SliceBox, VolumePrompts
    from ultrasam.propagation import StopRules
    from ultrasam.session import Span

    try:
        p = request["prompts"]
        frame = p.get("frame", "ras")
        prompts = VolumePrompts(
            np.asarray(p.get("points", []), float).reshape(-1, 3), np.asarray(p.get("labels", []), int), frame,
            [SliceBox(np.asarray(a, float), np.asarray(b, float), frame) for a, b in p.get("boxes", [])],
            [Roi(r["center"], np.asarray(r.get("axes", np.eye(3)), float), r["half_sizes"], frame)
             for r in p.get("rois", [])])
        axis = int(request.get("axis", 0))
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        span = Span(**request.get("span", {}))
        rules = StopRules(**request.get("rules", {}))
        return prompts, bool(request.get("propagate", False)), axis, span, rules
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ApiError(400, f"not a valid run request ({error!s}); send 'prompts' as ultrasam.wire.prompts_to_json "
                            "makes them, with optional 'propagate', 'axis', 'span' and 'rules'") from None


def create_app(engine: Engine, token: str | None = None):
    """The FastAPI application serving ``engine``; every request needs ``token`` when one is set."""
    app = FastAPI(title="UltraSam", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if expected is not None and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), expected):
            return _error(401, "wrong or missing token: send 'Authorization: Bearer <token>' with the token the "
                               "server was started with")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, str(error))

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return _error(404, f"no operation {request.method} {request.url.path}: see `ultrasam serve --help`")

    @app.exception_handler(405)
    async def wrong_method(request: Request, error):
        return _error(405, f"{request.method} is not allowed on {request.url.path}: see `ultrasam serve --help`")

    @app.get("/info")
    async def info():
        return engine.info()

    @app.post("/sessions")
    async def open_session(request: Request):
        body = await _read_body(request, engine.limits.upload_bytes)
        return await asyncio.get_running_loop().run_in_executor(None, engine.open, body)

    @app.post("/uploads")
    async def begin_upload(request: Request):
        return engine.begin_upload(await _read_json(request, engine.limits.json_bytes))

    @app.post("/uploads/{upload_id}")
    async def add_chunk(upload_id: str, request: Request):
        engine.pending(upload_id)  # an unknown upload is refused before its body is read
        body = await _read_body(request, engine.limits.chunk_bytes + CHUNK_OVERHEAD)
        return await asyncio.get_running_loop().run_in_executor(None, engine.add_chunk, upload_id, body)

    @app.delete("/uploads/{upload_id}")
    async def cancel_upload(upload_id: str):
        engine.cancel_upload(upload_id)
        return {"cancelled": upload_id}

    @app.post("/sessions/{session_id}/run")
    async def run(session_id: str, request: Request):
        payload = await _read_json(request, engine.limits.json_bytes)
        opened = engine.start(session_id, payload)
        return await _wait_state(engine, session_id, opened, payload.get("base"), payload.get("wait", 0.0))

    @app.get("/sessions/{session_id}/run")
    async def poll(session_id: str, base: int = -1, wait: float = 0.0):
        return await _wait_state(engine, session_id, engine.get(session_id), base, wait)

    @app.post("/sessions/{session_id}/cancel")
    async def cancel(session_id: str):
        engine.cancel(session_id)
        return {"cancelling": True}

    @app.get("/sessions/{session_id}/mask")
    async def mask(session_id: str):
        return engine.mask(session_id)

    @app.delete("/sessions/{session_id}")
    async def close(session_id: str):
        engine.close(session_id)
        return {"closed": session_id}

    return app


async def _wait_state(engine: Engine, session_id: str, opened: OpenSession, base, wait) -> dict:
    """The run's state, after waiting up to ``wait`` seconds (capped) for it to finish."""
    try:
        wait = min(max(float(wait), 0.0), MAX_WAIT_S)
        base = None if base is None or int(base) < 0 else int(base)
    except (TypeError, ValueError):
        raise ApiError(400, "'wait' must be seconds and 'base' a mask version number") from None
    if opened.run is not None and wait > 0 and not opened.run.future.done():
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(opened.run.future)), wait)
        except Exception:  # a timeout, or the run's own error, which the state below reports
            pass
    return engine.state(session_id, base)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit}: send less "
                            "(crop the volume), or start the server with a larger --max-upload-mib")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes: send less")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, limit: int) -> dict:
    import json

    body = await _read_body(request, limit)
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise ApiError(400, f"the body is not JSON ({error}): send a JSON object") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    return payload


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def check_binding(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOOPBACK and not token:
        raise ValueError(f"--host {host} makes the server reachable from other machines: give a token with "
                         "--token-file FILE or the ULTRASAM_TOKEN environment variable")


def serve(engine: Engine, host: str, port: int, token: str | None, watch_stdin: bool = False) -> None:
    """Serve until interrupted (or, with ``watch_stdin``, until the parent process closes our stdin)."""
    import uvicorn

    check_binding(host, token)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, token), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    if watch_stdin:
        threading.Thread(target=_exit_with_parent, args=(server,), daemon=True).start()
    threading.Thread(target=_expire_idle_sessions, args=(engine,), daemon=True).start()
    try:
        server.run()
    finally:
        engine.shutdown()


def _expire_idle_sessions(engine: Engine) -> None:
    """Close idle sessions and uploads at most half their idle time late (and at most a minute),
    whether requests come or not; a full session memory closes idle sessions at once (``_make_room``)."""
    every_s = min(60.0, engine.limits.idle_seconds / 2)
    while True:
        time.sleep(every_s)
        engine.expire_idle()


def _exit_with_parent(server) -> None:
    """A child server stops when its parent (Slicer) ends, however it ended: stdin reaches EOF."""
    import sys

    while sys.stdin.buffer.read(1 << 16):
        pass
    server.should_exit = True
