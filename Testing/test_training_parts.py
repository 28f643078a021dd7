"""Training pieces against references: the recipe's numbers, analytic prompts, torchvision's focal
loss, and segment_anything's own ``Sam.forward`` for the prompt/refine passes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from training_tiny import TINY_SAM, tiny_sam_config
from ultrasam.checkpoint import CheckpointError, SamConfig, sam_from_config
from ultrasam_training import config as cfg
from ultrasam_training.losses import best_candidate, dice_loss, focal_loss, mask_dice, mask_iou, sam_loss
from ultrasam_training.model_init import load_usfmae_encoder
from ultrasam_data.coco import DataError
from ultrasam_training.prepare import PrepareOptions, PreparedDataset, StepBatches, box_cells, low_res_target
from ultrasam_training.prompts import (Prompts, centroid_points, fixed_prompts, jitter_boxes, mask_boxes,
                                       random_points, sample_prompts)
from ultrasam_training.step import (Clicks, TrainingModel, corrected_passes, encode, final_logits, next_clicks,
                                   refine_prompts, run_passes)
from ultrasam_training.trainer import lr_factor


def test_defaults_are_ultrasams_recipe():
    config = cfg.TrainConfig()
    assert (config.optim.lr, config.optim.weight_decay, config.optim.clip_norm) == (1e-4, 1e-4, 0.1)
    assert (config.optim.warmup_steps, config.optim.milestones, config.optim.gamma) == (500, [20000, 28888], 0.1)
    assert (config.loss.focal_weight, config.loss.dice_weight, config.loss.iou_weight) == (20.0, 1.0, 1.0)
    assert (config.loss.focal_gamma, config.loss.focal_alpha) == (2.0, 0.25)
    assert (config.prompts.box_probability, config.prompts.box_jitter, config.prompts.refine) == (0.5, 0.05, True)
    assert (config.run.steps, config.run.batch_size, config.data.max_objects, config.data.flip) == (30000, 8, 20, True)


def test_config_round_trip_and_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": {"train": ["a.json"]}, "model": {"checkpoint": "w.pth"},
                                "optim": {"lr": 3}}))
    config = cfg.load_config(path)
    assert config.optim.lr == 3.0 and config.run.steps == 30000
    cfg.save_config(config, tmp_path / "again.json")
    assert cfg.load_config(tmp_path / "again.json") == config
    bad = [
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"}, "optim": {"lr_rate": 1}}, "unknown key"),
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"}, "run": {"steps": "10"}}, "run.steps must be int"),
        ({"data": {"train": []}, "model": {"checkpoint": "w"}}, "data.train"),
        ({"data": {"train": ["a"]}}, "model.checkpoint"),
        ({"data": {"train": ["a"]}, "model": {"init": "scratch", "scratch": {"image_sise": 64}}}, "model.scratch"),
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"}, "prompts": {"box_probability": 2.0}}, "box_prob"),
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"}, "prompts": {"free_box_probability": -0.1}},
         "free_box_prob"),
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"}, "prompts": {"correction_clicks": -1}},
         "correction_clicks must be >= 0"),
        ({"data": {"train": ["a"]}, "model": {"checkpoint": "w"},
          "prompts": {"correction_clicks": 1, "refine": False}}, "correction_clicks needs prompts.refine"),
    ]
    for values, message in bad:
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.from_dict(values)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(cfg.ConfigError, match="not valid JSON"):
        cfg.load_config(tmp_path / "broken.json")


def test_lr_schedule():
    factor = lambda step: lr_factor(step, 500, [20000, 28888], 0.1)  # noqa: E731
    assert factor(0) == pytest.approx(0.001)
    assert factor(250) == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor(500) == factor(19999) == 1.0
    assert factor(20000) == pytest.approx(0.1) and factor(28888) == pytest.approx(0.01)


def test_boxes_points_and_jitter_against_hand_made_masks():
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 5:9, 10:16] = True  # rows 5..8, columns 10..15
    masks[1, 0:1, 29:30] = True  # one pixel in the top-right corner
    boxes = mask_boxes(masks)
    assert boxes.tolist() == [[9.5, 4.5, 15.5, 8.5], [28.5, -0.5, 29.5, 0.5]]
    assert mask_boxes(masks[:1, ::4, ::4], pixel=4.0).tolist() == [[11.5, 7.5, 15.5, 11.5]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = random_points(masks, generator).long().T
        assert masks[torch.arange(2), y, x].all()
    assert centroid_points(masks[:1]).tolist() == [[12.5, 6.5]]
    jittered = jitter_boxes(boxes[:1].repeat(500, 1), 0.05, (20, 30), generator)
    assert (jittered - boxes[:1]).abs().max(dim=0).values.tolist() == pytest.approx([0.3, 0.2, 0.3, 0.2], abs=0.02)
    drawn = sample_prompts(masks[:1].repeat(400, 1, 1), 0.5, 0.05, generator).is_box.float().mean()
    assert 0.4 < float(drawn) < 0.6
    fixed = fixed_prompts(masks, "box")
    assert fixed.is_box.all() and torch.equal(fixed.boxes_xyxy, boxes)


def test_low_res_target():
    masks = torch.zeros(1, 60, 100, dtype=torch.bool)
    masks[0, 8:16, 4:12] = True
    target = low_res_target(masks, 128, 32)
    assert target.shape == (1, 32, 32)
    assert target[0].nonzero().tolist() == [[r, c] for r in range(2, 4) for c in range(1, 3)]
    finer = low_res_target(masks, 128, 64)  # a model with 8-pixel patches: grid 16, masks 64
    assert finer[0].nonzero().tolist() == [[r, c] for r in range(4, 8) for c in range(2, 6)]
    with pytest.raises(ValueError, match="must divide"):
        low_res_target(masks, 128, 48)


def test_a_model_with_smaller_patches_trains_on_its_own_mask_grid():
    """Targets follow the model's low-res grid (4 x its embedding grid), not SAM's input / 4."""
    sam = sam_from_config(SamConfig(**{**TINY_SAM, "encoder_global_attn_indexes": (1,), "patch_size": 8})).train()
    grid = sam.prompt_encoder.mask_input_size[0]
    assert grid == 64
    masks = torch.zeros(1, 96, 128, dtype=torch.bool)
    masks[0, 30:60, 40:90] = True
    sample = SimpleNamespace(image=torch.zeros(96, 128, 3, dtype=torch.uint8), masks=masks, dataset="d")
    item = PreparedDataset([sample], PrepareOptions(128, low_res_size=grid))[0]
    assert item.target.shape == (1, grid, grid)
    net = TrainingModel(sam, cfg.LossConfig(), refine=True, autocast_dtype=None)
    net([item])["total"].backward()
    assert sam.mask_decoder.output_upscaling[0].weight.grad is not None


def test_losses_against_torchvision_and_hand_values():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, generator=generator) * 3
    target = (torch.rand(3, 8, 8, generator=generator) > 0.5).float()
    reference = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none").mean(dim=(1, 2))
    assert torch.allclose(focal_loss(logits, target, 2.0, 0.25), reference, atol=1e-6)
    perfect = torch.where(target > 0, 50.0, -50.0)
    assert dice_loss(perfect, target).abs().max() < 1e-6
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 8 and 8 pixels, 4 shared
    assert mask_iou(a, b).item() == pytest.approx(4 / 12) and mask_dice(a, b).item() == pytest.approx(0.5)
    candidates = torch.stack([torch.where(b[0], -1.0, 1.0), torch.where(b[0], 1.0, -1.0), torch.ones(4, 4)])[None]
    index, ious = best_candidate(candidates, b.float())
    assert index.item() == 1 and ious[0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    parts = sam_loss(candidates, torch.tensor([[0.0, 0.25, 0.0]]), b.float(), cfg.LossConfig())
    assert parts["iou"].item() == pytest.approx(0.75 ** 2)
    assert parts["total"].item() == pytest.approx(20 * parts["focal"].item() + parts["dice"].item() + 0.5625)


def test_a_free_box_is_supervised_outside_only_and_adds_no_dice_or_iou_term():
    target = torch.zeros(2, 8, 8)
    target[0, 2:6, 2:6] = 1.0  # one object; row 1 a free box over cells 0..3 x 0..3
    ignore = torch.zeros(2, 8, 8, dtype=torch.bool)
    ignore[1, :4, :4] = True
    logits = torch.full((2, 1, 8, 8), -1.0)
    logits[1, 0, :4, :4] = 3.0  # the free box's answer fills the box
    logits.requires_grad_(True)
    iou_pred = torch.tensor([[0.5], [0.0]])
    parts = sam_loss(logits, iou_pred, target, cfg.LossConfig(), ignore)
    object_only = sam_loss(logits[:1].detach(), iou_pred[:1], target[:1], cfg.LossConfig())
    assert parts["dice"].item() == pytest.approx(object_only["dice"].item())
    assert parts["iou"].item() == pytest.approx(object_only["iou"].item())
    outside = focal_loss(torch.full((1, 8, 8), -1.0), target[1:], 2.0, 0.25)[0]  # every kept cell is at -1
    assert parts["focal"].item() == pytest.approx((object_only["focal"].item() + outside.item()) / 2)
    parts["total"].backward()
    assert (logits.grad[1, 0, :4, :4] == 0).all()  # inside the box: anything goes
    assert (logits.grad[1, 0, 4:] > 0).all()  # outside: pushed down


def test_box_cells_are_the_low_resolution_cells_a_box_overlaps():
    # 32-pixel input, 8 x 8 grid: cell c holds pixels 4c .. 4c + 3
    cells = box_cells(torch.tensor([3.5, 7.5, 11.5, 15.5]), 32, 8)  # columns 4..11, rows 8..15
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 1:3] = True
    assert torch.equal(cells, expected)
    assert box_cells(torch.tensor([2.5, 8.5, 4.5, 9.5]), 32, 8).nonzero().tolist() == [[2, 0], [2, 1]]


def test_step_batches_cover_each_epoch_once_across_ranks():
    seen = []
    for rank in range(2):
        seen += [[i for i, _ in batch] for batch in StepBatches(10, 3, seed=7, start=0, steps=5, rank=rank, world=2)]
    flat = [i for batch in seen for i in batch]  # 2 ranks x 5 steps x 3 = 30 = 3 epochs of 10
    assert len(flat) == 30 and all(flat.count(i) == 3 for i in range(10))
    whole = list(StepBatches(10, 3, seed=7, start=0, steps=5))
    assert list(StepBatches(10, 3, seed=7, start=3, steps=5)) == whole[3:]
    assert list(StepBatches(10, 3, seed=8, start=0, steps=5)) != whole


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_sam_config()
    model = sam_from_config(config)
    with torch.no_grad():  # SAM zero-initialises some tensors; make every one matter
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.2)
    return model.eval()


def _sam_query(image: torch.Tensor, prompts: Prompts, n: int, mask_input: torch.Tensor | None = None) -> dict:
    """Object ``n``'s prompt as one ``Sam.forward`` input record."""
    query = {"image": image.float(), "original_size": tuple(image.shape[1:])}
    if prompts.is_box[n]:
        query["boxes"] = prompts.boxes_xyxy[n : n + 1]
    else:
        query["point_coords"], query["point_labels"] = prompts.points_xy[n][None, None], torch.ones(1, 1)
    if mask_input is not None:
        query["mask_inputs"] = mask_input
    return query


