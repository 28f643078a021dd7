"""Volumes, prompts and server start-up shared by the server tests (not shipped)."""

from __future__ import annotations

import importlib.util
import sys
import time

import numpy as np
import pytest

from ultrasam.client import LocalServer
from ultrasam.wire import prompts_to_json

NEVER_STOP = {"min_iou": -10.0, "max_growth": 1e9}  # judge nothing: walks go to the volume's edge
SERVER_PACKAGES = ("torch", "segment_anything", "fastapi", "uvicorn")  # what `ultrasam serve` runs on


def skip_without_server_packages() -> None:
    """Skip where this interpreter cannot run `ultrasam serve` (the torch-free runs of make test-compat)."""
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"`ultrasam serve` needs {', '.join(missing)}, not installed here")


def tube_volume(slices: int, size: int = 64, offset: int = 0) -> np.ndarray:
    """(slices, size, size) uint8: a bright disc on every slice, a dark background.

    ``offset`` shifts every voxel value, so volumes that must not share cached embeddings differ.
    """
    j, i = np.indices((size, size))
    disc = ((j - size / 2) ** 2 + (i - size / 2) ** 2 < (size / 5) ** 2)
    voxels = np.where(disc, 200, 30).astype(np.uint8) + np.uint8(offset % 20)
    return np.repeat(voxels[None], slices, axis=0)


def centre_click(voxels: np.ndarray) -> dict:
    """A positive click at the middle voxel, in ijk (the geometry is the identity)."""
    k, j, i = (n // 2 for n in voxels.shape)
    return prompts_to_json([[i, j, k]], [1], "ijk")


def identity_geometry() -> tuple:
    return np.zeros(3), np.ones(3), np.eye(3)


def start_server(checkpoint, *options: str) -> LocalServer:
    skip_without_server_packages()
    server = LocalServer(sys.executable, ["--checkpoint", str(checkpoint), "--device", "cpu", *options])
    server.start()
    server.wait_ready()
    return server


def finish(session, timeout: float = 120.0, poll_s: float = 0.02):
    """Poll a run to its end; returns the final RunState."""
    end = time.monotonic() + timeout
    state = session.last
    while state.state == "running":
        if time.monotonic() > end:
            raise AssertionError("the run did not finish")
        time.sleep(poll_s)
        state = session.poll()
    return state
