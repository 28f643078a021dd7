"""A thin client of ``ultrasam serve``: the standard library and numpy only, no model code.

Slicer's Python imports it without torch. Every call is one short HTTP exchange on a kept-alive
connection, made from the caller's thread; long work (propagation) is started, then polled, and a
volume travels in chunks (:class:`VolumeUpload`), so a caller on Slicer's main thread never waits
on either. :class:`LocalServer` runs the server as a child
process on a free loopback port with a random token.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from ultrasam import __version__
from ultrasam.wire import PROTOCOL, apply_slices, encode_chunk, prompts_to_json, volume_header

TOKEN_ENV = "ULTRASAM_TOKEN"


class ServerError(RuntimeError):
    """The server answered with an error; the message says what to do."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ServerGone(ServerError):
    """No server answered (not started, crashed or killed); nothing on the client side changed."""


class Client:
    """Talks to one server. Not thread-safe: one client per thread.

    Args:
        url: ``http://host:port``.
        token: sent as ``Authorization: Bearer <token>`` (default: $ULTRASAM_TOKEN).
        timeout: seconds any one exchange may take before the server counts as gone.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"server URL must look like http://host:port, got {url!r}")
        self.url, self.timeout = f"http://{parts.hostname}:{parts.port or 80}", timeout
        self._address = (parts.hostname, parts.port or 80)
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | dict | None = None, timeout: float | None = None) -> dict:
        """One exchange -> the JSON answer. Raises ServerGone (no answer) or ServerError (4xx/5xx)."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        if isinstance(body, dict):
            body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        elif body is not None:
            headers["Content-Type"] = "application/octet-stream"
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: reconnect once
            connection = self._connect(timeout)
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as error:
                self.close()
                if attempt or not isinstance(error, (http.client.RemoteDisconnected, ConnectionResetError,
                                                     BrokenPipeError)):
                    raise ServerGone(f"no answer from the UltraSam server at {self.url} ({error})") from None
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = {"error": data[:200].decode(errors="replace")}
        if response.status >= 400:
            raise ServerError(f"UltraSam server: {answer.get('error', answer)}", response.status)
        return answer

    def info(self, timeout: float | None = None) -> dict:
        return self.request("GET", "/info", timeout=timeout)

    def check_version(self, timeout: float | None = None) -> dict:
        """The server's info; ServerError saying what to upgrade when it speaks another protocol."""
        info = self.info(timeout)
        if info.get("protocol") != PROTOCOL:
            older = "server" if info.get("protocol", 0) < PROTOCOL else "UltraSamSlicer extension (or client)"
            raise ServerError(f"the server at {self.url} runs UltraSam {info.get('version')} (protocol "
                              f"{info.get('protocol')}), this client {__version__} (protocol {PROTOCOL}): "
                              f"upgrade the {older} (`pip install -U ultrasam-slicer` on the server)")
        return info

    def open_volume(self, voxels: np.ndarray, origin_lps, spacing, direction_lps, name: str = "") -> "RemoteSession":
        """Upload a (K, J, I) volume with its geometry (:class:`ultrasam.geometry.Geometry` fields),
        all steps of a :class:`VolumeUpload` in a row (command line, scripts)."""
        upload = VolumeUpload(self, voxels, origin_lps, spacing, direction_lps, name)
        while upload.step() is None:
            pass
        return upload.session

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(*self._address, timeout=self.timeout)
        self._connection.timeout = timeout or self.timeout
        if self._connection.sock is not None:
            self._connection.sock.settimeout(self._connection.timeout)
        return self._connection