def test_passes_match_segment_anything(tiny):
    """Mixed point/box objects decoded together equal Sam.forward run object by object."""
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    prompts = Prompts(
        is_box=torch.tensor([True, False, True]),
        points_xy=torch.tensor([[0.0, 0.0], [40.0, 30.0], [0.0, 0.0]]),
        boxes_xyxy=torch.tensor([[10.0, 5.0, 60.0, 50.0], [0.0, 0.0, 0.0, 0.0], [70.0, 40.0, 120.0, 90.0]]),
    )
    with torch.no_grad():
        embedding = encode(tiny, [image], None)
        passes = run_passes(tiny, embedding, prompts, refine=True)
        second = refine_prompts(prompts, passes[0].logits, 128)
    for n in range(3):
        first = tiny([_sam_query(image, prompts, n)], multimask_output=False)[0]
        assert torch.allclose(passes[0].logits[n], first["low_res_logits"][0], atol=1e-5)
        assert torch.allclose(passes[0].iou[n], first["iou_predictions"][0], atol=1e-5)
        again = tiny([_sam_query(image, second, n, passes[0].logits[n : n + 1])], multimask_output=True)[0]
        assert torch.allclose(passes[1].logits[n], again["low_res_logits"][0], atol=1e-5)
    assert torch.equal(second.boxes_xyxy[[0, 2]], prompts.boxes_xyxy[[0, 2]])


