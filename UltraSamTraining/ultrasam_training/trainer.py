"""The training loop: one entry point for one CPU, one GPU, or torchrun's DDP processes.

Run layout (``config.output_dir``): ``config.json`` (the resolved config), ``metrics.jsonl``
(see :mod:`ultrasam_training.runlog`), ``resume.pt`` (full training state, rewritten atomically
every ``run.checkpoint_every`` steps), ``best.pth`` (the weights with the best validation Dice)
and ``model.pth`` (the final weights). ``best.pth`` and ``model.pth`` are in
``ultrasam.checkpoint``'s own format, so ``load_model`` and the Segment Editor effect read them.

Resume is exact: ``resume.pt`` holds the step, model, optimizer, scheduler and RNG states; the data
each step sees is a pure function of (seed, step, rank) (:class:`~ultrasam_training.prepare.StepBatches`),
so a run killed at any point and resumed with the same world size ends with the same weights as
an uninterrupted run (bit for bit on CPU; on GPU with ``run.deterministic``).
"""

from __future__ import annotations

import datetime
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ultrasam.checkpoint import atomic_torch_save, save_checkpoint
from ultrasam.fast_attention import accelerate_image_encoder
from ultrasam_data.coco import CocoDataset
from ultrasam_data.splits import split_dataset
from ultrasam_training.config import DataConfig, TrainConfig, save_config
from ultrasam_training.embedding_cache import EmbeddingCache, LastStageEmbedder, freeze_encoder, training_images
from ultrasam_training.evaluate import evaluate
from ultrasam_training.model_init import build_model
from ultrasam_training.prepare import PrepareOptions, PreparedDataset, StepBatches, collate
from ultrasam_training.runlog import RunLog
from ultrasam_training.skipped import report_skips, without_missing_images
from ultrasam_training.step import TrainingModel

EMBEDDINGS_DIR = "embeddings"
RESUME_FILE = "resume.pt"
BEST_FILE = "best.pth"
FINAL_FILE = "model.pth"
WARMUP_START = 0.001  # LR factor at step 0, rising linearly to 1 over optim.warmup_steps
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """This process's place in a (torchrun) job; one process when WORLD_SIZE is unset.

    ``launched``: started by torchrun (WORLD_SIZE set), which gets a process group and DDP even
    with one process, so a 1-GPU job runs the same NCCL path as a larger one.
    """

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)), "WORLD_SIZE" in os.environ)

    @property
    def main(self) -> bool:
        return self.rank == 0


def lr_factor(step: int, warmup: int, milestones: Sequence[int], gamma: float) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then x``gamma`` per passed milestone."""
    warm = 1.0 if step >= warmup else WARMUP_START + (1 - WARMUP_START) * step / warmup
    return warm * gamma ** sum(step >= m for m in milestones)


def open_datasets(config: DataConfig, seed: int, log: Optional[RunLog] = None) -> tuple[Sequence[Any], Optional[Sequence[Any]]]:
    """Training and validation samples (validation: ``data.val``, else a held-out split, else None).

    Bad annotations and missing image files are left out and reported, or refused unless
    ``data.skip_bad_samples`` (:mod:`ultrasam_training.skipped`); the split is deterministic, so
    every rank gets the same.
    """
    problems = []

    def open_files(files: Sequence[str], max_objects: int) -> CocoDataset:
        dataset = CocoDataset(list(files), max_objects=max_objects, image_root=config.image_root or None)
        dataset, missing = without_missing_images(dataset)
        problems.extend(dataset.problems + missing)
        return dataset

    # Training reads every object; prepare() draws max_objects afresh per step (the reader's own
    # draw would repeat the same subset every epoch).
    train_set = open_files(config.train, sys.maxsize)
    val_set = open_files(config.val, config.max_objects) if config.val else None
    report_skips(problems, config.skip_bad_samples, log)
    if config.val or config.val_fraction == 0:
        return train_set, val_set
    split = split_dataset(train_set, config.val_fraction, seed, by=config.split_by)
    return train_set.subset(split.train), train_set.subset(split.val)


def train(config: TrainConfig, resume: bool = True) -> Path:
    """Train to ``config.run.steps`` (continuing ``resume.pt`` if present); returns the final model path.

    Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 writes all files.
    """
    config.validate()
    procs = Processes.from_env()
    run_dir = Path(config.output_dir)
    device = _setup(config, procs)
    try:
        return _train(config, procs, device, run_dir, resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _setup(config: TrainConfig, procs: Processes) -> torch.device:
    """Pick the device, start the process group, set numerics; returns this process's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if procs.launched:
        # Long enough for rank 0's validation, while the other ranks wait at the next collective.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    if config.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn where CUDA has no deterministic kernel
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _seed_everything(config.run.seed)  # the same scratch init on every rank
    return device


