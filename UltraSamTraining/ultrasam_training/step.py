"""SAM run the way UltraSam trains it: prompt pass, then one refinement pass, both supervised.

Pass 1: each object's prompt (one positive point, or a box), single-mask output. Pass 2 (the
refine round, as UltraSam's inference runs it): the pass-1 low-resolution logits as mask input
plus a box: the same box for box prompts; for point prompts the bounding box of the pass-1 mask
(the point is kept when that mask is empty); multimask output.

Shapes: L is SAM's low-resolution mask grid (input size / 4), ``logits`` (N, M, L, L) with M = 1
(pass 1) or 3 (pass 2), ``iou`` (N, M).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from segment_anything.modeling import Sam
from torch import nn

from ultrasam.model_input import encoder_input

from ultrasam_training.config import LossConfig
from ultrasam_training.losses import sam_loss
from ultrasam_training.prepare import Item
from ultrasam_training.prompts import Prompts, mask_boxes


@dataclass
class Pass:
    logits: torch.Tensor
    iou: torch.Tensor


# (3, h, w) uint8 images -> (B, C, g, g) float32 embeddings: the encoder, or a store of its outputs
Embedder = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def encode(model: Sam, images: Sequence[torch.Tensor], autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """(3, h, w) uint8 images -> (B, C, g, g) float32 embeddings; the model's normalisation, then
    zero padding to its S x S input (SAM's ``preprocess`` for SAM-normalised models)."""
    device = model.pixel_mean.device
    batch = torch.cat([encoder_input(model, image.to(device).float()[None]) for image in images])
    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with context:
        return model.image_encoder(batch).float()


def decode(
    model: Sam, embedding: torch.Tensor, prompts: Prompts, mask_input: torch.Tensor | None, multimask: bool
) -> Pass:
    """One decoder pass for N objects of one image; embedding (1, C, g, g), mask_input (N, 1, L, L).

    Point and box prompts both give two sparse tokens (a point is padded with SAM's not-a-point),
    so the two groups are encoded separately and decoded together.
    """
    groups = [(~prompts.is_box).nonzero()[:, 0], prompts.is_box.nonzero()[:, 0]]
    sparse, dense = [], []
    for is_box, index in zip((False, True), groups):
        if len(index) == 0:
            continue
        masks = None if mask_input is None else mask_input[index]
        if is_box:
            embedded = model.prompt_encoder(points=None, boxes=prompts.boxes_xyxy[index], masks=masks)
        else:
            points = (prompts.points_xy[index, None], torch.ones_like(index)[:, None])
            embedded = model.prompt_encoder(points=points, boxes=None, masks=masks)
        sparse.append(embedded[0])
        dense.append(embedded[1])
    logits, iou = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat(sparse),
        dense_prompt_embeddings=torch.cat(dense),
        multimask_output=multimask,
    )
    order = torch.cat(groups).argsort()
    return Pass(logits[order], iou[order])


def refine_prompts(prompts: Prompts, logits: torch.Tensor, image_size: int) -> Prompts:
    """Pass-2 prompts: box prompts keep their box; point prompts get the pass-1 mask's box."""
    found = logits[:, 0] > 0
    has_mask = found.flatten(1).any(dim=1)
    use_mask_box = ~prompts.is_box & has_mask
    boxes = torch.where(
        use_mask_box[:, None], mask_boxes(found, pixel=image_size / logits.shape[-1]), prompts.boxes_xyxy
    )
    return Prompts(prompts.is_box | use_mask_box, prompts.points_xy, boxes)


def run_passes(model: Sam, embedding: torch.Tensor, prompts: Prompts, refine: bool) -> list[Pass]:
    """Pass 1, and pass 2 when ``refine``; the pass-1 logits enter pass 2 without gradient."""
    first = decode(model, embedding, prompts, None, multimask=False)
    if not refine:
        return [first]
    logits = first.logits.detach()
    second_prompts = refine_prompts(prompts, logits, model.image_encoder.img_size)
    return [first, decode(model, embedding, second_prompts, logits, multimask=True)]


def final_logits(passes: list[Pass]) -> torch.Tensor:
    """Inference rule: the last pass's candidate with the highest predicted IoU, (N, 1, L, L)."""
    last = passes[-1]
    best = last.iou.argmax(dim=1)
    return last.logits[torch.arange(len(best), device=best.device), best][:, None]


class TrainingModel(nn.Module):
    """``Sam`` plus the recipe's loss, as one module so DDP sees one forward per step."""

    def __init__(self, sam: Sam, loss: LossConfig, refine: bool, autocast_dtype: torch.dtype | None,
                 embed: Optional[Embedder] = None):
        super().__init__()
        self.sam, self.loss, self.refine, self.autocast_dtype = sam, loss, refine, autocast_dtype
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
            for passed in run_passes(self.sam, embedding[None], item.prompts.to(device), self.refine):
                for name, value in sam_loss(passed.logits, passed.iou, target, self.loss, ignore).items():
                    totals[name] = totals.get(name, 0.0) + value
            used += 1
        if used == 0:
            raise ValueError("a training batch had no objects; check the data set with `ultrasam-train check`")
        return {name: value / used for name, value in totals.items()}