def test_refine_box_of_a_point_prompt_is_the_pass1_mask_box():
    logits = -torch.ones(2, 1, 32, 32)
    logits[0, 0, 2:4, 5:9] = 1.0  # low-res rows 2..3, columns 5..8; 4 input pixels each
    prompts = Prompts(torch.tensor([False, False]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 4))
    refined = refine_prompts(prompts, logits, 128)
    assert refined.is_box.tolist() == [True, False]  # an empty pass-1 mask keeps its point
    assert refined.boxes_xyxy[0].tolist() == [19.5, 7.5, 35.5, 15.5]


def test_corrective_clicks_land_on_the_error_with_its_sign():
    """A 4x4 low-resolution grid of a 16-pixel input (4 input pixels a cell): object 0's answer
    misses one cell, object 1's spills onto one, object 2's is right."""
    target = torch.zeros(3, 4, 4)
    target[0, 1, 1:3] = 1
    target[1, 2, 2] = 1
    target[2, 0, 0] = 1
    logits = torch.where(target[:, None] > 0, 1.0, -1.0)
    logits[0, 0, 1, 2] = -1.0  # missed: row 1, column 2
    logits[1, 0, 3, 0] = 1.0  # spilled: row 3, column 0
    clicks = next_clicks(logits, target, None, image_size=16)
    assert clicks.labels.tolist() == [[1], [0], [-1]]
    # a cell's centre in input pixels (integer values are pixel centres): column 2 -> 2 * 4 + 1.5
    assert clicks.points_xy[:2, 0].tolist() == [[9.5, 5.5], [1.5, 13.5]]
    ignore = torch.zeros(3, 4, 4, dtype=torch.bool)
    ignore[1, 3, 0] = True  # where nothing is known, nothing is wrong
    again = next_clicks(logits, target, ignore, image_size=16, clicks=clicks)
    assert again.labels.tolist() == [[1, 1], [0, -1], [-1, -1]] and again.points_xy.shape == (3, 2, 2)


