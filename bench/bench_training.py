"""Training throughput: images/s per GPU of the default recipe against UltraSam's own numerics.

Two variants of the same model (same initial weights, same batches) run the full training step of
:mod:`ultrasam_training` (image encoder, prompt pass, refine pass, losses, backward, clip, AdamW):

- ``recipe``: what ``ultrasam-train`` does on a GPU: bf16 autocast and fused (SDPA) attention;
- ``ultrasam``: as UltraSam trained: fp32, SAM's eager attention (TF32 off).

Prints images/s of each and their ratio (goal on one H100 with SAM ViT-B at 1024: >= 60 images/s
and >= 3x). ``--frozen`` compares instead, both in fp32:

- ``frozen``: ``model.frozen_encoder``: the encoder frozen, its embeddings read from the on-disk
  cache (filled before timing, as the trainer fills it before its first step);
- ``full``: full fine-tuning, the encoder run and trained at every step.

``--last-stage`` compares ``last-stage`` (``model.train_last_stage``: a TinyViT encoder's last stage
and neck trained on the cached tokens entering that stage) with ``full`` the same way.

Data are synthetic (random grey images with ellipse masks, ``--objects`` per image) and prepared
before timing, so the figure is the model's, not the data loader's. Weights are random unless
``--checkpoint`` names a model: throughput does not depend on them, and nothing is downloaded.

    python bench/bench_training.py                      # GPU, SAM ViT-B, batch 8
    python bench/bench_training.py --tiny --device cpu  # seconds on a CPU: checks the script
    python bench/bench_training.py --frozen --checkpoint litemedsam --device cpu --batch 4 --objects 1 --steps 3 --warmup 1
    python bench/bench_training.py --last-stage --checkpoint litemedsam --device cpu --batch 4 --objects 1 --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch

from ultrasam.atomic import write_text_atomic
from ultrasam.checkpoint import SamConfig, sam_from_config
from ultrasam.fast_attention import accelerate_image_encoder
from ultrasam_training.config import LossConfig
from ultrasam_training.embedding_cache import LAST_STAGE_INPUT, EmbeddingCache, LastStageEmbedder, freeze_encoder
from ultrasam_training.prepare import Item, low_res_target
from ultrasam_training.prompts import sample_prompts
from ultrasam_training.step import TrainingModel
from ultrasam_training.trainer import optimise

TINY = SamConfig(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,),
                 encoder_window_size=4, encoder_mlp_ratio=2.0, image_size=128, prompt_embed_dim=32,
                 mask_in_chans=4, decoder_mlp_dim=64, iou_head_hidden_dim=32)
TINY_TINY_VIT = SamConfig(encoder="tiny_vit", image_size=256, patch_size=4, tiny_vit_embed_dims=(8, 16, 16, 32),
                          tiny_vit_depths=(1, 1, 1, 1), tiny_vit_num_heads=(0, 1, 1, 2),
                          tiny_vit_window_sizes=(0, 7, 7, 7), mask_in_chans=4, decoder_mlp_dim=64,
                          iou_head_hidden_dim=32)
# name: (autocast dtype, fused attention, what is cached: None, "embeddings" or "last-stage-input");
# the first of each pair is the one under test
VARIANTS = {"recipe": (torch.bfloat16, True, None), "ultrasam": (None, False, None)}
FROZEN_VARIANTS = {"frozen": (None, False, "embeddings"), "full": (None, False, None)}
LAST_STAGE_VARIANTS = {"last-stage": (None, False, LAST_STAGE_INPUT), "full": (None, False, None)}


def synthetic_items(count: int, objects: int, image_size: int, seed: int = 0, mask_grid: int = 0) -> list[Item]:
    """``count`` items of size (image_size, 3/4 image_size) with ``objects`` random ellipses each,
    targets on the model's low-resolution mask grid (SAM's default: image_size / 4)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size * 3 // 4, image_size
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    items = []
    for _ in range(count):
        centre = torch.rand(objects, 2, generator=generator) * torch.tensor([width, height]) * 0.8 + 0.1 * width
        radius = (torch.rand(objects, 2, generator=generator) * 0.15 + 0.03) * width
        masks = (((xs - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2
                 + ((ys - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2) <= 1
        masks = masks[masks.flatten(1).any(dim=1)]
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        target = low_res_target(masks, image_size, mask_grid or image_size // 4)
        items.append(Item(image, target, sample_prompts(masks, 0.5, 0.05, generator), None, "synthetic"))
    return items


def run_variant(variant: tuple, base: torch.nn.Module, batches: list[list[Item]], warmup: int,
                device: torch.device) -> dict:
    """Train a copy of ``base`` on ``batches`` (the first ``warmup`` untimed); returns the figures."""
    autocast, fused, cached = variant
    sam = copy.deepcopy(base).to(device).train()
    if fused:
        accelerate_image_encoder(sam)
    with tempfile.TemporaryDirectory() as folder:
        embed = None
        if cached:
            last_stage = cached == LAST_STAGE_INPUT
            freeze_encoder(sam, last_stage)
            cache = EmbeddingCache(folder, sam, autocast, batch_size=1, last_stage_input=last_stage)
            cache.fill(item.image for items in batches for item in items)
            embed = LastStageEmbedder(sam, cache) if last_stage else cache
        net = TrainingModel(sam, LossConfig(), refine=True, autocast_dtype=autocast, embed=embed)
        trained = [parameter for parameter in sam.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        losses = []
        for index, items in enumerate(batches):
            if index == warmup:
                _synchronize(device)
                start = time.perf_counter()
            losses.append(float(optimise(net, sam, optimizer, scheduler, items, 0.1)["total"]))
        _synchronize(device)
        seconds = time.perf_counter() - start
    images = sum(len(items) for items in batches[warmup:])
    return {
        "images_per_s": images / seconds,
        "seconds": seconds,
        "first_loss": losses[0],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(base: torch.nn.Module, device: torch.device, batch: int, objects: int, steps: int, warmup: int,
              variants: dict = VARIANTS) -> dict:
    """Both variants on the same initial weights and batches; returns figures and the speed-up of the
    first variant over the second."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, as UltraSam trained
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    pool = synthetic_items(batch * min(steps + warmup, 4), objects, base.image_encoder.img_size,
                           mask_grid=base.prompt_encoder.mask_input_size[0])
    batches = [[pool[(step * batch + i) % len(pool)] for i in range(batch)] for step in range(warmup + steps)]
    results = {}
    for name, variant in variants.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        results[name] = run_variant(variant, base, batches, warmup, device)
    tested, reference = list(variants)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "image_size": base.image_encoder.img_size,
        "encoder": type(base.image_encoder).__name__,
        "batch_per_gpu": batch,
        "objects_per_image": objects,
        "timed_steps": steps,
        "variants": results,
        "speedup": results[tested]["images_per_s"] / results[reference]["images_per_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per GPU (UltraSam: 8)")
    parser.add_argument("--objects", type=int, default=20, help="objects per image (UltraSam's cap: 20)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN autotuning, caches)")
    parser.add_argument("--tiny", action="store_true", help="a tiny SAM at 128 px (CPU check of this script)")
    parser.add_argument("--checkpoint", help="weights to start from: 'litemedsam', 'compact-v1' or a checkpoint file "
                        "(default: random weights of SAM ViT-B, or of the tiny SAM with --tiny)")
    comparison = parser.add_mutually_exclusive_group()
    comparison.add_argument("--frozen", action="store_true", help="frozen-encoder training against full fine-tuning")
    comparison.add_argument("--last-stage", action="store_true",
                            help="training a TinyViT encoder's last stage on cached tokens against full fine-tuning "
                                 "(with --tiny: a tiny TinyViT)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.objects < 1:
        parser.error("--steps, --batch and --objects must be >= 1, --warmup >= 0")
    variants = FROZEN_VARIANTS if args.frozen else LAST_STAGE_VARIANTS if args.last_stage else VARIANTS
    figures = benchmark(_model(args), torch.device(args.device), args.batch, args.objects, args.steps, args.warmup,
                        variants)
    for name, result in figures["variants"].items():
        print(f"{name:9s} {result['images_per_s']:8.2f} images/s  first loss {result['first_loss']:.4f}"
              + (f"  peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] else ""))
    print(f"speed-up  {figures['speedup']:.2f}x  {list(figures['variants'])[0]} over {list(figures['variants'])[1]} "
          f"({figures['device']}, batch {args.batch}, "
          f"{args.objects} objects, image {figures['image_size']})")
    if args.json:
        write_text_atomic(args.json, json.dumps(figures, indent=2))
    return figures


def _model(args: argparse.Namespace) -> torch.nn.Module:
    """The named checkpoint's model, or random weights (throughput does not depend on them)."""
    if args.checkpoint:
        from ultrasam.checkpoint import load_model
        from ultrasam.resources import model_path

        return load_model(model_path(args.checkpoint)).model
    torch.manual_seed(0)
    if args.tiny:
        return sam_from_config(TINY_TINY_VIT if args.last_stage else TINY)
    return sam_from_config(SamConfig())


if __name__ == "__main__":
    main()
