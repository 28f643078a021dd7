"""Image embeddings of a volume's slices: computed in batches when needed, kept under a memory bound.

An embedding is 256 x 64 x 64 values per slice (4 MiB in float32, 2 MiB in bf16), so a volume of
a few hundred slices does not fit on every GPU next to the model. :class:`VolumeEmbeddingCache`
keeps the most recently used embeddings on the predictor's device (in bf16 on CUDA), moves the
least recently used ones to CPU memory when the device budget is exceeded, and drops them when
the CPU budget is exceeded too (they are recomputed if needed again).

Entries are keyed by the volume's voxel content, the slicing axis, the intensity window and the
predictor's model and mode, so editing the voxels, changing the window or loading other weights
can never return a stale embedding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

import torch

from ultrasam.predictor import ImageEmbedding, Prediction, Predictor, Prompt2D
from ultrasam.slicing import VolumeSlices

GIB = 1 << 30


class VolumeEmbeddingCache:
    """Slice embeddings of any number of volumes for one predictor, within memory budgets.

    Args:
        predictor: computes the embeddings (its ``batch_size`` sets the batch).
        device_bytes: budget on the predictor's device; least recently used entries beyond it
            move to CPU memory.
        host_bytes: budget in CPU memory for moved entries; beyond it they are dropped.
    """

    def __init__(self, predictor: Predictor, device_bytes: int = 2 * GIB, host_bytes: int = 8 * GIB) -> None:
        self.predictor = predictor
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        on_cuda = predictor.device.type == "cuda"
        self.storage_dtype = torch.bfloat16 if on_cuda else torch.float32
        self._device: OrderedDict[tuple[str, int], ImageEmbedding] = OrderedDict()
        self._host: OrderedDict[tuple[str, int], ImageEmbedding] = OrderedDict()
        self.computed = 0  # slices embedded so far (for reports and tests)

    def get(self, slices: VolumeSlices, indices: Sequence[int]) -> list[ImageEmbedding]:
        """Embeddings of slices ``indices`` (float32, on the predictor's device), computing only
        the missing ones, in batches."""
        key = f"{slices.content_key}:{self.predictor.model_key}:{self.predictor.mode}"
        wanted = [(key, int(index)) for index in indices]
        found = {}
        for entry in dict.fromkeys(wanted):
            if entry in self._device or entry in self._host:  # checked late: a fetch may spill others
                found[entry] = self._fetch(entry)
        missing = [entry for entry in dict.fromkeys(wanted) if entry not in found]
        if missing:
            images = [slices.image(index) for _, index in missing]
            for entry, embedding in zip(missing, self.predictor.embed(images, cache=False)):
                found[entry] = _for_use(self._store(entry, embedding))
            self.computed += len(missing)
        return [found[entry] for entry in wanted]

    def clear(self) -> None:
        self._device.clear()
        self._host.clear()

    @property
    def device_used(self) -> int:
        return sum(_nbytes(e) for e in self._device.values())

    @property
    def host_used(self) -> int:
        return sum(_nbytes(e) for e in self._host.values())

    def _store(self, entry: tuple[str, int], embedding: ImageEmbedding) -> ImageEmbedding:
        stored = replace(embedding, features=embedding.features.to(self.predictor.device, self.storage_dtype))
        self._device[entry] = stored
        self._device.move_to_end(entry)
        self._spill()
        return stored

    def _fetch(self, entry: tuple[str, int]) -> ImageEmbedding:
        if entry in self._host:
            return _for_use(self._store(entry, self._host.pop(entry)))
        self._device.move_to_end(entry)
        return _for_use(self._device[entry])

    def _spill(self) -> None:
        """Move least recently used entries to CPU beyond the device budget; drop beyond the CPU one."""
        used = self.device_used
        while used > self.device_bytes and len(self._device) > 1:
            entry, embedding = self._device.popitem(last=False)
            used -= _nbytes(embedding)
            self._host[entry] = replace(embedding, features=embedding.features.to("cpu"))
        host = self.host_used
        while host > self.host_bytes and self._host:
            host -= _nbytes(self._host.popitem(last=False)[1])


def _for_use(stored: ImageEmbedding) -> ImageEmbedding:
    """The float32 embedding the decoder takes, from a stored (possibly bf16) one."""
    return replace(stored, features=stored.features.float())


def _nbytes(embedding: ImageEmbedding) -> int:
    return embedding.features.numel() * embedding.features.element_size()


class VolumeSlicePredictor:
    """A :class:`~ultrasam.propagation.SlicePredictor` for one slice stack and a real Predictor.

    Args:
        slices: the volume along the chosen axis.
        cache: embeddings store (shared between volumes and runs).
        refine: passed to :meth:`Predictor.predict` (None: the predictor mode's default).
    """

    def __init__(self, slices: VolumeSlices, cache: VolumeEmbeddingCache, refine: bool | None = None) -> None:
        self.slices, self.cache, self.refine = slices, cache, refine

    def prefetch(self, indices: Sequence[int]) -> None:
        self.cache.get(self.slices, indices)

    def predict(self, index: int, prompt: Prompt2D, mask_input: torch.Tensor | None = None) -> Prediction:
        embedding = self.cache.get(self.slices, [index])[0]
        return self.cache.predictor.predict(embedding, prompt, mask_input=mask_input, refine=self.refine)
