"""Write training data in US-43d's layout: 8-bit PNG images and class-agnostic COCO RLE masks.

One data set is a folder::

    <root>/<dataset>/images/<dataset>__<group>__<n>.png
    <root>/<dataset>/annotations/<dataset>__coco.json          (everything but official test)
    <root>/<dataset>/annotations/test.<dataset>__coco.json     (official test split, if any)

As UltraSam's converters do, each connected component (8-connected, scikit-image's default they
used) of each label is one instance, encoded with ``pycocotools.mask.encode`` and ``counts``
stored as a str. Images without any instance are not written. Image records carry three extra
keys: ``group`` (the volume or patient, for grouped splits), ``source`` (the file the image came
from) and ``index`` (its slice or frame number there, or -1).

The folder is built under a temporary name next to the target and renamed into place only when
every image and annotation file is written, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORY = {"id": 1, "name": "object", "supercategory": "none"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def annotation_file_name(dataset: str, subset: str = "") -> str:
    """US-43d's annotation file name: ``[<subset>.]<dataset>__coco.json``."""
    return f"{subset + '.' if subset else ''}{dataset}__coco.json"


def instance_masks(layer: np.ndarray) -> list[np.ndarray]:
    """Split an (H, W) label map into instances: each 8-connected component of each non-zero label.

    Returns:
        (H, W) bool masks, label by label in increasing order, components in raster order.
    """
    masks = []
    for value in np.unique(layer):
        if value == 0:
            continue
        binary = sitk.GetImageFromArray((layer == value).astype(np.uint8))
        components = sitk.GetArrayFromImage(sitk.ConnectedComponent(binary, True))
        masks.extend(components == n for n in range(1, int(components.max()) + 1))
    return masks


def encode_mask(mask: np.ndarray) -> dict:
    """COCO fields of one (H, W) bool mask: RLE ``segmentation`` (str counts), ``area``, ``bbox``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = int(mask_utils.area(rle))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"segmentation": rle, "area": area, "bbox": bbox}


def safe_name(name: str) -> str:
    """``name`` with anything but letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
    cleaned = _SAFE_NAME.sub("_", str(name)).strip("._")
    if not cleaned:
        raise ValueError(f"{name!r} cannot name a data set or group; use letters and digits")
    return cleaned


class CocoWriter:
    """Collects images and label maps of one data set and publishes the folder atomically.

    Use as a context manager; the folder appears only if the ``with`` block ends without error::

        with CocoWriter(root, "BUSBRA") as writer:
            writer.add(image, [mask], group="0001", source="bus_0001-l.png")

    Attributes:
        counts: images and instances written so far, keyed ``"<subset>/images"``,
            ``"<subset>/instances"`` (subset ``""`` is the main file), and ``"empty"``: images
            offered without any instance (empty slices of volumes: expected, not written).
        skipped: reason -> source items a converter left out (see :meth:`skip`).
    """

    def __init__(self, root: str | os.PathLike, dataset: str, overwrite: bool = False,
                 description: str = "", url: str = "") -> None:
        self.root = Path(root)
        self.dataset = safe_name(dataset)
        self.target = self.root / self.dataset
        self.overwrite = overwrite
        self.info = {"description": description or self.dataset, "url": url}
        self.counts: Counter = Counter()
        self.skipped: dict[str, list[str]] = {}
        self._files: dict[str, dict] = {}
        self._next_image_id = 0
        self._next_annotation_id = 1
        self._work: Path | None = None

    def __enter__(self) -> "CocoWriter":
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.target} already exists; choose another output folder or data set name, "
                "or allow overwriting it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        self._work = Path(tempfile.mkdtemp(prefix=f".{self.dataset}.partial-", dir=self.root))
        (self._work / "images").mkdir()
        (self._work / "annotations").mkdir()
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                self._publish()
        finally:
            if self._work is not None and self._work.exists():
                shutil.rmtree(self._work)

    def add(self, image: np.ndarray, layers: Sequence[np.ndarray], group: str, source: str = "",
            index: int = -1, subset: str = "") -> int:
        """Add one image with its instances; an image without any instance is skipped.

        Args:
            image: (H, W) or (H, W, 3) uint8, as the model will see it.
            layers: (H, W) integer label maps on the image's pixels (0 = background). Several layers
                may overlap (4D label channels, Slicer segments); each is split on its own.
            group: the volume, sequence or patient the image belongs to.
            source: the file the image was cut from (kept for tracing).
            index: slice or frame number in ``source``, -1 for a 2D source.
            subset: ``""`` for the main file, or e.g. ``"test"`` for an official test split.

        Returns:
            The number of instances written (0 when the image was skipped).
        """
        if self._work is None:
            raise RuntimeError("use CocoWriter inside a `with` block")
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image must be (H, W) or (H, W, 3) uint8, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        masks = []
        for layer in layers:
            if layer.shape != (height, width):
                raise ValueError(f"label map of shape {layer.shape} does not match the image ({height}, {width})")
            masks.extend(instance_masks(layer))
        if not masks:
            self.counts["empty"] += 1
            return 0
        record = self._add_image(image, group, source, index, subset)
        annotations = self._file(subset)["annotations"]
        for mask in masks:
            annotations.append({"id": self._next_annotation_id, "image_id": record["id"], "iscrowd": 0,
                                "category_id": CATEGORY["id"], **encode_mask(mask)})
            self._next_annotation_id += 1
        self.counts[f"{subset}/images"] += 1
        self.counts[f"{subset}/instances"] += len(masks)
        return len(masks)

    def skip(self, reason: str, item: str) -> None:
        """Record a source item left out and why (listed in the conversion summary)."""
        self.skipped.setdefault(reason, []).append(item)

    def _add_image(self, image: np.ndarray, group: str, source: str, index: int, subset: str) -> dict:
        image_id = self._next_image_id
        self._next_image_id += 1
        file_name = f"{self.dataset}__{safe_name(group)}__{image_id:05d}.png"
        Image.fromarray(image).save(self._work / "images" / file_name)
        record = {"id": image_id, "file_name": file_name, "height": int(image.shape[0]),
                  "width": int(image.shape[1]), "group": str(group), "source": str(source),
                  "index": int(index)}
        self._file(subset)["images"].append(record)
        return record

    def _file(self, subset: str) -> dict:
        if subset not in self._files:
            self._files[subset] = {"info": self.info, "images": [], "annotations": [], "categories": [CATEGORY]}
        return self._files[subset]

    def _publish(self) -> None:
        if not self._files:
            raise ValueError(f"{self.dataset}: no image has a non-empty mask; nothing to write")
        for subset, content in self._files.items():
            with open(self._work / "annotations" / annotation_file_name(self.dataset, subset), "w") as file:
                json.dump(content, file)
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.dataset}.old-", dir=self.root))
            os.replace(self.target, old / self.dataset)
        os.replace(self._work, self.target)
        if old is not None:
            shutil.rmtree(old)
