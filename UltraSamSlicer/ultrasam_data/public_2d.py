"""Converters for the 2D public data sets in ``shared/data``: BUS-BRA and HC18.

BUS-BRA (breast lesions): ``bus_XXXX-s.png`` images with ``mask_XXXX-s.png`` masks, anywhere under
the root (the release has ``Images``/``Masks``). ``5-fold-cv.csv`` is required: rows with
``kFold == 1`` form UltraSam's official test split (``test.BUSBRA__coco.json``), the rest the main
file. Groups are patients (``Case`` in ``bus_data.csv``, else the number in the ID), so the left
and right views of one lesion stay together.

HC18 (fetal head): ``NNN[_k]HC.png`` images with ``NNN[_k]HC_Annotation.png`` ellipse outlines one
pixel wide (a pre-filled mask is accepted too). The outline is filled; the result is checked
against ``pixel_size_and_HC.csv``: the perimeter of the ellipse with the filled mask's second
moments, in mm, must match the head circumference (and the semi-axes, when the CSV has them)
within ``HC18_TOLERANCE``. An outline that cannot be filled (open, e.g. cut by the image border)
fails that check and the image is skipped and counted, never written wrong. Groups are the
subject number ``NNN``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from tqdm import tqdm

from ultrasam_data.writer import CocoWriter

HC18_TOLERANCE = 0.05  # measured: the filled masks of the 400 shared images agree within 1.8 %


def read_grey(path: Path) -> np.ndarray:
    """(H, W) uint8 grey image (colour files are reduced by their maximum channel)."""
    array = np.asarray(Image.open(path))
    return array.max(axis=-1) if array.ndim == 3 else array


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _find_one(root: Path, name: str) -> Path:
    found = sorted(root.rglob(name))
    if not found:
        raise ValueError(f"{root}: no {name}; it comes with the data set's release, put it under this folder")
    return found[0]


def convert_busbra(root: str | os.PathLike, writer: CocoWriter) -> int:
    """Write BUS-BRA with the fold-1 test split; returns the number of images written."""
    root = Path(root)
    folds = {row["ID"]: row["kFold"].strip() for row in read_csv_rows(_find_one(root, "5-fold-cv.csv"))}
    cases = {}
    if list(root.rglob("bus_data.csv")):
        cases = {row["ID"]: row["Case"] for row in read_csv_rows(_find_one(root, "bus_data.csv"))}
    masks = {path.name.removeprefix("mask_"): path for path in root.rglob("mask_*.png")}
    images = sorted(root.rglob("bus_*.png"))
    if not images:
        raise ValueError(f"{root}: no bus_*.png images; give the BUS-BRA folder")
    written = 0
    for path in tqdm(images, desc=writer.dataset, unit="image"):
        image_id = path.stem
        key = path.name.removeprefix("bus_")
        if key not in masks or image_id not in folds:
            writer.skip("no mask or no row in 5-fold-cv.csv", path.name)
            continue
        group = cases.get(image_id) or re.sub(r"\D", "", image_id)
        subset = "test" if folds[image_id] == "1" else ""
        mask = read_grey(masks[key]) > 0
        written += writer.add(read_grey(path), [mask.astype(np.uint8)], group, path.name, subset=subset) > 0
    return written


def fill_outline(outline: np.ndarray) -> np.ndarray:
    """(H, W) bool: a closed outline with everything it encloses (a filled mask stays as it is)."""
    image = sitk.GetImageFromArray(outline.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)) > 0


def moment_ellipse(mask: np.ndarray) -> tuple[float, float]:
    """Semi-axes (a >= b, pixels) of the ellipse with the same second moments as a filled (H, W) mask."""
    rows, cols = np.nonzero(mask)
    if rows.size < 3:
        return 0.0, 0.0
    low, high = np.linalg.eigvalsh(np.cov(np.stack([cols, rows]).astype(np.float64), bias=True))
    return 2.0 * float(np.sqrt(max(high, 0.0))), 2.0 * float(np.sqrt(max(low, 0.0)))


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's second approximation of an ellipse's perimeter (relative error < 1e-9 here)."""
    h = ((a - b) / (a + b)) ** 2 if a + b > 0 else 0.0
    return float(np.pi * (a + b) * (1.0 + 3.0 * h / (10.0 + np.sqrt(4.0 - 3.0 * h))))


def hc18_mismatch(mask: np.ndarray, row: dict[str, str]) -> str:
    """Why a filled mask disagrees with its CSV row (head circumference, semi-axes), or ``""``."""
    a, b = moment_ellipse(mask)
    mm = float(row["pixel size(mm)"])
    expected = {"head circumference": (row.get("head circumference (mm)"), ellipse_perimeter(a, b) * mm),
                "semi-axis a": (row.get("semi_axes_a_mm"), a * mm), "semi-axis b": (row.get("semi_axes_b_mm"), b * mm)}
    for name, (reference, measured) in expected.items():
        if reference and abs(measured - float(reference)) > HC18_TOLERANCE * float(reference):
            return f"{name} {measured:.1f} mm, CSV says {float(reference):.1f} mm"
    return ""


def convert_hc18(root: str | os.PathLike, writer: CocoWriter) -> int:
    """Write HC18's training images with filled, CSV-checked head masks; returns images written."""
    root = Path(root)
    rows = {row["filename"]: row for row in read_csv_rows(_find_one(root, "pixel_size_and_HC.csv"))}
    outlines = {path.name.replace("_Annotation", ""): path for path in root.rglob("*HC_Annotation.png")}
    images = sorted(path for path in root.rglob("*HC.png"))
    if not images:
        raise ValueError(f"{root}: no *_HC.png images; give the HC18 training folder")
    written = 0
    for path in tqdm(images, desc=writer.dataset, unit="image"):
        if path.name not in outlines or path.name not in rows:
            writer.skip("no annotation or no row in pixel_size_and_HC.csv", path.name)
            continue
        mask = fill_outline(read_grey(outlines[path.name]) > 0)
        mismatch = hc18_mismatch(mask, rows[path.name])
        if mismatch:
            writer.skip("filled outline disagrees with the CSV (open outline?)", f"{path.name}: {mismatch}")
            continue
        group = path.name.split("_")[0]
        written += writer.add(read_grey(path), [mask.astype(np.uint8)], group, path.name) > 0
    return written
