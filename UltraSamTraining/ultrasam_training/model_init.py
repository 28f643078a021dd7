"""The model a training run starts from: a checkpoint, a USF-MAE encoder on a fresh SAM, or scratch.

USF-MAE (a ViT-B/16 masked autoencoder trained on ultrasound at 224 x 224) shares SAM's encoder
blocks but not its input size, relative positions or neck. Its weights fill the patch embedding,
the absolute position grid (class token dropped, 14 x 14 grid resized bicubically to SAM's grid)
and every block's norms, attention and MLP (``mlp.fc1/fc2`` -> ``mlp.lin1/lin2``); relative
positions, the neck, the prompt encoder and the mask decoder keep their fresh initialisation.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from ultrasam.checkpoint import CheckpointError, load_model, read_checkpoint_object, sam_from_config
from ultrasam.resources import model_path
from ultrasam_training.config import ModelConfig

_USFMAE_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")


def build_model(config: ModelConfig) -> Sam:
    """A ``Sam`` on the CPU in train mode, initialised as ``config.init`` says."""
    if config.init == "checkpoint":
        model = load_model(model_path(config.checkpoint)).model
    else:
        model = sam_from_config(config.sam_config())
        if config.init == "usf-mae":
            load_usfmae_encoder(model, _state_dict_of(read_checkpoint_object(config.checkpoint)))
    return model.train()


def _state_dict_of(raw: object) -> Mapping[str, torch.Tensor]:
    """The tensors of a checkpoint object: the object itself or its ``model``/``state_dict`` entry."""
    for key in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping) or "patch_embed.proj.weight" not in raw:
        raise CheckpointError(
            "not a USF-MAE checkpoint: expected ViT keys such as 'patch_embed.proj.weight' and "
            "'blocks.0.attn.qkv.weight'; use model.init = 'checkpoint' for SAM or UltraSam files"
        )
    return raw


def usfmae_to_sam(state_dict: Mapping[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Map USF-MAE encoder tensors to ``image_encoder.*`` names of a SAM with a ``grid`` x ``grid`` token grid.

    ``pos_embed`` (1, 1 + g*g, C) loses its class token and becomes (1, grid, grid, C); decoder
    and class-token tensors are ignored.
    """
    mapped = {
        "image_encoder.patch_embed.proj.weight": state_dict["patch_embed.proj.weight"],
        "image_encoder.patch_embed.proj.bias": state_dict["patch_embed.proj.bias"],
        "image_encoder.pos_embed": resize_pos_embed(state_dict["pos_embed"], grid),
    }
    for name, tensor in state_dict.items():
        match = _USFMAE_BLOCK.match(name)
        if match:
            block, part, kind = match.groups()
            part = {"mlp.fc1": "mlp.lin1", "mlp.fc2": "mlp.lin2"}.get(part, part)
            mapped[f"image_encoder.blocks.{block}.{part}.{kind}"] = tensor
    return mapped


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, C) ViT position embedding (class token first) -> (1, grid, grid, C), bicubic."""
    tokens = pos_embed[:, 1:]
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise CheckpointError(f"USF-MAE pos_embed has {tokens.shape[1]} patch tokens, not a square grid")
    image = tokens.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def load_usfmae_encoder(model: Sam, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy USF-MAE weights into ``model``'s image encoder in place; returns the names filled."""
    grid = model.image_encoder.pos_embed.shape[1]
    mapped = usfmae_to_sam(state_dict, grid)
    own = model.state_dict()
    for name, tensor in mapped.items():
        if name not in own or own[name].shape != tensor.shape:
            shape = tuple(own[name].shape) if name in own else "absent"
            raise CheckpointError(
                f"USF-MAE tensor for {name} has shape {tuple(tensor.shape)}, the model needs {shape}; "
                "set model.scratch to the encoder's width and depth (ViT-B: 768 wide, 12 deep, 12 heads)"
            )
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)
