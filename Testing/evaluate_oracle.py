"""A perfect model for the evaluation tests: it answers a prompt with the true object it names.

Strict on the prompt conventions, so a wrong prompt costs Dice: a box names an object only when
it is that object's tight box on pixel edges, ``(c0 - 0.5, r0 - 0.5, c1 + 0.5, r1 + 0.5)``; a
positive point only when its pixel belongs to the object. For propagation (box of the previous
slice's mask plus its logits) a box names the object it overlaps most.

Holds no tests itself.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ultrasam.predictor import ImageEmbedding, Prediction, Prompt2D


def _key(image: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes() + repr(image.shape).encode()).hexdigest()


def edge_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5, rows.max() + 0.5])


class OraclePredictor:
    """Has the :class:`~ultrasam.predictor.Predictor` interface the evaluator and propagation use."""

    def __init__(self, truth: list[tuple[np.ndarray, np.ndarray]], exact_boxes: bool = True) -> None:
        """``truth``: (image, (N, H, W) bool objects) pairs; identical images must hold the same objects."""
        self.device, self.batch_size, self.mode, self.model_key = torch.device("cpu"), 3, "ultrasam", "oracle"
        self.exact_boxes = exact_boxes
        self.truth: dict[str, np.ndarray] = {}
        for image, masks in truth:
            masks = np.asarray(masks, dtype=bool)
            known = self.truth.setdefault(_key(image), masks)
            assert known.shape == masks.shape and (known == masks).all(), "two identical images, different truths"
        self.prompts: list[Prompt2D] = []

    def embed(self, images, cache: bool = True) -> list[ImageEmbedding]:
        return [ImageEmbedding(torch.zeros(1, 1, 1, 1), image.shape[:2], image.shape[:2], _key(image))
                for image in images]

    def predict(self, embedding: ImageEmbedding, prompt: Prompt2D, mask_input=None, refine=None) -> Prediction:
        self.prompts.append(prompt)
        named = [mask for mask in self.truth[embedding.key] if self._names(mask, prompt, mask_input is None)]
        if prompt.box_xyxy is not None and len(named) > 1:
            named = [max(named, key=lambda mask: _inside(mask, prompt.box_xyxy))]
        if len(named) != 1:
            return Prediction(np.zeros(embedding.original_hw, dtype=bool), 0.0, torch.zeros(1, 1, 256, 256))
        return Prediction(named[0].copy(), 0.95, torch.zeros(1, 1, 256, 256))

    def _names(self, mask: np.ndarray, prompt: Prompt2D, first_pass: bool) -> bool:
        if not mask.any():
            return False
        if prompt.points_xy is not None:
            x, y = np.rint(prompt.points_xy[0]).astype(int)
            inside = 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x]
            return bool(prompt.labels[0] == 1 and inside)
        if self.exact_boxes and first_pass:
            return bool(np.allclose(prompt.box_xyxy, edge_box(mask)))
        return _inside(mask, prompt.box_xyxy) > 0


def _inside(mask: np.ndarray, box) -> int:
    rows, cols = np.nonzero(mask)
    x0, y0, x1, y1 = box
    return int(((cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)).sum())
