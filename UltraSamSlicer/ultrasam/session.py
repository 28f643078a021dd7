"""One object being segmented in one volume: an interactive editor's state, free of Qt and MRML.

``ultrasam serve`` holds one per opened volume (:mod:`ultrasam.server`): the Segment Editor effect
sends prompts in world RAS and the server calls :meth:`SegmentationSession.run`; everything between
prompts and a (K, J, I) mask is the core's (:mod:`ultrasam.slicing`, :mod:`ultrasam.prompts3d`,
:mod:`ultrasam.propagation`). The session adds what an interactive editor needs on top:

- the slicing axis follows the view the user prompts in (points stay valid: they are 3D);
- a live preview segments the key slices only; "Propagate" walks out from them, and later
  prompts re-run propagation incrementally (only the walks a changed key slice affects);
- propagation can be limited to one direction or a slice range (the core's span: nothing outside
  it is computed, and changing it reuses what is still valid);
- one intensity window for the whole volume;
- the content checks of :mod:`ultrasam.content_checks`, as ``ultrasam segment`` has them: a blank
  or non-finite volume is refused, blank slices stay empty, and each result carries warnings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ultrasam.batch import slice_rows
from ultrasam.content_checks import (SkipBlankSlices, blank_slices, check_volume_content,
                                     checked_key_prompts, result_warnings)
from ultrasam.geometry import Volume
from ultrasam.intensity import choose_window
from ultrasam.prompts3d import VolumePrompts
from ultrasam.propagation import Propagator, SliceResult, StopRules
from ultrasam.slicing import VolumeSlices
from ultrasam.volume_embeddings import VolumeEmbeddingCache, VolumeSlicePredictor

DIRECTIONS = ("both", "forward", "backward")


@dataclass(frozen=True)
class Span:
    """Which slices propagation may reach, along the session's axis.

    Attributes:
        direction: "both", "forward" (increasing slice index from the lowest key slice) or
            "backward" (decreasing from the highest).
        first, last: optional inclusive slice range; None means the volume's edge.
    """

    direction: str = "both"
    first: int | None = None
    last: int | None = None

    def bounds(self, keys: list[int], num_slices: int) -> tuple[int, int]:
        """Inclusive (lo, hi) slice range for key slices ``keys`` (sorted)."""
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        lo = 0 if self.first is None else max(0, self.first)
        hi = num_slices - 1 if self.last is None else min(num_slices - 1, self.last)
        if self.direction == "forward":
            lo = max(lo, keys[0])
        elif self.direction == "backward":
            hi = min(hi, keys[-1])
        outside = [k for k in keys if not lo <= k <= hi]
        if outside:
            raise ValueError(
                f"prompted slice(s) {outside} lie outside the propagation range {lo}..{hi}: "
                "widen the range or remove those prompts"
            )
        return lo, hi


@dataclass
class SessionResult:
    """The mask a run produced.

    Attributes:
        mask: (K, J, I) uint8 0/1 on the session volume's grid.
        axis: numpy axis the slices were taken along.
        slices: per-slice reports (slice indices in the full volume).
        propagated: whether walks ran (False: key slices only).
        warnings: what the user should look at again (:func:`ultrasam.content_checks.result_warnings`).
        rows: ``slices`` as JSON-ready report rows (:func:`ultrasam.batch.slice_rows`).
    """

    mask: np.ndarray
    axis: int
    slices: list[SliceResult] = field(default_factory=list)
    propagated: bool = False
    warnings: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the status bar: slices segmented and why walks stopped."""
        kept = [s.index for s in self.slices if s.stop is None and s.area > 0]
        if not kept:
            return "no mask found: add a positive point inside the object or draw a box around it"
        stops = sorted({f"{s.stop} at slice {s.index}" for s in self.slices if s.stop})
        text = f"{len(kept)} slice(s) segmented, {min(kept)}..{max(kept)} along {'kji'[self.axis]}"
        return text + (f"; stopped: {', '.join(stops)}" if stops else "")


