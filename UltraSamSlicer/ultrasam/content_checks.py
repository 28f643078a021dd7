"""Refuse or flag input the model would answer with confidence and no meaning.

SAM-type models return a mask with a high predicted IoU even on an all-zero image, so the image
content is checked instead: blank or non-finite volumes are refused, blank slices get no mask,
and results the user should look at again (a key slice below the IoU threshold, a mask lying
wholly on zero-intensity background outside the ultrasound fan, a mask that left the box it was
prompted with, a click the mask does not follow) come back as warnings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch

from ultrasam.geometry import LEFT_BOX, Volume, points_in_mask, share_inside_box
from ultrasam.predictor import Prediction, Prompt2D
from ultrasam.prompts3d import VolumePrompts, slice_prompts
from ultrasam.slicing import VolumeSlices

BLANK_SLICE = "blank slice"  # the stop reason of a slice with one grey value
LISTED = 10  # slices named in a warning about many (an ROI prompts every slice it crosses)


def check_volume_content(volume: Volume) -> list[str]:
    """Refuse a volume without image content; return warnings about part of it.

    Raises:
        ValueError: every voxel is NaN/inf, or every voxel has the same value.
    """
    voxels = volume.voxels
    name = volume.name or "the image"
    finite = np.isfinite(voxels) if np.issubdtype(voxels.dtype, np.floating) else None
    warnings = []
    if finite is not None and not finite.all():
        if not finite.any():
            raise ValueError(f"{name}: every voxel is NaN or infinite; nothing to segment, check the file")
        bad = int(voxels.size - np.count_nonzero(finite))
        warnings.append(f"{name}: {bad} of {voxels.size} voxels are NaN or infinite; they are shown as the "
                        "window's lowest grey value")
        voxels = voxels[finite]
    low, high = voxels.min(), voxels.max()
    if low == high:
        which = "every finite voxel" if warnings else "every voxel"
        raise ValueError(f"{name}: {which} has the value {low.item():g} (a blank image); nothing to segment")
    return warnings


def blank_slices(slices: VolumeSlices) -> set[int]:
    """Indices of slices whose 8-bit image has a single grey value."""
    return {index for index in range(slices.num_slices) if np.ptp(slices.image(index)) == 0}


class SkipBlankSlices:
    """A :class:`~ultrasam.propagation.SlicePredictor` that answers blank slices with an empty mask
    (predicted IoU 0, so a walk stops there) instead of asking the model."""

    def __init__(self, predictor, slices: VolumeSlices, blank: set[int]) -> None:
        self.predictor, self.slices, self.blank = predictor, slices, blank
        self._logits_shape = (1, 1, 256, 256)  # taken from the first real prediction (a key slice's)

    def prefetch(self, indices) -> None:
        self.predictor.prefetch([i for i in indices if i not in self.blank])

    def predict(self, index: int, prompt: Prompt2D, mask_input: Optional[torch.Tensor] = None) -> Prediction:
        if index not in self.blank:
            prediction = self.predictor.predict(index, prompt, mask_input)
            self._logits_shape = tuple(prediction.low_res_logits.shape)
            return prediction
        return Prediction(np.zeros(self.slices.image_shape, dtype=bool), 0.0,
                          torch.full(self._logits_shape, -20.0))  # the logits of "nothing here"


def checked_key_prompts(slices: VolumeSlices, prompts: VolumePrompts, blank: set[int], name: str) -> dict[int, Prompt2D]:
    """``prompts`` on their key slices ({slice index: Prompt2D}, :func:`ultrasam.prompts3d.slice_prompts`).

    Raises:
        ValueError: the ROI(s) cross no slice along the axis, or a key slice is blank (one grey value).
    """
    keys = slice_prompts(slices, prompts)
    if not keys:
        raise ValueError(f"{name}: the ROI(s) cross no slice of the volume along {'kji'[slices.axis]}: "
                         "move or resize them")
    blank_keys = sorted(set(keys) & blank)
    if blank_keys:
        raise ValueError(f"{name}: prompted slice(s) {blank_keys} are blank (a single grey value); nothing to "
                         "segment there, prompt a slice with image content")
    return keys


def result_warnings(slices: VolumeSlices, rows: list[dict], masks: Mapping[int, np.ndarray],
                    min_iou: float, blank: set[int], key_prompts: Mapping[int, Prompt2D]) -> list[str]:
    """Warnings about a finished run (``rows``: the report's slice rows; ``key_prompts``: what
    :func:`checked_key_prompts` returned)."""
    warnings = [f"key slice {r['index']}: predicted IoU {r['iou']:.2f} is below the stop threshold "
                f"{min_iou:g}; the mask was kept, check it or add prompts"
                for r in rows if r["status"] == "key" and r["iou"] < min_iou]
    met = sorted(r["index"] for r in rows if r["index"] in blank)
    if met:
        warnings.append(f"slice(s) {met} are blank (a single grey value) and were left empty")
    on_background = [index for index, mask in sorted(masks.items()) if _wholly_on_zero(slices.image(index), mask)]
    if on_background:
        warnings.append(f"slice(s) {on_background}: the mask lies wholly on zero-intensity background "
                        "(outside the ultrasound fan?); check the prompt positions")
    left = _left_their_box(key_prompts, masks)
    if left:
        where = ", ".join(f"{index} ({1 - inside:.0%} outside)" for index, inside in left[:LISTED])
        where += f" and {len(left) - LISTED} more" if len(left) > LISTED else ""
        warnings.append(f"slice(s) {where}: the mask reaches well outside the box prompted there, so the model "
                        "may have followed a neighbouring structure; check it, and tighten the box or add prompts")
    missed, covered = _unfollowed_clicks(key_prompts, masks)
    if missed:
        warnings.append(f"slice(s) {missed}: a positive click lies outside the mask, so the model did not follow "
                        "it; check the mask, and move the click or prompt with a box")
    if covered:
        warnings.append(f"slice(s) {covered}: a negative click lies inside the mask, so the model did not follow "
                        "it; correct the mask with a tighter box, or edit it by hand")
    return warnings


def _left_their_box(key_prompts: Mapping[int, Prompt2D], masks: Mapping[int, np.ndarray]) -> list[tuple[int, float]]:
    """(slice index, share inside) of box-prompted key slices whose mask has less than
    ``LEFT_BOX`` of itself inside that box: the model answered with something else than the box."""
    shares = [(index, share_inside_box(masks[index], prompt.box_xyxy)) for index, prompt in sorted(key_prompts.items())
              if prompt.box_xyxy is not None and index in masks]
    return [(index, inside) for index, inside in shares if inside < LEFT_BOX]


def _unfollowed_clicks(key_prompts: Mapping[int, Prompt2D],
                       masks: Mapping[int, np.ndarray]) -> tuple[list[int], list[int]]:
    """Key slices where a positive click's pixel is out of the mask, and where a negative click's
    pixel is in it (the evaluator's rule for an obeyed negative click). A slice without a mask in
    ``masks`` has an empty one."""
    missed, covered = [], []
    for index, prompt in sorted(key_prompts.items()):
        if prompt.points_xy is None:
            continue
        mask = masks.get(index)
        hit = np.zeros(len(prompt.labels), bool) if mask is None else points_in_mask(mask, prompt.points_xy)
        if not hit[prompt.labels == 1].all():
            missed.append(index)
        if hit[prompt.labels == 0].any():
            covered.append(index)
    return missed, covered


def _wholly_on_zero(image: np.ndarray, mask: np.ndarray) -> bool:
    grey = image.max(axis=-1) if image.ndim == 3 else image
    return bool(mask.any()) and not grey[mask].any()