class VolumeUpload:
    """A volume sent in short steps: each :meth:`step` is one HTTP exchange carrying at most
    ``chunk_bytes`` of raw voxels (compressed), so Slicer's main thread calls it from a timer.

    Args:
        voxels: (K, J, I); origin_lps, spacing, direction_lps: :class:`ultrasam.geometry.Geometry` fields.
        chunk_bytes: raw voxel bytes per step (fewer if the server takes less); default :attr:`CHUNK_BYTES`.
    """

    CHUNK_BYTES = 4 << 20  # zlib level 1 and loopback: a few tens of milliseconds a step

    def __init__(self, client: Client, voxels: np.ndarray, origin_lps, spacing, direction_lps, name: str = "",
                 chunk_bytes: int | None = None) -> None:
        voxels = np.ascontiguousarray(voxels)
        self.client, self.shape = client, tuple(voxels.shape)
        self.header = volume_header(voxels, origin_lps, spacing, direction_lps, name)
        self._flat = voxels.reshape(-1)
        self.chunk_voxels = max(1, (chunk_bytes or self.CHUNK_BYTES) // voxels.itemsize)
        self.id: str | None = None
        self.sent = 0  # voxels the server holds
        self.session: RemoteSession | None = None

    @property
    def progress(self) -> float:
        """The fraction of the voxels the server holds, 0 to 1."""
        return self.sent / self._flat.size

    def step(self) -> "RemoteSession | None":
        """Send the next piece (first the header, then one chunk a call); the session once all arrived."""
        if self.session is not None:
            return self.session
        if self.id is None:
            answer = self.client.request("POST", "/uploads", self.header)
            self.id = answer["upload"]
            self.chunk_voxels = max(1, min(self.chunk_voxels, answer["chunk_bytes"] // self._flat.itemsize))
            return None
        answer = self.client.request("POST", f"/uploads/{self.id}", encode_chunk(self._flat, self.sent,
                                                                                   self.chunk_voxels))
        if "session" in answer:
            self.sent, self.session = self._flat.size, RemoteSession(self.client, answer["session"], self.shape)
        else:
            self.sent = answer["received"]
        return self.session

    def cancel(self) -> None:
        """Drop an unfinished upload on the server (it would expire anyway)."""
        if self.id is not None and self.session is None:
            self.client.request("DELETE", f"/uploads/{self.id}")
            self.id = None


@dataclass
class RunState:
    """What the server said about a run: "running", "done", "cancelled", "failed" or "idle"."""

    state: str
    progress: tuple[int, int] = (0, 0)
    error: str = ""
    summary: str = ""
    propagated: bool = False
    slices: tuple = ()  # per-slice report rows (ultrasam.batch.slice_rows) when done
    warnings: tuple = ()  # what to look at again (ultrasam.content_checks.result_warnings) when done


class RemoteSession:
    """One volume on the server, and the client's copy of its latest mask.

    ``mask`` (K, J, I) uint8 changes only when a run is done: a failed, cancelled or lost run leaves
    it as it was. Runs send only the slices that changed since the version held here.
    """

    def __init__(self, client: Client, session_id: str, shape_kji: tuple[int, int, int]) -> None:
        self.client, self.id = client, session_id
        self.mask = np.zeros(shape_kji, np.uint8)
        self.version = 0
        self.running = False
        self.last = RunState("idle")

    def start(self, prompts: dict, propagate: bool = False, axis: int = 0, span: dict | None = None,
              rules: dict | None = None, wait: float = 0.0) -> RunState:
        """Start a run; waits up to ``wait`` seconds for it (a click is back within one call).

        Args:
            prompts: :func:`ultrasam.wire.prompts_to_json`.
            span: :class:`ultrasam.session.Span` fields; rules: :class:`ultrasam.propagation.StopRules` fields.
        """
        request = {"prompts": prompts, "propagate": propagate, "axis": axis, "span": span or {},
                   "rules": rules or {}, "base": self.version, "wait": wait}
        return self._take(self.client.request("POST", f"/sessions/{self.id}/run", request,
                                              timeout=self.client.timeout + wait))

    def poll(self, wait: float = 0.0) -> RunState:
        """The state of the latest run; when done, ``mask`` holds its result."""
        answer = self.client.request("GET", f"/sessions/{self.id}/run?base={self.version}&wait={wait}",
                                     timeout=self.client.timeout + wait)
        return self._take(answer)

    def cancel(self) -> None:
        self.client.request("POST", f"/sessions/{self.id}/cancel")

    def close(self) -> None:
        self.client.request("DELETE", f"/sessions/{self.id}")

    def _take(self, answer: dict) -> RunState:
        state = RunState(answer["state"], tuple(answer.get("progress", (0, 0))), answer.get("error", ""),
                         answer.get("summary", ""), answer.get("propagated", False), tuple(answer.get("slices", ())),
                         tuple(answer.get("warnings", ())))
        if state.state == "done" and answer["version"] != self.version:
            mask = self.mask.copy()  # replaced whole: a half-applied update is never seen
            self.mask, self.version = apply_slices(mask, answer["masks"]), answer["version"]
        self.running, self.last = state.state == "running", state
        return state


def segment_on_server(client: Client, volume, prompts, axis: int, propagate: bool, rules: dict | None = None,
                      span: dict | None = None, poll_s: float = 1.0) -> tuple[np.ndarray, dict]:
    """:func:`ultrasam.batch.segment_volume` on a server: the command line's ``--server``.

    Args:
        volume: an :class:`ultrasam.geometry.Volume`; prompts: :class:`ultrasam.prompts3d.VolumePrompts`
            (its boxes and ROIs in its points' frame).
        axis: numpy axis 0/1/2; rules, span: as :meth:`RemoteSession.start`.

    Returns:
        (K, J, I) uint8 mask and a report with :func:`ultrasam.batch.volume_report`'s totals, slice
        rows and warnings (no walks: the server does not send them).
    """
    geometry = volume.geometry
    session = client.open_volume(volume.voxels, geometry.origin_lps, geometry.spacing, geometry.direction_lps,
                                 volume.name)
    try:
        wire_prompts = prompts_to_json(prompts.points, prompts.labels, prompts.frame,
                                       [(box.corner_a, box.corner_b) for box in prompts.boxes],
                                       [(roi.center, roi.axes, roi.half_sizes) for roi in prompts.rois])
        state = session.start(wire_prompts, propagate, axis, span, rules, wait=poll_s)
        while state.state == "running":
            state = session.poll(wait=poll_s)
    finally:
        session.close()
    if state.state != "done":
        raise ValueError(f"{volume.name or 'volume'}: {state.error or 'the run was ' + state.state}")
    rows = list(state.slices)
    segmented = [row["index"] for row in rows if row["status"] in ("key", "propagated") and row["area_px"] > 0]
    voxels = int(session.mask.sum())
    return session.mask, {
        "volume": volume.name, "server": client.url, "axis": axis, "summary": state.summary,
        "key_slices": sorted({row["key"] for row in rows}), "segmented_slices": sorted(segmented),
        "voxels": voxels, "volume_ml": round(voxels * float(np.prod(geometry.spacing)) / 1000.0, 4), "slices": rows,
        "warnings": list(state.warnings),
    }


class LocalServer:
    """``ultrasam serve`` as a child process on a free loopback port, with a random token.

    Args:
        python: the interpreter to run it with (Slicer: PythonSlicer; see :func:`python_executable`).
        serve_args: model options for ``ultrasam serve`` (``--checkpoint``, ``--device``, ...).
    """

    def __init__(self, python: str, serve_args: list[str]) -> None:
        self.python, self.serve_args = python, list(serve_args)
        self.process: subprocess.Popen | None = None
        self.log_path = ""
        self._client: Client | None = None

    def start(self) -> None:
        """Start the process and return at once; :meth:`ready` says when it answers."""
        self.stop()
        port, token = free_port(), secrets.token_urlsafe(24)
        env = child_environment({TOKEN_ENV: token})  # not on the command line: others may list it
        log = tempfile.NamedTemporaryFile("wb", prefix="ultrasam-serve-", suffix=".log", delete=False)
        self.log_path = log.name
        command = [self.python, "-m", "ultrasam.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--exit-with-stdin", *self.serve_args]
        # stdin stays open while we live: the server exits when it closes, however this process ends.
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=log, env=env)
        log.close()
        self._client = Client(f"http://127.0.0.1:{port}", token)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """True once the server answers; raises ServerGone (with its log's end) if it exited."""
        if self.process is None:
            return False
        if self.process.poll() is not None:
            raise ServerGone(f"the UltraSam server exited (code {self.process.returncode}): {self.log_tail()} "
                             f"(full log: {self.log_path})")
        try:
            self._client.request("GET", "/info", timeout=0.5)
            return True
        except ServerGone:
            return False

    def wait_ready(self, timeout: float = 120.0) -> Client:
        """Block until ready (command line and tests; Slicer polls :meth:`ready` instead)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerGone(f"the UltraSam server did not answer within {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.05)
        return self._client

    @property
    def client(self) -> Client | None:
        return self._client

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                return " | ".join(file.read().strip().splitlines()[-lines:]) or "(no output)"
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the process. Its log is deleted when it was still running (nothing went wrong) and
        kept when it had exited on its own, for the crash to be read."""
        if self.process is not None:
            if self.process.poll() is None:
                self._remove_log()
                self.process.terminate()
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            if self.process.stdin is not None:
                self.process.stdin.close()
        if self._client is not None:
            self._client.close()
        self.process, self._client = None, None

    def _remove_log(self) -> None:
        try:
            os.remove(self.log_path)
        except OSError:
            pass  # never written, or already gone


def child_environment(extra: dict | None = None) -> dict:
    """This process's environment, with this ``ultrasam`` package importable (Slicer keeps it in
    the module's folder, which a child interpreter does not search)."""
    env = dict(os.environ, **(extra or {}))
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def python_executable() -> str:
    """The Python to run the server with: Slicer's PythonSlicer beside Slicer's own, else this one.

    In Slicer ``sys.executable`` is its bundled interpreter; PythonSlicer (PythonSlicer.exe on
    Windows) is the launcher beside it that sets up Slicer's library paths, as
    ``slicer.util.pip_install`` uses it.
    """
    launcher = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
    return launcher if os.path.isfile(launcher) else sys.executable
