"""2D prediction against segment_anything's SamPredictor and UltraSam's documented rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

from ultrasam.checkpoint import SamConfig, sam_from_config
from ultrasam.predictor import Predictor, Prompt2D


def _image(height=96, width=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    blob = ((yy - height / 2) ** 2 / (height / 4) ** 2 + (xx - width / 2) ** 2 / (width / 4) ** 2) < 1
    return (blob * 150 + rng.integers(0, 60, (height, width))).astype(np.uint8)


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_sam_mode_matches_sam_predictor(tiny_sam):
    image = _image()
    reference = SamPredictor(tiny_sam)
    reference.set_image(np.repeat(image[..., None], 3, axis=2))
    ours = Predictor(tiny_sam, device="cpu", mode="sam", precision="float32")
    embedding = ours.set_image(image)
    assert torch.allclose(embedding.features, reference.features, atol=1e-4)
    box = np.array([30.0, 20.0, 100.0, 80.0])
    masks, scores, logits = reference.predict(box=box, multimask_output=False)
    prediction = ours.predict(embedding, Prompt2D(box_xyxy=box))
    assert np.allclose(prediction.low_res_logits[0, 0].numpy(), logits[0], atol=1e-3)
    assert _iou(prediction.mask, masks[0]) > 0.999
    assert prediction.iou == pytest.approx(float(scores[0]), abs=1e-4)
    masks, scores, _ = reference.predict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
    prediction = ours.predict(embedding, Prompt2D([[60.0, 50.0]], [1]))
    assert _iou(prediction.mask, masks[int(np.argmax(scores))]) > 0.999


def test_ultrasam_resize_truncates():
    model = sam_from_config(SamConfig(encoder_embed_dim=32, encoder_num_heads=2, encoder_depth=2,
                                      encoder_global_attn_indexes=(1,)))
    # ULTRASAM_FACTS.md: mmdet's FixScaleResize makes a 958x533 image 1023x569 (SAM: 1024x570).
    assert Predictor(model, device="cpu", mode="ultrasam").input_size(533, 958) == (569, 1023)
    assert Predictor(model, device="cpu", mode="sam").input_size(533, 958) == (570, 1024)


def _reference_refine(model, image, point, postprocess):
    """UltraSam's refine inference for one positive point, assembled from SamPredictor calls
    following ULTRASAM_FACTS.md (an image whose resize is exact, so both pipelines agree), with
    ``postprocess(model, logits, input_size, original_shape)`` turning logits into a mask."""
    sam = SamPredictor(model)
    sam.set_image(np.repeat(image[..., None], 3, axis=2))
    _, _, low = sam.predict(point_coords=np.array([point]), point_labels=np.array([1]),
                            multimask_output=False, return_logits=True)
    first = postprocess(model, torch.from_numpy(low[None]), sam.input_size, image.shape)
    rows, columns = np.flatnonzero(first.any(1)), np.flatnonzero(first.any(0))
    scale = model.image_encoder.img_size / max(image.shape)
    box = np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1]) * scale - 0.5
    sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor(box[None], dtype=torch.float32),
                                         masks=torch.from_numpy(low[None]))
    logits, iou = model.mask_decoder(sam.features, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    best = int(iou[0].argmax())
    return postprocess(model, logits[:, best:best + 1], sam.input_size, image.shape), float(iou[0, best])


def _ultrasam_postprocess(model, logits, input_size, original):
    binary = (logits > 0).float()
    full = F.interpolate(binary, (model.image_encoder.img_size,) * 2, mode="bilinear", align_corners=False)
    full = full[..., : input_size[0], : input_size[1]]
    return (F.interpolate(full, original[:2], mode="bilinear", align_corners=False)[0, 0] > 0).numpy()


def _sam_postprocess(model, logits, input_size, original):
    return (model.postprocess_masks(logits, input_size, original[:2])[0, 0] > 0).numpy()


@torch.no_grad()
@pytest.mark.parametrize("mode, postprocess", [("ultrasam", _ultrasam_postprocess), ("refine", _sam_postprocess)])
def test_refine_inference(tiny_sam, mode, postprocess):
    """Both two-pass modes; "refine" differs from "ultrasam" only in upsampling logits, not masks."""
    image = _image(96, 128)  # 128 -> 256: both resize rules give 192x256
    point = [64.0, 40.0]
    expected_mask, expected_iou = _reference_refine(tiny_sam, image, point, postprocess)
    predictor = Predictor(tiny_sam, device="cpu", mode=mode, precision="float32")
    prediction = predictor.predict(predictor.set_image(image), Prompt2D([point], [1]))
    assert expected_mask.any()
    assert _iou(prediction.mask, expected_mask) > 0.999
    assert prediction.iou == pytest.approx(expected_iou, abs=1e-4)


def test_ultrasam_postprocess_grows_masks(tiny_sam):
    """UltraSam's binary-then-resize rule gives masks at least as large as SAM's on the same logits."""
    image = _image()
    box = Prompt2D(box_xyxy=[20, 15, 110, 85])
    embedding = Predictor(tiny_sam, device="cpu", mode="sam").set_image(image)
    ultrasam = Predictor(tiny_sam, device="cpu", mode="ultrasam")
    sam_mask = Predictor(tiny_sam, device="cpu", mode="sam").predict(embedding, box).mask
    grown = ultrasam._postprocess(
        Predictor(tiny_sam, device="cpu", mode="sam").predict(embedding, box).low_res_logits, embedding)
    assert grown.sum() >= sam_mask.sum() and (grown | sam_mask).sum() == grown.sum()


def test_embedding_cache(tiny_sam):
    calls = []
    tiny_sam.image_encoder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    predictor = Predictor(tiny_sam, device="cpu", batch_size=2, cache_size=3)
    images = [_image(seed=s) for s in range(3)]
    first = predictor.embed(images)
    assert calls == [2, 1]  # batched
    assert predictor.embed(images[:1])[0] is first[0] and calls == [2, 1]
    changed = images[0].copy()
    changed[0, 0] ^= 1
    assert predictor.set_image(changed) is not first[0] and calls == [2, 1, 1]
    other_model = Predictor(tiny_sam, device="cpu")
    assert other_model.set_image(images[0]).key != first[0].key


@pytest.mark.parametrize("kwargs, message", [
    ({}, "at least one point or a box"),
    ({"points_xy": [[1, 2]], "labels": [1, 0]}, "one label"),
    ({"points_xy": [[1, 2]], "labels": [2]}, "1 .positive. or 0"),
    ({"box_xyxy": [10, 10, 5, 20]}, "x1 > x0"),
])
def test_bad_prompts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Prompt2D(**kwargs)


def test_prompt_outside_image(tiny_sam):
    predictor = Predictor(tiny_sam, device="cpu")
    embedding = predictor.set_image(_image())
    with pytest.raises(ValueError, match="outside the 128x96 image"):
        predictor.predict(embedding, Prompt2D([[200.0, 10.0]], [1]))


def test_refuses_16_bit_images(tiny_sam):
    with pytest.raises(ValueError, match="uint8.*to_uint8"):
        Predictor(tiny_sam, device="cpu").set_image(np.zeros((10, 10), np.uint16))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_requested_without_gpu():
    from ultrasam.device import choose_device

    with pytest.raises(RuntimeError, match="choose --device cpu"):
        choose_device("cuda")
    assert choose_device("auto").type in ("cpu", "mps")
