"""The user's cache folder: what ultrasam keeps between runs (downloaded weights, the CPU precision
choice of :mod:`ultrasam.precision`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ULTRASAM_CACHE``, else ``$XDG_CACHE_HOME/ultrasam``, else ``~/.cache/ultrasam``."""
    if os.environ.get("ULTRASAM_CACHE"):
        return Path(os.environ["ULTRASAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ultrasam"
