"""Frozen-encoder training: every image embedded once, kept on disk, reused at every step.

With the image encoder frozen, its output for a given model-input image never changes, so the
training loop reads it from this store instead of running the encoder (for LiteMedSAM's TinyViT
on a CPU, about a second per image, against tens of milliseconds for both decoder passes).

Layout: ``<folder>/<encoder fingerprint>/<image key>.pt``, one float16 (C, g, g) tensor per
image. The image key hashes the exact resized uint8 image the encoder sees (so a flipped image
is its own entry), the fingerprint hashes the encoder's weights (so a different model never
reads another's embeddings). Files are written atomically; a killed run keeps what it embedded.

To train a TinyViT encoder's last stage and neck as well (``model.train_last_stage``), the store
holds the (G*G, C) tokens entering that stage instead, keyed to the weights before it only, and
:class:`LastStageEmbedder` runs the stage on them at every step. For LiteMedSAM that stage works on
the 64 x 64 output grid; the stages before it, the 256 x 256 convolutional one among them, never
run again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from ultrasam.checkpoint import atomic_torch_save
from ultrasam_data.coco import DataError
from ultrasam_training.config import ConfigError
from ultrasam_training.prepare import resize_image
from ultrasam_training.step import autocast, encode

LAST_STAGE_INPUT = "last-stage-input"  # folder suffix of a store of last-stage tokens


class EmbeddingCache:
    """Callable: (3, h, w) uint8 model-input images -> (B, C, g, g) float32 embeddings, or with
    ``last_stage_input`` the (B, G*G, C) float32 tokens entering the encoder's last stage.

    Images not yet in the store are encoded (encoder in eval mode, no gradient) and written.
    """

    def __init__(self, folder: str | Path, model: Sam, autocast_dtype: Optional[torch.dtype] = None,
                 batch_size: int = 4, last_stage_input: bool = False) -> None:
        self.model, self.autocast_dtype, self.batch_size = model, autocast_dtype, batch_size
        if last_stage_input:
            skipped = last_stage_modules(model)
            self.encoder = model.image_encoder.forward_to_last_stage
            name = f"{encoder_fingerprint(model, skipped)}-{LAST_STAGE_INPUT}"
        else:
            self.encoder, name = model.image_encoder, encoder_fingerprint(model)
        self.folder = Path(folder) / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.encoded = 0  # images this object ran through the encoder

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        device = self.model.pixel_mean.device
        paths = self._store_missing(images)
        return torch.stack([torch.load(path, map_location=device, weights_only=True) for path in paths]).float()

    def _store_missing(self, images: Sequence[torch.Tensor]) -> list[Path]:
        """Encode and write the images not yet stored; returns every image's file."""
        paths = [self.folder / f"{image_key(image)}.pt" for image in images]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for i, embedding in zip(chunk, self._encode([images[i] for i in chunk])):
                atomic_torch_save(embedding.half().cpu().clone(), paths[i])
        return paths

    def fill(self, images: Iterable[torch.Tensor], progress: Callable[[int], None] = lambda done: None) -> int:
        """Embed every image not yet stored, in batches; returns how many images were looked at."""
        batch: list[torch.Tensor] = []
        done = 0
        for image in images:
            batch.append(image)
            if len(batch) == self.batch_size:
                self._store_missing(batch)  # written, not read back
                done += len(batch)
                batch = []
                progress(done)
        if batch:
            self._store_missing(batch)
            done += len(batch)
            progress(done)
        return done

    @torch.no_grad()
    def _encode(self, images: list[torch.Tensor]) -> torch.Tensor:
        encoder = self.model.image_encoder
        was_training = encoder.training
        encoder.eval()  # batch-norm statistics stay the pretrained ones
        try:
            self.encoded += len(images)
            return encode(self.model, images, self.autocast_dtype, self.encoder)
        finally:
            encoder.train(was_training)


def training_images(samples: Sequence, image_size: int, flip: bool,
                    shard: tuple[int, int] = (0, 1)) -> Iterable[torch.Tensor]:
    """Each sample's model-input image, and its horizontal mirror when training flips (as
    :func:`ultrasam_training.prepare.prepare` makes them); with ``shard`` (rank, world) only every
    world-th sample from the rank-th."""
    rank, world = shard
    for index in range(rank, len(samples), world):
        try:
            sample = samples[index]
        except DataError:
            continue  # PreparedDataset skips it too
        image = torch.tensor(np.asarray(sample.image)).permute(2, 0, 1)
        yield resize_image(image, image_size)
        if flip:
            yield resize_image(image.flip(-1), image_size)


def image_key(image: torch.Tensor) -> str:
    array = np.ascontiguousarray(image.cpu().numpy())
    digest = hashlib.blake2b(array.tobytes(), digest_size=16)
    digest.update(str(array.shape).encode())
    return digest.hexdigest()


class LastStageEmbedder:
    """Callable: (3, h, w) uint8 model-input images -> (B, 256, G, G) float32 embeddings, with
    gradient to the encoder's last stage and neck: the cached tokens entering the stage, run through it.
    """

    def __init__(self, model: Sam, cache: EmbeddingCache) -> None:
        self.model, self.cache = model, cache

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        encoder = self.model.image_encoder
        # Batch norm keeps the pretrained statistics the cached tokens were computed with (and that
        # inference uses); its scale and shift still learn.
        encoder.eval()
        with autocast(self.model.pixel_mean.device, self.cache.autocast_dtype):
            return encoder.forward_last_stage(self.cache(images)).float()


def freeze_encoder(model: Sam, train_last_stage: bool = False) -> None:
    """No gradient to the image encoder, except to its last stage and neck with ``train_last_stage``."""
    model.image_encoder.requires_grad_(False)
    if train_last_stage:
        for module in last_stage_modules(model):
            module.requires_grad_(True)


def last_stage_modules(model: Sam) -> list[torch.nn.Module]:
    """The image encoder's last stage and neck; ConfigError unless it is a TinyViT encoder."""
    encoder = model.image_encoder
    if not hasattr(encoder, "last_stage_modules"):
        raise ConfigError(
            f"model.train_last_stage needs a TinyViT image encoder (LiteMedSAM, compact-v2, compact-v3); this "
            f"model's encoder is {type(encoder).__name__}: set it to false, or train the whole encoder "
            "(model.frozen_encoder false)"
        )
    return encoder.last_stage_modules()


def encoder_fingerprint(model: Sam, skipped: Sequence[torch.nn.Module] = ()) -> str:
    """A short hash of the image encoder's weights and buffers (and its input normalisation),
    leaving out those of the ``skipped`` modules."""
    from ultrasam.model_input import input_normalisation

    left_out = {id(tensor) for module in skipped for tensor in [*module.parameters(), *module.buffers()]}
    digest = hashlib.blake2b(input_normalisation(model).encode(), digest_size=8)
    for name, tensor in sorted(model.image_encoder.state_dict(keep_vars=True).items()):
        if id(tensor) in left_out:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
