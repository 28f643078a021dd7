"""``ultrasam evaluate`` end to end: a perfect model scores 1.0 in 2D and 3D, a tiny random SAM runs
on real BUS-BRA images and matches segment_anything's SamPredictor, bad inputs say what to do."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from conftest import shared_path
from evaluate_oracle import OraclePredictor, edge_box
from ultrasam import evaluation
from ultrasam.checkpoint import save_checkpoint
from ultrasam.evaluation import dice, evaluate_images, evaluate_volume, inscribed_ellipse
from ultrasam.evaluation_data import open_sources, read_volume_pair, volume_set
from ultrasam.evaluation_report import markdown, summarise
from ultrasam.predictor import Prediction, Prompt2D
from ultrasam.slicing import VolumeSlices
from ultrasam_data.writer import CocoWriter


def run_cli(argv: list[str]) -> int:
    """``ultrasam evaluate ...`` through the parser the CLI registers."""
    parser = argparse.ArgumentParser(prog="ultrasam")
    evaluation.add_evaluate_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["evaluate", *argv])
    return args.run(args)


def synthetic_labels(height: int = 90, width: int = 120) -> np.ndarray:
    """Label map: label 1 in two separate blobs (two objects), label 2 a C shape (centroid outside)."""
    y, x = np.mgrid[:height, :width]
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[10:30, 10:40] = 1
    labels[((x - 95) / 15) ** 2 + ((y - 20) / 10) ** 2 <= 1] = 1
    ring = (np.hypot(x - 60, y - 62) >= 12) & (np.hypot(x - 60, y - 62) <= 20)
    labels[ring & (x < 72)] = 2
    return labels


def test_a_perfect_model_scores_one_with_box_and_centroid_prompts(tmp_path):
    rng = np.random.default_rng(0)
    with CocoWriter(tmp_path, "Shapes") as writer:
        for n in range(4):
            image = rng.integers(0, 256, (90, 120), dtype=np.uint8)
            writer.add(image, [np.roll(synthetic_labels(), 3 * n, axis=1)], group=str(n), subset="test" if n else "")
    with open_sources([tmp_path / "Shapes"], split="auto") as sets:
        (shapes,) = sets
        assert shapes.count() == 3  # auto: the test split, 3 images of 3 objects
        samples = list(shapes.samples())
    oracle = OraclePredictor([(s.image, s.masks) for s in samples])
    rows = evaluate_images(samples, oracle, progress=False)
    assert len(rows) == 9 and {r["image"] for r in rows} == {s.path.name for s in samples}
    for key in ("box_dice", "box_iou", "point_dice", "point_iou"):
        assert [r[key] for r in rows] == [1.0] * 9, key
    assert sum(r["point_moved"] for r in rows) == 3  # the C shapes
    summary = summarise(rows, [])
    assert "nearest object pixel instead: Shapes 3 of 9." in markdown({"model": "oracle", "datasets": summary})
    boxes = [p.box_xyxy for p in oracle.prompts if p.box_xyxy is not None]
    truth_boxes = [edge_box(m) for s in samples for m in s.masks]
    np.testing.assert_allclose(boxes[0::2], truth_boxes)  # each object's box, then its free box
    for free, truth in zip(boxes[1::2], truth_boxes):  # the same size, clear of every object
        np.testing.assert_allclose(free[2:] - free[:2], truth[2:] - truth[:2])
    assert [(r["free_inside"], r["free_left"]) for r in rows] == [(1.0, 0.0)] * 9  # nothing named, nothing drawn
    for row, sample_mask in zip(rows, (m for s in samples for m in s.masks)):
        assert row["ellipse_dice"] == pytest.approx(dice(inscribed_ellipse(edge_box(sample_mask), sample_mask.shape),
                                                         sample_mask))


class _FirstObjectPredictor(OraclePredictor):
    """Ignores its prompt: answers every prompt with the image's first object (the salient blob)."""

    def predict(self, embedding, prompt, mask_input=None, refine=None):
        first = self.truth[embedding.key][0].copy()
        return Prediction(first, 0.95, torch.zeros(1, 1, 256, 256))


def test_a_model_that_ignores_its_box_leaves_the_free_box():
    labels = synthetic_labels()
    image = np.random.default_rng(1).integers(0, 256, labels.shape, dtype=np.uint8)
    masks = np.stack([labels == 1, labels == 2])
    masks[0, :, 60:] = False  # the rectangle alone
    sample = SimpleNamespace(image=image, masks=masks, boxes_xyxy=np.stack([edge_box(m) for m in masks]),
                             dataset="Shapes", path=Path("shapes.png"))
    rows = evaluate_images([sample], _FirstObjectPredictor([(image, masks)]), progress=False)
    assert [(r["free_inside"], r["free_left"]) for r in rows] == [(0.0, 1.0)] * 2
    assert rows[1]["box_inside"] < 0.2  # the C shape's own box holds little of the first object


