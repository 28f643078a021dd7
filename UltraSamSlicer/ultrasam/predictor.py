"""2D prediction: image embedding (batched, cached) and prompts -> mask, as UltraSam runs it.

Three modes share one code path and differ only where the models they serve differ:

``"ultrasam"`` (default for UltraSam weights), after mmdet's pipeline as UltraSam uses it:
  - resize: mmdet's ``FixScaleResize``, ``new = int(side * (S / long_side))`` (truncating;
    958x533 -> 1023x569) with ``cv2.resize`` (bilinear, uint8), see :mod:`ultrasam.resize`;
  - two-pass "refine" inference: pass 1 with the prompt (single mask); pass 2 with pass 1's
    low-resolution logits as mask input plus a box (the prompt's box, or for a single point the
    bounding box of pass 1's mask), multimask output, the mask with the highest predicted IoU kept;
  - post-processing: threshold the 256x256 logits at 0, then resize the *binary* mask bilinearly
    to the image and keep every pixel above 0.
``"sam"`` (Meta's ``SamPredictor``): rounded resize with PIL's bilinear filter, one pass, the upsampled
  logits thresholded at 0, multimask output for a lone point.
``"refine"`` (models trained by ``ultrasam_training`` with the refine round): the resize of that
  training (``ultrasam_training.prepare``: UltraSam's truncated size, torch's bilinear rounded to
  8 bits) and two passes, with SAM's post-processing (the logits upsampled, then thresholded), as
  that training validates them. UltraSam's binary-mask resize grows a mask by up to one low-resolution
  cell, which is 4 input pixels for SAM but 1/64 of the image for a model with a 64 x 64 grid.

Frames: prompts and masks are in the original image's pixel frame ``xy`` (x = column, integer
values are pixel centres); boxes are ``(x0, y0, x1, y1)`` in that frame, SAM's convention.
"""

from __future__ import annotations

import hashlib
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from segment_anything.modeling import Sam

from ultrasam.device import autocast_for, check_precision, choose_device, configure_device
from ultrasam.fast_attention import WarmCompiled, accelerate_image_encoder, accelerate_mask_decoder
from ultrasam.model_input import encoder_input
from ultrasam.precision import resolve_precision
from ultrasam.resize import fix_scale_size, resize_bilinear, resize_like_mmdet


@dataclass(frozen=True)
class Rules:
    """What an inference mode decides (see the module docstring)."""

    resize: str  # "mmdet": cv2, truncated size (UltraSam); "sam": PIL, rounded size; "training": torch, truncated
    refine: bool  # UltraSam's second pass
    binary_upsample: bool  # resize the thresholded low-res mask (UltraSam); else the logits (SAM)
    multimask_lone_point: bool  # SAM's three candidates for a single click


RULES = {
    "ultrasam": Rules(resize="mmdet", refine=True, binary_upsample=True, multimask_lone_point=False),
    "sam": Rules(resize="sam", refine=False, binary_upsample=False, multimask_lone_point=True),
    "refine": Rules(resize="training", refine=True, binary_upsample=False, multimask_lone_point=False),
}
MODES = tuple(RULES)


@dataclass(frozen=True)
class Prompt2D:
    """Prompts on one image, in its pixel frame ``xy``.

    Attributes:
        points_xy: (N, 2) click positions, or None.
        labels: (N,) 1 for a positive click, 0 for a negative one.
        box_xyxy: (4,) box (x0, y0, x1, y1), or None.
    """

    points_xy: np.ndarray | None = None
    labels: np.ndarray | None = None
    box_xyxy: np.ndarray | None = None

    def __post_init__(self) -> None:
        points = None if self.points_xy is None else np.asarray(self.points_xy, np.float64).reshape(-1, 2)
        labels = None if self.labels is None else np.asarray(self.labels, np.int64).reshape(-1)
        box = None if self.box_xyxy is None else np.asarray(self.box_xyxy, np.float64).reshape(4)
        if points is not None and len(points) == 0:
            points, labels = None, None
        if (points is None) != (labels is None) or (points is not None and len(points) != len(labels)):
            raise ValueError("give one label (1 positive, 0 negative) per point")
        if labels is not None and not np.isin(labels, (0, 1)).all():
            raise ValueError(f"point labels must be 1 (positive) or 0 (negative), got {labels.tolist()}")
        if points is None and box is None:
            raise ValueError("a prompt needs at least one point or a box")
        if box is not None and not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box.tolist()}")
        object.__setattr__(self, "points_xy", points)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "box_xyxy", box)

    def check_inside(self, height: int, width: int) -> None:
        """Raise ValueError naming the prompt that lies outside a (height, width) image."""
        limits = np.array([width - 0.5, height - 0.5])
        if self.points_xy is not None:
            outside = np.any((self.points_xy < -0.5) | (self.points_xy > limits), axis=1)
            if outside.any():
                raise ValueError(
                    f"point(s) {self.points_xy[outside].tolist()} lie outside the {width}x{height} image"
                )
        if self.box_xyxy is not None:
            x0, y0, x1, y1 = self.box_xyxy
            if x1 < -0.5 or y1 < -0.5 or x0 > limits[0] or y0 > limits[1]:
                raise ValueError(f"box {self.box_xyxy.tolist()} lies outside the {width}x{height} image")


