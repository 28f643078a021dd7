"""Read US-43d as UltraSam publishes it: class-agnostic COCO files of PNG/JPG images and masks.

Accepted, per file or mixed:

- a merged file (``file_name = <dataset>/images/x.png``, relative to the file's folder) or
  per-data-set files (``<root>/<dataset>/annotations/[<split>.][agnostic.]<dataset>__coco.json``
  with images in ``<root>/<dataset>/images``), or a folder holding either;
- masks as COCO RLE dicts (``counts`` compressed str or uncompressed list), the same dict stored
  as a Python-repr string (read with ``ast.literal_eval``, never ``eval``), or polygons.

Every annotation is parsed once when the data set is opened; those that cannot be used (bad
segmentation, empty mask, outside the image, size mismatch, unknown image) are dropped and counted
in :attr:`CocoDataset.problems` (see ``PROBLEM_KINDS``), so opening never fails on bad samples. Images without a usable
annotation are dropped too. Image files are only opened by ``__getitem__`` (and by
``ultrasam_data.check``, which also reports missing and mismatched files).

Groups (for grouped splits) come from the image record's ``group`` key (written by our
converters), else from US-43d's file name ``<dataset>__<patient>__<procedure>__<n>.png``, else
each image is its own group (UltraSam's 3D data sets carry no volume id in their names).
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ultrasam.geometry import mask_box
from ultrasam.intensity import to_uint8

ANNOTATION_NAME = re.compile(r"^(?:(?P<split>train|val|test)\.)?(?:agnostic\.)?(?P<dataset>.+)__coco\.json$")
HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "F")  # grey beyond 8 bits: mapped by to_uint8
PROBLEM_KINDS = ("missing file", "unreadable image", "size mismatch", "bad segmentation", "empty mask",
                 "out of bounds", "unknown image", "no objects", "bad record", "unreadable annotation file")
IMAGE_KEYS = ("id", "file_name", "height", "width")
FOLDER_PROBES = 10  # images looked up to find the image folder (a few may be missing)


class DataError(ValueError):
    """An annotation or image that cannot be used; ``kind`` is one of ``PROBLEM_KINDS``, ``where``
    names the image when the reader knows it."""

    def __init__(self, kind: str, detail: str, where: str = "") -> None:
        super().__init__(f"{where + ': ' if where else ''}{kind}: {detail}")
        self.kind, self.detail, self.where = kind, detail, where


@dataclass(frozen=True)
class Problem:
    """A bad annotation or image: its kind (``PROBLEM_KINDS``), where it is, and what is wrong."""

    kind: str
    where: str
    detail: str


@dataclass(frozen=True)
class ImageRecord:
    """One image and its usable annotations, as parsed from a COCO file.

    Attributes:
        path: the image file.
        dataset: the data set it belongs to.
        group: the patient / volume / sequence it comes from (for grouped splits).
        image_id: the id in its COCO file.
        height, width: size the COCO file gives.
        rles: compressed COCO RLE dicts, one per usable annotation, all of size (height, width).
        annotation_file: the COCO file it was read from.
    """

    path: Path
    dataset: str
    group: str
    image_id: int | str
    height: int
    width: int
    rles: tuple[dict, ...]
    annotation_file: Path


@dataclass
class Sample:
    """One training image and (at most ``max_objects``) of its objects.

    Attributes:
        image: (H, W, 3) uint8 RGB (grey images repeated over the channels).
        masks: (N, H, W) bool, one per object.
        boxes_xyxy: (N, 4) float32 tight box of each mask in the ``xy`` frame (integer values are
            pixel centres): (x_min - 0.5, y_min - 0.5, x_max + 0.5, y_max + 0.5), the pixel edges.
            This is COCO's ``[x, y, x + w, y + h]`` shifted by -0.5; segment_anything's prompt
            encoder adds the 0.5 back, which reproduces UltraSam's GT box prompts.
        dataset: data set name.
        group: patient / volume id.
        image_id: id in its COCO file.
        path: the image file.
    """

    image: np.ndarray
    masks: np.ndarray
    boxes_xyxy: np.ndarray
    dataset: str
    group: str
    image_id: int | str
    path: Path


def literal(text: str) -> object:
    """Parse a Python-repr (or JSON-like) literal safely; never executes code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
        raise DataError("bad segmentation", f"string is not a literal ({type(error).__name__})") from None


