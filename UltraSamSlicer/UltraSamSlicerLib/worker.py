"""One long-lived inference thread, driven and polled from Slicer's main thread.

Qt-free and MRML-free on purpose: jobs compute numpy results only, and the main thread (a
``qt.QTimer`` in the effect) calls :meth:`InferenceWorker.poll` to collect them and touch MRML.
One thread for the whole session, not one per job: PyTorch's cuDNN autotuning cache is
per-thread, and one thread serialises access to the model without locks.

Re-entry: at most one job runs. A new :meth:`request` while one runs replaces any job still waiting
(only the latest live preview matters) and asks a running *background* job (embedding slices
ahead of time) to stop, so prompts never wait behind it; :meth:`start` refuses instead (long jobs
such as propagation must not be silently dropped or stacked).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """A unit of work and what the main thread can read about it while it runs.

    Attributes:
        name: shown in messages ("preview", "propagate", ...).
        function: called on the worker thread as ``function(job)``; it reads ``job.cancel`` and
            writes ``job.progress``.
        cancel: set by the main thread to ask the job to stop at its next check.
        progress: (done, total) written by the worker; plain tuple assignment, read any time.
        background: the job only prepares ahead of time and yields to any :meth:`request`.
        generation: the caller's session count when it queued the job, so that a result arriving
            after the session changed (another model or volume) can be recognised and dropped.
    """

    name: str
    function: Callable[["Job"], Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: tuple[int, int] = (0, 0)
    background: bool = False
    generation: int = 0
    future: Future | None = None


class WorkerBusy(RuntimeError):
    """A long job was started while another one runs."""


class InferenceWorker:
    """Runs :class:`Job` objects one at a time on a single daemon-like thread."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="UltraSamInference")
        self._running: Job | None = None
        self._waiting: Job | None = None

    @property
    def busy(self) -> bool:
        return self._running is not None

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting (results of a finished job are collected)."""
        return self._running is None and self._waiting is None

    @property
    def running(self) -> Job | None:
        return self._running

    def start(self, job: Job) -> Job:
        """Run ``job`` now. Raises :class:`WorkerBusy` if another job is running or waiting."""
        if self._running is not None or self._waiting is not None:
            raise WorkerBusy(f"'{(self._running or self._waiting).name}' is still running: wait or cancel it first")
        return self._launch(job)

    def request(self, job: Job) -> Job:
        """Run ``job`` now if idle, else after the running one, replacing any job already waiting."""
        if self._running is None:
            return self._launch(job)
        if self._running.background:
            self._running.cancel.set()
        self._waiting = job
        return job

    def cancel(self) -> None:
        """Ask the running job to stop and drop the waiting one."""
        self._waiting = None
        if self._running is not None:
            self._running.cancel.set()

    def poll(self) -> tuple[Job, Any, BaseException | None] | None:
        """Main thread: collect the finished job, if any, and start the waiting one.

        Returns:
            (job, result, error) for a job that finished since the last poll, else None. ``error``
            is the exception the job raised (result None), to be shown by the caller.
        """
        job = self._running
        if job is None or not job.future.done():
            return None
        self._running = None
        error = job.future.exception()
        result = None if error is not None else job.future.result()
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            self._launch(waiting)
        return job, result, error

    def shutdown(self) -> None:
        """Cancel everything and let the thread end once the running job returns."""
        self.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _launch(self, job: Job) -> Job:
        job.future = self._executor.submit(job.function, job)
        self._running = job
        return job
