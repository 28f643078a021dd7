"""Shared pieces of the 3D tests: the simulated prostate data and a predictor that knows the truth.

Holds no tests itself; the test_3d_* modules import it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from ultrasam.checkpoint import SamConfig, sam_from_config
from ultrasam.predictor import Prediction, Prompt2D
from ultrasam.resources import SAMPLE_VOLUME
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_io import read_volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MRUS3D = DATA / "mrus3d"
RESECT_CASE3 = SAMPLE_VOLUME  # ships in the package; sha256 equal to ../shared/data/resect3d/Case3.nii.gz

needs_mrus3d = pytest.mark.skipif(not MRUS3D.is_dir(), reason=f"simulated prostate volumes not found at {MRUS3D}")


def prostate_cases() -> list[str]:
    return sorted(p.name for p in (MRUS3D / "images").glob("obs*.nii.gz")) if MRUS3D.is_dir() else []


@lru_cache(maxsize=None)
def read_prostate(name: str):
    """(image Volume, (K, J, I) bool gland mask = label channel 0) of one simulated case (shared
    between tests: do not modify)."""
    image = read_volume(MRUS3D / "images" / name)
    gland = read_volume(MRUS3D / "labels" / name, frame=0).voxels > 0.5
    return image, gland


def micro_sam():
    """A very small random SAM-architecture model (2 encoder blocks, 128 input, 32-wide decoder):
    fast enough to walk a few hundred slices on a CPU in tests."""
    config = SamConfig(encoder_embed_dim=16, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                       encoder_mlp_ratio=2.0, image_size=128, encoder_window_size=4, prompt_embed_dim=32,
                       mask_in_chans=4, decoder_mlp_dim=64, iou_head_hidden_dim=32)
    torch.manual_seed(0)
    return sam_from_config(config)


class TruthPredictor:
    """Returns the true mask of a slice when the prompt touches the object there, else nothing.

    A prompt touches the object when a positive point falls on an object pixel or the box holds
    the centre of an object pixel. Its logits are filled with the slice index, so a test can tell
    which slice a mask input came from. Records every call as (slice index, prompt, mask input).
    """

    def __init__(self, slices: VolumeSlices, truth_kji: np.ndarray, iou: float = 0.9) -> None:
        self.slices, self.truth, self.iou = slices, truth_kji.astype(bool), iou
        self.calls: list[tuple[int, Prompt2D, torch.Tensor | None]] = []

    def prefetch(self, indices) -> None:
        pass

    def predict(self, index: int, prompt: Prompt2D, mask_input: torch.Tensor | None = None) -> Prediction:
        self.calls.append((index, prompt, mask_input))
        truth = self.slices.slice_mask(self.truth, index)
        mask = truth if self.touches(truth, prompt) else np.zeros_like(truth)
        return Prediction(mask.copy(), self.iou, torch.full((1, 1, 256, 256), float(index)))

    @staticmethod
    def touches(truth: np.ndarray, prompt: Prompt2D) -> bool:
        rows, cols = np.nonzero(truth)
        if prompt.points_xy is not None:
            for (x, y), label in zip(np.rint(prompt.points_xy).astype(int), prompt.labels):
                if label == 1 and 0 <= y < truth.shape[0] and 0 <= x < truth.shape[1] and truth[y, x]:
                    return True
        if prompt.box_xyxy is not None:
            x0, y0, x1, y1 = prompt.box_xyxy
            return bool(np.any((cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)))
        return False

    def called_slices(self) -> set[int]:
        return {index for index, _, _ in self.calls}
