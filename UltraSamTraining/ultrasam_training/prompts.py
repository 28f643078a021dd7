"""Prompt sampling per object, as UltraSam trained and evaluated.

All coordinates are in the ``xy`` frame of the model input (the image resized so its long side is
the model's input size, before padding): ``x`` = column, ``y`` = row, integer values are pixel
centres, and ``segment_anything``'s prompt encoder adds the +0.5 itself. A box is
``box_xyxy = (x0, y0, x1, y1)`` on the pixel edges, i.e. a mask spanning columns ``c0..c1`` has
``x0 = c0 - 0.5`` and ``x1 = c1 + 0.5`` (UltraSam's COCO-box convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ultrasam.free_boxes import corner_box, free_corners


@dataclass
class Prompts:
    """One prompt per object.

    Attributes:
        is_box: (N,) bool, True where the object is prompted by its box, else by its point.
        points_xy: (N, 2) float, one positive point per object (used where ``is_box`` is False).
        boxes_xyxy: (N, 4) float, one box per object (used where ``is_box`` is True).
    """

    is_box: torch.Tensor
    points_xy: torch.Tensor
    boxes_xyxy: torch.Tensor

    def to(self, device: torch.device) -> Prompts:
        return Prompts(self.is_box.to(device), self.points_xy.to(device), self.boxes_xyxy.to(device))


def mask_boxes(masks: torch.Tensor, pixel: float = 1.0) -> torch.Tensor:
    """Boxes on the pixel edges of (N, H, W) bool masks, as (N, 4) ``box_xyxy``.

    ``pixel`` is the size of one mask pixel in the output frame (4 for SAM's low-resolution
    logits measured in input pixels). Empty masks give a zero box; check ``masks.any`` first.
    """
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    index_h = torch.arange(masks.shape[1], device=masks.device)
    index_w = torch.arange(masks.shape[2], device=masks.device)
    big = max(masks.shape[1], masks.shape[2])
    y0 = torch.where(rows, index_h, big).amin(dim=1)
    y1 = torch.where(rows, index_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, index_w, big).amin(dim=1)
    x1 = torch.where(cols, index_w, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float() * pixel - 0.5
    return torch.where(masks.flatten(1).any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def random_points(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One uniformly drawn pixel inside each of the (N, H, W) non-empty bool masks, as (N, 2) xy."""
    flat = masks.flatten(1)
    counts = flat.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("random_points needs non-empty masks; drop empty objects first")
    draw = torch.rand(len(masks), generator=generator, device=masks.device)
    rank = (draw * counts).long().clamp(max=counts - 1) + 1
    index = torch.searchsorted(flat.long().cumsum(dim=1), rank[:, None]).squeeze(1)
    width = masks.shape[2]
    return torch.stack([index % width, index // width], dim=1).float()


def centroid_points(masks: torch.Tensor) -> torch.Tensor:
    """Centroid of each (N, H, W) non-empty bool mask, as (N, 2) xy (UltraSam's point test prompt)."""
    weights = masks.float()
    total = weights.sum(dim=(1, 2)).clamp(min=1.0)
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device)
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device)
    x = (weights.sum(dim=1) * xs).sum(dim=1) / total
    y = (weights.sum(dim=2) * ys).sum(dim=1) / total
    return torch.stack([x, y], dim=1)


def jitter_boxes(
    boxes_xyxy: torch.Tensor, fraction: float, size_hw: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """Move each corner coordinate by up to ``fraction`` of the box side, uniformly, in the image.

    boxes_xyxy: (N, 4); returns (N, 4) clamped to the image of ``size_hw`` = (H, W) pixels.
    """
    sides = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).repeat(1, 2)
    noise = torch.rand(boxes_xyxy.shape, generator=generator, device=boxes_xyxy.device) * 2 - 1
    jittered = boxes_xyxy + noise * fraction * sides
    height, width = size_hw
    limits = torch.tensor([width, height, width, height], device=boxes_xyxy.device) - 0.5
    return torch.minimum(jittered.clamp(min=-0.5), limits)


def sample_prompts(
    masks: torch.Tensor, box_probability: float, box_jitter: float, generator: torch.Generator
) -> Prompts:
    """Training prompts for (N, H, W) non-empty bool masks: a jittered box or a random inside point."""
    is_box = torch.rand(len(masks), generator=generator, device=masks.device) < box_probability
    boxes = jitter_boxes(mask_boxes(masks), box_jitter, tuple(masks.shape[1:]), generator)
    return Prompts(is_box, random_points(masks, generator), boxes)


def fixed_prompts(masks: torch.Tensor, kind: str) -> Prompts:
    """Evaluation prompts for (N, H, W) bool masks: the exact box, or the centroid point."""
    if kind not in ("box", "point"):
        raise ValueError(f"prompt kind must be 'box' or 'point', got {kind!r}")
    is_box = torch.full((len(masks),), kind == "box", dtype=torch.bool, device=masks.device)
    return Prompts(is_box, centroid_points(masks), mask_boxes(masks))


def random_free_box(masks: torch.Tensor, margin: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """A box on tissue without an annotated object, for (N, H, W) non-empty bool masks, or None
    where none fits. Unannotated structures may lie in it, so training asks only that the answer
    stay inside it.

    Its size is a random object's box scaled by 0.5-1 (so negatives look like the positives), its
    place uniform among those keeping ``margin`` pixels from every object pixel. Returns (4,) xyxy.
    """
    chosen = int(torch.randint(len(masks), (1,), generator=generator))
    x0, y0, x1, y1 = mask_boxes(masks[chosen:chosen + 1])[0].tolist()
    scale = 0.5 + 0.5 * float(torch.rand(1, generator=generator))
    size = (max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale)))
    corners = free_corners(masks.any(dim=0).cpu().numpy(), size, margin)
    if len(corners) == 0:
        return None
    corner = corners[int(torch.randint(len(corners), (1,), generator=generator))]
    return torch.tensor(corner_box(corner, size), dtype=torch.float32)


def with_free_box(prompts: Prompts, box_xyxy: torch.Tensor) -> Prompts:
    """``prompts`` and one more object prompted by ``box_xyxy`` (its point, unused, the box centre)."""
    box = box_xyxy.to(prompts.boxes_xyxy)[None]
    return Prompts(
        torch.cat([prompts.is_box, torch.ones(1, dtype=torch.bool, device=box.device)]),
        torch.cat([prompts.points_xy, (box[:, :2] + box[:, 2:]) / 2]),
        torch.cat([prompts.boxes_xyxy, box]),
    )
