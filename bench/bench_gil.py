"""Why inference left Slicer's process: the same work with Slicer's main thread emulated, as ratios.

In Slicer, PythonQt holds the GIL while Qt's event loop runs; Python gets it back only for short
callbacks such as the effect's 50 ms QTimer. Here the main thread does the same: between callbacks
it calls ``usleep`` through ``ctypes.PyDLL``, which keeps the GIL during the call (checked by
``Testing/test_server_gil.py``). The uncontended run is the same loop with ``time.sleep``, which
releases it. Each figure is the median over interleaved repetitions, contended / uncontended:

- in process: a Python worker thread runs one click (the former design); it advances only in the
  gaps the main thread leaves;
- through the client: the model runs in ``ultrasam serve``; the main thread starts the run and
  polls once a tick, for a click and for a 40-slice propagation.

Every run segments the middle slab of RESECT case 3 shifted by one more voxel, so no run reuses
cached embeddings.

    python bench/bench_gil.py                          # compact-v1, CPU
    python bench/bench_gil.py --json out/gil.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import sys
import threading
import time

import numpy as np

from ultrasam.atomic import write_text_atomic
from ultrasam.checkpoint import load_model
from ultrasam.client import LocalServer
from ultrasam.geometry import Volume
from ultrasam.precision import cpu_description
from ultrasam.predictor import Predictor
from ultrasam.prompts3d import VolumePrompts
from ultrasam.propagation import StopRules
from ultrasam.resources import COMPACT_V1_MODEL, SAMPLE_VOLUME
from ultrasam.session import SegmentationSession
from ultrasam.volume_embeddings import VolumeEmbeddingCache
from ultrasam.volume_io import read_volume
from ultrasam.wire import prompts_to_json

HOLD_S = 0.045  # the event loop's share between two 50 ms timer callbacks
NEVER_STOP = {"min_iou": -10.0, "max_growth": 1e9}  # walks go to the slab's edge: the same work every run
_usleep = ctypes.PyDLL(None).usleep  # POSIX: keeps the GIL while it sleeps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(COMPACT_V1_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind, contended and not")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    slabs = Slabs(read_volume(SAMPLE_VOLUME))
    loaded = load_model(args.checkpoint)
    cache = VolumeEmbeddingCache(Predictor(loaded.model, device=args.device, mode=loaded.info["postprocess"]))
    server = LocalServer(sys.executable, ["--checkpoint", args.checkpoint, "--device", args.device])
    server.start()
    try:
        client = server.wait_ready()
        rows = {
            "in-process worker thread, click": median_ratio(lambda held: in_process_click(cache, slabs.next(3), held),
                                                            args.repeats),
            "through the client, click": median_ratio(lambda held: served_run(client, slabs.next(3), False, held),
                                                      args.repeats),
            "through the client, 40-slice propagation": median_ratio(
                lambda held: served_run(client, slabs.next(41), True, held), args.repeats),
        }
    finally:
        server.stop()

    for name, row in rows.items():
        print(f"{name}: {row['alone_ms']} ms alone, {row['held_ms']} ms with the GIL held between ticks: "
              f"{row['ratio']}x")
    figures = {"device": args.device, "cpu": cpu_description()[0], "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "checkpoint": args.checkpoint, "repeats": args.repeats, "rows": rows}
    if args.json:
        write_text_atomic(args.json, json.dumps(figures, indent=1))
    return figures


class Slabs:
    """Middle slabs of a real volume, shifted by one more voxel along i each call: new content every
    time, so no run finds cached embeddings."""

    def __init__(self, volume: Volume) -> None:
        self.volume, self.calls = volume, 0

    def next(self, slices: int) -> Volume:
        start = self.volume.shape_kji[0] // 2 - slices // 2
        self.calls += 1
        voxels = np.roll(self.volume.voxels[start:start + slices], self.calls, axis=2)
        return Volume(np.ascontiguousarray(voxels), self.volume.geometry, self.volume.name)


def centre_click(volume: Volume) -> dict:
    k, j, i = (n // 2 for n in volume.shape_kji)
    return prompts_to_json([[i, j, k]], [1], "ijk")


def main_thread(first, then, finished, held: bool) -> float:
    """Run ``first`` as one timer callback, then ``then`` once a tick until ``finished()``; between
    ticks the GIL is held (``held``) or released. Returns the seconds until the end."""
    wait = (lambda seconds: _usleep(int(seconds * 1e6))) if held else time.sleep
    start = time.perf_counter()
    first()
    while not finished():
        wait(HOLD_S)
        then()
    return time.perf_counter() - start


def in_process_click(cache: VolumeEmbeddingCache, volume: Volume, held: bool) -> float:
    session = SegmentationSession(volume, cache, StopRules(**NEVER_STOP))
    click = centre_click(volume)
    worker = threading.Thread(target=session.run, args=(VolumePrompts(click["points"], click["labels"], "ijk"), False))
    return main_thread(worker.start, lambda: None, lambda: not worker.is_alive(), held)


def served_run(client, volume: Volume, propagate: bool, held: bool) -> float:
    geometry = volume.geometry
    session = client.open_volume(volume.voxels, geometry.origin_lps, geometry.spacing, geometry.direction_lps)
    states = []
    # as the effect: the call that starts the run waits for nothing; the next tick's poll picks it up
    seconds = main_thread(lambda: states.append(session.start(centre_click(volume), propagate=propagate,
                                                              rules=NEVER_STOP)),
                          lambda: states.append(session.poll()), lambda: states[-1].state != "running", held)
    if states[-1].state != "done":
        raise RuntimeError(f"the run ended {states[-1].state}: {states[-1].error}")
    session.close()
    return seconds


def median_ratio(measure, repeats: int) -> dict:
    """Medians of ``measure(held)`` over ``repeats`` interleaved runs each, and their ratio."""
    times = {True: [], False: []}
    for n in range(repeats):
        for held in (n % 2 == 0, n % 2 == 1):  # alternate which goes first: load hits both alike
            times[held].append(measure(held))
    held_s, alone_s = statistics.median(times[True]), statistics.median(times[False])
    return {"alone_ms": round(alone_s * 1000, 1), "held_ms": round(held_s * 1000, 1),
            "ratio": round(held_s / alone_s, 2)}


if __name__ == "__main__":
    main()