@dataclass
class ImageEmbedding:
    """The image encoder's output for one image.

    Attributes:
        features: (1, C, G, G) encoder output (G = 64 for SAM), on the predictor's device.
        original_hw: (H, W) of the image given.
        input_hw: (h, w) of the resized image inside the S x S model input.
        key: content key the cache used.
    """

    features: torch.Tensor
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    key: str

    @property
    def scale_xy(self) -> np.ndarray:
        """(2,) factors from original pixels to model-input pixels, per axis (x, y)."""
        return np.array([self.input_hw[1] / self.original_hw[1], self.input_hw[0] / self.original_hw[0]])


@dataclass
class Prediction:
    """One mask in the original image frame.

    Attributes:
        mask: (H, W) bool.
        iou: the IoU head's raw score for this mask (not clamped; may exceed 1).
        low_res_logits: (1, 1, 256, 256) float32 logits in the padded model frame, usable as the
            ``mask_input`` of a following prediction (refinement, the next slice).
    """

    mask: np.ndarray
    iou: float
    low_res_logits: torch.Tensor


class Predictor:
    """Runs a SAM-architecture model on 2D images: embed once, prompt many times.

    Args:
        model: a ``segment_anything`` ``Sam`` (e.g. from :func:`ultrasam.checkpoint.load_model`);
            the predictor takes it over: it is moved to ``device`` and its image encoder and mask
            decoder switched to fused attention (:func:`ultrasam.fast_attention.accelerate_image_encoder`,
            :func:`~ultrasam.fast_attention.accelerate_mask_decoder`: same weights, same function).
        device: "auto", "cuda", "mps", "cpu" or a torch.device.
        mode: "ultrasam" or "sam" (see the module docstring).
        cache_size: how many image embeddings to keep (least recently used dropped first).
        batch_size: images per image-encoder call; halved for good when the GPU runs out of
            memory (down to 1, then the error is raised).
        precision: "auto", "float32" or "bfloat16" for the image encoder; "auto" is bf16 on CUDA
            and, on a CPU, the faster of the two by a timed run at the first embedding
            (:func:`ultrasam.precision.resolve_precision`, cached per machine and model). The
            decoder always runs in fp32.
        compile_decoder: compile the mask decoder with ``torch.compile`` on a background thread
            (clicks run eagerly until it is ready, then about 1.3x faster on this project's CPU; see
            docs/BENCHMARKS.md). Needs a working inductor toolchain; on failure it stays eager.
    """

    def __init__(self, model: Sam, device: str | torch.device = "auto", mode: str = "ultrasam",
                 cache_size: int = 32, batch_size: int = 4, precision: str = "auto",
                 compile_decoder: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.precision = check_precision(precision)
        self._encoder_precision: str | None = None
        self.device = choose_device(device)
        configure_device(self.device)
        self.model = accelerate_mask_decoder(accelerate_image_encoder(model.to(self.device).eval()))
        with torch.inference_mode():  # constant per model: computed once, not per click
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        self._mask_decoder = self.model.mask_decoder
        if compile_decoder:
            self._mask_decoder = WarmCompiled(self.model.mask_decoder, self._decoder_examples(), self.device, "float32")
        self.mode = mode
        self.batch_size = batch_size
        self.model_key = uuid.uuid4().hex  # a new model means a new predictor, so a new key
        self._cache: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._cache_size = cache_size

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Block until the compiled decoder is warm (True), or it failed or was not asked for."""
        return isinstance(self._mask_decoder, WarmCompiled) and self._mask_decoder.wait(timeout)

    @property
    def encoder_precision(self) -> str:
        """"float32" or "bfloat16": :attr:`precision` with "auto" resolved (timed once on a CPU)."""
        if self._encoder_precision is None:
            self._encoder_precision = resolve_precision(self.precision, self.device, self.model.image_encoder)
        return self._encoder_precision

    @property
    def rules(self) -> Rules:
        return RULES[self.mode]

    @property
    def image_size(self) -> int:
        return self.model.image_encoder.img_size

    # ---- image side ------------------------------------------------------------------------
    def embed(self, images: Sequence[np.ndarray], cache: bool = True) -> list[ImageEmbedding]:
        """Embed (H, W) or (H, W, 3) uint8 images in batches.

        With ``cache`` the embeddings are kept (and reused) in this predictor's LRU cache; callers
        that keep their own store, such as the volume cache, pass False.
        """
        keys = [self._content_key(image) for image in images]
        known = {key: self._cache[key] for key in keys if cache and key in self._cache}
        first_of: dict[str, int] = {}
        for i, key in enumerate(keys):
            first_of.setdefault(key, i)  # an image given twice is embedded once
        missing = [i for key, i in first_of.items() if key not in known]
        start = 0
        while start < len(missing):
            chunk = missing[start:start + self.batch_size]
            try:
                encoded = self._encode([images[i] for i in chunk], [keys[i] for i in chunk])
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                encoded = None  # handled below, once the error's traceback no longer holds the batch
            if encoded is None:
                self._halve_batch(len(chunk))
                continue
            for embedding in encoded:
                known[embedding.key] = embedding
                if cache:
                    self._remember(embedding)
            start += len(chunk)
        for key in keys:
            if cache and key in self._cache:  # a long list may have evicted its own first images
                self._cache.move_to_end(key)
        return [known[key] for key in keys]

    def _halve_batch(self, failed: int) -> None:
        """After the GPU ran out of memory on ``failed`` (> 1) images at once: half as many from now on."""
        torch.cuda.empty_cache()
        self.batch_size = max(1, failed // 2)
        warnings.warn(f"the GPU ran out of memory embedding {failed} images at once; "
                      f"embedding {self.batch_size} at a time from now on")

    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        """Embed one image (cached)."""
        return self.embed([image])[0]

    def clear_cache(self) -> None:
        self._cache.clear()

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an (height, width) image resized into the model's S x S input."""
        if self.rules.resize != "sam":
            return fix_scale_size(height, width, self.image_size)
        scale = self.image_size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    @torch.inference_mode()
    def _encode(self, images: list[np.ndarray], keys: list[str]) -> list[ImageEmbedding]:
        inputs, sizes = zip(*(self._preprocess(image) for image in images))
        batch = torch.cat(inputs)
        with autocast_for(self.device, self.encoder_precision):
            features = self.model.image_encoder(batch)
        features = features.float()
        return [
            ImageEmbedding(features[i:i + 1], image.shape[:2], size, key)
            for i, (image, size, key) in enumerate(zip(images, sizes, keys))
        ]

    def _preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W[, 3]) uint8 -> (1, 3, S, S) normalised, padded model input and its (h, w)."""
        image = _as_rgb_uint8(image)
        size = self.input_size(*image.shape[:2])
        return encoder_input(self.model, self._resize(image, size)), size

    def _resize(self, image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, 3, h, w) float holding 8-bit values, as each reference resizes."""
        if self.rules.resize == "training":  # as ultrasam_training.prepare, computed on the device
            return resize_bilinear(_as_tensor(image, self.device), size)
        if self.rules.resize == "mmdet":
            resized = resize_like_mmdet(image, size)
        else:  # SamPredictor: PIL's bilinear (antialiased)
            resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        return _as_tensor(resized, self.device).float()

    def _content_key(self, image: np.ndarray) -> str:
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
        digest.update(f"{image.shape}{image.dtype}{self.mode}{self.model_key}".encode())
        return digest.hexdigest()

    def _remember(self, embedding: ImageEmbedding) -> None:
        self._cache[embedding.key] = embedding
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ---- prompt side -----------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, embedding: ImageEmbedding, prompt: Prompt2D,
                mask_input: torch.Tensor | None = None, refine: bool | None = None) -> Prediction:
        """Masks for ``prompt`` on an embedded image.

        Args:
            embedding: from :meth:`embed`.
            prompt: points and/or box in the image's pixel frame.
            mask_input: optional (1, 1, 256, 256) logits from an earlier prediction.
            refine: run UltraSam's second pass; defaults to the mode's rule.
        """
        prompt.check_inside(*embedding.original_hw)
        refine = self.rules.refine if refine is None else refine
        lone_point = prompt.box_xyxy is None and mask_input is None and len(prompt.labels) == 1
        multimask = self.rules.multimask_lone_point and lone_point
        first = self._decode(embedding, prompt.points_xy, prompt.labels, prompt.box_xyxy, mask_input, multimask)
        if not refine:
            return first
        box, points, labels = prompt.box_xyxy, prompt.points_xy, prompt.labels
        if box is None:
            box = _refine_box(first.mask, embedding.scale_xy)
            if box is None:
                return first  # nothing found: no box to refine with
            if lone_point and labels[0] == 1:
                points = labels = None  # UltraSam's rule: the mask's box replaces the point
        return self._decode(embedding, points, labels, box, first.low_res_logits, multimask=True)

    def _decode(self, embedding: ImageEmbedding, points_xy, labels, box_xyxy,
                mask_input: torch.Tensor | None, multimask: bool) -> Prediction:
        """One prompt-encoder + mask-decoder pass; returns the best of the masks produced."""
        scale = embedding.scale_xy
        points = None
        if points_xy is not None:
            coords = torch.as_tensor(points_xy * scale, dtype=torch.float32, device=self.device)
            points = (coords[None], torch.as_tensor(labels, device=self.device)[None])
        boxes = None
        if box_xyxy is not None:
            boxes = torch.as_tensor(np.asarray(box_xyxy) * np.tile(scale, 2), dtype=torch.float32,
                                    device=self.device)[None]
        if mask_input is not None:
            mask_input = mask_input.to(self.device, torch.float32)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self._mask_decoder(
            image_embeddings=embedding.features,
            image_pe=self._dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        scores = iou[0].float().cpu()  # the one host sync of a decoder pass
        best = int(scores.argmax())
        logits = low_res[:, best:best + 1].float()
        return Prediction(self._postprocess(logits, embedding), float(scores[best]), logits)

    def _decoder_examples(self) -> list[tuple[tuple, dict]]:
        """Decoder inputs of every click shape: 2 prompt tokens (a point and its padding, or a box)
        or 3 (a point and a box), single- or multimask."""
        channels, grid = self.model.prompt_encoder.embed_dim, self.model.prompt_encoder.image_embedding_size
        image = torch.zeros(1, channels, *grid, device=self.device)
        return [((), {"image_embeddings": image, "image_pe": self._dense_pe,
                      "sparse_prompt_embeddings": torch.zeros(1, tokens, channels, device=self.device),
                      "dense_prompt_embeddings": image, "multimask_output": multimask})
                for tokens in (2, 3) for multimask in (False, True)]

    def _postprocess(self, logits: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """(1, 1, 256, 256) logits -> (H, W) bool mask in the original frame."""
        source = (logits > 0).float() if self.rules.binary_upsample else logits
        upsampled = self.model.postprocess_masks(source, embedding.input_hw, embedding.original_hw)
        return (upsampled[0, 0] > 0).cpu().numpy()


def _refine_box(mask: np.ndarray, scale_xy: np.ndarray) -> np.ndarray | None:
    """UltraSam's pass-2 box from a pass-1 (H, W) mask, in SAM's convention (x0, y0, x1, y1).

    UltraSam feeds ``(x_min, y_min, x_max + 1, y_max + 1) * scale`` to a prompt encoder without the
    +0.5 that segment_anything's adds, so the model-frame box here is that minus 0.5, written in
    original pixels as ``edges - 0.5 / scale``. None when the mask is empty.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    edges = np.array([columns[0], rows[0], columns[-1] + 1, rows[-1] + 1], dtype=np.float64)
    return edges - 0.5 / np.tile(scale_xy, 2)


def _as_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) array -> (1, 3, H, W) tensor of the same dtype on ``device``."""
    return torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device).permute(2, 0, 1)[None]


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3|4) uint8 -> (H, W, 3) uint8; refuse anything else clearly."""
    if image.dtype != np.uint8:
        raise ValueError(
            f"images must be 8-bit (uint8), got {image.dtype}; map intensities with ultrasam.intensity.to_uint8"
        )
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return image[..., :3]
    raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