def to_rle(segmentation: object, height: int, width: int) -> dict:
    """Any COCO segmentation form -> one compressed RLE dict of size (height, width).

    Raises:
        DataError: unparseable, empty, outside the image, or of another size.
    """
    if isinstance(segmentation, str):
        segmentation = literal(segmentation)
    if isinstance(segmentation, dict):
        rle = _rle_from_dict(segmentation, height, width)
    elif isinstance(segmentation, (list, tuple)):
        rle = _rle_from_polygons(segmentation, height, width)
    else:
        raise DataError("bad segmentation", f"unsupported type {type(segmentation).__name__}")
    area = int(mask_utils.area(rle))
    if area == 0:
        raise DataError("empty mask", "the mask has no pixel")
    if area > height * width:
        raise DataError("bad segmentation", "RLE counts cover more pixels than the image has")
    return rle


def _rle_from_dict(segmentation: dict, height: int, width: int) -> dict:
    if "counts" not in segmentation or "size" not in segmentation:
        raise DataError("bad segmentation", "an RLE dict needs 'counts' and 'size'")
    size = [int(v) for v in segmentation["size"]]
    if size != [height, width]:
        raise DataError("size mismatch", f"mask size {size} but image is {[height, width]}")
    counts = segmentation["counts"]
    try:
        if isinstance(counts, list):
            return mask_utils.frPyObjects({"counts": counts, "size": size}, height, width)
        return {"counts": counts.encode("ascii") if isinstance(counts, str) else bytes(counts), "size": size}
    except (TypeError, ValueError, AttributeError, UnicodeError) as error:
        raise DataError("bad segmentation", f"unreadable RLE counts ({error})") from None


def _rle_from_polygons(polygons: Sequence, height: int, width: int) -> dict:
    try:
        rings = [np.asarray(ring, dtype=np.float64).reshape(-1) for ring in polygons]
    except (TypeError, ValueError):
        raise DataError("bad segmentation", "polygons must be lists of numbers") from None
    if not rings or any(ring.size < 6 or ring.size % 2 for ring in rings):
        raise DataError("bad segmentation", "each polygon needs at least 3 (x, y) points")
    points = np.concatenate(rings).reshape(-1, 2)
    if not np.all(np.isfinite(points)):
        raise DataError("bad segmentation", "polygon coordinates must be finite")
    if points.min() < 0 or points[:, 0].max() > width or points[:, 1].max() > height:
        raise DataError("out of bounds", f"polygon reaches outside the {width}x{height} image")
    return mask_utils.merge(mask_utils.frPyObjects([ring.tolist() for ring in rings], height, width))


def annotation_files(root: str | os.PathLike, split: str | None = None) -> list[Path]:
    """COCO files of one split under a US-43d root (or one data set folder), agnostic preferred.

    Args:
        split: ``"train"``, ``"val"``, ``"test"``, or None for the unsplit ``<dataset>__coco.json``.
    """
    chosen: dict[tuple[Path, str], Path] = {}
    for path in sorted(Path(root).rglob("*__coco.json")):
        match = ANNOTATION_NAME.match(path.name)
        if match and match["split"] == split:
            key = (path.parent, match["dataset"])
            if key not in chosen or ".agnostic." in f".{path.name}":
                chosen[key] = path
    return sorted(chosen.values())


