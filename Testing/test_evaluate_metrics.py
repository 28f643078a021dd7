"""Evaluation scores against hand-computed values: Dice, IoU, the inscribed ellipse, the centroid
point, the summary and the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ultrasam.evaluation import centroid_point, corrective_click, dice, inscribed_ellipse, iou
from ultrasam.evaluation_report import summarise, write_results
from ultrasam.geometry import points_in_mask, share_inside_box


def test_dice_and_iou_of_small_masks():
    a = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    b = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)
    # intersection 2, |a| = |b| = 3, union 4
    assert dice(a, b) == pytest.approx(4 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)
    assert dice(a, a) == iou(a, a) == 1.0
    empty = np.zeros_like(a)
    assert dice(empty, a) == iou(empty, a) == 0.0
    assert dice(empty, empty) == iou(empty, empty) == 1.0


def test_ellipse_in_a_5x5_box_drops_the_four_corners():
    # Box on the pixel edges of a 5x5 square: centre (2, 2), semi-axes 2.5; a pixel centre is
    # inside when dx^2 + dy^2 <= 6.25: the corners (8) are out, (2, 1)-offsets (5) are in.
    box = (-0.5, -0.5, 4.5, 4.5)
    ellipse = inscribed_ellipse(box, (5, 5))
    expected = np.ones((5, 5), dtype=bool)
    expected[[0, 0, 4, 4], [0, 4, 0, 4]] = False
    np.testing.assert_array_equal(ellipse, expected)
    assert dice(ellipse, np.ones((5, 5), dtype=bool)) == pytest.approx(2 * 21 / (21 + 25))


def test_a_mask_that_is_the_inscribed_ellipse_scores_one():
    height, width, c0, r0, c1, r1 = 120, 160, 20, 30, 130, 89
    cx, cy, a, b = (c0 + c1) / 2, (r0 + r1) / 2, (c1 - c0 + 1) / 2, (r1 - r0 + 1) / 2
    y, x = np.mgrid[:height, :width]
    mask = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1
    rows, cols = np.nonzero(mask)
    assert (cols.min(), rows.min(), cols.max(), rows.max()) == (c0, r0, c1, r1)  # its tight box
    assert dice(inscribed_ellipse((c0 - 0.5, r0 - 0.5, c1 + 0.5, r1 + 0.5), mask.shape), mask) == 1.0


def test_a_full_rectangle_scores_the_area_ratio_of_an_ellipse():
    mask = np.zeros((500, 600), dtype=bool)
    mask[50:450, 100:400] = True  # 400 rows x 300 columns
    ellipse = inscribed_ellipse((99.5, 49.5, 399.5, 449.5), mask.shape)
    ratio = math.pi / 4
    assert dice(ellipse, mask) == pytest.approx(2 * ratio / (1 + ratio), abs=2e-3)
    assert not (ellipse & ~mask).any()


def test_centroid_point_of_a_convex_mask_is_the_centroid():
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 2:6] = True  # rows 1-2, columns 2-5
    point, moved = centroid_point(mask)
    np.testing.assert_allclose(point, [3.5, 1.5])
    assert not moved


def test_centroid_outside_a_ring_moves_to_the_nearest_mask_pixel():
    y, x = np.mgrid[:41, :41]
    distance = np.hypot(x - 20.3, y - 19.6)
    ring = (distance >= 8) & (distance <= 12)
    point, moved = centroid_point(ring)
    assert moved
    px, py = point.astype(int)
    assert ring[py, px] and np.allclose(point, [px, py])
    rows, cols = np.nonzero(ring)
    centre = [cols.mean(), rows.mean()]
    nearest = np.min(np.hypot(cols - centre[0], rows - centre[1]))
    assert np.hypot(px - centre[0], py - centre[1]) == pytest.approx(nearest)


def test_share_inside_box_counts_pixel_centres_in_the_box():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 16 pixels, columns and rows 2..5
    assert share_inside_box(mask, (1.5, 1.5, 5.5, 5.5)) == 1.0  # the tight box on pixel edges
    assert share_inside_box(mask, (1.5, 1.5, 3.5, 5.5)) == 0.5  # columns 2..3 only
    assert share_inside_box(mask, (6.5, 6.5, 9.5, 9.5)) == 0.0  # a box elsewhere
    assert share_inside_box(np.zeros((4, 4), bool), (0, 0, 2, 2)) == 1.0  # nothing predicted, nothing outside


def test_points_in_mask_reads_the_pixel_whose_centre_is_nearest():
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True  # row 1, column 2: the pixel centred at x = 2, y = 1
    clicks = [[2, 1], [2.4, 0.6], [2.6, 1], [4.5, 3.5], [-0.5, -0.5]]
    np.testing.assert_array_equal(points_in_mask(mask, clicks), [True, True, False, False, False])
    mask[3, 4] = mask[0, 0] = True  # the corners, reached from their outer half pixel
    assert points_in_mask(mask, [[4.5, 3.5], [-0.5, -0.5]]).all()


def test_corrective_clicks_go_to_the_deepest_pixel_of_the_larger_error():
    truth = np.zeros((40, 50), bool)
    truth[5:30, 5:30] = True
    assert corrective_click(truth.copy(), truth) is None
    spilled = truth.copy()
    spilled[10:15, 35:40] = True  # a 5 x 5 spill centred on row 12, column 37
    xy, label = corrective_click(spilled, truth)
    assert (xy.tolist(), label) == ([37.0, 12.0], 0)
    missed = spilled.copy()
    missed[11:18, 11:18] = False  # a deeper 7 x 7 hole centred on row 14, column 14: it goes first
    xy, label = corrective_click(missed, truth)
    assert (xy.tolist(), label) == ([14.0, 14.0], 1)
    edge = truth.copy()
    edge[0:3, 40:50] = True  # a spill on the image border: the border is an edge, the click stays inside
    xy, label = corrective_click(edge, truth)
    assert label == 0 and edge[int(xy[1]), int(xy[0])] and not truth[int(xy[1]), int(xy[0])] and xy[1] == 1


def _object(dataset, image, box, ellipse, point, inside=1.0):
    return {"dataset": dataset, "image": image, "object": 0, "box_dice": box, "box_iou": box / 2,
            "box_inside": inside, "ellipse_dice": ellipse, "point_dice": point, "point_iou": point / 2,
            "point_moved": False}


def test_summary_table_json_and_plot(tmp_path):
    objects = [_object("A", "1.png", 0.9, 0.8, 0.6, inside=0.96), _object("A", "2.png", 0.7, 0.9, 0.4, inside=0.5),
               _object("B", "1.png", 1.0, 1.0, 1.0)]
    volumes = [{"dataset": "V", "volume": "v.nii.gz", "dice3d": 0.5, "iou3d": 0.25}]
    summary = summarise(objects, volumes)
    assert summary["A"]["n"] == 2 and summary["A"]["images"] == 2
    assert summary["A"]["box_dice"] == {"mean": 0.8, "std": 0.1, "median": 0.8}
    assert summary["A"]["ellipse_dice"] == {"mean": 0.85, "std": 0.05, "median": 0.85}
    assert summary["A"]["box_inside"]["median"] == 0.73
    assert summary["V"] == {"kind": "volumes", "n": 1, "dice3d": {"mean": 0.5, "std": 0.0, "median": 0.5},
                            "iou3d": {"mean": 0.25, "std": 0.0, "median": 0.25}}
    results = {"model": "m", "datasets": summary, "objects": objects, "volumes": volumes}
    table = write_results(results, tmp_path / "out")
    assert "| A | 2 | 0.800 ± 0.100 | 0.850 ± 0.050 | 0.400 ± 0.050 | 0.730 | 0.500 ± 0.100 | 0.250 ± 0.050 |" in table
    assert "| V | 1 | 0.500 ± 0.000 | 0.250 ± 0.000 |" in table
    assert (tmp_path / "out" / "results.md").read_text(encoding="utf-8") == table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["datasets"] == summary
    with Image.open(tmp_path / "out" / "dice.png") as plot:
        assert plot.format == "PNG" and plot.width > 7 * 90  # 3 + 3 + 1 columns
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dice.png", "results.json", "results.md"]


def test_free_box_figures_count_only_the_objects_whose_box_found_a_free_place(tmp_path):
    objects = [{**_object("A", "1.png", 0.9, 0.8, 0.6), "free_inside": 1.0, "free_left": 0.0},
               {**_object("A", "2.png", 0.9, 0.8, 0.6), "free_inside": 0.2, "free_left": 1.0},
               {**_object("A", "3.png", 0.9, 0.8, 0.6), "free_inside": 0.4, "free_left": 1.0},
               {**_object("A", "4.png", 0.9, 0.8, 0.6), "free_inside": None, "free_left": None}]
    summary = summarise(objects, [])
    assert summary["A"]["free_boxes"] == 3
    assert summary["A"]["free_boxes_left"] == 2
    assert summary["A"]["free_inside"]["median"] == 0.4
    assert summary["A"]["free_left"]["mean"] == round(2 / 3, 4)
    table = write_results({"model": "m", "datasets": summary, "objects": objects, "volumes": []}, tmp_path)
    assert "| 0.400 | 2 of 3 |" in table


def test_corrective_click_figures_sum_over_objects(tmp_path):
    objects = [{**_object("A", "1.png", 0.9, 0.8, 0.6), "corrected_dice": 0.9, "negative_clicks": 2,
                "negatives_obeyed": 1},
               {**_object("A", "2.png", 0.9, 0.8, 0.6), "corrected_dice": 0.7, "negative_clicks": 1,
                "negatives_obeyed": 1},
               {**_object("B", "1.png", 0.9, 0.8, 0.6), "corrected_dice": 1.0, "negative_clicks": 0,
                "negatives_obeyed": 0}]
    summary = summarise(objects, [])
    assert (summary["A"]["negative_clicks"], summary["A"]["negatives_obeyed"]) == (3, 2)
    assert summary["A"]["corrected_dice"]["mean"] == 0.8
    table = write_results({"model": "m", "datasets": summary, "objects": objects, "volumes": []}, tmp_path)
    assert "| 0.800 ± 0.100 | 2 of 3 |" in table
    assert "| 1.000 ± 0.000 | – |" in table  # no negative click made: nothing to count
