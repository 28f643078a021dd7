"""Propagation on the simulated prostate volumes with a predictor that returns the true masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_3d_fakes import TruthPredictor, needs_mrus3d, prostate_cases, read_prostate
from ultrasam.predictor import Prediction, Prompt2D
from ultrasam.prompts3d import VolumePrompts, slice_prompts
from ultrasam.propagation import (
    AREA_JUMP, EDGE, LOW_IOU, MET, VANISHED, PropagationCancelled, Propagator, StopRules,
)
from ultrasam.slicing import VolumeSlices


def occupied(mask_kji: np.ndarray, axis: int) -> list[int]:
    """Slice indices along ``axis`` holding any voxel of the mask."""
    return np.flatnonzero(mask_kji.any(axis=tuple(a for a in range(3) if a != axis))).tolist()


def inner_point_ras(slices: VolumeSlices, gland: np.ndarray, index: int) -> np.ndarray:
    """RAS position of the gland pixel nearest its centroid on slice ``index``."""
    rows, cols = np.nonzero(slices.slice_mask(gland, index))
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    ijk = slices.slice_to_ijk(index, [[cols[nearest], rows[nearest]]])
    return slices.volume.geometry.ijk_to_ras(ijk)


def point_prompts(slices, gland, keys):
    """Per-slice prompts: one positive point (given in RAS) on each slice of ``keys``."""
    points = np.concatenate([inner_point_ras(slices, gland, k) for k in keys])
    return slice_prompts(slices, VolumePrompts(points, np.ones(len(keys)), frame="ras"))


def point_run(slices, gland, keys, rules=StopRules()):
    """Propagate from one positive point (given in RAS) on each slice of ``keys``."""
    prompts = point_prompts(slices, gland, keys)
    fake = TruthPredictor(slices, gland)
    propagator = Propagator(fake, slices.num_slices, rules)
    return propagator, fake, propagator.run(prompts), prompts


def obs004_quarter_keys(axis):
    """obs004 sliced along ``axis``: slices, gland, the slices holding it, and the two key slices
    a quarter of its length in from either end."""
    volume, gland = read_prostate("obs004.nii.gz")
    slices = VolumeSlices(volume, axis)
    extent = occupied(gland, axis)
    return slices, gland, extent, extent[len(extent) // 4], extent[3 * len(extent) // 4]


@needs_mrus3d
@pytest.mark.parametrize("start", [1 / 2, 1 / 4, 3 / 4])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("case", prostate_cases())
def test_one_point_in_the_gland_recovers_the_gland(case, axis, start):
    """From the middle of the gland, or a quarter of its length in from either end."""
    volume, gland = read_prostate(case)
    slices = VolumeSlices(volume, axis)
    extent = occupied(gland, axis)
    key = extent[int(len(extent) * start)]
    _, fake, result, prompts = point_run(slices, gland, [key])
    assert list(prompts) == [key]
    mask = slices.to_volume(result.masks())
    assert occupied(mask, axis) == extent  # the full range, nothing outside
    np.testing.assert_array_equal(mask, gland)
    down, up = result.walks
    for walk, end_slice in ((down, extent[0] - 1), (up, extent[-1] + 1)):
        if 0 <= end_slice < slices.num_slices:
            assert walk.end == VANISHED and walk.steps[-1].index == end_slice
        else:
            assert walk.end == EDGE
    # Every propagated slice was prompted by the box of the previous slice's mask (pixel edges)
    # plus that slice's low-resolution logits (the fake marks them with the slice index).
    for index, prompt, logits in fake.calls:
        if index == key:
            continue
        previous = index + (1 if index < key else -1)
        rows, cols = np.nonzero(slices.slice_mask(gland, previous))
        box = [cols.min() - 0.5, rows.min() - 0.5, cols.max() + 0.5, rows.max() + 0.5]
        assert prompt.points_xy is None and prompt.box_xyxy.tolist() == box
        assert logits is not None and float(logits.flatten()[0]) == previous


@needs_mrus3d
@pytest.mark.parametrize("axis", [0, 2])
def test_two_key_slices_meet_halfway_in_either_order(axis):
    slices, gland, _, low, high = obs004_quarter_keys(axis)
    _, _, forward, _ = point_run(slices, gland, [low, high])
    _, _, backward, _ = point_run(slices, gland, [high, low])
    middle = (low + high) // 2
    for result in (forward, backward):
        np.testing.assert_array_equal(slices.to_volume(result.masks()), gland)
        assert {i: r.key for i, r in result.slices.items() if low <= i <= high} == {
            i: (low if i <= middle else high) for i in range(low, high + 1)
        }
        walk_ends = {(w.key, w.direction): w.end for w in result.walks}
        assert walk_ends[low, 1] == MET and walk_ends[high, -1] == MET


@needs_mrus3d
def test_reprompting_one_key_slice_recomputes_only_its_territory():
    slices, gland, extent, low, high = obs004_quarter_keys(0)
    propagator, fake, first, prompts = point_run(slices, gland, [low, high])
    fake.calls.clear()
    moved = dict(prompts)
    x, y = np.rint(prompts[high].points_xy[0]).astype(int)
    moved[high] = Prompt2D(points_xy=[[x, y]], labels=[1], box_xyxy=[x - 3, y - 3, x + 3, y + 3])
    second = propagator.run(moved)
    territory = set(range((low + high) // 2 + 1, extent[-1] + 2))
    assert fake.called_slices() == territory
    assert fake.called_slices().isdisjoint(range(extent[0] - 1, (low + high) // 2 + 1))
    for index in range(0, (low + high) // 2 + 1):
        assert second.slices.get(index) is first.slices.get(index)  # untouched, not recomputed


@needs_mrus3d
def test_adding_and_removing_a_key_slice_reuses_the_neighbours():
    slices, gland, extent, low, high = obs004_quarter_keys(0)
    propagator, fake, _, prompts = point_run(slices, gland, [low])
    single = slices.to_volume(propagator.result.masks())
    both = point_prompts(slices, gland, [low, high])
    fake.calls.clear()
    propagator.run(both)  # the new key slice takes over the upper half of the old walk
    assert min(fake.called_slices()) == (low + high) // 2 + 1
    fake.calls.clear()
    propagator.run(prompts)  # removed again: the old walk resumes where it met the other one
    assert fake.called_slices() == set(range((low + high) // 2 + 1, extent[-1] + 2))
    np.testing.assert_array_equal(slices.to_volume(propagator.result.masks()), single)


@needs_mrus3d
@pytest.mark.parametrize("stop_after", [0, 1, 7])
def test_cancelling_half_way_keeps_the_previous_result(stop_after):
    volume, gland = read_prostate("obs002.nii.gz")
    slices = VolumeSlices(volume, 2)
    extent = occupied(gland, 2)
    propagator, fake, before, prompts = point_run(slices, gland, [extent[len(extent) // 2]])
    saved = {i: (r.mask.copy(), r.iou, r.area, r.stop) for i, r in before.slices.items()}
    second_key = extent[len(extent) // 4]
    more = dict(prompts)
    more.update(point_prompts(slices, gland, [second_key]))
    calls = len(fake.calls)
    with pytest.raises(PropagationCancelled):
        propagator.run(more, should_cancel=lambda: len(fake.calls) >= calls + stop_after)
    after = propagator.result
    assert len(fake.calls) == calls + stop_after
    assert set(after.slices) == set(saved)
    for index, (mask, iou, area, stop) in saved.items():
        result = after.slices[index]
        np.testing.assert_array_equal(result.mask, mask)
        assert (result.iou, result.area, result.stop) == (iou, area, stop)


class ScriptedPredictor:
    """Prediction per slice from a table: {index: (mask, iou)}; absent slices give nothing."""

    def __init__(self, shape, table):
        self.shape, self.table = shape, table

    def prefetch(self, indices):
        pass

    def predict(self, index, prompt, mask_input=None):
        mask, iou = self.table.get(index, (np.zeros(self.shape, bool), 0.9))
        return Prediction(mask, iou, torch.zeros(1, 1, 256, 256))


def square(size: int, shape=(40, 40)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[5:5 + size, 5:5 + size] = True
    return mask


@pytest.mark.parametrize(
    "bad_slice, rules, reason",
    [
        ((square(1), 0.9), StopRules(min_area=2), VANISHED),
        ((square(10), 0.3), StopRules(min_iou=0.5), LOW_IOU),
        ((square(30), 0.9), StopRules(max_growth=3.0, growth_floor=10), AREA_JUMP),
    ],
)
def test_each_stop_rule_ends_the_walk_and_leaves_its_slice_empty(bad_slice, rules, reason):
    table = {i: (square(10), 0.9) for i in range(20)}
    table[14] = bad_slice
    propagator = Propagator(ScriptedPredictor((40, 40), table), 20, rules)
    result = propagator.run({10: Prompt2D(points_xy=[[10, 10]], labels=[1])})
    up = result.walks[1]
    assert (up.end, up.steps[-1].index, up.steps[-1].stop) == (reason, 14, reason)
    assert not result.slices[14].mask.any()
    assert sorted(result.masks()) == list(range(0, 14))


def test_growth_below_the_floor_is_not_a_jump():
    table = {i: (square(2 + i), 0.9) for i in range(8)}  # 4 -> 81 pixels, all under the floor x 3
    result = Propagator(ScriptedPredictor((40, 40), table), 8, StopRules(growth_floor=30)).run(
        {0: Prompt2D(points_xy=[[5, 5]], labels=[1])})
    assert sorted(result.masks()) == list(range(8)) and result.walks[1].end == EDGE


def test_without_propagation_only_key_slices_are_segmented():
    table = {i: (square(10), 0.9) for i in range(20)}
    result = Propagator(ScriptedPredictor((40, 40), table), 20, propagate=False).run(
        {3: Prompt2D(points_xy=[[10, 10]], labels=[1]), 9: Prompt2D(box_xyxy=[4, 4, 16, 16])})
    assert sorted(result.masks()) == [3, 9] and result.walks == ()


def test_key_slice_outside_the_stack_is_refused():
    with pytest.raises(IndexError, match="outside"):
        Propagator(ScriptedPredictor((4, 4), {}), 5).run({5: Prompt2D(points_xy=[[1, 1]], labels=[1])})


@needs_mrus3d
def test_span_limits_the_walks_and_widening_it_only_computes_the_new_slices():
    volume, gland = read_prostate("obs005.nii.gz")
    slices = VolumeSlices(volume, 1)
    extent = occupied(gland, 1)
    middle = extent[len(extent) // 2]
    prompts = point_prompts(slices, gland, [middle])
    fake = TruthPredictor(slices, gland)
    propagator = Propagator(fake, slices.num_slices)
    narrow = propagator.run(prompts, span=(middle - 3, middle + 5))
    assert sorted(narrow.masks()) == list(range(middle - 3, middle + 6))
    assert [w.end for w in narrow.walks] == [EDGE, EDGE]
    fake.calls.clear()
    wide = propagator.run(prompts)
    assert fake.called_slices() == set(range(extent[0] - 1, middle - 3)) | set(range(middle + 6, extent[-1] + 2))
    np.testing.assert_array_equal(slices.to_volume(wide.masks()), gland)
    fake.calls.clear()
    propagator.run(prompts, span=(middle - 3, middle + 5))  # narrowing again: trimmed, nothing computed
    assert fake.calls == [] and sorted(propagator.result.masks()) == list(range(middle - 3, middle + 6))
    with pytest.raises(IndexError, match="outside the slices"):
        propagator.run(prompts, span=(middle + 1, middle + 5))


def test_adjacent_key_slices_meet_without_a_gap():
    table = {i: (square(10), 0.9) for i in range(10)}
    prompt = Prompt2D(points_xy=[[10, 10]], labels=[1])
    result = Propagator(ScriptedPredictor((40, 40), table), 10).run({0: prompt, 1: prompt})
    ends = {(w.key, w.direction): (w.end, len(w.steps)) for w in result.walks}
    assert ends == {(0, -1): (EDGE, 0), (0, 1): (MET, 0), (1, -1): (MET, 0), (1, 1): (EDGE, 8)}
    assert sorted(result.masks()) == list(range(10))


def test_slices_are_announced_a_batch_ahead():
    table = {i: (square(10), 0.9) for i in range(12)}

    class Recording(ScriptedPredictor):
        def prefetch(self, indices):
            announced.append(list(indices))

    announced = []
    prompt = Prompt2D(points_xy=[[10, 10]], labels=[1])
    Propagator(Recording((40, 40), table), 12, lookahead=3).run({2: prompt, 4: prompt, 9: prompt})
    assert announced[:3] == [[2, 4, 9], [4, 9], [9]]  # key slices first, together
    assert announced[3:6] == [[1, 0], [0], [3]]  # then each walk, nearest slices first