class SegmentationSession:
    """Prompts -> mask for one object in one volume, reusing work between runs.

    Args:
        volume: voxels with geometry ijk -> world RAS (from :mod:`mrml_bridge`).
        cache: the loaded model's slice-embedding store (shared across volumes and runs).
        rules: when propagation stops.
        slice_predictor: builds the per-slice predictor for the volume's slices along an axis (tests
            pass a fake); defaults to :class:`VolumeSlicePredictor` over ``cache``.
        lookahead: slices embedded per batch while propagating.

    Raises:
        ValueError: a blank or non-finite volume (nothing to segment).
    """

    def __init__(
        self,
        volume: Volume,
        cache: VolumeEmbeddingCache | None,
        rules: StopRules = StopRules(),
        slice_predictor: Callable[[VolumeSlices], object] | None = None,
        lookahead: int = 4,
    ) -> None:
        self.volume, self.rules, self.lookahead = volume, rules, lookahead
        self.volume_warnings = check_volume_content(volume)
        self.window = choose_window(volume.voxels)
        self._slices: VolumeSlices | None = None
        self._blank: set[int] = set()  # blank slices along the current axis
        self.axis = 0
        self.cache = cache
        self._make_predictor = slice_predictor or (lambda slices: VolumeSlicePredictor(slices, cache))
        self._propagator: Propagator | None = None

    def set_rules(self, rules: StopRules) -> None:
        """Use new stop rules from the next run on (earlier walks are recomputed)."""
        if rules != self.rules:
            self.rules, self._propagator = rules, None

    def set_axis(self, axis: int) -> bool:
        """Segment along numpy ``axis`` from now on; True when that changed it (results reset)."""
        if axis == self.axis:
            return False
        self.axis, self._propagator, self._slices = axis, None, None
        return True

    def embed_all(self, should_cancel: Callable[[], bool] = lambda: False,
                  on_progress: Callable[[int, int], None] = lambda done, total: None) -> bool:
        """Embed every slice along the current axis ahead of prompting (worthwhile on a GPU).

        Returns:
            True when every slice is embedded, False when ``should_cancel`` stopped it first.
        """
        slices = self.slices()
        batch = max(1, self.cache.predictor.batch_size)
        for start in range(0, slices.num_slices, batch):
            if should_cancel():
                return False
            self.cache.get(slices, range(start, min(start + batch, slices.num_slices)))
            on_progress(min(start + batch, slices.num_slices), slices.num_slices)
        return True

    def slices(self) -> VolumeSlices:
        """The volume as 8-bit slices along the current axis, with its one window (built once)."""
        if self._slices is None:
            self._slices = VolumeSlices(self.volume, self.axis, self.window)
            self._blank = blank_slices(self._slices)
        return self._slices

    def run(
        self,
        prompts: VolumePrompts,
        propagate: bool,
        span: Span = Span(),
        should_cancel: Callable[[], bool] = lambda: False,
        on_progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> SessionResult:
        """Segment from ``prompts`` (world RAS); key slices only, or propagated within ``span``.

        Raises:
            ValueError: a prompt lies outside the volume or the span, or on a blank slice (message
                says which).
            ultrasam.propagation.PropagationCancelled: ``should_cancel`` said so; the previous
                result is kept for the next run.
        """
        if prompts.is_empty():
            return SessionResult(np.zeros(self.volume.shape_kji, dtype=np.uint8), self.axis)
        slices = self.slices()
        keys = checked_key_prompts(slices, prompts, self._blank, self.volume.name or "the volume")
        span_range = span.bounds(sorted(keys), slices.num_slices) if propagate else None
        if self._propagator is None:
            predictor = SkipBlankSlices(self._make_predictor(slices), slices, self._blank)
            self._propagator = Propagator(predictor, slices.num_slices, self.rules, lookahead=self.lookahead)
        self._propagator.propagate = propagate
        first, last = span_range or (0, slices.num_slices - 1)
        done, total = [0], (last - first + 1 if propagate else len(keys))

        def on_slice(result: SliceResult) -> None:
            done[0] += 1
            on_progress(min(done[0], total), total)

        result = self._propagator.run(keys, should_cancel, on_slice, span_range)
        rows = slice_rows(result.slices.values(), float(np.prod(slices.pixel_spacing)))
        warnings = self.volume_warnings + result_warnings(slices, rows, result.masks(), self.rules.min_iou,
                                                          self._blank, keys)
        return SessionResult(slices.to_volume(result.masks()), self.axis, list(result.slices.values()), propagate,
                             warnings, rows)
