"""Test stand-ins shared by the Slicer self-tests and the pytest suite (not shipped).

The model stand-in makes expected masks exact: it returns the bright pixels of the slice it is
asked about, so on a volume holding one bright ball the right answer is the ball itself.
"""

THRESHOLD = 100  # ThresholdModel's mask: 8-bit slice pixels above this

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
        return Prediction(self.slices.image(index) > THRESHOLD, 1.0, torch.zeros(1, 1, 256, 256))

    def prefetch(self, indices):
        pass


class ClientCalls:
    """What the stand-ins for ultrasam.client.RemoteSession share: its attributes, and the calls
    that answer at once here (a run is done when ``start`` returns)."""

    def __init__(self, shape_kji):
        from ultrasam.client import RunState

        self.RunState = RunState
        self.mask = np.zeros(shape_kji, np.uint8)
        self.running, self.closed, self.last = False, False, RunState("idle")

    def poll(self, wait=0.0):
        return self.last

    def cancel(self):
        pass

    def close(self):
        self.closed = True


class InlineSession(ClientCalls):
    """Stand-in for ultrasam.client.RemoteSession that runs a SegmentationSession in this process,
    as the server does (its request parsing included), so the effect's MRML handling is tested
    without starting a server. The server's answers are compared with the core's own in
    Testing/test_server.py.
    """

    def __init__(self, volume, slice_predictor=ThresholdModel):
        from ultrasam.session import SegmentationSession

        super().__init__(volume.shape_kji)
        self.session = SegmentationSession(volume, None, slice_predictor=slice_predictor)

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
        self.last = self.RunState("done", summary=result.summary(), propagated=result.propagated,
                                  warnings=tuple(result.warnings))
        return self.last


class NumpySession(ClientCalls):
    """Stand-in for ultrasam.client.RemoteSession with numpy only: no torch, no server, no core
    session. The effect's self-test uses it, so that its preview/apply/undo part runs where Slicer
    has no torch (the Extensions Index build machines).

    Assumptions, and where they are checked:
    - the server answers as ``ultrasam.client`` expects (a RunState per call; ``mask`` replaced only
      by a finished run): checked against the real ``ultrasam serve`` in Testing/test_server.py;
    - its masks are the ones the core's SegmentationSession gives with :class:`ThresholdModel` (what
      :class:`InlineSession` runs): checked on the pytest effect's volume, for clicks, boxes and
      propagation with and without a span, by test_slicer_effect.py's
      test_the_numpy_stand_in_answers_as_the_core_session_does.

    Its model is ThresholdModel's: the bright pixels of each key slice (one per prompted point or
    box; ROIs are not supported). Propagation walks out from the key slices, within the span, up to
    the first slice with no bright pixel: the core's "vanished" rule; the others (IoU, growth) never
    fire with an IoU of 1 on a ball.
    """

    def __init__(self, volume):
        from ultrasam.intensity import choose_window

        super().__init__(volume.shape_kji)
        self.volume, self.window = volume, choose_window(volume.voxels)

    def start(self, prompts, propagate=False, axis=0, span=None, rules=None, wait=0.0):
        from ultrasam.slicing import VolumeSlices

        if prompts["rois"]:
            raise NotImplementedError("NumpySession takes points and boxes only")
        slices = VolumeSlices(self.volume, axis, self.window)
        corners = [corner for box in prompts["boxes"] for corner in box]
        try:
            keys = sorted(set(slices.locate(np.reshape(prompts["points"] + corners, (-1, 3)), prompts["frame"])[0]))
        except ValueError as error:  # a prompt outside the volume, as the server says it
            self.last = self.RunState("failed", error=str(error))
            return self.last
        bright = {index: slices.image(index) > THRESHOLD for index in range(slices.num_slices)}
        masks = {key: bright[key] for key in keys}
        if propagate:
            span = span or {}
            first, last = span.get("first"), span.get("last")
            low = max(0 if first is None else first, keys[0] if span.get("direction") == "forward" else 0)
            high = min(slices.num_slices - 1 if last is None else last,
                       keys[-1] if span.get("direction") == "backward" else slices.num_slices - 1)
            for key in keys:
                for step in (-1, 1):
                    index = key + step
                    while low <= index <= high and bright[index].any() and index not in keys:
                        masks[index] = bright[index]
                        index += step
        self.mask = slices.to_volume(masks)
        kept = sorted(index for index, mask in masks.items() if mask.any())
        summary = f"{len(kept)} slice(s) segmented" if kept else "no mask found"
        self.last = self.RunState("done", summary=summary, propagated=propagate)
        return self.last
