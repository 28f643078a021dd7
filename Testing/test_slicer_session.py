"""The segmentation session the server holds per volume, and the module's model settings.

The session is driven with a stand-in predictor that thresholds the slice it is given, on a
synthetic ball whose extent is known by construction, so the slices a run may and may not touch
are known exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "UltraSamSlicer"
sys.path[:0] = [str(MODULE_DIR), str(MODULE_DIR / "Testing" / "Python")]
from slicer_test_fakes import ThresholdModel, ball  # noqa: E402
from ultrasam.session import SegmentationSession, Span  # noqa: E402
from ultrasam.geometry import Geometry, Volume  # noqa: E402
from ultrasam.prompts3d import VolumePrompts  # noqa: E402
from ultrasam.propagation import PropagationCancelled  # noqa: E402

SHAPE = (24, 20, 22)
CENTER_KJI = np.array([10, 9, 11])
RADIUS = 4.2  # ball covers slices 6..14 along every axis through its centre


def ball_volume() -> Volume:
    inside = ball(SHAPE, CENTER_KJI, RADIUS)
    geometry = Geometry(origin_lps=[3.0, -2.0, 7.0], spacing=[0.5, 0.7, 1.1])
    return Volume(np.where(inside, 200, 0).astype(np.uint8), geometry, "ball")


def session_and_log(volume):
    log = []
    return SegmentationSession(volume, None, slice_predictor=lambda s: ThresholdModel(s, log)), log


def centre_prompt(volume) -> VolumePrompts:
    ras = volume.geometry.ijk_to_ras(CENTER_KJI[::-1].astype(float))
    return VolumePrompts(ras[None], [1], frame="ras")


def segmented_slices(mask, axis) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(mask.any(axis=other)).tolist()


def test_preview_segments_only_the_prompted_slice():
    volume = ball_volume()
    session, _ = session_and_log(volume)
    result = session.run(centre_prompt(volume), propagate=False)
    assert segmented_slices(result.mask, 0) == [10]
    assert np.array_equal(result.mask[10], volume.voxels[10] > 100)


@pytest.mark.parametrize("span, expected", [
    (Span("both"), list(range(6, 15))),
    (Span("forward"), list(range(10, 15))),
    (Span("backward"), list(range(6, 11))),
    (Span("both", first=8, last=12), list(range(8, 13))),
])
def test_propagation_stays_inside_its_span(span, expected):
    volume = ball_volume()
    session, log = session_and_log(volume)
    result = session.run(centre_prompt(volume), propagate=True, span=span)
    assert segmented_slices(result.mask, 0) == expected
    assert np.array_equal(result.mask > 0, (volume.voxels > 100) & _slab(expected))
    lo, hi = span.bounds([10], SHAPE[0])
    assert all(lo <= index <= hi for index, _ in log)  # nothing computed outside the span


def _slab(indices):
    slab = np.zeros(SHAPE, bool)
    slab[indices] = True
    return slab


def test_prompt_outside_the_range_is_refused_with_advice():
    volume = ball_volume()
    session, _ = session_and_log(volume)
    with pytest.raises(ValueError, match="outside the propagation range"):
        session.run(centre_prompt(volume), propagate=True, span=Span("both", first=12))


def test_axis_follows_the_view_and_the_point_stays_put():
    volume = ball_volume()
    session, _ = session_and_log(volume)
    assert session.set_axis(2) and not session.set_axis(2)
    result = session.run(centre_prompt(volume), propagate=False)
    assert segmented_slices(result.mask, 2) == [11]
    assert np.array_equal(result.mask[:, :, 11], volume.voxels[:, :, 11] > 100)


def test_cancel_keeps_the_previous_result_and_reruns_reuse_it():
    volume = ball_volume()
    session, log = session_and_log(volume)
    first = session.run(centre_prompt(volume), propagate=True)
    calls = len(log)
    session.run(centre_prompt(volume), propagate=True)
    assert len(log) == calls  # same prompt: nothing recomputed
    moved = VolumePrompts(volume.geometry.ijk_to_ras(np.array([11.0, 9.0, 12.0]))[None], [1], frame="ras")
    with pytest.raises(PropagationCancelled):
        session.run(moved, propagate=True, should_cancel=lambda: True)
    again = session.run(centre_prompt(volume), propagate=True)
    assert np.array_equal(again.mask, first.mask)
    assert "9 slice(s) segmented, 6..14 along k" in again.summary()


class Everywhere(ThresholdModel):
    """A model as sure of itself on blank input as SAM-type models are: the whole slice, IoU 0.9."""

    def predict(self, index, prompt, mask_input=None):
        prediction = super().predict(index, prompt, mask_input)
        return type(prediction)(np.ones_like(prediction.mask), 0.9, prediction.low_res_logits)


def test_blank_slices_stay_empty_unasked_and_the_result_says_so_as_ultrasam_segment_does():
    volume = ball_volume()  # zero outside the ball: slices 0..5 and 15..23 hold one grey value
    log = []
    session = SegmentationSession(volume, None, slice_predictor=lambda slices: Everywhere(slices, log))
    result = session.run(centre_prompt(volume), propagate=True)
    assert segmented_slices(result.mask, 0) == list(range(6, 15)) and result.mask[6:15].all()
    assert sorted({index for index, _ in log}) == list(range(6, 15))  # the model never saw a blank slice
    assert result.warnings == ["slice(s) [5, 15] are blank (a single grey value) and were left empty"]

    on_blank = VolumePrompts(volume.geometry.ijk_to_ras(np.array([11.0, 9.0, 2.0]))[None], [1], frame="ras")
    with pytest.raises(ValueError, match=r"prompted slice\(s\) \[2\] are blank"):
        session.run(on_blank, propagate=False)
    with pytest.raises(ValueError, match=r"every voxel has the value 0 \(a blank image\)"):
        SegmentationSession(Volume(np.zeros(SHAPE, np.uint8), volume.geometry, "blank"), None)


def test_with_a_real_model_the_session_gives_what_the_core_gives(tiny_sam):
    # The session adds cropping, axis following and incremental reruns on top of the core; with a
    # real (tiny, random) SAM it must reproduce the core's own volume segmentation exactly.
    from ultrasam.batch import segment_volume
    from ultrasam.predictor import Predictor
    from ultrasam.propagation import StopRules
    from ultrasam.volume_embeddings import VolumeEmbeddingCache

    full = ball_volume()
    volume = Volume(full.voxels[:, 6:11].copy(), full.geometry, "slab")  # 5 slices along j: little CPU time
    cache = VolumeEmbeddingCache(Predictor(tiny_sam, device="cpu"))  # shared: each slice embedded once
    rules = StopRules(min_iou=-10.0, max_growth=1e9)  # random weights: judge nothing, walk on
    prompts = VolumePrompts(volume.geometry.ijk_to_ras(np.array([11.0, 3.0, 10.0]))[None], [1], frame="ras")
    expected, _ = segment_volume(volume, cache.predictor, prompts, axis=1, propagate=True, rules=rules, cache=cache)
    session = SegmentationSession(volume, cache, rules)
    session.set_axis(1)
    result = session.run(prompts, propagate=True)
    assert expected.any()
    np.testing.assert_array_equal(result.mask, expected)


def test_model_settings_fall_back_to_the_shipped_model_and_say_how_to_get_ultrasam(tmp_path, monkeypatch):
    import ultrasam.resources
    from UltraSamSlicerLib.engine import serve_arguments
    from UltraSamSlicerLib.models import ModelSettings

    settings = ModelSettings(cache_dir=str(tmp_path), device="cpu", precision="float32", cache_gib=1.5)
    assert settings.checkpoint_path() == ultrasam.resources.SHIPPED_MODEL
    assert serve_arguments(settings) == ["--checkpoint", str(ultrasam.resources.SHIPPED_MODEL), "--device", "cpu",
                                         "--precision", "float32", "--cache-gib", "1.5"]
    monkeypatch.setattr(ultrasam.resources, "SHIPPED_MODEL", tmp_path / "not-installed.pth")
    with pytest.raises(FileNotFoundError, match="Download UltraSam weights"):
        ModelSettings(cache_dir=str(tmp_path)).checkpoint_path()
    (tmp_path / "UltraSam.pth").write_bytes(b"")
    assert ModelSettings(cache_dir=str(tmp_path)).checkpoint_path() == tmp_path / "UltraSam.pth"
    with pytest.raises(FileNotFoundError, match="choose another file"):
        ModelSettings(checkpoint=str(tmp_path / "nope.pth")).checkpoint_path()


def test_model_settings_name_the_bundled_compact_v1_and_litemedsam(tmp_path, monkeypatch):
    import ultrasam.resources
    from UltraSamSlicerLib.engine import serve_arguments
    from UltraSamSlicerLib.models import COMPACT_V1, LITEMEDSAM, NAMED_MODELS, ModelSettings

    assert COMPACT_V1 == ultrasam.resources.COMPACT_V1 and LITEMEDSAM == ultrasam.resources.LITEMEDSAM
    assert {COMPACT_V1, LITEMEDSAM} < set(NAMED_MODELS)
    settings = ModelSettings(checkpoint=COMPACT_V1, device="cpu")
    assert settings.checkpoint_path() == ultrasam.resources.COMPACT_V1_MODEL
    assert serve_arguments(settings)[:2] == ["--checkpoint", str(ultrasam.resources.COMPACT_V1_MODEL)]
    monkeypatch.setattr(ultrasam.resources, "COMPACT_V1_MODEL", tmp_path / "not-installed.pth")
    with pytest.raises(FileNotFoundError, match="reinstall the UltraSamSlicer extension"):
        settings.checkpoint_path()
