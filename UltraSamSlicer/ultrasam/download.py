"""Download the official UltraSam weights into a user cache folder (for machines with internet).

The download resumes a partial file (HTTP Range), shows progress, and is accepted only once the
file loads as an UltraSam checkpoint (no checksum is published); until then it stays ``*.part``.
Nothing here runs at import time.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ultrasam.user_cache import cache_dir

Progress = Callable[[int, int], None]  # (bytes received so far, total bytes or 0 if unknown)

OFFICIAL_URL = "https://s3.unistra.fr/camma_public/github/ultrasam/UltraSam.pth"
OFFICIAL_NAME = "UltraSam.pth"
CHUNK = 1 << 20


def cached_official_weights(folder: str | os.PathLike | None = None) -> Path | None:
    """Path of the downloaded official weights, or None when they are not there."""
    path = Path(folder or cache_dir()) / OFFICIAL_NAME
    return path if path.is_file() else None


def download_official_weights(folder: str | os.PathLike | None = None, url: str = OFFICIAL_URL,
                              progress: bool | Progress = True,
                              should_cancel: Callable[[], bool] = lambda: False) -> Path:
    """Fetch UltraSam.pth into ``folder`` (resuming), check it loads, and return its path.

    Args:
        progress: True for a terminal progress bar, False for none, or a callback taking
            (received, total) bytes (the Slicer panel's progress bar).
        should_cancel: polled between chunks; True stops with the part file kept for resuming.
    """
    from ultrasam.checkpoint import CheckpointError, load_model

    target = Path(folder or cache_dir()) / OFFICIAL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    _fetch(url, partial, _reporter(progress), should_cancel)
    try:
        loaded = load_model(partial)
    except CheckpointError as error:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"the downloaded file is not usable ({error}); it was removed, try again") from None
    if loaded.kind != "ultrasam":
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"{url} did not serve UltraSam weights (found {loaded.kind}); the file was removed")
    os.replace(partial, target)
    return target


def _fetch(url: str, partial: Path, report: Progress, should_cancel: Callable[[], bool]) -> None:
    """Append the rest of ``url`` to ``partial``, asking the server for the missing range only."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # nothing left to fetch: the part file is complete
            return
        raise ConnectionError(f"download of {url} failed: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, TimeoutError) as error:
        raise ConnectionError(
            f"cannot reach {url} ({getattr(error, 'reason', error)}); check the connection, or download "
            "UltraSam.pth elsewhere and pass it with --checkpoint"
        ) from None
    with response:
        if have and response.status != 206:  # server ignored the range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length", 0) or 0)
        received = have
        with open(partial, "ab" if have else "wb") as stream:
            while chunk := response.read(CHUNK):
                if should_cancel():
                    raise InterruptedError(f"download cancelled at {received} bytes; run it again to resume")
                stream.write(chunk)
                received += len(chunk)
                report(received, total)
    if total and received < total:
        raise ConnectionError(
            f"download of {url} stopped at {received} of {total} bytes; run the same command again to resume"
        )


def _reporter(progress: bool | Progress) -> Progress:
    """A (received, total) callback: the caller's, a tqdm bar, or nothing."""
    if callable(progress):
        return progress
    if not progress:
        return lambda received, total: None
    from tqdm.auto import tqdm  # only for terminal use; Slicer passes its own callback

    bar = tqdm(unit="B", unit_scale=True, desc=OFFICIAL_NAME)

    def report(received: int, total: int) -> None:
        bar.total = total or None
        bar.update(received - bar.n)

    return report
