"""Segment whole volumes: one volume from its prompts, or many from one prompts file.

:func:`segment_volume` is what the ``ultrasam segment`` command and the Slicer effect call for a
3D volume; :func:`run_batch` runs it over every volume listed in a JSON or CSV prompts file.

Prompts file, JSON: a list of entries (or ``{"volumes": [...]}``), one per volume::

    {"volume": "case1.nii.gz",            # relative paths start at the prompts file's folder
     "output": "masks/case1.nii.gz",      # optional; default <output_dir>/<name>_mask.nii.gz
     "axis": "k",                         # optional: 0/1/2 (numpy axis) or k/j/i
     "frame": "ras",                      # frame of every position below: ras, lps or ijk
     "points": [[x, y, z], ...], "labels": [1, ...],
     "boxes": [[[x, y, z], [x, y, z]], ...],        # two opposite corners on one slice
     "rois": [{"center": [x, y, z], "half_sizes": [a, b, c],
               "axes": [[x-axis], [y-axis], [z-axis]]}]}   # axes optional (identity)

Prompts file, CSV: one point per row, columns ``volume,x,y,z,label`` and optionally ``frame``
(default ras), ``axis`` and ``output``; rows naming the same volume prompt it together.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ultrasam.atomic import check_writable, write_text_atomic
from ultrasam.content_checks import (SkipBlankSlices, blank_slices, check_volume_content,
                                     checked_key_prompts, result_warnings)
from ultrasam.geometry import Volume
from ultrasam.intensity import Window
from ultrasam.predictor import Predictor
from ultrasam.prompts3d import Roi, SliceBox, VolumePrompts
from ultrasam.propagation import Propagator, PropagationResult, SliceResult, StopRules
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_embeddings import VolumeEmbeddingCache, VolumeSlicePredictor
from ultrasam.volume_io import check_mask_path, full_suffix, read_volume, write_mask


def segment_volume(
    volume: Volume,
    predictor: Predictor,
    prompts: VolumePrompts,
    axis: int | str = 0,
    propagate: bool = True,
    window: Window | None = None,
    rules: StopRules = StopRules(),
    cache: VolumeEmbeddingCache | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_slice: Callable[[SliceResult], None] = lambda result: None,
    span: tuple[int, int] | None = None,
) -> tuple[np.ndarray, dict]:
    """Segment one object in a volume from prompts on one or more key slices.

    Args:
        volume: (K, J, I) voxels and geometry.
        predictor: the 2D model.
        prompts: points, 2D boxes and 3D ROIs, in ijk, ras or lps.
        axis: slicing axis: numpy axis 0/1/2 of the (K, J, I) array, or the letter k/j/i.
        propagate: extend from the key slices to the whole object; False segments key slices only.
        window: intensity window for all slices (None: :func:`ultrasam.intensity.choose_window`).
        rules: when propagation decides the object has ended.
        cache: slice embeddings to reuse (e.g. across runs on the same volume); a new one if None.
        should_cancel: polled before every slice; True raises PropagationCancelled.
        on_slice: called after every segmented slice (progress).
        span: inclusive (first, last) slice range propagation may reach (default: all slices).

    Returns:
        (K, J, I) uint8 mask (1 = object) in ``volume``'s geometry, and the report of
        :func:`volume_report` with its ``warnings`` (see :mod:`ultrasam.content_checks`).

    Raises:
        ValueError: no prompts, a blank or non-finite volume, or a prompt on a blank slice.
    """
    name = volume.name or "volume"
    if prompts.is_empty():
        raise ValueError(f"{name}: no prompts; give at least one point, box or ROI")
    warnings = check_volume_content(volume)
    slices = VolumeSlices(volume, axis, window)
    blank = blank_slices(slices)
    key_prompts = checked_key_prompts(slices, prompts, blank, name)
    cache = cache or VolumeEmbeddingCache(predictor)
    lookahead = predictor.batch_size if predictor.device.type == "cuda" else 1
    slice_predictor = SkipBlankSlices(VolumeSlicePredictor(slices, cache), slices, blank)
    propagator = Propagator(slice_predictor, slices.num_slices, rules, propagate, lookahead)
    result = propagator.run(key_prompts, should_cancel, on_slice, span)
    report = volume_report(slices, result)
    report["warnings"] = warnings + result_warnings(slices, report["slices"], result.masks(), rules.min_iou, blank,
                                                   key_prompts)
    return slices.to_volume(result.masks()), report


def volume_report(slices: VolumeSlices, result: PropagationResult) -> dict:
    """JSON-ready review of a run: one row per visited slice, how every walk ended, totals.

    Slice rows: ``index``, ``key`` (the key slice it came from), ``iou`` (predicted), ``area_px``,
    ``area_mm2`` and ``status``: "key", "propagated", or the stop rule that rejected the slice.
    """
    pixel_mm2 = float(np.prod(slices.pixel_spacing))
    rows = slice_rows(result.slices.values(), pixel_mm2)
    walks = [
        {"key": w.key, "direction": w.direction, "slices": len(w.steps), "last": w.steps[-1].index if w.steps else w.key,
         "end": w.end}
        for w in result.walks
    ]
    masks = result.masks()
    voxels = int(sum(int(m.sum()) for m in masks.values()))
    return {
        "volume": slices.volume.name,
        "axis": slices.axis,
        "window": list(slices.window),
        "key_slices": sorted({r.key for r in result.slices.values()}),
        "segmented_slices": sorted(masks),
        "voxels": voxels,
        "volume_ml": round(voxels * float(np.prod(slices.volume.geometry.spacing)) / 1000.0, 4),
        "slices": rows,
        "walks": walks,
    }


def slice_rows(results, pixel_mm2: float) -> list[dict]:
    """One report row per :class:`~ultrasam.propagation.SliceResult` (see :func:`volume_report`)."""
    return [
        {
            "index": r.index,
            "key": r.key,
            "iou": round(r.iou, 4),
            "area_px": r.area,
            "area_mm2": round(r.area * pixel_mm2, 3),
            "status": r.stop or ("key" if r.index == r.key else "propagated"),
        }
        for r in results
    ]


@dataclass
class Job:
    """One volume of a prompts file."""

    volume: Path
    prompts: VolumePrompts
    axis: int | str | None = None
    output: Path | None = None


def read_prompts_file(path: str | os.PathLike) -> list[Job]:
    """Read a JSON or CSV prompts file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found")
    try:
        if path.suffix.lower() == ".json":
            return _jobs_from_json(json.loads(path.read_text(encoding="utf-8")), path.parent)
        if path.suffix.lower() == ".csv":
            return _jobs_from_csv(path.read_text(encoding="utf-8"), path.parent)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a valid prompts file ({error}); see `ultrasam segment --help` for the format") from None
    raise ValueError(f"{path}: prompts file must end in .json or .csv")