def test_corrective_clicks_land_inside_a_thick_error_not_on_its_thin_rim():
    target = torch.zeros(1, 32, 32)
    target[0, 4:28, 4:28] = 1
    logits = torch.where(target[:, None] > 0, 1.0, -1.0)
    logits[0, 0, 3, 4:28] = 1.0  # a one-cell rim spilled above the object
    logits[0, 0, 10:19, 10:19] = -1.0  # a 9 x 9 hole in it: cells 12..16 are two cells inside
    torch.manual_seed(0)
    for _ in range(20):
        clicks = next_clicks(logits, target, None, image_size=32)
        x, y = clicks.points_xy[0, 0].tolist()
        assert clicks.labels.tolist() == [[1]] and 12 <= x <= 16 and 12 <= y <= 16


def test_corrected_passes_match_segment_anything(tiny):
    """A point prompt and a box prompt, each with a negative and a positive click, equal
    Sam.forward run object by object: pass 1 with the points (and box), pass 2 adding pass 1's mask
    box (for the point prompt) and its logits."""
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    prompts = Prompts(torch.tensor([False, True]), torch.tensor([[40.0, 30.0], [0.0, 0.0]]),
                      torch.tensor([[30.0, 20.0, 50.0, 40.0], [70.0, 40.0, 120.0, 90.0]]))
    clicks = Clicks(torch.tensor([[[60.0, 30.0], [45.0, 35.0]], [[80.0, 50.0], [100.0, 70.0]]]),
                    torch.tensor([[0, 1], [1, 0]]))
    with torch.no_grad():
        embedding = encode(tiny, [image], None)
        first, second = corrected_passes(tiny, embedding, prompts, clicks)
    for n in range(2):
        if prompts.is_box[n]:
            points, labels = clicks.points_xy[n], clicks.labels[n]
        else:  # the prompt's point, then its clicks
            points = torch.cat([prompts.points_xy[n][None], clicks.points_xy[n]])
            labels = torch.cat([torch.ones(1, dtype=torch.long), clicks.labels[n]])
        query = {"image": image.float(), "original_size": (96, 128), "point_coords": points[None],
                 "point_labels": labels[None]}
        if prompts.is_box[n]:
            query["boxes"] = prompts.boxes_xyxy[n : n + 1]
        expected = tiny([query], multimask_output=False)[0]
        assert torch.allclose(first.logits[n], expected["low_res_logits"][0], atol=1e-5)
        found = first.logits[n : n + 1, 0] > 0
        box = prompts.boxes_xyxy[n : n + 1] if prompts.is_box[n] else mask_boxes(found, pixel=128 / found.shape[-1])
        assert found.any() or prompts.is_box[n]  # the point prompt's pass 2 uses its mask box
        again = tiny([{**query, "boxes": box, "mask_inputs": first.logits[n : n + 1]}], multimask_output=True)[0]
        assert torch.allclose(second.logits[n], again["low_res_logits"][0], atol=1e-5)


