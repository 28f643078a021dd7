"""Write checkpoints in UltraSam's exact layout, for tests, with the real mmengine package.

The tensor names are written from the table in ULTRASAM_FACTS.md in the SAM -> UltraSam direction,
independently of the loader's UltraSam -> SAM code, so a mistake in either shows up as a mismatch.

Everything else in the file comes from a real ``mmengine.runner.Runner``: it trains a toy model for
a few iterations with UltraSam's optimiser and schedule (AdamW, linear warm-up, MultiStepLR at
20,000 and 28,888), validates with a metric that returns numpy scalars (as many metrics do),
and saves through ``Runner.save_checkpoint``. A hook swaps the toy model's tensors for the UltraSam
ones just before mmengine pickles the dict, so the file holds exactly what mmengine writes: ``meta``
(with the config text in ``meta['cfg']``), ``state_dict``, ``message_hub`` (real ``HistoryBuffer``
objects, whose ``__getstate__`` pickles ``getattr(HistoryBuffer, 'min')`` and its siblings) and
``param_schedulers`` (MultiStepLR's milestones are a ``collections.Counter``). Assumption, from
the published file's size (375 MB for 93.7 M float32 weights): UltraSam.pth carries no optimizer
state, so ``save_optimizer=False``.

The Runner runs in a subprocess, once per test session: it seeds the global random generators and
configures logging, which must not leak into the tests.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
SWAP_FILE = "ultrasam_state_dict.pth"  # the tensors the hook puts in place of the toy model's


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
    """``torch.save`` a dict laid out as UltraSam.pth: mmengine's own bookkeeping around ``sam``'s
    tensors in UltraSam's names (keys in the order ``Runner.save_checkpoint`` writes them)."""
    bookkeeping = mmengine_bookkeeping()
    checkpoint = {"meta": bookkeeping["meta"], "state_dict": ultrasam_state_dict(sam)}
    checkpoint.update((key, value) for key, value in bookkeeping.items() if key not in checkpoint)
    torch.save(checkpoint, path)


def runner_checkpoint(tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """The file a real mmengine Runner writes, as it writes it, with ``tensors`` as its ``state_dict``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, folder / SWAP_FILE)
    subprocess.run([sys.executable, __file__, str(folder)], check=True, capture_output=True, timeout=600)
    return folder / "iter_3.pth"


@functools.lru_cache(maxsize=1)
def mmengine_bookkeeping() -> dict:
    """Everything but ``state_dict`` of a real Runner's checkpoint (unpickled with mmengine: trusted)."""
    import mmengine  # noqa: F401  (the unpickling below needs its classes)

    with tempfile.TemporaryDirectory() as folder:
        path = runner_checkpoint({}, Path(folder))
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    del checkpoint["state_dict"]
    return checkpoint


def _train_and_save(folder: Path) -> None:
    """Run mmengine's Runner for 3 iterations and a validation; it saves ``folder/iter_3.pth``."""
    import numpy as np
    from mmengine.config import Config
    from mmengine.evaluator import BaseMetric, Evaluator
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class ToyModel(BaseModel):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            output = self.layer(torch.stack(inputs) if isinstance(inputs, list) else inputs)
            if mode == "loss":
                return {"loss": output.pow(2).mean(), "loss_dice": output.abs().mean()}
            return [{"score": float(value)} for value in output[:, 0]]

    class ToyData(torch.utils.data.Dataset):
        metainfo = {"classes": ("object",)}

        def __len__(self):
            return 4

        def __getitem__(self, index):
            return {"inputs": torch.full((2,), float(index))}

    class MeanScore(BaseMetric):
        default_prefix = "toy"

        def process(self, data_batch, data_samples):
            self.results.extend(sample["score"] for sample in data_samples)

        def compute_metrics(self, results):
            return {"dice": np.float64(np.mean(results)), "objects": np.int64(len(results))}

    class UltraSamTensors(Hook):
        """Puts the UltraSam-named tensors into the dict mmengine is about to pickle."""

        def before_save_checkpoint(self, runner, checkpoint):
            checkpoint["state_dict"] = torch.load(folder / SWAP_FILE, weights_only=True)

    def loader(sampler: str) -> dict:
        return {"dataset": ToyData(), "sampler": {"type": sampler, "shuffle": False}, "batch_size": 2,
                "collate_fn": {"type": "default_collate"}}

    settings = {
        "train_cfg": {"type": "IterBasedTrainLoop", "max_iters": 3, "val_interval": 3},
        "val_cfg": {"type": "ValLoop"},
        "optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 1e-4},
                          "clip_grad": {"max_norm": 0.1, "norm_type": 2}},
        "param_scheduler": [
            {"type": "LinearLR", "start_factor": 1e-3, "by_epoch": False, "begin": 0, "end": 500},
            {"type": "MultiStepLR", "by_epoch": False, "milestones": [20000, 28888], "gamma": 0.1},
        ],
        "default_hooks": {"checkpoint": {"type": "CheckpointHook", "interval": 3, "by_epoch": False,
                                         "save_optimizer": False, "save_best": "toy/dice", "rule": "greater"},
                          "logger": {"type": "LoggerHook", "interval": 1}},
        "log_processor": {"by_epoch": False},
        "env_cfg": {"dist_cfg": {"backend": "gloo"}},
        "log_level": "ERROR",
    }
    config = Config({"model": {"type": "SAM"}, **settings})
    Runner(model=ToyModel(), work_dir=str(folder), train_dataloader=loader("InfiniteSampler"),
           val_dataloader=loader("DefaultSampler"),
           val_evaluator=Evaluator(MeanScore()), custom_hooks=[UltraSamTensors()], cfg=config, **settings).train()


if __name__ == "__main__":
    _train_and_save(Path(sys.argv[1]))
