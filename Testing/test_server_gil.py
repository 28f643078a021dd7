"""Slicer's main thread, emulated: while it holds the GIL, in-process inference stops and the
server's goes on. This is why inference left Slicer's process.

In Slicer, PythonQt holds the GIL while Qt's event loop runs, and Python gets it back only for
short callbacks such as the effect's QTimer. Here the main thread holds it the same way: it calls
``usleep`` through ``ctypes.PyDLL``, which (unlike ``ctypes.CDLL``) keeps the GIL during the call.
The tests count work done, never time it; what the contention costs in time is measured by
``bench/bench_gil.py`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_helpers import NEVER_STOP, centre_click, identity_geometry, start_server, tube_volume  # noqa: E402
# compact-v1: its encoder is ~75x faster on a CPU than the default's; these tests are about the server.
from ultrasam.resources import COMPACT_V1_MODEL as FAST_MODEL  # noqa: E402

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="usleep through ctypes.PyDLL needs a POSIX C library"),
    pytest.mark.skipif(not FAST_MODEL.is_file(), reason="the compact-v1 model file is not installed"),
]

HOLD_S = 2.0  # long against one slice of work, short against a propagation of LONG_VOLUME slices
LONG_VOLUME = 121
_usleep = ctypes.PyDLL(None).usleep if sys.platform != "win32" else None


def hold_gil(seconds: float) -> None:
    _usleep(int(seconds * 1e6))


def wait_until(condition, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` with the GIL released between polls."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("the condition did not come true")
        time.sleep(0.01)


@pytest.mark.parametrize("keeps_gil", [True, False])
def test_pydll_usleep_keeps_the_gil_and_time_sleep_does_not(keeps_gil):
    stamps, stop = [], threading.Event()
    counter = threading.Thread(target=lambda: [stamps.append(time.perf_counter()) for _ in iter(stop.is_set, True)])
    counter.start()
    wait_until(lambda: stamps)
    start = time.perf_counter()
    (hold_gil if keeps_gil else time.sleep)(0.3)
    end = time.perf_counter()
    stop.set()
    counter.join()
    # the margins leave room for the thread switch at either end of the call
    inside = [t for t in stamps if start + 0.1 < t < end - 0.1]
    assert (len(inside) == 0) == keeps_gil, len(inside)


def test_an_in_process_worker_thread_stops_while_the_main_thread_holds_the_gil():
    from ultrasam.checkpoint import load_model
    from ultrasam.geometry import Geometry, Volume
    from ultrasam.predictor import Predictor
    from ultrasam.prompts3d import VolumePrompts
    from ultrasam.propagation import StopRules
    from ultrasam.session import SegmentationSession
    from ultrasam.volume_embeddings import VolumeEmbeddingCache

    loaded = load_model(FAST_MODEL)
    cache = VolumeEmbeddingCache(Predictor(loaded.model, device="cpu", mode=loaded.info["postprocess"]))
    voxels = tube_volume(LONG_VOLUME)
    session = SegmentationSession(Volume(voxels, Geometry(*identity_geometry())), cache, StopRules(**NEVER_STOP))
    prompt = centre_click(voxels)
    done = [0]
    worker = threading.Thread(target=session.run, args=(VolumePrompts(prompt["points"], prompt["labels"], "ijk"),),
                              kwargs={"propagate": True, "on_progress": lambda slices, total: done.__setitem__(0, slices)})
    worker.start()
    wait_until(lambda: done[0] >= 2)
    before = done[0]
    hold_gil(HOLD_S)
    during = done[0] - before
    worker.join()
    assert done[0] == LONG_VOLUME
    assert during <= 1  # at most the slice it was inside when the main thread took the GIL


def test_through_the_client_the_server_works_on_while_the_main_thread_holds_the_gil():
    server = start_server(FAST_MODEL)
    try:
        voxels = tube_volume(LONG_VOLUME)
        session = server.client.open_volume(voxels, *identity_geometry())
        session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
        wait_until(lambda: session.poll().progress[0] >= 2)
        before = session.last.progress[0]
        hold_gil(HOLD_S)
        after = session.poll()
        assert after.state == "done" or after.progress[0] > before + 1, (before, after)
        while session.last.state == "running":
            session.poll(wait=1.0)
        assert session.last.state == "done" and session.mask.any(axis=(1, 2)).sum() == LONG_VOLUME
    finally:
        server.stop()