def dataset_name(annotation_file: Path, content: dict, file_name: str) -> str:
    """Data set of an image: merged-file prefix, else the file's name pattern, else its description."""
    parts = Path(file_name).parts
    if len(parts) >= 3 and parts[-2] == "images":
        return parts[-3]
    match = ANNOTATION_NAME.match(annotation_file.name)
    if match:
        return match["dataset"]
    return str(content.get("info", {}).get("description") or annotation_file.stem)


def image_group(image: dict) -> str:
    """Patient / volume of an image record (see the module docstring)."""
    if image.get("group") not in (None, ""):
        return str(image["group"])
    fields = Path(image["file_name"]).stem.split("__")
    return "__".join(fields[1:-1]) if len(fields) > 2 else Path(image["file_name"]).stem


def image_folder(annotation_file: Path, file_names: Sequence[str], image_root: Path | None) -> Path:
    """Folder ``file_name`` is relative to: ``image_root``, else whichever of the file's folder,
    ``../images``, ``./images`` and the file folder's subfolders holds most of the first images."""
    if image_root is not None:
        return image_root
    here = annotation_file.parent
    candidates = [here, here.parent / "images", here / "images"]
    candidates += sorted(p for p in here.iterdir() if p.is_dir() and p not in candidates)
    probes = list(file_names)[:FOLDER_PROBES]
    hits = [sum((folder / name).is_file() for name in probes) for folder in candidates]
    return candidates[int(np.argmax(hits))]


def read_annotation_file(path: Path, image_root: Path | None, problems: list[Problem]) -> list[ImageRecord]:
    """Parse one COCO file into image records; unusable files, annotations and images go to ``problems``."""
    try:
        with open(path) as file:
            content = json.load(file)
        images = {image["id"]: image for image in content["images"] if _usable_record(image, path, problems)}
        rles = _annotation_rles(content.get("annotations", []), images, path, problems)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        problems.append(Problem("unreadable annotation file", str(path), f"not a COCO file ({error!r})"))
        return []
    if not images:
        return []
    folder = image_folder(path, [image["file_name"] for image in images.values()], image_root)
    records = []
    for image_id, image in images.items():
        if not rles[image_id]:
            problems.append(Problem("no objects", f"{path.name} image {image['file_name']}", "no usable annotation"))
            continue
        records.append(ImageRecord(folder / image["file_name"], dataset_name(path, content, image["file_name"]),
                                   image_group(image), image_id, int(image["height"]), int(image["width"]),
                                   tuple(rles[image_id]), path))
    return records


def _usable_record(image: dict, path: Path, problems: list[Problem]) -> bool:
    if all(key in image for key in IMAGE_KEYS) and int(image["height"]) > 0 and int(image["width"]) > 0:
        return True
    problems.append(Problem("bad record", f"{path.name} image {image.get('id')!r}",
                            f"an image record needs {', '.join(IMAGE_KEYS)} (size > 0)"))
    return False


def _annotation_rles(annotations: list[dict], images: dict, path: Path, problems: list[Problem]) -> dict:
    """image id -> RLEs of its usable annotations."""
    rles: dict[object, list[dict]] = {image_id: [] for image_id in images}
    for annotation in annotations:
        image = images.get(annotation.get("image_id"))
        try:
            if image is None:
                raise DataError("unknown image", f"image_id {annotation.get('image_id')!r} is not a usable image")
            rles[image["id"]].append(to_rle(annotation.get("segmentation"), int(image["height"]), int(image["width"])))
        except DataError as error:
            problems.append(Problem(error.kind, f"{path.name} annotation {annotation.get('id')!r}", error.detail))
    return rles


