"""Train / validation splits of a :class:`~ultrasam_data.coco.CocoDataset`, per data set.

- ``by="image"``: UltraSam's split: each data set's images shuffled, ``val_fraction`` of them to
  validation. Neighbouring slices of one volume then land on both sides, so validation scores
  of 3D and video data sets are optimistic.
- ``by="group"``: whole groups (patient, volume, sequence) go to one side, so no slice of a
  validation volume is ever trained on. Groups are drawn in random order until validation holds
  at least ``val_fraction`` of the data set's images; a data set with two or more groups always
  keeps at least one group on each side.

Both are deterministic in ``seed``, and each data set is split with its own stream (seeded from
``seed`` and its name), so adding a data set does not change the others' splits.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ultrasam.atomic import write_text_atomic
from ultrasam_data.coco import ANNOTATION_NAME, CocoDataset

SPLIT_KINDS = ("group", "image")


@dataclass(frozen=True)
class Split:
    """Indices into the dataset: ``train`` and ``val``, disjoint, together all of it, sorted."""

    train: list[int]
    val: list[int]


def split_dataset(dataset: CocoDataset, val_fraction: float = 0.05, seed: int = 0, by: str = "group") -> Split:
    """Split ``dataset`` per data set (see the module docstring)."""
    if by not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {by!r}; use one of {SPLIT_KINDS}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    units: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, record in enumerate(dataset.records):
        unit = record.group if by == "group" else str(index)
        units[record.dataset][unit].append(index)
    val: list[int] = []
    for name, members in units.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        val.extend(_draw(members, val_fraction, rng))
    val_set = set(val)
    return Split([i for i in range(len(dataset)) if i not in val_set], sorted(val))


def _draw(members: dict[str, list[int]], val_fraction: float, rng: np.random.Generator) -> list[int]:
    """Indices of the units drawn for validation until they hold ``val_fraction`` of the images."""
    total = sum(len(indices) for indices in members.values())
    wanted = math.ceil(val_fraction * total) if val_fraction > 0 else 0
    names = sorted(members)
    order = [names[i] for i in rng.permutation(len(names))]
    chosen: list[int] = []
    for unit in order[: max(len(order) - 1, 0)]:  # the last unit always stays in train
        if len(chosen) >= wanted:
            break
        chosen.extend(members[unit])
    return chosen


def write_split(annotation_file: str | os.PathLike, val_fraction: float, seed: int = 0,
                by: str = "group") -> tuple[Path, Path]:
    """Write ``train.<name>`` and ``val.<name>`` beside a data set's main COCO file ``<name>``.

    The split is :func:`split_dataset`'s for that file alone, written down so that training
    (``data.val``) and ``ultrasam evaluate`` share one fixed held-out set. Each output keeps the
    input's other keys and only the annotations of its images; images the reader drops (no usable
    object) go to neither file. Both files are written atomically; existing ones are replaced.
    """
    source = Path(annotation_file)
    match = ANNOTATION_NAME.match(source.name)
    if match is None or match["split"]:
        raise ValueError(f"{source.name}: expected a main data-set file named <dataset>__coco.json")
    content = json.loads(source.read_text(encoding="utf-8"))
    dataset = CocoDataset(source)
    split = split_dataset(dataset, val_fraction, seed, by)
    written = []
    for part, indices in (("train", split.train), ("val", split.val)):
        ids = {dataset.records[i].image_id for i in indices}
        subset = dict(content, images=[image for image in content["images"] if image["id"] in ids],
                      annotations=[a for a in content.get("annotations", []) if a.get("image_id") in ids])
        target = source.with_name(f"{part}.{source.name}")
        write_text_atomic(target, json.dumps(subset))
        written.append(target)
    return written[0], written[1]