def _train(config: TrainConfig, procs: Processes, device: torch.device, run_dir: Path, resume: bool) -> Path:
    sam = build_model(config.model)
    on_gpu = device.type == "cuda"
    if config.run.attention == "fused" or (config.run.attention == "auto" and on_gpu):
        accelerate_image_encoder(sam)
    autocast = torch.bfloat16 if config.run.precision == "bf16" or (config.run.precision == "auto" and on_gpu) else None
    sam.to(device)
    if config.model.frozen_encoder:
        freeze_encoder(sam, config.model.train_last_stage)
    trained = [parameter for parameter in sam.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    optim = config.optim
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, optim.milestones, optim.gamma)
    )
    state_path = run_dir / RESUME_FILE
    start, best = 0, float("-inf")
    if resume and state_path.is_file():
        start, best = _load_state(state_path, sam, optimizer, scheduler, procs)
    log = RunLog(run_dir, resume_step=start, tensorboard=True) if procs.main else None
    step, logged = start, start
    try:
        # Opened with the log open, so a refusal of the data reaches metrics.jsonl (and the Slicer module).
        train_set, val_set = _prepared_datasets(config, sam.image_encoder.img_size,
                                                sam.prompt_encoder.mask_input_size[0], procs, log)
        frozen = config.model.frozen_encoder
        embed = _embedding_cache(config, sam, autocast, train_set, val_set, procs, log) if frozen else None
        net = TrainingModel(sam, config.loss, config.prompts.refine, autocast, embed, config.prompts.correction_clicks)
        if dist.is_initialized():
            # Unused per step: the negative-point embedding, and mask heads no object was closest with.
            net = DistributedDataParallel(net, device_ids=[device.index] if on_gpu else None,
                                          find_unused_parameters=True)
        batches = StepBatches(len(train_set), config.run.batch_size, config.run.seed, start, config.run.steps,
                              procs.rank, procs.world)
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                                             num_workers=config.run.num_workers)
        if log:
            save_config(config, run_dir / "config.json")
            log.write("start", start, steps=config.run.steps, world=procs.world, device=str(device),
                      process_group=dist.get_backend() if dist.is_initialized() else None,
                      precision=str(autocast or torch.float32), images=len(train_set),
                      val_images=len(val_set) if val_set else 0)
        tick = time.time()  # the first rate counts steps only, not the data's opening or the embedding
        reported = set()  # an unreadable image comes back every epoch: report it once
        for items in loader:
            met = list(dict.fromkeys(p for item in items for p in item.skipped if p not in reported))
            report_skips(met, config.data.skip_bad_samples, log, step)
            reported.update(met)
            parts = optimise(net, sam, optimizer, scheduler, items, config.optim.clip_norm)
            step += 1
            if step % config.run.log_every == 0 or step == config.run.steps:
                parts = _mean_over_processes(parts, procs)
                rate = (step - logged) * config.run.batch_size * procs.world / max(time.time() - tick, 1e-9)
                logged, tick = step, time.time()
                if log:  # images/s of the whole job (all processes)
                    log.write("train", step, lr=scheduler.get_last_lr()[0], images_per_s=rate,
                              **{name: float(value) for name, value in parts.items()})
            if val_set is not None and (step % config.run.val_every == 0 or step == config.run.steps):
                best = _validate(sam, val_set, config, autocast, step, best, run_dir, log, embed)
            if step % config.run.checkpoint_every == 0 or step == config.run.steps:
                if procs.main:
                    _save_state(state_path, step, sam, optimizer, scheduler, best, config, procs)
                    log.write("checkpoint", step, path=str(state_path))
                _barrier(procs)
        final = run_dir / FINAL_FILE
        if procs.main:
            save_checkpoint(final, sam, {"step": step, "best_val_dice": best if best > float("-inf") else None,
                                         "config": config.to_dict(), "postprocess": _inference_rules(config)})
            log.write("done", step, model=str(final),
                      best=str(run_dir / BEST_FILE) if (run_dir / BEST_FILE).is_file() else None)
        return final
    except BaseException as error:
        if log:
            log.write("error", step, message=f"{type(error).__name__}: {error}")
        raise
    finally:
        if log:
            log.close()


