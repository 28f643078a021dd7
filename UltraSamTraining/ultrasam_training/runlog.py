"""A run's metrics: one JSON object per line in ``metrics.jsonl``, plus TensorBoard when available.

Every record has ``kind`` ("skipped", "start", "train", "val", "checkpoint", "done", "error"),
``step`` and ``time`` (Unix seconds); "skipped" lists the training data left out. The launcher and the Slicer module read this file to show progress, so
each line is written whole and flushed. TensorBoard events go to ``<run>/tensorboard`` when the
``tensorboard`` package is installed (``torch.utils.tensorboard`` needs it); without it the JSONL
file is the only record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ultrasam.atomic import WriteError, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line, from a killed writer, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLog:
    """Appends records to ``<run_dir>/metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        """Open the log; with ``resume_step``, records after that step (from a killed run) are dropped."""
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step and r.get("kind") != "done"]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._stream = self.path.open("a")
        self._writer = _summary_writer(Path(run_dir) / "tensorboard", resume_step) if tensorboard else None

    def write(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        try:
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
        except OSError as error:  # a full disk: say which file
            raise WriteError.of(self.path, error, "the records before this one are kept") from None
        if self._writer is not None:
            for name, value in _scalars(values):
                self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._stream.close()
        if self._writer is not None:
            self._writer.close()


def _summary_writer(folder: Path, resume_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)


def _scalars(values: dict[str, Any], prefix: str = ""):
    """(name, number) pairs of a nested record, e.g. per_dataset/busbra/dice."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{name}", value
