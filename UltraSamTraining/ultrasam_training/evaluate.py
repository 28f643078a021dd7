"""Validation: Dice and IoU per object at the model-input resolution, per data set and overall.

Each object is prompted as UltraSam was evaluated (its exact box, or one point at its mask
centroid: ``prompts.val_prompt``), run through the same passes as training, and the inference
rule picks the final mask (highest predicted IoU of the last pass). Logits are upsampled with
SAM's ``postprocess_masks`` and thresholded at 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional

import torch
from segment_anything.modeling import Sam

from ultrasam_training.losses import mask_dice, mask_iou
from ultrasam_training.prepare import Item
from ultrasam_training.step import Embedder, encode, final_logits, run_passes


@torch.no_grad()
def evaluate(model: Sam, items: Iterable[Item], refine: bool, autocast_dtype: torch.dtype | None,
             embed: Optional[Embedder] = None) -> dict:
    """Mean Dice/IoU over objects: ``{"dice", "iou", "objects", "per_dataset": {name: {...}}}``.

    Items need ``masks`` (prepare them with ``keep_masks=True``); the model is used in eval mode
    and put back in the mode it was in. ``embed`` replaces the encoder (frozen-encoder training).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    try:
        for item in items:
            if item.masks is None:
                raise ValueError("evaluate needs items prepared with keep_masks=True")
            if len(item.masks) == 0:
                continue
            embedding = embed([item.image]) if embed else encode(model, [item.image], autocast_dtype)
            device = embedding.device
            logits = final_logits(run_passes(model, embedding, item.prompts.to(device), refine))
            size = tuple(item.masks.shape[1:])
            pred = model.postprocess_masks(logits, input_size=size, original_size=size)[:, 0] > 0
            target = item.masks.to(device)
            entry = sums[item.dataset]
            entry[0] += float(mask_dice(pred, target).sum())
            entry[1] += float(mask_iou(pred, target).sum())
            entry[2] += len(target)
    finally:
        model.train(was_training)
    return summarise(sums)


def summarise(sums: dict[str, list[float]]) -> dict:
    """Turn per-data-set [dice sum, iou sum, objects] into means (overall = mean over all objects)."""
    per_dataset = {
        name: {"dice": dice / count, "iou": iou / count, "objects": int(count)}
        for name, (dice, iou, count) in sorted(sums.items())
        if count
    }
    objects = sum(entry[2] for entry in sums.values())
    overall = {
        "dice": sum(entry[0] for entry in sums.values()) / max(objects, 1),
        "iou": sum(entry[1] for entry in sums.values()) / max(objects, 1),
        "objects": int(objects),
    }
    return {**overall, "per_dataset": per_dataset}
