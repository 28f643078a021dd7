"""UltraSam's mask losses: focal x20 + dice + IoU-head MSE, on the low-resolution mask grid.

Shapes: ``logits`` (N, M, h, w) mask logits for N objects and M candidate masks (1, or 3 with
multimask output), ``iou_pred`` (N, M) the IoU head's output, ``target`` (N, h, w) float in {0, 1}.
With M > 1 the mask and IoU losses supervise, per object, the candidate whose thresholded mask
has the highest IoU with the target (as UltraSam and SAM do); with ``iou_all_candidates`` the
IoU head learns every candidate's IoU (SAM 2's ``supervise_all_iou``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ultrasam_training.config import LossConfig


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels: (N, h, w) -> (N,)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** gamma).flatten(1).mean(dim=1)


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


def best_candidate(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object, the index of the candidate closest to the target and all candidates' true IoUs.

    logits (N, M, h, w), target (N, h, w) -> (index (N,) long, iou (N, M) float, no gradient).
    """
    with torch.no_grad():
        ious = mask_iou(logits > 0, target[:, None].expand_as(logits))
    return ious.argmax(dim=1), ious


def sam_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, weights: LossConfig
) -> dict[str, torch.Tensor]:
    """Weighted focal + dice + IoU MSE, averaged over objects (dice: over those with a non-empty
    target); returns scalars by name and 'total'."""
    index, true_iou = best_candidate(logits, target)
    rows = torch.arange(len(index), device=index.device)
    chosen = logits[rows, index].float()
    # Dice is undefined for an empty target (a free box): its smoothed form would reward only
    # probabilities of exactly 0 over the whole grid. Focal and IoU supervise those objects alone.
    has_object = target.flatten(1).any(dim=1)
    dice = dice_loss(chosen[has_object], target[has_object]).sum() / has_object.sum().clamp(min=1)
    parts = {
        "focal": focal_loss(chosen, target, weights.focal_gamma, weights.focal_alpha).mean(),
        "dice": dice,
        "iou": (F.mse_loss(iou_pred.float(), true_iou) if weights.iou_all_candidates
                else F.mse_loss(iou_pred[rows, index].float(), true_iou[rows, index])),
    }
    parts["total"] = (
        weights.focal_weight * parts["focal"] + weights.dice_weight * parts["dice"] + weights.iou_weight * parts["iou"]
    )
    return parts
