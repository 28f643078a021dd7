"""Write checkpoints in UltraSam's exact mmengine layout, for tests.

Written from the table in ULTRASAM_FACTS.md in the SAM -> UltraSam direction, independently of the
loader's UltraSam -> SAM code, so a mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch

ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")


def ultrasam_state_dict(sam: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM-named tensors -> UltraSam-named tensors (inverse of the facts table)."""
    out: dict[str, torch.Tensor] = {}
    encoder_depth = 1 + max(int(k.split(".")[2]) for k in sam if k.startswith("image_encoder.blocks."))
    out["backbone.patch_embed.projection.weight"] = sam["image_encoder.patch_embed.proj.weight"]
    out["backbone.patch_embed.projection.bias"] = sam["image_encoder.patch_embed.proj.bias"]
    out["backbone.pos_embed"] = sam["image_encoder.pos_embed"]
    for i in range(encoder_depth):
        s, u = f"image_encoder.blocks.{i}.", f"backbone.layers.{i}."
        for p in ("weight", "bias"):
            out[u + f"ln1.{p}"] = sam[s + f"norm1.{p}"]
            out[u + f"ln2.{p}"] = sam[s + f"norm2.{p}"]
            out[u + f"attn.qkv.{p}"] = sam[s + f"attn.qkv.{p}"]
            out[u + f"attn.proj.{p}"] = sam[s + f"attn.proj.{p}"]
            out[u + f"ffn.layers.0.0.{p}"] = sam[s + f"mlp.lin1.{p}"]
            out[u + f"ffn.layers.1.{p}"] = sam[s + f"mlp.lin2.{p}"]
        out[u + "attn.rel_pos_h"] = sam[s + "attn.rel_pos_h"]
        out[u + "attn.rel_pos_w"] = sam[s + "attn.rel_pos_w"]
    for k, v in sam.items():
        if k.startswith("image_encoder.neck."):
            out["backbone.channel_reduction." + k[len("image_encoder.neck."):]] = v
    out["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = sam[
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    for k, v in sam.items():
        if k.startswith("prompt_encoder.mask_downscaling."):
            out[k] = v
    out["prompt_encoder.label_encoder.label_embedding.weight"] = torch.cat([
        sam["prompt_encoder.no_mask_embed.weight"],
        *[sam[f"prompt_encoder.point_embeddings.{n}.weight"] for n in range(4)],
        sam["prompt_encoder.not_a_point_embed.weight"],
        sam["mask_decoder.mask_tokens.weight"],
        sam["mask_decoder.iou_token.weight"],
    ])
    for i in range(2):
        s, u = f"mask_decoder.transformer.layers.{i}.", f"decoder.layers.{i}."
        for attention in ATTENTIONS:
            _attention(out, sam, s + attention + ".", u + attention + ".attn.")
        for n in range(1, 5):
            for p in ("weight", "bias"):
                out[u + f"norm{n}.{p}"] = sam[s + f"norm{n}.{p}"]
        for p in ("weight", "bias"):
            out[u + f"mlp.layers.0.0.{p}"] = sam[s + f"mlp.lin1.{p}"]
            out[u + f"mlp.layers.1.{p}"] = sam[s + f"mlp.lin2.{p}"] * 2.0  # UltraSam's doubled residual
    _attention(out, sam, "mask_decoder.transformer.final_attn_token_to_image.",
               "decoder.final_attn_token_to_image.attn.")
    for p in ("weight", "bias"):
        out[f"decoder.post_norm.{p}"] = sam[f"mask_decoder.transformer.norm_final_attn.{p}"]
    for k, v in sam.items():
        if k.startswith(("mask_decoder.output_upscaling.", "mask_decoder.output_hypernetworks_mlps.",
                         "mask_decoder.iou_prediction_head.")):
            out["bbox_head." + k[len("mask_decoder."):]] = v
    return out


def _attention(out, sam, s: str, u: str) -> None:
    for name in "qkv":
        out[u + f"{name}_proj_weight"] = sam[s + f"{name}_proj.weight"]
    out[u + "in_proj_bias"] = torch.cat([sam[s + f"{name}_proj.bias"] for name in "qkv"])
    out[u + "out_proj.weight"] = sam[s + "out_proj.weight"]
    out[u + "out_proj.bias"] = sam[s + "out_proj.bias"]


def save_ultrasam_checkpoint(sam: dict[str, torch.Tensor], path) -> None:
    """torch.save a dict shaped like UltraSam.pth: meta (numpy scalars, cfg text), state_dict,
    message_hub holding an mmengine HistoryBuffer; mmengine is faked for the save only."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:  # pickled by reference as mmengine.logging.history_buffer.HistoryBuffer
        def __init__(self, values):
            self._log_history = np.asarray(values)
            self._count_history = np.ones(len(values))
            self.max_length = 1000000

    HistoryBuffer.__module__ = module.__name__
    HistoryBuffer.__qualname__ = "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    names = ["mmengine", "mmengine.logging", "mmengine.logging.history_buffer"]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[names[-1]] = module
    try:
        checkpoint = {
            "meta": {"epoch": 0, "iter": np.int64(30000), "mmengine_version": "0.10.4",
                     "cfg": "model = dict(type='SAM')\n", "seed": np.int64(42), "lr": np.float64(1e-6)},
            "state_dict": ultrasam_state_dict(sam),
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([0.5, 0.4])},
                            "runtime_info": {"iter": 30000}, "resumed_keys": {"iter": True}},
        }
        torch.save(checkpoint, path)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