def test_correction_rounds_train_the_negative_click():
    """With one corrective round, a training step reaches SAM's negative-point embedding (it is
    unused by UltraSam's recipe, which has no negative clicks)."""
    torch.manual_seed(0)
    config = tiny_sam_config()
    sam = sam_from_config(config)
    image = torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8)
    box = Prompts(torch.tensor([True]), torch.zeros(1, 2), torch.tensor([[20.0, 20.0, 100.0, 100.0]]))
    with torch.no_grad():
        answer = final_logits(run_passes(sam, encode(sam, [image], None), box, refine=True))
    assert (answer > 0).any()  # so against an empty target every error is a spill: a negative click
    item = SimpleNamespace(image=image, target=torch.zeros(1, 32, 32), ignore=None, prompts=box)
    negative = sam.prompt_encoder.point_embeddings[0].weight
    for corrections, reached in ((0, False), (1, True)):
        sam.zero_grad(set_to_none=True)
        losses = TrainingModel(sam, cfg.LossConfig(), refine=True, autocast_dtype=None, corrections=corrections)([item])
        losses["total"].backward()
        assert (negative.grad is not None and bool(negative.grad.abs().sum() > 0)) == reached


def test_usfmae_encoder_mapping():
    model = sam_from_config(tiny_sam_config())
    dim = 32
    usf = {"patch_embed.proj.weight": torch.randn(dim, 3, 16, 16), "patch_embed.proj.bias": torch.randn(dim),
           "cls_token": torch.randn(1, 1, dim), "decoder_embed.weight": torch.randn(16, dim)}
    usf["pos_embed"] = torch.cat([torch.full((1, 1, dim), 100.0), torch.full((1, 16, dim), 0.5)], dim=1)
    for i in range(2):
        for part, shape in (("norm1", (dim,)), ("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                            ("norm2", (dim,)), ("mlp.fc1", (2 * dim, dim)), ("mlp.fc2", (dim, 2 * dim))):
            usf[f"blocks.{i}.{part}.weight"] = torch.randn(shape)
            usf[f"blocks.{i}.{part}.bias"] = torch.randn(shape[0])
    neck_before = model.image_encoder.neck[0].weight.clone()
    filled = load_usfmae_encoder(model, usf)
    encoder = model.image_encoder
    assert encoder.pos_embed.shape == (1, 8, 8, dim)
    assert torch.allclose(encoder.pos_embed, torch.full((1, 8, 8, dim), 0.5))  # class token dropped
    assert torch.equal(encoder.blocks[1].mlp.lin2.weight, usf["blocks.1.mlp.fc2.weight"])
    assert torch.equal(encoder.blocks[0].attn.qkv.bias, usf["blocks.0.attn.qkv.bias"])
    assert torch.equal(encoder.neck[0].weight, neck_before)
    assert len(filled) == 3 + 2 * 12
    usf["blocks.2.norm1.weight"] = torch.randn(dim)  # a deeper encoder than the model
    with pytest.raises(CheckpointError, match="model.scratch"):
        load_usfmae_encoder(model, usf)


class _Samples:
    """Three samples whose image 1 cannot be read; image n's mask covers n + 1 rows."""

    def __len__(self):
        return 3

    def __getitem__(self, index):
        if index == 1:
            raise DataError("missing file", "image 1 does not exist")
        masks = torch.zeros(1, 32, 32, dtype=torch.bool)
        masks[0, : index + 1] = True
        return SimpleNamespace(image=torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), masks=masks.numpy(),
                               dataset="d")


def test_an_unreadable_sample_is_skipped_for_the_next_and_listed_for_the_trainer():
    dataset = PreparedDataset(_Samples(), PrepareOptions(64, prompt_kind="box", keep_masks=True))
    item = dataset[(1, 5)]
    assert item.masks.shape == (1, 64, 64) and int(item.masks[0].any(dim=1).sum()) == 6  # sample 2, scaled x2
    assert [(p.kind, p.where, p.detail) for p in item.skipped] == [("missing file", "sample 1", "image 1 does not exist")]
    assert dataset[(0, 5)].skipped == ()


def test_build_model_from_each_init_kind(tmp_path):
    from ultrasam.checkpoint import save_checkpoint
    from ultrasam_training.model_init import build_model

    scratch = cfg.ModelConfig(init="scratch", scratch=TINY_SAM)
    model = build_model(scratch)
    assert model.training and model.image_encoder.img_size == 128
    save_checkpoint(tmp_path / "own.pth", model, {})
    again = build_model(cfg.ModelConfig(init="checkpoint", checkpoint=str(tmp_path / "own.pth")))
    assert again.training and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                     again.state_dict().values()))
    encoder = {"patch_embed.proj.weight": torch.randn(32, 3, 16, 16), "patch_embed.proj.bias": torch.randn(32),
               "pos_embed": torch.randn(1, 1 + 14 * 14, 32), "blocks.0.norm1.weight": torch.full((32,), 3.0)}
    torch.save({"model": encoder}, tmp_path / "usfmae.pth")
    usf = build_model(cfg.ModelConfig(init="usf-mae", checkpoint=str(tmp_path / "usfmae.pth"), scratch=TINY_SAM))
    assert torch.equal(usf.image_encoder.blocks[0].norm1.weight, encoder["blocks.0.norm1.weight"])
    torch.save({"model": {"image_encoder.pos_embed": torch.zeros(1)}}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="not a USF-MAE checkpoint"):
        build_model(cfg.ModelConfig(init="usf-mae", checkpoint=str(tmp_path / "sam.pth"), scratch=TINY_SAM))


