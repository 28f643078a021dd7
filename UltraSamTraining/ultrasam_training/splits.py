"""Train / validation splits of a :class:`~ultrasam_training.coco.CocoDataset`, per data set.

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

import math
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ultrasam_training.coco import CocoDataset

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
