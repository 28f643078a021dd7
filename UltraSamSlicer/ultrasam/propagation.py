"""Key-slice prompts -> a whole-volume mask, by propagating masks from slice to slice.

Each prompted key slice is segmented from its own prompt. From there a walk goes outward, one
slice at a time, in both directions: the next slice is prompted with the box of the previous mask
and the previous low-resolution logits as mask input (UltraSam's refine pass, carried across
slices). A walk ends when the object ends (stop rules), at the volume's edge, or where it meets
the territory of the next key slice: every slice between two key slices belongs to the nearer one
(the lower one on a tie), so two walks meet at the same place whatever order they run in.

:class:`Propagator` keeps its result between runs: changing the prompt of one key slice recomputes
that key slice and the two walks leaving it; adding or removing a key slice trims or extends its
neighbours' walks without recomputing what they already hold. A run that is cancelled leaves the
previous result as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from ultrasam.geometry import mask_box
from ultrasam.predictor import Prediction, Prompt2D

VANISHED, LOW_IOU, AREA_JUMP = "vanished", "low_iou", "area_jump"
EDGE, MET = "edge", "met"


class SlicePredictor(Protocol):
    """What propagation needs from a model: a mask for one slice of one volume along one axis."""

    def predict(self, index: int, prompt: Prompt2D, mask_input: torch.Tensor | None = None) -> Prediction:
        """Segment slice ``index``; ``mask_input`` is (1, 1, 256, 256) low-resolution logits or None."""

    def prefetch(self, indices: Sequence[int]) -> None:
        """Hint: these slices are needed next (a real predictor embeds them in one batch)."""


class PropagationCancelled(RuntimeError):
    """The run was cancelled; the propagator still holds the result of the previous run."""


@dataclass(frozen=True)
class StopRules:
    """When a walk decides the object has ended. The slice that breaks a rule is left empty.

    Attributes:
        min_area: a mask with fewer pixels has vanished.
        min_iou: a predicted IoU below this is not trusted (UltraSam's score is the raw IoU head,
            it can exceed 1).
        max_growth: a mask larger than ``max_growth`` x the previous slice's area (or
            ``max_growth`` x ``growth_floor``, whichever is larger) has leaked out of the object.
        growth_floor: area in pixels below which growth is not judged (tiny masks at an object's
            tip change shape fast).
    """

    min_area: int = 1
    min_iou: float = 0.5
    max_growth: float = 3.0
    growth_floor: int = 50

    def verdict(self, area: int, iou: float, previous_area: int) -> str | None:
        """Why a slice with this ``area`` and ``iou`` ends the walk, or None to go on."""
        if area < self.min_area:
            return VANISHED
        if iou < self.min_iou:
            return LOW_IOU
        if area > self.max_growth * max(previous_area, self.growth_floor):
            return AREA_JUMP
        return None


@dataclass(frozen=True, eq=False)
class SliceResult:
    """One segmented slice.

    Attributes:
        index: slice index along the slicing axis.
        key: the key slice whose prompt or walk produced it.
        mask: (H, W) bool in slice pixels; empty when ``stop`` is set.
        iou: predicted IoU.
        area: pixels in the predicted mask (before any rejection).
        stop: None when accepted, else the rule that rejected the slice and ended the walk.
        logits: (1, 1, 256, 256) low-resolution logits on the CPU, kept for accepted slices so a
            walk can later be extended from any of them.
    """

    index: int
    key: int
    mask: np.ndarray
    iou: float
    area: int
    stop: str | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)


@dataclass(frozen=True, eq=False)
class Walk:
    """Slices reached from one key slice in one direction (+1 or -1), nearest first.

    ``limit`` is the last slice it may reach; ``end`` says why it ended: a stop rule, EDGE (the
    volume's edge, or the span's) or MET (the next key slice's territory).
    """

    key: int
    direction: int
    limit: int
    steps: tuple[SliceResult, ...]
    end: str


@dataclass(frozen=True)
class KeyResult:
    prompt: Prompt2D
    result: SliceResult


@dataclass(frozen=True)
class PropagationResult:
    """Masks of every segmented slice, plus how each walk ended.

    Attributes:
        slices: {slice index: SliceResult} for key slices and every slice a walk visited.
        walks: every walk, lowest key first, downward walk before upward.
    """

    slices: dict[int, SliceResult]
    walks: tuple[Walk, ...]

    def masks(self) -> dict[int, np.ndarray]:
        """{slice index: (H, W) bool} of accepted, non-empty slices."""
        return {i: r.mask for i, r in self.slices.items() if r.stop is None and r.area > 0}


class Propagator:
    """Segments a volume from key-slice prompts and keeps the result for incremental reruns.

    Args:
        predictor: segments single slices of one volume along one axis.
        num_slices: number of slices along that axis.
        rules: when a walk stops.
        propagate: False segments the key slices only.
        lookahead: slices announced to ``predictor.prefetch`` ahead of a walk (its batch size).
    """

    def __init__(
        self,
        predictor: SlicePredictor,
        num_slices: int,
        rules: StopRules = StopRules(),
        propagate: bool = True,
        lookahead: int = 1,
    ) -> None:
        self.predictor, self.num_slices, self.rules = predictor, num_slices, rules
        self.propagate, self.lookahead = propagate, max(1, lookahead)
        self._keys: dict[int, KeyResult] = {}
        self._walks: dict[tuple[int, int], Walk] = {}

    @property
    def result(self) -> PropagationResult:
        """The result of the last completed run."""
        slices = {key.result.index: key.result for key in self._keys.values()}
        for walk in self._walks.values():
            slices.update({step.index: step for step in walk.steps})
        walks = tuple(self._walks[k] for k in sorted(self._walks))
        return PropagationResult(dict(sorted(slices.items())), walks)

    def run(
        self,
        prompts: Mapping[int, Prompt2D],
        should_cancel: Callable[[], bool] = lambda: False,
        on_slice: Callable[[SliceResult], None] = lambda result: None,
        span: tuple[int, int] | None = None,
    ) -> PropagationResult:
        """Segment from ``prompts`` ({key slice index: prompt}), reusing what is still valid.

        Args:
            should_cancel: polled before every slice; True raises :class:`PropagationCancelled`
                and keeps the previous result.
            on_slice: called after every newly segmented slice (progress reporting).
            span: inclusive (first, last) slices walks may reach (default: the whole volume);
                a walk reaching its end stops with EDGE.
        """
        if not prompts:
            raise ValueError("no key slice has a prompt; place a point, box or ROI on the volume first")
        first, last = (0, self.num_slices - 1) if span is None else (max(0, span[0]), min(self.num_slices - 1, span[1]))
        outside = sorted(index for index in prompts if not first <= index <= last)
        if outside:
            raise IndexError(f"key slice(s) {outside} lie outside the slices {first}..{last} propagation may reach")
        step = _Stepper(self, should_cancel, on_slice, (first, last))
        order = sorted(prompts)
        keys = {index: step.key(index, prompts[index], order[n:n + self.lookahead]) for n, index in enumerate(order)}
        walks = {}
        if self.propagate:
            for (index, direction), limit in _territories(sorted(keys), first, last).items():
                walks[index, direction] = step.walk(keys[index], direction, limit)
        self._keys, self._walks = keys, walks
        return self.result


def _territories(keys: Sequence[int], first: int, last: int) -> dict[tuple[int, int], int]:
    """{(key, direction): last slice that walk may reach}; ties between two keys go to the lower."""
    limits = {}
    for n, key in enumerate(keys):
        limits[key, -1] = (keys[n - 1] + key) // 2 + 1 if n > 0 else first
        limits[key, +1] = (key + keys[n + 1]) // 2 if n + 1 < len(keys) else last
    return limits


@dataclass
class _Stepper:
    """One run's computations, reading (never changing) the propagator's previous state."""

    owner: Propagator
    should_cancel: Callable[[], bool]
    on_slice: Callable[[SliceResult], None]
    span: tuple[int, int]

    def key(self, index: int, prompt: Prompt2D, ahead: list[int]) -> KeyResult:
        """Key slice ``index`` segmented from ``prompt`` (reused if the prompt is unchanged);
        ``ahead`` are the next key slices, embedded together."""
        previous = self.owner._keys.get(index)
        if previous is not None and _same_prompt(previous.prompt, prompt):
            return previous
        prediction = self._predict(index, prompt, None, ahead)
        result = _result(index, index, prediction, None)
        self.on_slice(result)
        return KeyResult(prompt, result)

    def walk(self, key: KeyResult, direction: int, limit: int) -> Walk:
        index = key.result.index
        previous = self.owner._walks.get((index, direction))
        if previous is not None and self.owner._keys.get(index) is key:
            return self._reuse(previous, key, limit)
        return self._extend(Walk(index, direction, limit, (), MET), key.result)

    def _reuse(self, walk: Walk, key: KeyResult, limit: int) -> Walk:
        """Trim ``walk`` to a nearer ``limit``, or extend it from where its old limit stopped it."""
        beyond = (lambda i: i > limit) if walk.direction > 0 else (lambda i: i < limit)
        if any(beyond(step.index) for step in walk.steps):
            kept = tuple(step for step in walk.steps if not beyond(step.index))
            return Walk(walk.key, walk.direction, limit, kept, self._boundary(walk.direction, limit))  # kept are accepted
        if walk.end not in (MET, EDGE):
            return replace(walk, limit=limit)  # stopped by a rule inside the new limit
        if limit == walk.limit:
            return replace(walk, end=self._boundary(walk.direction, limit))
        return self._extend(replace(walk, limit=limit), walk.steps[-1] if walk.steps else key.result)

    def _boundary(self, direction: int, limit: int) -> str:
        """Why a walk in ``direction`` that reached ``limit`` ended there."""
        return EDGE if limit == self.span[direction > 0] else MET

    def _extend(self, walk: Walk, last: SliceResult) -> Walk:
        """Continue ``walk`` past ``last``, its newest accepted slice (or its key slice)."""
        steps, direction, limit = list(walk.steps), walk.direction, walk.limit
        if last.area < self.owner.rules.min_area:
            return replace(walk, end=VANISHED)
        index = last.index + direction
        while (index <= limit) if direction > 0 else (index >= limit):
            ahead = list(range(index, limit + direction, direction))[: self.owner.lookahead]
            prompt = Prompt2D(points_xy=None, labels=None, box_xyxy=mask_box(last.mask))
            prediction = self._predict(index, prompt, last.logits, ahead)
            stop = self.owner.rules.verdict(int(prediction.mask.sum()), float(prediction.iou), last.area)
            result = _result(index, walk.key, prediction, stop)
            steps.append(result)
            self.on_slice(result)
            if stop is not None:
                return replace(walk, steps=tuple(steps), end=stop)
            last, index = result, index + direction
        return replace(walk, steps=tuple(steps), end=self._boundary(direction, limit))

    def _predict(self, index: int, prompt: Prompt2D, logits: torch.Tensor | None, ahead: list[int]) -> Prediction:
        if self.should_cancel():
            raise PropagationCancelled(f"cancelled before slice {index}; the previous result is kept")
        self.owner.predictor.prefetch(ahead)
        return self.owner.predictor.predict(index, prompt, logits)


def _result(index: int, key: int, prediction: Prediction, stop: str | None) -> SliceResult:
    """A SliceResult from a prediction: empty mask and no logits when ``stop`` rejects it."""
    mask, logits = prediction.mask, prediction.low_res_logits.detach().to("cpu")
    if stop is not None:
        mask, logits = np.zeros_like(mask), None
    return SliceResult(index, key, mask, float(prediction.iou), int(prediction.mask.sum()), stop, logits)


def _same_prompt(a: Prompt2D, b: Prompt2D) -> bool:
    fields = ("points_xy", "labels", "box_xyxy")
    return all(_same_array(getattr(a, name), getattr(b, name)) for name in fields)


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))
