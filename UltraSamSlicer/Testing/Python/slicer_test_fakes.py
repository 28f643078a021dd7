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


class InlineSession:
    """Stand-in for ultrasam.client.RemoteSession that runs a SegmentationSession in this process.

    Same calls and RunState answers as the client (checked by test_server.py's comparison of both
    on one volume), so the effect's MRML handling is tested without starting a server.
    """

    def __init__(self, volume, slice_predictor=ThresholdModel):
        from ultrasam.client import RunState
        from ultrasam.session import SegmentationSession

        self.session = SegmentationSession(volume, None, slice_predictor=slice_predictor)
        self.mask = np.zeros(volume.shape_kji, np.uint8)
        self.running, self.closed, self.last, self.RunState = False, False, RunState("idle"), RunState

    def start(self, prompts, propagate=False, axis=0, span=None, rules=None, wait=0.0):
        from ultrasam.server import parse_run_request

        prompts, propagate, axis, span, rules = parse_run_request(
            {"prompts": prompts, "propagate": propagate, "axis": axis, "span": span or {}, "rules": rules or {}},
            self.session.volume.shape_kji)
        self.session.set_rules(rules)
        self.session.set_axis(axis)
        try:
            result = self.session.run(prompts, propagate, span)
        except ValueError as error:
            self.last = self.RunState("failed", error=str(error))
            return self.last
        self.mask = result.mask.astype(np.uint8)
        self.last = self.RunState("done", summary=result.summary(), propagated=result.propagated)
        return self.last

    def poll(self, wait=0.0):
        return self.last

    def cancel(self):
        pass

    def close(self):
        self.closed = True
