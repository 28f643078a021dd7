"""UltraSam's mask losses: focal x20 + dice + IoU-head MSE, on the low-resolution mask grid.

Shapes: ``logits`` (N, M, h, w) mask logits for N objects and M candidate masks (1, or 3 with
multimask output), ``iou_pred`` (N, M) the IoU head's output, ``target`` (N, h, w) float in {0, 1}.
With M > 1 the mask and IoU losses supervise, per object, the candidate whose thresholded mask
has the highest IoU with the target (as UltraSam and SAM do). Pixels marked ``ignore`` count in
none of the losses (a free box's inside: see :mod:`ultrasam_training.prompts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultrasam_training.config import LossConfig


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float,
               ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over the pixels not in ``ignore``: (N, h, w) -> (N,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    loss = alpha_t * ce * (1 - p_t) ** gamma
    if ignore is None:
        return loss.flatten(1).mean(dim=1)
    kept = (~ignore).flatten(1).float()
    return (loss.flatten(1) * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss on sigmoid probabilities: (N, h, w) -> (N,)."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    overlap = (prob * target).sum(dim=1)
    return 1 - (2 * overlap + smooth) / (prob.sum(dim=1) + target.sum(dim=1) + smooth)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks (..., h, w) against (..., h, w): (...,); empty-vs-empty counts as 1."""
    pred, target = pred.flatten(-2).bool(), target.flatten(-2).bool()
    inter = (pred & target).sum(dim=-1).float()
    union = (pred | target).sum(dim=-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mask_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of bool masks (..., h, w) against (..., h, w): (...,); empty-vs-empty counts as 1."""
    pred, target = pred.flatten(-2).bool(), target.flatten(-2).bool()
    inter = (pred & target).sum(dim=-1).float()
    total = (pred.sum(dim=-1) + target.sum(dim=-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


def best_candidate(logits: torch.Tensor, target: torch.Tensor,
                   ignore: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object, the index of the candidate closest to the target and all candidates' true IoUs,
    over the pixels not in ``ignore`` (N, h, w).

    logits (N, M, h, w), target (N, h, w) -> (index (N,) long, iou (N, M) float, no gradient).
    """
    with torch.no_grad():
        pred = logits > 0
        if ignore is not None:
            pred = pred & ~ignore[:, None]
        ious = mask_iou(pred, target[:, None].expand_as(logits))
    return ious.argmax(dim=1), ious


def sam_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, weights: LossConfig,
    ignore: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted focal + dice + IoU MSE, averaged over objects; returns scalars by name and 'total'.

    ``ignore`` (N, h, w) bool marks pixels no loss looks at. An object with ignored pixels (a free
    box: only its outside is known, and empty) has no true IoU and an empty target, so it adds to
    the focal term alone: the dice and IoU terms average over the other objects.
    """
    index, true_iou = best_candidate(logits, target, ignore)
    rows = torch.arange(len(index), device=index.device)
    chosen = logits[rows, index].float()
    whole = torch.ones_like(index, dtype=torch.bool) if ignore is None else ~ignore.flatten(1).any(dim=1)
    parts = {
        "focal": focal_loss(chosen, target, weights.focal_gamma, weights.focal_alpha, ignore).mean(),
        "dice": _mean_over(dice_loss(chosen, target), whole),
        "iou": _mean_over((iou_pred[rows, index].float() - true_iou[rows, index]) ** 2, whole),
    }
    parts["total"] = (
        weights.focal_weight * parts["focal"] + weights.dice_weight * parts["dice"] + weights.iou_weight * parts["iou"]
    )
    return parts


def _mean_over(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (N,) over the True ``rows``; 0 (with gradient) when there are none."""
    return (values * rows).sum() / rows.sum().clamp(min=1)
