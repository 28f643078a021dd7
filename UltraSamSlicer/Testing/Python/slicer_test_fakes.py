"""Test stand-ins shared by the Slicer self-tests and the pytest suite (not shipped).

The model stand-in makes expected masks exact: it returns the bright pixels of the slice it is
asked about, so on a volume holding one bright ball the right answer is the ball itself.
"""

import numpy as np


def ball(shape, center_kji, radius: float) -> np.ndarray:
    """(K, J, I) bool: voxels within ``radius`` voxels of ``center_kji``."""
    k, j, i = np.indices(shape)
    return ((np.stack([k, j, i], -1) - np.asarray(center_kji)) ** 2).sum(-1) <= radius ** 2


class ThresholdModel:
    """SlicePredictor stand-in: mask = pixels above 100 of the slice given, IoU 1.

    Args:
        slices: the ultrasam.slicing.VolumeSlices it predicts on.
        log: optional list receiving (slice index, number of slices) per prediction.
    """

    def __init__(self, slices, log=None):
        self.slices, self.log = slices, log

    def predict(self, index, prompt, mask_input=None):
        import torch
        from ultrasam.predictor import Prediction

        if self.log is not None:
            self.log.append((index, self.slices.num_slices))
        return Prediction(self.slices.image(index) > 100, 1.0, torch.zeros(1, 1, 256, 256))

    def prefetch(self, indices):
        pass
