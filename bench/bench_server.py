"""What the server costs: a click through ``ultrasam serve`` on loopback against the same click in-process,
and the upload of a 300 x 512 x 512 uint8 volume. One run, side by side, same model and volume.

- click: one positive point on an already embedded slice to the mask in the caller's hands. In
  process: ``SegmentationSession.run`` on one worker thread (as the effect ran it before, and as
  the server runs it on its model thread; torch behaves differently on the main thread). Through
  the server: ``RemoteSession.start(..., wait=...)``, one HTTP round trip on 127.0.0.1 including
  JSON, the changed slice's zlib'd mask and the client's copy of the volume mask. The click point
  alternates between two nearby voxels so each click recomputes the slice (never a no-op rerun).
- upload: ``VolumeUpload.step`` until the session is open, for 300 x 512 x 512 uint8: per step
  zlib (level 1) of at most 4 MiB on the client and one POST with the server's inflate; the last
  step also the session set-up (intensity window). The longest step is what Slicer's main thread
  waits at once; the total is what the user waits for the volume. Also the round trip of a poll that
  finds nothing new: the protocol's own cost, without model work. Two contents: RESECT case 3 (the
  bundled real ultrasound) resampled to that grid, and uniform noise (incompressible, worst case).

    python bench/bench_server.py                      # compact model, CPU
    python bench/bench_server.py --device cuda --checkpoint UltraSam.pth --json out/server.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ultrasam.atomic import write_text_atomic
from ultrasam.checkpoint import load_model
from ultrasam.client import LocalServer, VolumeUpload
from ultrasam.geometry import Geometry, Volume
from ultrasam.precision import cpu_description
from ultrasam.predictor import Predictor
from ultrasam.prompts3d import VolumePrompts
from ultrasam.resources import SAMPLE_VOLUME, SHIPPED_MODEL
from ultrasam.session import SegmentationSession
from ultrasam.volume_embeddings import VolumeEmbeddingCache
from ultrasam.volume_io import read_volume
from ultrasam.wire import encode_volume, prompts_to_json

UPLOAD_SHAPE = (300, 512, 512)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(SHIPPED_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clicks", type=int, default=60)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    real = read_volume(SAMPLE_VOLUME)
    click_volume = Volume(np.ascontiguousarray(real.voxels[130:160]), real.geometry, "RESECT case 3, 30 slices")
    clicks = [prompts_to_json([[128 + n % 2, 128, 15]], [1], "ijk") for n in range(args.clicks + 1)]
    here = in_process_session(args, click_volume)
    worker = ThreadPoolExecutor(max_workers=1)  # as the effect's former worker thread, and the server's model thread

    server = LocalServer(sys.executable, ["--checkpoint", args.checkpoint, "--device", args.device])
    server.start()
    try:
        client = server.wait_ready()
        geometry = click_volume.geometry
        served = client.open_volume(click_volume.voxels, geometry.origin_lps, geometry.spacing, geometry.direction_lps)
        in_process_ms, served_ms = [], []
        for n, click in enumerate(clicks):  # interleaved: the shared machine's load hits both alike
            prompts = VolumePrompts(click["points"], click["labels"], "ijk")
            in_process_ms.append(timed(lambda: worker.submit(here.run, prompts, False).result()))
            served_ms.append(timed(lambda: _done(served.start(click, wait=10.0))))
        in_process_ms, served_ms = in_process_ms[1:], served_ms[1:]  # the first click embeds the slice
        round_trip_ms = [timed(served.poll) for _ in clicks]  # the protocol alone: no model work
        served.close()
        uploads = {name: upload(client, voxels) for name, voxels in upload_volumes(real).items()}
    finally:
        server.stop()

    figures = {
        "device": args.device, "cpu": cpu_description()[0], "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "click_in_process_ms": round(statistics.median(in_process_ms), 2),
        "click_server_ms": round(statistics.median(served_ms), 2),
        "click_overhead_ms": round(statistics.median(served_ms) - statistics.median(in_process_ms), 2),
        "round_trip_ms": round(statistics.median(round_trip_ms), 2),
        "upload": uploads,
    }
    print(f"click, median of {args.clicks}: in-process {figures['click_in_process_ms']} ms, through the server "
          f"{figures['click_server_ms']} ms, overhead {figures['click_overhead_ms']} ms; a poll's round trip alone "
          f"{figures['round_trip_ms']} ms")
    for name, row in uploads.items():
        print(f"upload {name} {UPLOAD_SHAPE} uint8: {row['megabytes']} MB -> {row['compressed_mb']} MB, compress "
              f"{row['compress_s']} s in one piece; {row['steps']} steps, {row['upload_s']} s in all, the longest "
              f"{row['longest_step_ms']} ms")
    if args.json:
        write_text_atomic(args.json, json.dumps(figures, indent=1))
    return 0


def in_process_session(args, volume: Volume) -> SegmentationSession:
    loaded = load_model(args.checkpoint)
    predictor = Predictor(loaded.model, device=args.device, mode=loaded.info["postprocess"])
    return SegmentationSession(volume, VolumeEmbeddingCache(predictor))


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def _done(state) -> None:
    assert state.state == "done", state


def upload_volumes(real: Volume) -> dict[str, np.ndarray]:
    k, j, i = UPLOAD_SHAPE
    index = [np.linspace(0, n - 1, m).round().astype(int) for n, m in zip(real.voxels.shape, UPLOAD_SHAPE)]
    resampled = np.ascontiguousarray(real.voxels[np.ix_(*index)].astype(np.uint8))
    noise = np.random.default_rng(0).integers(0, 256, UPLOAD_SHAPE, dtype=np.uint8)
    return {"RESECT case 3 resampled": resampled, "uniform noise": noise}


def upload(client, voxels: np.ndarray) -> dict:
    geometry = Geometry()
    start = time.perf_counter()
    body = encode_volume(voxels, geometry.origin_lps, geometry.spacing, geometry.direction_lps)
    compress_s = time.perf_counter() - start
    sending = VolumeUpload(client, voxels, geometry.origin_lps, geometry.spacing, geometry.direction_lps)
    steps_ms = []
    while sending.session is None:
        steps_ms.append(timed(sending.step))
    sending.session.close()
    assert zlib.decompress(body[8 + int.from_bytes(body[4:8], "little"):])[:16] == voxels.tobytes()[:16]
    return {"megabytes": round(voxels.nbytes / 1e6, 1), "compressed_mb": round(len(body) / 1e6, 1),
            "compress_s": round(compress_s, 2), "steps": len(steps_ms), "upload_s": round(sum(steps_ms) / 1000, 2),
            "longest_step_ms": round(max(steps_ms), 1)}


if __name__ == "__main__":
    sys.exit(main())
