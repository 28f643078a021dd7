"""What training leaves out of its data, said before it starts: on screen and in ``metrics.jsonl``.

The data reader drops what it cannot use (an unreadable annotation file, a corrupt or empty
mask, an unknown image; see ``coco.PROBLEM_KINDS``), and this module adds image files that do not
exist. By default (``data.skip_bad_samples = false``) training then refuses to start and lists
them, since a careful user would rather fix the data than train on part of it without knowing;
with ``true`` it trains on the rest, and every skipped item is listed in a "skipped" record of
``metrics.jsonl``, summarised on screen and in the Slicer module's status line.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any, Sequence

from ultrasam_data.coco import CocoDataset, Problem

EXAMPLES = 3  # items named per kind on screen


class SkippedDataError(ValueError):
    """Training data had bad items and skipping them was not allowed; the message lists them."""


def without_missing_images(dataset: CocoDataset) -> tuple[CocoDataset, list[Problem]]:
    """``dataset`` without the records whose image file does not exist, and those as problems."""
    present, missing = [], []
    for index, record in enumerate(dataset.records):
        if record.path.is_file():
            present.append(index)
        else:
            missing.append(Problem("missing file", f"{record.dataset} image {record.path.name}",
                                   f"{record.path} does not exist"))
    if not missing:
        return dataset, []
    kept = dataset.subset(present)
    kept.problems = list(dataset.problems)
    return kept, missing


def summary(problems: Sequence[Problem]) -> str:
    """One line: how many items of each kind, with a few named."""
    counts = Counter(problem.kind for problem in problems)
    parts = []
    for kind, count in sorted(counts.items()):
        named = [f"{p.where} ({p.detail})" for p in problems if p.kind == kind][:EXAMPLES]
        parts.append(f"{kind}: {count}, e.g. {'; '.join(named)}")
    return f"{len(problems)} training data item(s) left out ({' | '.join(parts)})"


def report_skips(problems: Sequence[Problem], allowed: bool, log: Any, step: int = 0) -> None:
    """Refuse (SkippedDataError) or record and print ``problems``; nothing to do when empty.

    ``log`` is the run's :class:`~ultrasam_training.runlog.RunLog` (None on ranks > 0); ``step``
    is when they were met (0: found before training, on opening the data).
    """
    if not problems:
        return
    line = summary(problems)
    if not allowed:
        raise SkippedDataError(f"{line}. Fix the data (`ultrasam check-data` lists every item), or set "
                               "data.skip_bad_samples to true in the config to train without them")
    if log is not None:
        log.write("skipped", step, count=len(problems), kinds=dict(Counter(p.kind for p in problems)),
                  items=[{"kind": p.kind, "where": p.where, "detail": p.detail} for p in problems])
        print(f"ultrasam-train: warning: {line}; all are listed in {log.path}", file=sys.stderr)
