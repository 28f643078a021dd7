"""The UltraSam server the module and the effect use: a local child process, or a remote one.

Qt-free, and free of model code: the model runs in ``ultrasam serve`` (:mod:`ultrasam.server`),
never in Slicer's process. Every method returns within milliseconds, so Slicer's main thread calls
them from a ``QTimer``: :meth:`EngineConnection.client` starts a local server and answers None
until it is ready; a server that died (crash, out of memory, kill -9) is started again at the
next call.

- **Local** (the default): ``PythonSlicer -m ultrasam.cli serve`` on a free loopback port with a
  random token, with the model chosen in the module; it exits with Slicer.
- **Remote**: the URL and token from the module's settings; the server's version is checked on
  connect.
"""

from __future__ import annotations

import atexit
import subprocess

from ultrasam.client import Client, LocalServer, ServerError, ServerGone, child_environment, python_executable
from UltraSamSlicerLib.models import ModelSettings

__all__ = ["EngineConnection", "ServerError", "ServerGone", "shared_engine"]

REMOTE_CHECK_S = 5.0  # longest wait for a remote server's /info (on Slicer's main thread)


def serve_arguments(settings: ModelSettings) -> list[str]:
    """``ultrasam serve`` options for the module's model settings (raises FileNotFoundError)."""
    return ["--checkpoint", str(settings.checkpoint_path()), "--device", settings.device,
            "--precision", settings.precision, "--cache-gib", str(settings.cache_gib)]


class EngineConnection:
    """One server for the current settings; restarted when they change or when it died.

    Args:
        python: interpreter for a local server (default: PythonSlicer in Slicer, else this one).
    """

    def __init__(self, python: str | None = None) -> None:
        self.python = python or python_executable()
        self.settings: ModelSettings | None = None
        self.local: LocalServer | None = None
        self.description = ""  # the model the server says it runs, once connected
        self.starts = 0  # local servers started so far
        self._client: Client | None = None

    def client(self, settings: ModelSettings) -> Client | None:
        """A client of a ready server for ``settings``, or None while a local one starts.

        Raises:
            ServerError: the remote server refuses or speaks another version (message says what
                to do); ServerGone: it does not answer, or the local one exited while starting.
            FileNotFoundError: the chosen checkpoint is missing.
        """
        if settings != self.settings:
            self.stop()
            self.settings = settings
        if self._client is not None and (self.local is None or self.local.running):
            return self._client
        if settings.server_url:
            client = Client(settings.server_url, settings.server_token or None)
            # A short wait: this runs on Slicer's main thread, and a remote host may be down.
            self.description = f"{client.check_version(timeout=REMOTE_CHECK_S)['model']} at {client.url}"
            self._client = client
            return client
        return self._local_client(settings)

    def _local_client(self, settings: ModelSettings) -> Client | None:
        if self.local is None or (self._client is not None and not self.local.running):
            self._client = None  # a server that ran and died: start another
            self.local = LocalServer(self.python, serve_arguments(settings))
            self.local.start()
            self.starts += 1
            return None
        try:
            if not self.local.ready():
                return None
        except ServerGone:
            self.local = None  # it died while starting: say so; the next call tries again
            raise
        self.description = self.local.client.check_version()["model"]
        self._client = self.local.client
        return self._client

    @property
    def starting(self) -> bool:
        return self.local is not None and self._client is None

    def lost(self) -> str:
        """After a ServerGone from a call: what happened, in a sentence for the user."""
        if self.local is not None and not self.local.running:
            return (f"the UltraSam server stopped (exit code {self.local.process.returncode}; crashed, out of "
                    f"memory or killed): {self.local.log_tail(1)} (full log: {self.local.log_path})")
        return "the UltraSam server does not answer"

    def stop(self) -> None:
        if self.local is not None:
            self.local.stop()
        if self._client is not None:
            self._client.close()
        self.local, self._client, self.description = None, None, ""


def start_download(folder: str, python: str | None = None) -> subprocess.Popen:
    """Download the official weights into ``folder`` in a child process (poll it; never wait)."""
    return subprocess.Popen([python or python_executable(), "-m", "ultrasam.cli", "download", "--cache-dir", folder],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_environment())


_ENGINE: EngineConnection | None = None


def shared_engine() -> EngineConnection:
    """The connection the module panel and the effect share; its local server stops at exit."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = EngineConnection()
        atexit.register(_ENGINE.stop)
    return _ENGINE
