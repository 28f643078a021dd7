"""Annotated data for ``ultrasam evaluate``: what each source given on the command line holds.

A source is one of:

- a COCO file in US-43d's style (class-agnostic, RLE / Python-repr RLE / polygon masks);
- a US-43d folder (``<dataset>/annotations/[<split>.]<dataset>__coco.json``), read per ``split``;
- a raw BUS-BRA folder (``5-fold-cv.csv``) or HC18 folder (``pixel_size_and_HC.csv``), converted
  first with the data layer's converters (``ultrasam_data``), so evaluation sees exactly what training sees:
  BUS-BRA fold 1 becomes ``test.BUSBRA__coco.json`` (UltraSam's test split), HC18's outlines are
  filled and checked against the CSV;
- a folder with ``images/`` and ``labels/`` volumes paired by file name (3D; a 4D label file is a
  stack of structures, one per channel).

Every connected component of a label is one object, as in US-43d. COCO files, converters and volume
pairs come from the data layer (``ultrasam_data``), the same readers training uses.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("auto", "main", "train", "val", "test")
RAW_MARKERS = {"busbra": "5-fold-cv.csv", "hc18": "pixel_size_and_HC.csv"}


@dataclass
class ImageSet:
    """The images of one data set, with their objects.

    Attributes:
        name: data set name (US-43d's, e.g. ``BUSBRA``).
        records: ``ultrasam_data.coco.ImageRecord`` of every usable image, in file order.
        files: the annotation files read.
        dropped: problem kind -> annotations or images of those files left out as unusable.
    """

    name: str
    records: list = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    def count(self, limit: int | None = None) -> int:
        return len(self.records[:limit])

    def samples(self, limit: int | None = None) -> Iterator:
        """``ultrasam_data.coco.Sample`` of the first ``limit`` images (all objects), loaded lazily."""
        from ultrasam_data.coco import read_sample

        for record in self.records[:limit]:
            yield read_sample(record, record.rles)

    def describe(self) -> dict:
        return {"dataset": self.name, "kind": "images", "images": len(self.records),
                "objects": sum(len(r.rles) for r in self.records), "files": [str(f) for f in self.files],
                "dropped": dict(self.dropped)}


@dataclass
class VolumeSet:
    """Image volumes paired with label volumes (``ultrasam_data.converters.VolumePair``)."""

    name: str
    pairs: list
    folder: Path

    def describe(self) -> dict:
        return {"dataset": self.name, "kind": "volumes", "volumes": len(self.pairs), "folder": str(self.folder)}


def source_kind(path: Path) -> str:
    """``coco``, ``busbra``, ``hc18`` or ``volumes``; a clear error for anything else."""
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such COCO file or folder")
    for kind, marker in RAW_MARKERS.items():
        if next(path.glob(marker), None) or next(path.glob(f"*/{marker}"), None):
            return kind
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "volumes"
    return "coco"


@contextmanager
def open_sources(paths: Sequence[str | os.PathLike], split: str = "auto",
                 work_dir: str | os.PathLike | None = None) -> Iterator[list[ImageSet | VolumeSet]]:
    """The data sets of every source, in order; raw folders converted into ``work_dir``.

    Args:
        split: which annotation files of a folder (``SPLITS``): ``auto`` takes a data set's
            ``test.`` file where it has one, else its main ``<dataset>__coco.json``.
        work_dir: where converted raw folders are kept and reused; None: a temporary folder
            removed when the ``with`` block ends.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    temporary = None if work_dir else Path(tempfile.mkdtemp(prefix="ultrasam-evaluate-"))
    try:
        sets: list[ImageSet | VolumeSet] = []
        for path in map(Path, paths):
            kind = source_kind(path)
            if kind == "volumes":
                sets.append(volume_set(path))
                continue
            if kind in RAW_MARKERS:
                path = convert_raw(kind, path, Path(work_dir) if work_dir else temporary)
            files = [path] if path.is_file() else split_files(path, split)
            sets.extend(image_sets(files))
        yield sets
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def split_files(root: Path, split: str) -> list[Path]:
    """Annotation files of one split under a US-43d folder (see :func:`open_sources`)."""
    from ultrasam_data.coco import ANNOTATION_NAME, annotation_files

    if split == "auto":
        def by_dataset(files: list[Path]) -> dict:
            return {(f.parent, ANNOTATION_NAME.match(f.name)["dataset"]): f for f in files}
        main, test = by_dataset(annotation_files(root, None)), by_dataset(annotation_files(root, "test"))
        files = sorted({**main, **test}.values())
    else:
        files = annotation_files(root, None if split == "main" else split)
    if not files:
        wanted = "<dataset>__coco.json" if split in ("auto", "main") else f"{split}.<dataset>__coco.json"
        raise FileNotFoundError(f"{root}: no {wanted} annotation files; give a COCO file, a US-43d folder, "
                                "or another --split")
    return files


def image_sets(files: Sequence[Path]) -> list[ImageSet]:
    """Read COCO files; one :class:`ImageSet` per data set named in them."""
    from ultrasam_data.coco import read_annotation_file

    sets: dict[str, ImageSet] = {}
    for path in files:
        problems: list = []
        records = read_annotation_file(path, None, problems)
        if not records:
            reasons = "; ".join(f"{p.kind}: {p.detail}" for p in problems[:3]) or "no images"
            raise ValueError(f"{path}: no usable annotated image ({reasons}); check the file")
        by_dataset = defaultdict(list)
        for record in records:
            by_dataset[record.dataset].append(record)
        for name, members in by_dataset.items():
            data_set = sets.setdefault(name, ImageSet(name))
            data_set.records += members
            data_set.files.append(path)
            data_set.dropped.update(p.kind for p in problems)
    return list(sets.values())


def convert_raw(kind: str, source: Path, work_dir: Path) -> Path:
    """Converted data set folder of a raw BUS-BRA or HC18 folder (reused if ``work_dir`` has it)."""
    from ultrasam_data.convert import DEFAULT_NAMES, summary
    from ultrasam_data.public_2d import convert_busbra, convert_hc18
    from ultrasam_data.writer import CocoWriter

    name = DEFAULT_NAMES[kind]
    target = work_dir / name
    if target.is_dir():
        print(f"{source}: using the conversion already in {target} (delete it to convert again)", file=sys.stderr)
        return target
    print(f"{source}: converting {kind} into {target}", file=sys.stderr)
    converter = convert_busbra if kind == "busbra" else convert_hc18
    with CocoWriter(work_dir, name) as writer:
        converter(source, writer)
    print(summary(writer), file=sys.stderr)
    return target


def volume_set(folder: Path) -> VolumeSet:
    """Volumes of ``folder/images`` paired by file name with ``folder/labels``."""
    from ultrasam_data.converters import pair_folders

    return VolumeSet(folder.name, pair_folders(folder / "images", folder / "labels"), folder)


def read_volume_pair(pair, channel: int = 0):
    """(image Volume, (K, J, I) bool structure ``channel`` of the label file) of one pair."""
    from ultrasam.volume_io import read_volume
    from ultrasam_data.converters import label_channels, read_array

    volume = read_volume(pair.image)
    channels = label_channels(read_array(pair.label), volume.shape_kji, pair.label)
    if not 0 <= channel < len(channels):
        raise ValueError(f"{pair.label}: label channel {channel} asked for, the file has {len(channels)} "
                         f"(0..{len(channels) - 1}); choose one with --label-channel")
    return volume, np.asarray(channels[channel] > 0)
