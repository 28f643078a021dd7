"""``ultrasam evaluate``: Dice and IoU of any checkpoint on annotated images and volumes.

Every object is segmented through the same engine as ``ultrasam segment`` and the Slicer effect
(:class:`~ultrasam.predictor.Predictor`, its mode from the checkpoint), at the image's own
resolution, and scored against its ground-truth mask. Prompts, as UltraSam was tested:

- **box**: the object's tight box on pixel edges in the ``xy`` frame (integer values are pixel
  centres): a mask spanning columns ``c0..c1`` and rows ``r0..r1`` gives
  ``box_xyxy = (c0 - 0.5, r0 - 0.5, c1 + 0.5, r1 + 0.5)``, which is COCO's ``[x, y, w, h]`` as
  ``(x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5)``.
- **point**: one positive click at the mask's centroid; where the centroid's pixel is not in the
  mask (a non-convex or split object), the mask pixel nearest the centroid instead.
- **ellipse** (no model): the ellipse inscribed in the box prompt, the trivial answer a box
  already gives; every box figure is reported beside it.
- **prompt-following** (``box_inside``): the share of the box prompt's predicted pixels that lie
  inside that box, on the model's own mask (nothing clipped); 1.0 for an empty mask. A model that
  answers with something else than what the box points at scores low whatever its Dice.
- **free box** (``free_inside``, ``free_left``): the object's box moved the shortest distance to
  where it keeps 2 % of the image's long side from every object
  (:func:`ultrasam.free_boxes.nearest_free_box`), then the share of its predicted pixels inside
  it (1.0 for an empty mask) and whether that share is below ``LEFT_BOX`` (the mask left the
  box). A model drawn to the object it was moved off leaves the box. Absent (None) where no such
  place exists.
- **corrective clicks** (``corrected_dice``, ``negative_clicks``, ``negatives_obeyed``): after the
  point, up to ``CORRECTIONS`` more clicks as interactive benchmarks place them (RITM's and SAM's
  protocol): each on the pixel of the answer's error farthest from that error's edge, positive
  where the answer missed the object, negative where it spilled, and the prompt of all clicks so
  far segmented again. ``corrected_dice`` is the last answer's Dice; a negative click is obeyed
  when its pixel is out of the next answer. A model that ignores the clicks a user adds to fix
  its answer is caught here.
- **3D**: one positive click at the centroid (same rule) of the structure's middle slice along the
  slicing axis, propagated through the volume by :func:`ultrasam.batch.segment_volume`; Dice and
  IoU over the whole volume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ultrasam.free_boxes import nearest_free_box
from ultrasam.geometry import LEFT_BOX, Volume, points_in_mask, share_inside_box
from ultrasam.predictor import ImageEmbedding, Predictor, Prompt2D
from ultrasam.prompts3d import VolumePrompts
from ultrasam.slicing import VolumeSlices

CORRECTIONS = 2  # corrective clicks after the first point


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks of one shape (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks of one shape (1.0 when both are empty)."""
    union = int(np.logical_or(prediction, truth).sum())
    return 1.0 if union == 0 else int(np.logical_and(prediction, truth).sum()) / union