class _SpillingPredictor(OraclePredictor):
    """Answers a point on an object with that object plus a fixed spill; drops the spill for a
    negative click in it when ``obeys``, else ignores it."""

    def __init__(self, truth, spill: np.ndarray, obeys: bool) -> None:
        super().__init__(truth)
        self.spill, self.obeys = spill, obeys

    def predict(self, embedding, prompt, mask_input=None, refine=None):
        if prompt.points_xy is None:
            return super().predict(embedding, prompt, mask_input, refine)
        self.prompts.append(prompt)
        answer = super().predict(embedding, Prompt2D(points_xy=prompt.points_xy[:1], labels=prompt.labels[:1]))
        negatives = [xy for xy, label in zip(prompt.points_xy, prompt.labels) if label == 0]
        told = self.obeys and any(self.spill[int(y), int(x)] for x, y in negatives)
        return Prediction(answer.mask | (self.spill & ~told), 0.95, torch.zeros(1, 1, 256, 256))


@pytest.mark.parametrize("obeys", [True, False])
def test_a_model_that_ignores_a_negative_click_is_counted(obeys):
    labels = synthetic_labels()
    image = np.random.default_rng(2).integers(0, 256, labels.shape, dtype=np.uint8)
    masks = (labels == 2)[None]
    spill = np.zeros(labels.shape, bool)
    spill[70:79, 95:104] = True  # 9 x 9, clear of the C shape
    sample = SimpleNamespace(image=image, masks=masks, boxes_xyxy=np.stack([edge_box(masks[0])]),
                             dataset="Shapes", path=Path("shapes.png"))
    predictor = _SpillingPredictor([(image, masks)], spill, obeys)
    (row,) = evaluate_images([sample], predictor, progress=False)
    assert row["point_dice"] == pytest.approx(dice(masks[0] | spill, masks[0]))
    clicks = [p for p in predictor.prompts if p.points_xy is not None and len(p.points_xy) > 1]
    np.testing.assert_allclose(clicks[0].points_xy[1], [99.0, 74.0])  # the spill's centre, its deepest pixel
    assert list(clicks[0].labels) == [1, 0]
    if obeys:
        assert (row["corrected_dice"], row["negative_clicks"], row["negatives_obeyed"]) == (1.0, 1, 1)
        assert len(clicks) == 1  # right after one correction: no second click
    else:
        assert (row["corrected_dice"], row["negative_clicks"], row["negatives_obeyed"]) == (row["point_dice"], 2, 0)


def test_split_choice_and_limit(tmp_path):
    with CocoWriter(tmp_path, "Shapes") as writer:
        for n in range(5):
            subset = "val" if n < 2 else ""
            writer.add(np.full((90, 120), n, np.uint8), [synthetic_labels()], group=str(n), subset=subset)
    with open_sources([tmp_path], split="val") as sets:
        assert [(s.name, s.count(), s.count(1)) for s in sets] == [("Shapes", 2, 1)]
    with open_sources([tmp_path], split="auto") as sets:  # no test file: the main one
        assert [s.count() for s in sets] == [3]
    with pytest.raises(FileNotFoundError, match="no test.<dataset>__coco.json"):
        with open_sources([tmp_path], split="test"):
            pass


MRUS3D = "mrus3d"


