"""The compact model shipped with the package: small, loadable, the default without UltraSam
weights, and as accurate on real held-out ultrasound as when it was trained.

The regression check runs ``ultrasam evaluate`` (the whole engine: reading, prompts, resize,
encoder, decoder, UltraSam's two passes, post-processing, metrics) on twelve real images the model
never saw (``Testing/fixtures/regression``) and compares the mean Dice with the figures measured
when the model was shipped (same command, float32 on a CPU). A change anywhere in that chain that
moves a mean by more than ``MARGIN`` fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REGRESSION_FIXTURES, shared_path
from ultrasam.checkpoint import load_model
from ultrasam.cli import main
from ultrasam.geometry import share_inside_box
from ultrasam.resources import LITEMEDSAM, SHIPPED_MODEL, model_path

MAX_BYTES = 25 * 1024 * 1024
MARGIN = 0.01
# Mean per data set, from `ultrasam evaluate Testing/fixtures/regression/BUSBRA
# Testing/fixtures/regression/HC --device cpu --precision float32 -c compact-v3.pth` (2 December 2026).
# box_inside: the share of each box prompt's mask inside its box (prompt-following). free_left: the
# share of free boxes (each box moved clear of every object) whose mask left them; compact-v2 scored
# 2 of 6 (BUSBRA) and 2 of 4 (HC) here. corrected_dice: after up to two corrective clicks (prompts
# of several points, positive and negative).
RECORDED = {
    "BUSBRA": {"box_dice": 0.9109, "point_dice": 0.8611, "ellipse_dice": 0.8618, "box_inside": 0.9965,
               "free_left": 0.0, "corrected_dice": 0.8133},
    "HC": {"box_dice": 0.9477, "point_dice": 0.8422, "ellipse_dice": 0.9735, "box_inside": 0.9960,
           "free_left": 0.0, "corrected_dice": 0.8158},
}


def test_shipped_model_is_small_float16_and_loads_with_its_training_rules():
    assert SHIPPED_MODEL.is_file() and SHIPPED_MODEL.stat().st_size <= MAX_BYTES
    stored = torch.load(SHIPPED_MODEL, weights_only=True)["model"]
    assert {tensor.dtype for tensor in stored.values() if tensor.is_floating_point()} == {torch.float16}
    loaded = load_model(SHIPPED_MODEL)
    assert loaded.info["postprocess"] == "refine"  # trained with the refine round, so run with it
    assert loaded.config == load_model(model_path(LITEMEDSAM)).config  # LiteMedSAM's architecture


def test_evaluate_on_held_out_real_images_matches_the_recorded_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))  # the default model must be the shipped one
    out = tmp_path / "eval"
    assert main(["evaluate", str(REGRESSION_FIXTURES / "BUSBRA"), str(REGRESSION_FIXTURES / "HC"), "--device", "cpu",
                 "--precision", "float32", "-o", str(out)]) == 0
    assert "compact model shipped" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for dataset, figures in RECORDED.items():
        measured = results["datasets"][dataset]
        assert measured["n"] == 6
        for key, recorded in figures.items():
            assert measured[key]["mean"] == pytest.approx(recorded, abs=MARGIN), (dataset, key)


def test_training_configs_in_docs_fine_tune_litemedsam_with_its_encoder_unchanged():
    """compact-v3's recipe resumes compact-v2's run (docs/MODEL_CARD.md): the same settings, more steps,
    and boxes on object-free tissue."""
    from dataclasses import replace

    from ultrasam_training.config import load_config

    docs = Path(__file__).resolve().parents[1] / "docs"
    first, resumed = (load_config(docs / f"compact-{name}.train.json") for name in ("v2", "v3"))
    assert (first.model.init, first.model.checkpoint, first.model.frozen_encoder) == ("checkpoint", LITEMEDSAM, True)
    assert (first.prompts.free_box_probability, resumed.prompts.free_box_probability) == (0.0, 0.5)
    assert resumed.run.steps > first.run.steps
    assert replace(resumed, output_dir=first.output_dir, run=first.run, prompts=first.prompts) == first
    assert replace(resumed.prompts, free_box_probability=0.0) == first.prompts
    assert replace(resumed.run, steps=first.run.steps) == first.run
    shipped, base = load_model(SHIPPED_MODEL).model.state_dict(), load_model(model_path(LITEMEDSAM)).model.state_dict()
    encoder = [name for name in base if name.startswith("image_encoder.")]
    as_shipped = {name: base[name].half().to(base[name].dtype) if base[name].is_floating_point() else base[name]
                  for name in encoder}
    assert encoder and all(torch.equal(shipped[name], as_shipped[name]) for name in encoder)
    assert not torch.equal(shipped["mask_decoder.iou_token.weight"], base["mask_decoder.iou_token.weight"].half().float())


def test_demo_follows_its_box_on_the_bundled_volume_with_the_shipped_model(tmp_path, monkeypatch, capsys):
    """Offline, the demo runs compact-v3 and says so; its mask stays in the box on the prompted slice and
    on the imaged fan through the volume. (compact-v1 put 105 of its 131 voxels on the black background
    outside the fan.) The volume has no reference mask: docs/demo.png shows the answer."""
    import SimpleITK as sitk

    from ultrasam.resources import SAMPLE_BOX_IJK, SAMPLE_VOLUME

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))
    out = tmp_path / "demo.seg.nrrd"
    assert main(["demo", "-o", str(out), "--device", "cpu", "--precision", "float32"]) == 0
    assert "compact model shipped" in capsys.readouterr().err
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(bool)
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_VOLUME)))
    assert mask.shape == volume.shape == (288, 256, 256)
    i0, j0, k, i1, j1, _ = SAMPLE_BOX_IJK
    prompted = mask[k]
    assert prompted.sum() > 0.25 * (i1 - i0) * (j1 - j0)  # an object, not a speck
    assert prompted[j0:j1 + 1, i0:i1 + 1].sum() >= 0.99 * prompted.sum()
    assert (mask & (volume == 0)).sum() <= 0.01 * mask.sum()  # on the imaged fan, not the black outside
    assert mask.any(axis=(1, 2)).sum() > 10  # followed through the volume


def test_each_box_on_one_real_image_follows_its_own_lesion():
    """Two held-out breast lesions side by side in one image (the left and right views of each of the
    three BUS-BRA regression patients), one box each: the median share of a mask inside its box is at
    least 0.95 (issue 16's prompt-following measure; compact-v1 scores 0.07 here), and every mask
    overlaps its own lesion more than the other one."""
    from ultrasam.predictor import Prompt2D
    from ultrasam_data.coco import CocoDataset

    predictor = _shipped_predictor()
    lesions = CocoDataset(REGRESSION_FIXTURES / "BUSBRA")
    shares = []
    for left, right in ((lesions[i], lesions[i + 1]) for i in range(0, len(lesions), 2)):
        image, truths, boxes = _side_by_side(left, right)
        embedding = predictor.set_image(image)
        for box, truth, other in zip(boxes, truths, truths[::-1]):
            mask = predictor.predict(embedding, Prompt2D(box_xyxy=box)).mask
            shares.append(share_inside_box(mask, box))
            assert (mask & truth).sum() > (mask & other).sum()
    assert len(shares) == 6 and np.median(shares) >= 0.95


def test_a_box_on_tissue_without_a_lesion_keeps_its_mask_inside():
    """compact-v2 failed here (every training box held an object, so a box on lesion-free tissue was
    pulled towards the lesion); compact-v3 trained with boxes on object-free tissue (docs/MODEL_CARD.md)."""
    from ultrasam.predictor import Prompt2D
    from ultrasam_data.coco import CocoDataset

    predictor = _shipped_predictor()
    sample = CocoDataset(REGRESSION_FIXTURES / "BUSBRA")[0]
    free = _box_away_from(sample.masks[0], sample.image.shape[:2])
    mask = predictor.predict(predictor.set_image(sample.image[..., 0]), Prompt2D(box_xyxy=free)).mask
    assert share_inside_box(mask, free) >= 0.95  # 1.0 for an empty mask


@pytest.mark.parametrize("image, box, warned", [
    # MMOTU-2D tumour 9: compact-v3 puts 57 % of its box mask outside the box (box Dice 0.43, MODEL_CARD.md)
    ("us43d_sample/sample_images/test.MMOTU_2d__00009.png", (547.5, 118.5, 609.5, 241.5), True),
    # a bundled held-out BUS-BRA lesion, its true box: followed (regression figures above)
    ("BUSBRA__7__00011.png", None, False),
])
def test_the_user_is_warned_when_the_mask_leaves_the_box(image, box, warned, tmp_path, monkeypatch, capsys):
    """The runtime prompt-following check on the real model and real images (``ultrasam segment``,
    which the effect's session shares): a box the model answers with a neighbouring structure is
    reported to the user, a box it follows is not."""
    from ultrasam_data.coco import CocoDataset

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))
    if box is None:
        sample = next(s for s in CocoDataset(REGRESSION_FIXTURES / "BUSBRA") if Path(s.path).name == image)
        path, box = Path(sample.path), sample.boxes_xyxy[0]
    else:
        path = shared_path(*image.split("/"))
    assert main(["segment", str(path), "--box", *map(str, box), "-o", str(tmp_path / "mask.png"), "--device", "cpu",
                 "--precision", "float32"]) == 0
    left = [line for line in capsys.readouterr().err.splitlines() if "outside the box prompted there" in line]
    assert bool(left) == warned, left


def test_the_user_is_warned_exactly_when_the_written_mask_covers_a_negative_click(tmp_path, monkeypatch, capsys):
    """The evaluator's first negative corrective click on the bundled held-out images (a click on
    the mask's spill), given with the centroid click to ``ultrasam segment``: the warning about a
    negative click the model did not follow is printed if and only if the mask written to disk
    covers that click's pixel. (compact-v3 seldom obeys: see the xfail test below.)"""
    from PIL import Image

    from ultrasam.evaluation import centroid_point, corrective_click
    from ultrasam.predictor import Prompt2D
    from ultrasam_data.coco import CocoDataset

    monkeypatch.setenv("ULTRASAM_CACHE", str(tmp_path / "no-weights"))
    predictor = _shipped_predictor()
    for sample in (s for name in ("BUSBRA", "HC") for s in CocoDataset(REGRESSION_FIXTURES / name)):
        point, _ = centroid_point(sample.masks[0])
        answer = predictor.predict(predictor.set_image(sample.image), Prompt2D(points_xy=[point], labels=[1])).mask
        click = corrective_click(answer, sample.masks[0])
        if click is not None and click[1] == 0:
            break
    else:
        pytest.fail("no negative corrective click on the bundled images")
    negative = click[0]
    out = tmp_path / "mask.png"
    assert main(["segment", str(sample.path), "--point", *map(str, point), "--negative", *map(str, negative),
                 "-o", str(out), "--device", "cpu", "--precision", "float32"]) == 0
    warned = "a negative click lies inside the mask" in capsys.readouterr().err
    written = np.asarray(Image.open(out)) > 0
    assert warned == written[int(negative[1]), int(negative[0])]


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="compact-v3 ignores negative clicks: 0 of 10 obeyed here, 25 of 230 on the test sets "
                          "(docs/MODEL_CARD.md, 'Corrective clicks'); a model that follows them passes")
def test_negative_clicks_on_a_spill_are_obeyed():
    """The evaluator's corrective clicks on the twelve held-out images: at least half of the
    negative ones (on a spill) take their pixel out of the mask."""
    from ultrasam.evaluation import evaluate_images
    from ultrasam_data.coco import CocoDataset

    predictor = _shipped_predictor()
    samples = [sample for name in ("BUSBRA", "HC") for sample in CocoDataset(REGRESSION_FIXTURES / name)]
    rows = evaluate_images(samples, predictor, progress=False)
    negatives, obeyed = (sum(row[key] for row in rows) for key in ("negative_clicks", "negatives_obeyed"))
    if negatives < 5:
        pytest.skip(f"only {negatives} negative clicks were needed: too few to judge")
    assert obeyed >= negatives / 2, f"{obeyed} of {negatives} negative clicks obeyed"


def _shipped_predictor():
    """The shipped model with the rules it was trained with, float32 on the CPU (as RECORDED was measured)."""
    from ultrasam.predictor import Predictor

    loaded = load_model(SHIPPED_MODEL)
    return Predictor(loaded.model, device="cpu", mode=loaded.info["postprocess"], precision="float32")


def _side_by_side(left, right):
    """(grey image, the two lesion masks on it, their (x0, y0, x1, y1) boxes) of two samples."""
    height, width = max(left.image.shape[0], right.image.shape[0]), left.image.shape[1] + right.image.shape[1]
    image, truths = np.zeros((height, width), np.uint8), [np.zeros((height, width), bool) for _ in range(2)]
    for truth, sample, x in zip(truths, (left, right), (0, left.image.shape[1])):
        h, w = sample.masks[0].shape
        image[:h, x:x + w] = sample.image[..., 0]
        truth[:h, x:x + w] = sample.masks[0]
    shift = np.array([left.image.shape[1], 0, left.image.shape[1], 0])
    return image, truths, [left.boxes_xyxy[0].astype(float), right.boxes_xyxy[0] + shift]


def _box_away_from(structures: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 60-pixel box within ``shape`` that touches no lesion (10-pixel margin), below its top quarter."""
    height, width = shape
    for y in range(height // 4, height - 70, 10):
        for x in range(10, width - 70, 10):
            if not structures[y - 10:y + 70, x - 10:x + 70].any():
                return np.array([x, y, x + 60, y + 60], float) - 0.5
    raise AssertionError("no free box in the image")