def test_object_cap_draws_a_fresh_subset_per_sample_seed():
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    for n in range(3):
        masks[n, 10 * n : 10 * n + 1 + n] = True  # objects of 1, 2 and 3 rows
    sample = SimpleNamespace(image=torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), masks=masks.numpy(), dataset="d")
    dataset = PreparedDataset([sample], PrepareOptions(32, max_objects=2, prompt_kind="box", keep_masks=True))
    drawn = {tuple(sorted(int(m.any(dim=1).sum()) for m in dataset[(0, seed)].masks)) for seed in range(20)}
    assert drawn == {(1, 2), (1, 3), (2, 3)}


def test_a_free_box_is_a_box_prompt_clear_of_every_object_ignored_inside():
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 5:20, 8:30] = True
    masks[1, 40:60, 35:50] = True
    sample = SimpleNamespace(image=torch.zeros(64, 64, 3, dtype=torch.uint8).numpy(), masks=masks.numpy(), dataset="d")
    plain = PreparedDataset([sample], PrepareOptions(64, box_probability=0.5))
    with_free = PreparedDataset([sample], PrepareOptions(64, box_probability=0.5, free_box_probability=1.0))
    margin = 64 // 64
    for seed in range(10):
        before, item = plain[(0, seed)], with_free[(0, seed)]
        assert len(item.target) == 3 and not item.target[2].any() and bool(item.prompts.is_box[2])
        assert not item.ignore[:2].any() and torch.equal(item.ignore[2], box_cells(item.prompts.boxes_xyxy[2], 64, 16))
        assert torch.equal(item.target[:2], before.target) and torch.equal(item.prompts.boxes_xyxy[:2], before.prompts.boxes_xyxy)
        x0, y0, x1, y1 = item.prompts.boxes_xyxy[2].tolist()
        c0, r0, c1, r1 = round(x0 + 0.5), round(y0 + 0.5), round(x1 - 0.5), round(y1 - 0.5)  # covered pixels
        assert 0 <= c0 <= c1 < 64 and 0 <= r0 <= r1 < 64
        assert not masks.any(dim=0)[max(0, r0 - margin):r1 + 1 + margin, max(0, c0 - margin):c1 + 1 + margin].any()
        # half to all of an object's box side (at most 22 x 20 here)
        assert 7 <= c1 - c0 + 1 <= 22 and 7 <= r1 - r0 + 1 <= 20


def test_an_image_whose_objects_leave_no_room_gets_no_free_box():
    masks = torch.ones(1, 32, 32, dtype=torch.bool)
    sample = SimpleNamespace(image=torch.zeros(32, 32, 3, dtype=torch.uint8).numpy(), masks=masks.numpy(), dataset="d")
    item = PreparedDataset([sample], PrepareOptions(32, free_box_probability=1.0))[(0, 0)]
    assert len(item.target) == 1 and len(item.prompts.is_box) == 1