def load_image(record: ImageRecord) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of a record, checked against its COCO size."""
    try:
        with Image.open(record.path) as file:
            pixels = np.asarray(file if file.mode in HIGH_DEPTH_MODES else file.convert("RGB"))
    except FileNotFoundError:
        raise DataError("missing file", f"{record.path} does not exist") from None
    except OSError as error:
        raise DataError("unreadable image", str(error)) from None
    if pixels.ndim == 2:
        pixels = np.repeat(to_uint8(pixels)[0][..., np.newaxis], 3, axis=2)
    if pixels.shape[:2] != (record.height, record.width):
        raise DataError("size mismatch", f"the file is {pixels.shape[1]}x{pixels.shape[0]} but "
                          f"{record.annotation_file.name} says {record.width}x{record.height}")
    return pixels


def decode_masks(rles: list[dict], path: Path) -> np.ndarray:
    """(N, H, W) bool masks of compressed RLEs; a corrupt RLE raises :class:`DataError`."""
    try:
        return np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool)
    except ValueError as error:
        raise DataError("bad segmentation", f"{path}: an annotation's RLE is corrupt ({error})") from None


def read_sample(record: ImageRecord, rles: Sequence[dict]) -> Sample:
    """Load a record's image and decode ``rles`` (some or all of ``record.rles``) into a Sample."""
    image = load_image(record)
    masks = decode_masks(list(rles), record.path)
    return Sample(image, masks, boxes_of(masks), record.dataset, record.group, record.image_id, record.path)


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32 pixel-edge boxes (see :class:`Sample`) of (N, H, W) non-empty masks."""
    return np.array([mask_box(mask) for mask in masks], dtype=np.float32).reshape(-1, 4)


class CocoDataset:
    """Images of one or more COCO files as training samples (a map-style dataset).

    Args:
        sources: COCO files and/or folders (a folder contributes ``annotation_files(folder, split)``).
        max_objects: at most this many objects per sample (UltraSam: 20). More are drawn at random,
            reproducibly from ``seed``, the epoch (:meth:`set_epoch`) and the index.
        image_root: folder every ``file_name`` is relative to; found per file when None.
        split: which files a folder source contributes (see :func:`annotation_files`).
        seed: seed of the object draw.

    Attributes:
        records: the usable images.
        problems: annotations and images dropped while reading the COCO files.
    """

    def __init__(self, sources: str | os.PathLike | Sequence[str | os.PathLike], max_objects: int = 20,
                 image_root: str | os.PathLike | None = None, split: str | None = None, seed: int = 0) -> None:
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        self.max_objects = max_objects
        self.seed = seed
        self.epoch = 0
        self.problems: list[Problem] = []
        self.records: list[ImageRecord] = []
        root = Path(image_root) if image_root else None
        for path in self._files(sources, split):
            self.records.extend(read_annotation_file(path, root, self.problems))

    @staticmethod
    def _files(sources, split: str | None) -> list[Path]:
        sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        files = []
        for source in map(Path, sources):
            if source.is_dir():
                found = annotation_files(source, split)
                if not found:
                    raise FileNotFoundError(f"{source}: no {split + '.' if split else ''}<dataset>__coco.json "
                                            "files; give COCO files or a US-43d folder (split files need "
                                            "split='train', 'val' or 'test')")
                files.extend(found)
            elif source.is_file():
                files.append(source)
            else:
                raise FileNotFoundError(f"{source}: no such COCO file or folder")
        return files

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Change the object draw for images with more than ``max_objects`` objects."""
        self.epoch = int(epoch)

    def subset(self, indices: Sequence[int]) -> "CocoDataset":
        """A dataset of the records at ``indices`` (same settings; reading problems not carried over)."""
        subset = object.__new__(CocoDataset)
        subset.__dict__.update(self.__dict__, records=[self.records[i] for i in indices], problems=[])
        return subset

    def __getitem__(self, index: int) -> Sample:
        """The sample at ``index``; raises :class:`DataError` for a missing, unreadable or mismatched image."""
        record = self.records[index]
        rles = list(record.rles)
        if len(rles) > self.max_objects:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            rles = [rles[i] for i in np.sort(rng.choice(len(rles), self.max_objects, replace=False))]
        try:
            return read_sample(record, rles)
        except DataError as error:
            raise DataError(error.kind, error.detail, f"{record.dataset} image {record.path.name}") from None

