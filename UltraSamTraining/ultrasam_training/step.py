"""SAM run the way UltraSam trains it: prompt pass, then one refinement pass, both supervised.

Pass 1: each object's prompt (one positive point, or a box), single-mask output. Pass 2 (the
refine round, as UltraSam's inference runs it): the pass-1 low-resolution logits as mask input
plus a box: the same box for box prompts; for point prompts the bounding box of the pass-1 mask
(the point is kept when that mask is empty); multimask output.

Corrective clicks (``prompts.correction_clicks``, not in UltraSam's recipe): each round draws one
click per object where the latest answer is wrong, positive or negative as SAM trains, and runs
the prompt plus all its clicks again, both passes, as the predictor runs a prompt of several points.

Shapes: L is SAM's low-resolution mask grid (input size / 4), ``logits`` (N, M, L, L) with M = 1
(pass 1) or 3 (pass 2), ``iou`` (N, M).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from ultrasam.model_input import encoder_input

from ultrasam_training.config import LossConfig
from ultrasam_training.losses import sam_loss
from ultrasam_training.prepare import Item
from ultrasam_training.prompts import Prompts, mask_boxes


CLICK_DEPTH = 2  # corrective clicks land this many mask cells inside the error, where it is that thick


@dataclass
class Pass:
    logits: torch.Tensor
    iou: torch.Tensor


# (3, h, w) uint8 images -> (B, C, g, g) float32 embeddings: the encoder, or a store of its outputs
Embedder = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def encode(model: Sam, images: Sequence[torch.Tensor], autocast_dtype: torch.dtype | None,
           encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """(3, h, w) uint8 images -> (B, C, g, g) float32 embeddings; the model's normalisation, then
    zero padding to its S x S input (SAM's ``preprocess`` for SAM-normalised models).

    ``encoder`` runs instead of ``model.image_encoder`` (its part up to the last stage, say).
    """
    device = model.pixel_mean.device
    batch = torch.cat([encoder_input(model, image.to(device).float()[None]) for image in images])
    with autocast(device, autocast_dtype):
        return (encoder or model.image_encoder)(batch).float()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@dataclass
class Clicks:
    """Corrective clicks so far, K per object, in the model-input xy frame (see :mod:`.prompts`).

    Attributes:
        points_xy: (N, K, 2) float.
        labels: (N, K) long: 1 on a pixel the mask missed, 0 on one it wrongly held, -1 (SAM's
            not-a-point) where that round found nothing to correct.
    """

    points_xy: torch.Tensor
    labels: torch.Tensor


def decode(
    model: Sam, embedding: torch.Tensor, prompts: Prompts, mask_input: torch.Tensor | None, multimask: bool,
    clicks: Optional[Clicks] = None, point_boxes: Optional[torch.Tensor] = None,
) -> Pass:
    """One decoder pass for N objects of one image; embedding (1, C, g, g), mask_input (N, 1, L, L).

    An object prompted by a point sends it, then its ``clicks``, and its row of ``point_boxes``
    (N, 4) if given; one prompted by a box sends its ``clicks`` and the box. The two groups are
    encoded and decoded separately, as their token counts may differ.
    """
    parts, groups = [], []
    for is_box in (False, True):
        index = (prompts.is_box == is_box).nonzero()[:, 0]
        if len(index) == 0:
            continue
        points = None if is_box else (prompts.points_xy[index, None], torch.ones_like(index)[:, None])
        if clicks is not None:
            points = _with_clicks(points, clicks.points_xy[index], clicks.labels[index])
        boxes = prompts.boxes_xyxy[index] if is_box else None if point_boxes is None else point_boxes[index]
        masks = None if mask_input is None else mask_input[index]
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        logits, iou = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        parts.append(Pass(logits, iou))
        groups.append(index)
    order = torch.cat(groups).argsort()
    return Pass(torch.cat([part.logits for part in parts])[order], torch.cat([part.iou for part in parts])[order])


def _with_clicks(points: tuple | None, clicks_xy: torch.Tensor, labels: torch.Tensor) -> tuple:
    if points is None:
        return clicks_xy, labels
    return torch.cat([points[0], clicks_xy], dim=1), torch.cat([points[1], labels], dim=1)


def refine_prompts(prompts: Prompts, logits: torch.Tensor, image_size: int) -> Prompts:
    """Pass-2 prompts: box prompts keep their box; point prompts get the pass-1 mask's box."""
    found = logits[:, 0] > 0
    has_mask = found.flatten(1).any(dim=1)
    use_mask_box = ~prompts.is_box & has_mask
    boxes = torch.where(
        use_mask_box[:, None], mask_boxes(found, pixel=image_size / logits.shape[-1]), prompts.boxes_xyxy
    )
    return Prompts(prompts.is_box | use_mask_box, prompts.points_xy, boxes)


def run_passes(model: Sam, embedding: torch.Tensor, prompts: Prompts, refine: bool, corrections: int = 0,
               target: Optional[torch.Tensor] = None, ignore: Optional[torch.Tensor] = None) -> list[Pass]:
    """Pass 1, and pass 2 when ``refine``; the pass-1 logits enter pass 2 without gradient.

    Then ``corrections`` rounds (needs ``target`` (N, L, L) and ``ignore``): each adds one click
    per object on the latest answer's error (:func:`next_clicks`) and runs the prompt with its
    clicks from scratch, as inference runs a prompt of several points (:func:`corrected_passes`).
    """
    first = decode(model, embedding, prompts, None, multimask=False)
    if not refine:
        return [first]
    logits = first.logits.detach()
    second_prompts = refine_prompts(prompts, logits, model.image_encoder.img_size)
    passes = [first, decode(model, embedding, second_prompts, logits, multimask=True)]
    clicks = None
    for _ in range(corrections):
        clicks = next_clicks(final_logits(passes).detach(), target, ignore, model.image_encoder.img_size, clicks)
        passes += corrected_passes(model, embedding, prompts, clicks)
    return passes


def next_clicks(logits: torch.Tensor, target: torch.Tensor, ignore: Optional[torch.Tensor], image_size: int,
                clicks: Optional[Clicks] = None) -> Clicks:
    """``clicks`` plus one per object, drawn uniformly from the pixels its answer got wrong, as a
    user clicks: inside the error, at least ``CLICK_DEPTH`` cells from its edge where it is that
    thick (an error that is only a thin rim takes a click anywhere on it). Positive on a missed
    pixel, negative on a wrongly held one; -1 where nothing is wrong. logits (N, 1, L, L), target
    (N, L, L), ignore (N, L, L) bool or None."""
    truth = target > 0.5
    wrong = (logits[:, 0] > 0) ^ truth
    if ignore is not None:
        wrong &= ~ignore
    inner = wrong.float()[:, None]
    for _ in range(CLICK_DEPTH):  # erosion by a 3 x 3 minimum
        inner = -F.max_pool2d(-inner, 3, stride=1, padding=1)
    inner = inner[:, 0] > 0
    wrong = torch.where(inner.flatten(1).any(dim=1)[:, None], inner.flatten(1), wrong.flatten(1))
    found = wrong.any(dim=1)
    choice = torch.multinomial(torch.where(found[:, None], wrong.float(), 1.0), 1)[:, 0]
    size, pixel = logits.shape[-1], image_size / logits.shape[-1]
    xy = torch.stack([choice % size, torch.div(choice, size, rounding_mode="floor")], dim=1) * pixel + (pixel - 1) / 2
    labels = torch.where(found, truth.flatten(1).gather(1, choice[:, None])[:, 0].long(), -1)
    if clicks is None:
        return Clicks(xy[:, None].float(), labels[:, None])
    return Clicks(torch.cat([clicks.points_xy, xy[:, None].float()], 1), torch.cat([clicks.labels, labels[:, None]], 1))


def corrected_passes(model: Sam, embedding: torch.Tensor, prompts: Prompts, clicks: Clicks) -> list[Pass]:
    """A prompt with its clicks as the predictor's refine rules run it: pass 1 single-mask, no mask
    input; pass 2 with the same points, the prompt's box or else pass 1's mask box, and pass 1's
    logits; multimask."""
    first = decode(model, embedding, prompts, None, multimask=False, clicks=clicks)
    logits = first.logits.detach()
    point_boxes = refine_prompts(prompts, logits, model.image_encoder.img_size).boxes_xyxy  # the refine round's boxes
    return [first, decode(model, embedding, prompts, logits, multimask=True, clicks=clicks, point_boxes=point_boxes)]


def final_logits(passes: list[Pass]) -> torch.Tensor:
    """Inference rule: the last pass's candidate with the highest predicted IoU, (N, 1, L, L)."""
    last = passes[-1]
    best = last.iou.argmax(dim=1)
    return last.logits[torch.arange(len(best), device=best.device), best][:, None]


class TrainingModel(nn.Module):
    """``Sam`` plus the recipe's loss, as one module so DDP sees one forward per step."""

    def __init__(self, sam: Sam, loss: LossConfig, refine: bool, autocast_dtype: torch.dtype | None,
                 embed: Optional[Embedder] = None, corrections: int = 0):
        super().__init__()
        self.sam, self.loss, self.refine, self.autocast_dtype = sam, loss, refine, autocast_dtype
        self.corrections = corrections  # corrective-click rounds per object (see run_passes)
        self.embed = embed  # frozen-encoder training: cached embeddings instead of the encoder

    def forward(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Mean over images (with at least one object) of the summed pass losses, plus its parts."""
        images = [item.image for item in items]
        embeddings = self.embed(images) if self.embed else encode(self.sam, images, self.autocast_dtype)
        device = embeddings.device
        totals: dict[str, torch.Tensor] = {}
        used = 0
        for embedding, item in zip(embeddings, items):
            if len(item.target) == 0:
                continue
            target = item.target.to(device)
            ignore = None if item.ignore is None else item.ignore.to(device)
            passes = run_passes(self.sam, embedding[None], item.prompts.to(device), self.refine, self.corrections,
                                target, ignore)
            for passed in passes:
                for name, value in sam_loss(passed.logits, passed.iou, target, self.loss, ignore).items():
                    totals[name] = totals.get(name, 0.0) + value
            used += 1
        if used == 0:
            raise ValueError("a training batch had no objects; check the data set with `ultrasam-train check`")
        return {name: value / used for name, value in totals.items()}
