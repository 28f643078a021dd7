"""From a data sample to the model's input, and which samples each training step sees.

Randomness here (object subset, flip, prompts) comes from a per-sample seed that
:class:`StepBatches` derives from the run seed and the sample's position in the run, never from a
global generator. So the data of step ``s`` is a pure function of ``(seed, s, rank)``: a resumed
run sees exactly what an uninterrupted one would, with any number of loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ultrasam.resize import fix_scale_size, resize_bilinear
from ultrasam_data.coco import DataError, Problem
from ultrasam_training.prompts import Prompts, fixed_prompts, random_free_box, sample_prompts, with_free_box


@dataclass
class Item:
    """One image ready for SAM.

    Attributes:
        image: (3, h, w) uint8, the image resized so its long side is the model's input size
            (UltraSam's truncating resize), not yet normalised or padded.
        target: (N, L, L) float in {0, 1}, each object's mask on SAM's low-resolution grid of the
            padded input (L = 4 x the embedding grid: input size / 4 for SAM's 16-pixel patches).
        prompts: N prompts in the ``xy`` frame of ``image``.
        masks: (N, h, w) bool masks at ``image``'s resolution (validation items only, else None).
        dataset: name of the data set the image comes from (validation reports per data set).
        ignore: (N, L, L) bool, target pixels no loss looks at (a free box's inside), or None.
        skipped: the unreadable samples passed over to reach this one (the trainer reports them).
    """

    image: torch.Tensor
    target: torch.Tensor
    prompts: Prompts
    masks: Optional[torch.Tensor]
    dataset: str
    ignore: Optional[torch.Tensor] = None
    skipped: tuple[Problem, ...] = ()


@dataclass(frozen=True)
class PrepareOptions:
    """How samples become items: model input size, object cap, flip, and the prompts to use.

    ``prompt_kind`` "random" draws training prompts (``box_probability``, ``box_jitter``);
    "box" or "point" gives the fixed evaluation prompts (exact box, mask centroid).
    ``low_res_size`` is the side of the model's low-resolution mask grid (``Sam.prompt_encoder.
    mask_input_size``); 0 means SAM's ``image_size / 4``. With "random" prompts, each image gets
    with ``free_box_probability`` one more box, on tissue at least ``image_size / 64`` pixels from
    any object (:func:`ultrasam_training.prompts.random_free_box`): its target is empty outside
    the box and ignored inside (``Item.ignore``), so it teaches the answer to stay in its box.
    """

    image_size: int
    max_objects: int = 20
    flip: bool = False
    prompt_kind: str = "random"
    box_probability: float = 0.5
    box_jitter: float = 0.05
    keep_masks: bool = False
    low_res_size: int = 0
    free_box_probability: float = 0.0


def resize_image(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8, long side ``image_size`` (UltraSam's truncated sizes), bilinear."""
    size = fix_scale_size(image.shape[1], image.shape[2], image_size)
    return resize_bilinear(image[None], size)[0].to(torch.uint8)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool -> (N, h, w) bool, as their image is resized: bilinear, kept where >= 0.5."""
    return F.interpolate(masks[None].float(), size=size, mode="bilinear", align_corners=False)[0] >= 0.5


def prepare(sample: Any, options: PrepareOptions, generator: torch.Generator) -> Item:
    """Turn a data sample (``image`` (H, W, 3) uint8, ``masks`` (N, H, W) bool, ``dataset``) into an Item.

    Objects beyond ``max_objects`` are dropped at random; objects that vanish at the input
    resolution are dropped (they cannot be prompted).
    """
    image = torch.tensor(np.asarray(sample.image)).permute(2, 0, 1)
    masks = torch.tensor(np.asarray(sample.masks), dtype=torch.bool)
    if len(masks) > options.max_objects:
        keep = torch.randperm(len(masks), generator=generator)[: options.max_objects].sort().values
        masks = masks[keep]
    if options.flip and bool(torch.rand(1, generator=generator) < 0.5):
        image, masks = image.flip(-1), masks.flip(-1)
    image = resize_image(image, options.image_size)
    size = tuple(image.shape[1:])
    masks = resize_masks(masks, size)
    masks = masks[masks.flatten(1).any(dim=1)]
    target = low_res_target(masks, options.image_size, options.low_res_size or options.image_size // 4)
    ignore = None
    if options.prompt_kind == "random":
        prompts = sample_prompts(masks, options.box_probability, options.box_jitter, generator)
        if len(masks) and options.free_box_probability and bool(torch.rand(1, generator=generator)
                                                                < options.free_box_probability):
            free = random_free_box(masks, max(1, options.image_size // 64), generator)
            if free is not None:
                prompts = with_free_box(prompts, free)
                inside = box_cells(free, options.image_size, target.shape[-1])
                ignore = torch.cat([torch.zeros_like(target, dtype=torch.bool), inside[None]])
                target = torch.cat([target, torch.zeros_like(target[:1])])
    else:
        prompts = fixed_prompts(masks, options.prompt_kind)
    return Item(
        image=image,
        target=target,
        prompts=prompts,
        masks=masks if options.keep_masks else None,
        dataset=str(getattr(sample, "dataset", "")),
        ignore=ignore,
    )


def box_cells(box_xyxy: torch.Tensor, image_size: int, low_res_size: int) -> torch.Tensor:
    """(L, L) bool: the cells of the low-resolution grid that overlap ``box_xyxy`` (input pixels,
    pixel edges); cell ``c`` covers input pixels ``c * s .. (c + 1) * s - 1``, ``s = image_size / L``."""
    step = image_size / low_res_size
    starts = torch.arange(low_res_size) * step - 0.5  # each cell's first pixel edge
    x0, y0, x1, y1 = box_xyxy.tolist()
    columns = (starts + step > x0) & (starts < x1)
    rows = (starts + step > y0) & (starts < y1)
    return rows[:, None] & columns[None, :]


def low_res_target(masks: torch.Tensor, image_size: int, low_res_size: int) -> torch.Tensor:
    """(N, h, w) bool masks -> (N, L, L) {0, 1} float on the low-res grid (side L) of the padded input."""
    if image_size % low_res_size:
        raise ValueError(f"the low-resolution grid ({low_res_size}) must divide the input size ({image_size})")
    padded = F.pad(masks.float(), (0, image_size - masks.shape[2], 0, image_size - masks.shape[1]))
    return (F.avg_pool2d(padded[:, None], kernel_size=image_size // low_res_size)[:, 0] >= 0.5).float()


def derived_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from non-negative integer keys (run seed, stream, position)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


class StepBatches:
    """Batch sampler: for steps ``start .. steps - 1``, this rank's ``(index, seed)`` pairs.

    The run reads one endless stream of sample positions; position ``p`` is index
    ``perm_e[p % n]`` of epoch ``e = p // n`` (a fresh permutation per epoch, from the seed). Step
    ``s`` takes positions ``s * B * world + rank * B + (0 .. B - 1)``, so the ranks together read
    each epoch once.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1):
        if size < 1:
            raise ValueError("the training set is empty: check data.train and the data check report")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.steps, self.rank, self.world = start, steps, rank, world
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.batch_size
            yield [(self.index(p), derived_seed(self.seed, 0, p)) for p in range(first, first + self.batch_size)]

    def index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, 1, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator)
        return int(self._perm[position % self.size])


class PreparedDataset(torch.utils.data.Dataset):
    """Items from a sequence of samples; indexed by ``(index, seed)`` pairs or plain indices."""

    def __init__(self, samples: Sequence[Any], options: PrepareOptions):
        self.samples, self.options = samples, options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        """The item at ``index``; an unreadable sample is passed over for the next one and listed
        in the item's ``skipped``, so the trainer can refuse or report it."""
        index, seed = key if isinstance(key, tuple) else (key, key)
        passed_over = []
        for offset in range(len(self.samples)):
            position = (index + offset) % len(self.samples)
            try:
                sample = self.samples[position]
            except DataError as error:
                passed_over.append(Problem(error.kind, error.where or f"sample {position}", error.detail))
                continue
            item = prepare(sample, self.options, torch.Generator().manual_seed(seed))
            item.skipped = tuple(passed_over)
            return item
        raise DataError("no readable image", "every sample failed to load; run `python -m ultrasam_data.check`")


def collate(items: list[Item]) -> list[Item]:
    """Items stay a list: images differ in size until SAM pads them, objects differ in number."""
    return items