def inscribed_ellipse(box_xyxy: Sequence[float], shape_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies in the ellipse inscribed in ``box_xyxy`` (``xy`` frame)."""
    x0, y0, x1, y1 = map(float, box_xyxy)
    cx, cy, a, b = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    y, x = np.ogrid[: shape_hw[0], : shape_hw[1]]
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def centroid_point(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """UltraSam's point prompt for a non-empty (H, W) bool mask.

    Returns:
        ((2,) xy: the centroid, or the mask pixel nearest it when the centroid's pixel is outside
        the mask), and whether it was moved that way.
    """
    rows, cols = np.nonzero(mask)
    centre = np.array([cols.mean(), rows.mean()])
    x, y = np.rint(centre).astype(int)
    if mask[y, x]:
        return centre, False
    nearest = np.argmin((cols - centre[0]) ** 2 + (rows - centre[1]) ** 2)
    return np.array([cols[nearest], rows[nearest]], dtype=np.float64), True


def score_objects(masks: np.ndarray, boxes_xyxy: np.ndarray, predictor: Predictor | None,
                  embedding: ImageEmbedding | None = None) -> list[dict]:
    """Scores of every object of one image.

    Args:
        masks: (N, H, W) bool ground truth.
        boxes_xyxy: (N, 4) their tight boxes on pixel edges (see the module docstring).
        predictor, embedding: the model and this image's embedding; None scores the ellipse only.

    Returns:
        One dict per object: ``ellipse_dice``, the point prompt ``point_xy`` and ``point_moved``
        (see :func:`centroid_point`), and with a model ``box_dice``, ``box_iou``, ``box_inside``
        (:func:`share_inside_box`), ``point_dice``, ``point_iou``, ``free_inside`` and
        ``free_left`` (the free box), ``corrected_dice``, ``negative_clicks`` and
        ``negatives_obeyed`` (the corrective clicks: see the module docstring).
    """
    rows = []
    objects = np.any(masks, axis=0) if len(masks) else None
    margin = max(1, round(0.02 * max(masks.shape[1:]))) if len(masks) else 0
    for truth, box in zip(masks, boxes_xyxy):
        point, moved = centroid_point(truth)
        row = {"ellipse_dice": dice(inscribed_ellipse(box, truth.shape), truth), "point_xy": point.round(2).tolist(),
               "point_moved": moved}
        if predictor is not None:
            by_box = predictor.predict(embedding, Prompt2D(box_xyxy=box)).mask
            by_point = predictor.predict(embedding, Prompt2D(points_xy=[point], labels=[1])).mask
            row.update(box_dice=dice(by_box, truth), box_iou=iou(by_box, truth),
                       box_inside=share_inside_box(by_box, box), point_dice=dice(by_point, truth),
                       point_iou=iou(by_point, truth), **_free_box_scores(predictor, embedding, objects, box, margin),
                       **_corrected_scores(predictor, embedding, truth, point, by_point))
        rows.append(row)
    return rows


def _free_box_scores(predictor: Predictor, embedding: ImageEmbedding, objects: np.ndarray,
                     box_xyxy: np.ndarray, margin: int) -> dict:
    free = nearest_free_box(objects, box_xyxy, margin)
    if free is None:
        return {"free_inside": None, "free_left": None}
    mask = predictor.predict(embedding, Prompt2D(box_xyxy=free)).mask
    inside = share_inside_box(mask, free)
    return {"free_inside": inside, "free_left": float(inside < LEFT_BOX)}


def corrective_click(mask: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The next click on an (H, W) answer: ``(xy, label)`` at the pixel of its error farthest from
    the error's edge (the image border counts as an edge), label 1 on a missed pixel and 0 on a
    spilled one; None when the answer is right."""
    import cv2  # a dependency of the engine (UltraSam mode's resize)

    best = None
    for wrong, label in ((truth & ~mask, 1), (mask & ~truth, 0)):
        if not wrong.any():
            continue
        distance = cv2.distanceTransform(np.pad(wrong, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        row, column = np.unravel_index(int(distance.argmax()), distance.shape)
        if best is None or distance[row, column] > best[0]:
            best = (distance[row, column], np.array([column - 1, row - 1], dtype=np.float64), label)
    return None if best is None else (best[1], best[2])


def _corrected_scores(predictor: Predictor, embedding: ImageEmbedding, truth: np.ndarray, point: np.ndarray,
                      answer: np.ndarray) -> dict:
    points, labels = [point], [1]
    negatives = obeyed = 0
    for _ in range(CORRECTIONS):
        click = corrective_click(answer, truth)
        if click is None:
            break
        xy, label = click
        points.append(xy)
        labels.append(label)
        answer = predictor.predict(embedding, Prompt2D(points_xy=points, labels=labels)).mask
        if label == 0:
            negatives += 1
            obeyed += not points_in_mask(answer, xy)[0]
    return {"corrected_dice": dice(answer, truth), "negative_clicks": negatives, "negatives_obeyed": obeyed}


def evaluate_images(samples: Iterable, predictor: Predictor | None, total: int | None = None,
                    progress: bool = True) -> list[dict]:
    """Score every object of every sample; images are embedded in the predictor's batches.

    Args:
        samples: objects with ``image`` ((H, W[, 3]) uint8), ``masks`` ((N, H, W) bool),
            ``boxes_xyxy`` ((N, 4)), ``dataset`` and ``path`` (e.g. ``ultrasam_data.coco.Sample``).
        predictor: the model, or None for the ellipse baseline alone.
        total: number of samples, for the progress bar.

    Returns:
        One row per object: ``dataset``, ``image``, ``object`` (index in the image) and the scores
        of :func:`score_objects`.
    """
    rows = []
    batch_size = predictor.batch_size if predictor is not None else 1
    with tqdm(total=total, desc="images", unit="image", disable=not progress, file=sys.stderr) as bar:
        for chunk in _chunks(samples, batch_size):
            # each image is embedded once: no use keeping it in the predictor's cache
            images = [sample.image for sample in chunk]
            embeddings = [None] * len(chunk) if predictor is None else predictor.embed(images, cache=False)
            for sample, embedding in zip(chunk, embeddings):
                scores = score_objects(sample.masks, sample.boxes_xyxy, predictor, embedding)
                rows += [{"dataset": sample.dataset, "image": Path(sample.path).name, "object": n, **score}
                         for n, score in enumerate(scores)]
            bar.update(len(chunk))
    return rows


def _chunks(items: Iterable, size: int) -> Iterable[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def volume_prompt(slices: VolumeSlices, truth_kji: np.ndarray) -> tuple[VolumePrompts, int, bool]:
    """One positive click at the centroid of the structure's middle slice along ``slices.axis``.

    Args:
        truth_kji: (K, J, I) bool structure, non-empty.

    Returns:
        The prompt (frame ``ijk``), the key slice index and whether the point was moved onto the
        mask (see :func:`centroid_point`).
    """
    others = tuple(a for a in range(3) if a != slices.axis)
    extent = np.flatnonzero(truth_kji.any(axis=others))
    middle = int(extent[len(extent) // 2])
    point, moved = centroid_point(slices.slice_mask(truth_kji, middle))
    return VolumePrompts(slices.slice_to_ijk(middle, [point]), [1], frame="ijk"), middle, moved


def evaluate_volume(volume: Volume, truth_kji: np.ndarray, predictor: Predictor, axis: int | str = 0) -> dict:
    """3D Dice and IoU after propagation from :func:`volume_prompt`.

    Args:
        volume: the image, (K, J, I) voxels and geometry.
        truth_kji: (K, J, I) bool structure on the volume's grid.

    Returns:
        ``dice3d``, ``iou3d``, ``key_slice``, ``point_ijk``, ``point_moved``, ``segmented_slices``.
    """
    from ultrasam.batch import segment_volume  # imports the 3D stack only when a volume is scored

    truth_kji = truth_kji.astype(bool)
    if not truth_kji.any():
        raise ValueError(f"{volume.name or 'volume'}: the label holds no voxel of the structure; "
                         "check --label-channel")
    slices = VolumeSlices(volume, axis)
    prompts, key, moved = volume_prompt(slices, truth_kji)
    mask, report = segment_volume(volume, predictor, prompts, axis=slices.axis)
    mask = mask.astype(bool)
    return {"dice3d": dice(mask, truth_kji), "iou3d": iou(mask, truth_kji), "key_slice": key,
            "point_ijk": prompts.points[0].round(2).tolist(), "point_moved": moved,
            "segmented_slices": len(report["segmented_slices"])}


def evaluate_volumes(pairs: Sequence, dataset: str, predictor: Predictor, axis: int | str, channel: int,
                     progress: bool = True) -> list[dict]:
    """:func:`evaluate_volume` on every (image, label) pair; one row per volume."""
    from ultrasam.evaluation_data import read_volume_pair

    rows = []
    for pair in tqdm(pairs, desc=dataset, unit="volume", disable=not progress, file=sys.stderr):
        volume, truth = read_volume_pair(pair, channel)
        rows.append({"dataset": dataset, "volume": Path(pair.image).name,
                     **evaluate_volume(volume, truth, predictor, axis)})
    return rows


# ---- command line ------------------------------------------------------------------------------
EXAMPLES = """\
examples:
  # the ellipse baseline alone (no model): BUS-BRA fold-1 test and all of HC18, raw folders
  ultrasam evaluate ../shared/data/busbra ../shared/data/hc18 --baseline-only -o eval/baseline
  # a checkpoint on BUS-BRA fold 1, HC18 and the simulated prostate volumes (3D, label channel 0)
  ultrasam evaluate ../shared/data/busbra ../shared/data/hc18 ../shared/data/mrus3d \\
      -c model.pth -o eval/model --work-dir eval/converted
  # any US-43d folder or COCO file, 20 images per data set, the val split files
  ultrasam evaluate data/US43d --split val --limit 20 -c UltraSam.pth -o eval/us43d
"""


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``ultrasam`` command's subparsers."""
    from ultrasam.model_options import add_model_options
    from ultrasam.evaluation_data import SPLITS

    parser = subparsers.add_parser(
        "evaluate", help="Dice/IoU of a checkpoint on annotated images and volumes",
        description="Dice and IoU per data set with the GT box and with one click at each object's centroid, "
                    "the Dice of the ellipse inscribed in the box beside every box figure, and 3D Dice after "
                    "propagation from one click on the middle slice. Protocol: docs/EVALUATION.md.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", help="COCO file (US-43d style), US-43d folder, raw BUS-BRA or HC18 "
                        "folder, or a folder with images/ and labels/ volumes (3D)")
    parser.add_argument("-o", "--output-dir", required=True, help="folder for results.json, results.md, dice.png")
    parser.add_argument("--split", choices=SPLITS, default="auto",
                        help="annotation files of a folder: auto (a data set's test split where it has one, "
                        "else its main file), main (<dataset>__coco.json), train, val or test")
    parser.add_argument("--limit", type=int, help="at most N images (volumes) per data set, first in file order")
    parser.add_argument("--baseline-only", action="store_true", help="score the inscribed-ellipse baseline only "
                        "(no model needed; 3D data is skipped)")
    parser.add_argument("--work-dir", help="keep raw BUS-BRA/HC18 folders converted here and reuse them "
                        "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--axis", default="k", help="slicing axis of volumes: k, j, i or numpy 0, 1, 2")
    parser.add_argument("--label-channel", type=int, default=0, help="structure of a 4D label volume (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate, write ``results.json``, ``results.md`` and ``dice.png``, print the table."""
    from ultrasam.model_options import predictor_from_args  # the CLI's choice of model, so results match it
    from ultrasam.evaluation_data import ImageSet, open_sources
    from ultrasam.evaluation_report import summarise, write_results

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    predictor, description = (None, "none (ellipse baseline only)") if args.baseline_only else predictor_from_args(args)
    print(f"model: {description}", file=sys.stderr)
    progress = not args.no_progress
    images, volumes = [], []
    with open_sources(args.data, args.split, args.work_dir) as sets:
        for data_set in sets:
            if isinstance(data_set, ImageSet):
                images += evaluate_images(data_set.samples(args.limit), predictor, data_set.count(args.limit),
                                          progress)
            elif predictor is None:
                print(f"{data_set.name}: volumes skipped, 3D scores need a model", file=sys.stderr)
            else:
                pairs = data_set.pairs[: args.limit]
                volumes += evaluate_volumes(pairs, data_set.name, predictor, args.axis, args.label_channel, progress)
        sources = [data_set.describe() for data_set in sets]
    options = {key: value for key, value in vars(args).items() if key != "run"}
    results = {"model": description, "options": options, "sources": sources,
               "datasets": summarise(images, volumes), "objects": images, "volumes": volumes}
    table = write_results(results, Path(args.output_dir))
    print(table)
    return 0