def test_a_perfect_model_propagated_from_one_point_gives_3d_dice_one():
    folder = shared_path(MRUS3D)
    pair = volume_set(folder).pairs[0]
    volume, gland = read_volume_pair(pair, channel=0)
    slices = VolumeSlices(volume, "k")
    oracle = OraclePredictor([(slices.image(i), slices.slice_mask(gland, i)[None]) for i in range(slices.num_slices)])
    result = evaluate_volume(volume, gland, oracle, axis="k")
    occupied = np.flatnonzero(gland.any(axis=(1, 2)))
    assert result["key_slice"] == occupied[len(occupied) // 2]
    assert result["dice3d"] == result["iou3d"] == 1.0
    assert result["segmented_slices"] == len(occupied)
    with pytest.raises(ValueError, match="label channel 6 asked for, the file has 6"):
        read_volume_pair(pair, channel=6)


def busbra_fold1_coco(root, count: int = 3):
    """A US-43d folder of the first ``count`` BUS-BRA fold-1 images, and their raw masks."""
    busbra = shared_path("busbra")
    with open(busbra / "5-fold-cv.csv", newline="") as file:
        ids = [row["ID"] for row in csv.DictReader(file) if row["kFold"].strip() == "1"][:count]
    masks = [np.asarray(Image.open(busbra / "masks" / f"mask_{i.removeprefix('bus_')}.png")) > 0 for i in ids]
    with CocoWriter(root, "BUSBRA") as writer:
        for image_id, mask in zip(ids, masks):
            image = np.asarray(Image.open(busbra / "images" / f"{image_id}.png").convert("L"))
            writer.add(image, [mask.astype(np.uint8)], group=image_id, subset="test")
    return root / "BUSBRA", masks


def test_tiny_random_sam_on_real_busbra_images_and_volumes_matches_sam_predictor(tmp_path, tiny_sam):
    data, masks = busbra_fold1_coco(tmp_path / "data")
    volumes = shared_path(MRUS3D)
    checkpoint = save_checkpoint(tmp_path / "tiny.pth", tiny_sam)  # own format: SAM's rules
    assert run_cli([str(data), str(volumes), "--limit", "3", "-c", str(checkpoint), "-o", str(tmp_path / "out"),
                    "--device", "cpu", "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = results["objects"]
    assert len(rows) == 3 and results["datasets"]["BUSBRA"]["n"] == 3
    assert [v["volume"] for v in results["volumes"]] == ["obs000.nii.gz", "obs001.nii.gz", "obs002.nii.gz"]
    for row in results["volumes"]:
        _, gland = read_volume_pair(volume_set(volumes).pairs[int(row["volume"][3:6])], channel=0)
        occupied = np.flatnonzero(gland.any(axis=(1, 2)))
        assert row["key_slice"] == occupied[len(occupied) // 2] and 0 <= row["dice3d"] <= 1
    assert "| BUSBRA | 3 |" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
    with Image.open(tmp_path / "out" / "dice.png") as plot:
        assert plot.format == "PNG"
    with open_sources([data]) as sets:
        images = [s.image for s in sets[0].samples()]
    reference = SamPredictor(tiny_sam)
    for row, image, mask in zip(rows, images, masks):
        rows_, cols = np.nonzero(mask)
        box = np.array([cols.min() - 0.5, rows_.min() - 0.5, cols.max() + 0.5, rows_.max() + 0.5])
        assert row["ellipse_dice"] == pytest.approx(dice(inscribed_ellipse(box, mask.shape), mask))
        reference.set_image(image)
        by_box = reference.predict(box=box, multimask_output=False)[0][0]
        assert row["box_dice"] == pytest.approx(dice(by_box, mask), abs=0.01)
        centre = np.array([[cols.mean(), rows_.mean()]])
        assert not row["point_moved"] and row["point_xy"] == pytest.approx(centre[0], abs=0.005)
        by_point, scores, _ = reference.predict(point_coords=centre, point_labels=np.array([1]))
        assert row["point_dice"] == pytest.approx(dice(by_point[int(np.argmax(scores))], mask), abs=0.01)


def test_bad_inputs_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such COCO file or folder"):
        with open_sources([tmp_path / "missing"]):
            pass
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        run_cli([str(tmp_path), "--baseline-only", "--limit", "0", "-o", str(tmp_path / "out")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "height": 4, "width": 4}],
                               "annotations": [{"id": 1, "image_id": 1, "segmentation": "not a mask"}]}))
    with pytest.raises(ValueError, match="no usable annotated image"):
        run_cli([str(bad), "--baseline-only", "-o", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written when the run fails


def test_baseline_only_needs_no_model(tmp_path):
    with CocoWriter(tmp_path, "Shapes") as writer:
        writer.add(np.zeros((90, 120), np.uint8), [synthetic_labels()], group="0")
    assert run_cli([str(tmp_path / "Shapes"), "--baseline-only", "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["datasets"]["Shapes"]["n"] == 3 and "box_dice" not in results["datasets"]["Shapes"]
    assert isinstance(results["datasets"]["Shapes"]["ellipse_dice"]["mean"], float)


def test_ultrasam_own_coco_sample_is_read_as_published():
    """UltraSam's own sample file (MMOTU-2D, RGB images beside the JSON); the baseline is checked
    against masks decoded here with pycocotools."""
    import ast

    from pycocotools import mask as mask_utils

    coco = shared_path("us43d_sample", "sample_coco_MMOTU2D.json")
    expected = []
    for annotation in json.loads(coco.read_text())["annotations"]:
        rle = annotation["segmentation"]
        rle = ast.literal_eval(rle) if isinstance(rle, str) else rle  # a Python-repr string in some files
        mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
        expected.append(dice(inscribed_ellipse(edge_box(mask), mask.shape), mask))
    with open_sources([coco]) as sets:
        rows = evaluate_images(sets[0].samples(), None, progress=False)
    assert len(rows) == len(expected) == 10
    assert sorted(r["ellipse_dice"] for r in rows) == pytest.approx(sorted(expected))