def _prepared_datasets(config: TrainConfig, image_size: int, low_res_size: int, procs: Processes, log):
    """(training items with random prompts, validation items with fixed prompts or None; rank 0 only)."""
    train_samples, val_samples = open_datasets(config.data, config.run.seed, log)
    train_set = PreparedDataset(
        train_samples,
        PrepareOptions(image_size, config.data.max_objects, config.data.flip, "random",
                       config.prompts.box_probability, config.prompts.box_jitter, low_res_size=low_res_size,
                       free_box_probability=config.prompts.free_box_probability),
    )
    if val_samples is None or len(val_samples) == 0 or not procs.main:
        return train_set, None
    val_options = PrepareOptions(image_size, config.data.max_objects, prompt_kind=config.prompts.val_prompt,
                                 keep_masks=True, low_res_size=low_res_size)
    return train_set, PreparedDataset(val_samples, val_options)


def _embedding_cache(config: TrainConfig, sam, autocast, train_set, val_set, procs: Processes,
                     log) -> EmbeddingCache | LastStageEmbedder:
    """The frozen encoder's store, filled before the first step: every training image (and its
    mirror when training flips), then every validation image. The ranks share the files and split
    the training images between them; the first step waits until every rank has filled its share.
    With ``model.train_last_stage`` the store holds the last stage's input, run through it per step."""
    folder = config.model.embedding_cache or str(Path(config.output_dir) / EMBEDDINGS_DIR)
    # On a CPU one image at a time is fastest (TinyViT, 2 threads: 1.0 s/image alone, 1.5 s/image in
    # batches of 4); a GPU wants batches.
    device = sam.pixel_mean.device
    cache = EmbeddingCache(folder, sam, autocast, batch_size=8 if device.type == "cuda" else 1,
                           last_stage_input=config.model.train_last_stage)
    size = sam.image_encoder.img_size
    tick = time.time()
    cache.fill(training_images(train_set.samples, size, config.data.flip, shard=(procs.rank, procs.world)))
    if val_set is not None:  # rank 0 alone validates
        cache.fill(training_images(val_set.samples, size, False))
    encoded = torch.zeros(procs.world, dtype=torch.long, device=device)
    encoded[procs.rank] = cache.encoded
    if dist.is_initialized():
        dist.all_reduce(encoded)  # also waits for every rank's share
    if log:
        log.write("embedded", 0, folder=str(cache.folder), encoded=int(encoded.sum()), per_rank=encoded.tolist(),
                  seconds=time.time() - tick)
    return LastStageEmbedder(sam, cache) if config.model.train_last_stage else cache


def optimise(net, sam, optimizer, scheduler, items, clip_norm: float) -> dict[str, torch.Tensor]:
    """One optimizer step on one batch; returns the detached loss parts."""
    optimizer.zero_grad(set_to_none=True)
    parts = net(items)
    parts["total"].backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(sam.parameters(), clip_norm)
    optimizer.step()
    scheduler.step()
    return {name: value.detach() for name, value in parts.items()}


def _mean_over_processes(parts: dict[str, torch.Tensor], procs: Processes) -> dict[str, torch.Tensor]:
    if procs.world == 1:
        return parts
    names = sorted(parts)
    stacked = torch.stack([parts[name].float() for name in names])
    dist.all_reduce(stacked)
    return dict(zip(names, stacked / procs.world))


def _validate(sam, val_set, config: TrainConfig, autocast, step: int, best: float, run_dir: Path, log,
              embed=None) -> float:
    """Rank 0 only: evaluate, log, and keep ``best.pth`` when the Dice improves; returns the best Dice."""
    scores = evaluate(sam, (val_set[i] for i in range(len(val_set))), config.prompts.refine, autocast, embed)
    improved = scores["dice"] > best
    if improved:
        best = scores["dice"]
        save_checkpoint(run_dir / BEST_FILE, sam, {"step": step, "val": scores, "config": config.to_dict(),
                                                   "postprocess": _inference_rules(config)})
    log.write("val", step, best=improved, **scores)
    return best


def _barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as plain values (no numpy objects), so the state file loads with weights_only."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(path: Path, step: int, sam, optimizer, scheduler, best: float, config: TrainConfig,
                procs: Processes) -> None:
    atomic_torch_save(
        {
            "step": step,
            "model": sam.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "best_dice": best,
            "rng": _rng_state(),
            "world": procs.world,
            "config": config.to_dict(),
        },
        path,
    )


def _load_state(path: Path, sam, optimizer, scheduler, procs: Processes) -> tuple[int, float]:
    """Restore a run from ``resume.pt``; returns (step, best validation Dice)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["world"] != procs.world:
        raise RuntimeError(
            f"{path} was written by a run with {state['world']} processes, this one has {procs.world}: "
            "resume with the same number of processes, or start a new output_dir"
        )
    sam.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return int(state["step"]), float(state["best_dice"])


def _inference_rules(config: TrainConfig) -> str:
    """The predictor mode matching how the model was trained and validated: UltraSam's refine round
    with logits upsampled before the threshold, or one pass."""
    return "refine" if config.prompts.refine else "sam"