def _jobs_from_json(data, folder: Path) -> list[Job]:
    entries = data["volumes"] if isinstance(data, dict) else data
    jobs = []
    for entry in entries:
        frame = entry.get("frame", "ras")
        prompts = VolumePrompts(
            points=entry.get("points", np.zeros((0, 3))),
            labels=entry.get("labels", np.ones(len(entry.get("points", [])), dtype=int)),
            frame=frame,
            boxes=[SliceBox(np.asarray(a, float), np.asarray(b, float), frame) for a, b in entry.get("boxes", [])],
            rois=[
                Roi(r["center"], np.asarray(r.get("axes", np.eye(3)), float).T, r["half_sizes"], frame)
                for r in entry.get("rois", [])
            ],
        )
        jobs.append(_job(folder, entry["volume"], prompts, entry.get("axis"), entry.get("output")))
    return jobs


def _jobs_from_csv(text: str, folder: Path) -> list[Job]:
    groups: dict[tuple, list[dict]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        key = (row["volume"], row.get("frame") or "ras", row.get("axis") or None, row.get("output") or None)
        groups.setdefault(key, []).append(row)
    jobs = []
    for (volume, frame, axis, output), rows in groups.items():
        points = [[float(row[c]) for c in "xyz"] for row in rows]
        prompts = VolumePrompts(points, [int(row["label"]) for row in rows], frame=frame)
        jobs.append(_job(folder, volume, prompts, int(axis) if axis and axis.isdigit() else axis, output))
    return jobs


def _job(folder: Path, volume: str, prompts: VolumePrompts, axis, output) -> Job:
    return Job(folder / volume, prompts, axis, folder / output if output else None)


def run_batch(
    prompts_file: str | os.PathLike,
    predictor: Predictor | None,
    output_dir: str | os.PathLike,
    axis: int | str = 0,
    propagate: bool = True,
    rules: StopRules = StopRules(),
    window: Window | None = None,
    progress: bool = True,
    segment: Callable[[Volume, VolumePrompts, int | str], tuple[np.ndarray, dict]] | None = None,
) -> list[dict]:
    """Segment every volume of ``prompts_file``; write masks, reports and a summary.

    Each volume gets its mask (input geometry) and ``<mask name>.report.json``; a volume that fails
    is recorded with its error and the others go on. ``summary.csv`` in ``output_dir`` lists all.
    ``segment(volume, prompts, axis) -> (mask, report)`` replaces :func:`segment_volume` with
    ``predictor`` (e.g. :func:`ultrasam.client.segment_on_server`; ``predictor`` is then None).

    Returns:
        One summary row per volume: volume, output, status ("ok" or "failed"), error, key and
        segmented slice counts, volume_ml, mean_iou, warnings (the report's, joined by "; "), seconds.
    """
    output_dir = Path(output_dir)
    jobs = read_prompts_file(prompts_file)
    outputs = [job.output or output_dir / f"{_stem(job.volume)}_mask.nii.gz" for job in jobs]
    clashes = sorted({str(p) for p in outputs if outputs.count(p) > 1})
    if clashes:
        raise ValueError(f"several volumes would write {clashes}; give each an 'output' in the prompts file")
    check_writable(output_dir / "summary.csv")
    if segment is None:
        cache = VolumeEmbeddingCache(predictor)

        def segment(volume, prompts, job_axis):
            cache.clear()  # volumes do not share slices; keep memory for the next one
            return segment_volume(volume, predictor, prompts, job_axis, propagate, window, rules, cache)

    summary = []
    for job, output in tqdm(list(zip(jobs, outputs)), desc="volumes", unit="vol", disable=not progress):
        summary.append(_run_job(job, output, segment, axis))
    write_text_atomic(output_dir / "summary.csv", _as_csv(summary))
    return summary


def _run_job(job: Job, output: Path, segment: Callable, axis: int | str) -> dict:
    start = time.perf_counter()
    row = {"volume": str(job.volume), "output": str(output), "status": "ok", "error": ""}
    try:
        volume = read_volume(job.volume)
        check_mask_path(output, volume.shape_kji[0])
        job_axis = axis if job.axis is None else job.axis
        mask, report = segment(volume, job.prompts, job_axis)
        write_mask(mask, volume.geometry, output)
        write_text_atomic(output.with_name(output.name + ".report.json"), json.dumps(report, indent=1))
        ious = [r["iou"] for r in report["slices"] if r["status"] in ("key", "propagated")]
        row.update(key_slices=len(report["key_slices"]), segmented_slices=len(report["segmented_slices"]),
                   volume_ml=report["volume_ml"], mean_iou=round(float(np.mean(ious)), 4) if ious else "",
                   warnings="; ".join(report["warnings"]))
    except (ValueError, IndexError, OSError) as error:
        row.update(status="failed", error=str(error))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _stem(path: Path) -> str:
    suffix = full_suffix(path)
    return path.name[: -len(suffix)] if suffix and path.name.lower().endswith(suffix) else path.name


def _as_csv(rows: list[dict]) -> str:
    columns = ["volume", "output", "status", "error", "key_slices", "segmented_slices", "volume_ml",
               "mean_iou", "warnings", "seconds"]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
