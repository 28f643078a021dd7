"""The training configuration: one JSON file, validated, with UltraSam's recipe as the defaults.

A config file holds any subset of the sections below; missing keys keep their defaults, unknown
keys are an error (a typo must not silently train with a default). Defaults reproduce UltraSam's
published recipe (``ULTRASAM_FACTS.md``, "Training recipe"):

- ``data``: COCO files to train and validate on, at most 20 objects per image, horizontal flip.
- ``model``: where the weights start: a checkpoint ``ultrasam.checkpoint.load_model`` reads
  (UltraSam, SAM ViT-B, MedSAM, our own), a USF-MAE encoder on a fresh SAM, or scratch.
- ``prompts``: per object, a positive point (probability 1 - ``box_probability``) or the GT box
  with each corner jittered by up to 5 % of the box size, then one refinement round.
- ``loss``: focal (gamma 2, alpha 0.25) x20 + dice x1 + IoU-head MSE x1 at the low-resolution
  mask grid; with multimask output the mask closest to the GT is supervised.
- ``optim``: AdamW lr 1e-4, weight decay 1e-4, gradient L2 clip 0.1, linear warm-up over 500
  steps, LR x0.1 at steps 20000 and 28888, 30000 steps.
- ``run``: batch 8 images per process, checkpoints, validation, logging, precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrasam.atomic import write_text_atomic

INIT_KINDS = ("checkpoint", "usf-mae", "scratch")
PRECISIONS = ("auto", "bf16", "fp32")
ATTENTIONS = ("auto", "fused", "eager")
VAL_PROMPTS = ("box", "point")
SPLIT_BY = ("group", "image")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message says what to change."""


@dataclass
class DataConfig:
    """COCO annotation files (US-43d layout) to train and validate on.

    ``train`` and ``val`` list COCO files or US-43d folders. ``image_root`` is the folder
    ``file_name`` entries are relative to; empty lets the data reader find it. Without ``val``,
    ``val_fraction`` of each training data set is held out for validation, by whole
    patient/volume groups (``split_by = "group"``, no slice of a validation volume is trained on)
    or by image (``"image"``, UltraSam's random 95/5 split, which leaks neighbouring slices).
    ``skip_bad_samples``: with false (the default) training refuses to start when the data has
    unusable annotation files, annotations or images, and lists them; with true it trains on the
    rest and records every skipped item (:mod:`ultrasam_training.skipped`).
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    val_fraction: float = 0.05
    split_by: str = "group"
    image_root: str = ""
    max_objects: int = 20
    flip: bool = True
    skip_bad_samples: bool = False


@dataclass
class ModelConfig:
    """Where the weights start.

    - ``init = "checkpoint"``: ``checkpoint`` is any file ``ultrasam.checkpoint.load_model`` reads.
    - ``init = "usf-mae"``: a fresh SAM (``scratch``) whose image-encoder blocks come from the
      USF-MAE ``state_dict`` in ``checkpoint``.
    - ``init = "scratch"``: random weights.

    ``checkpoint`` may also name a model the CLI knows ("litemedsam"). ``frozen_encoder`` trains
    only the prompt encoder and mask decoder, on image embeddings computed once per image (and
    flip) and kept in ``embedding_cache`` (default: ``<output_dir>/embeddings``): see
    :mod:`ultrasam_training.embedding_cache`. ``train_last_stage`` (with ``frozen_encoder``, for
    TinyViT encoders: LiteMedSAM, compact-v2, compact-v3) also trains the encoder's last stage and
    neck, on the tokens entering that stage, cached the same way.

    ``scratch`` overrides fields of ``ultrasam.checkpoint.SamConfig`` (SAM ViT-B when empty) for
    the last two, e.g. ``{"image_size": 256, "encoder_depth": 2}`` for a tiny test model.
    """

    init: str = "checkpoint"
    checkpoint: str = ""
    scratch: dict = field(default_factory=dict)
    frozen_encoder: bool = False
    train_last_stage: bool = False
    embedding_cache: str = ""

    def sam_config(self) -> Any:
        """The ``SamConfig`` a fresh model is built with; ConfigError names a bad field."""
        from ultrasam.checkpoint import SamConfig  # torch-heavy; config files load without it

        values = {k: tuple(v) if isinstance(v, list) else v for k, v in self.scratch.items()}
        try:
            config = SamConfig(**values)
        except TypeError as error:
            raise ConfigError(f"model.scratch: {error}; see ultrasam.checkpoint.SamConfig") from None
        _check(config.image_size % config.patch_size == 0, "model.scratch.image_size must be a multiple of patch_size")
        _check(
            config.encoder_embed_dim % config.encoder_num_heads == 0,
            "model.scratch.encoder_embed_dim must be divisible by encoder_num_heads",
        )
        _check(
            all(0 <= i < config.encoder_depth for i in config.encoder_global_attn_indexes),
            "model.scratch.encoder_global_attn_indexes must lie in 0 .. encoder_depth - 1",
        )
        return config


@dataclass
class PromptConfig:
    """Prompt sampling per object (UltraSam: 50/50 point or box, 5 % jitter, one refine round).

    ``free_box_probability`` (not in UltraSam's recipe): per training image, the chance of one
    more box, placed on tissue touching no object, whose answer must stay inside it (outside it
    the target is empty; inside, nothing is known, so nothing is supervised). It teaches a model
    to answer a box with what is in it rather than with the nearest object.

    ``correction_clicks`` (not in UltraSam's recipe, which has none): rounds of corrective clicks
    per object after the refine round, each a click on the answer's error, positive where it
    missed and negative where it spilled (:func:`ultrasam_training.step.run_passes`). It teaches
    the model to follow the clicks a user adds, negative ones above all.
    """

    box_probability: float = 0.5
    box_jitter: float = 0.05
    refine: bool = True
    val_prompt: str = "box"
    free_box_probability: float = 0.0
    correction_clicks: int = 0


@dataclass
class LossConfig:
    """Loss weights and focal parameters (UltraSam: focal x20 + dice + IoU MSE)."""

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class OptimConfig:
    """AdamW and the step schedule (linear warm-up, then x``gamma`` at each milestone)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    clip_norm: float = 0.1
    warmup_steps: int = 500
    milestones: list[int] = field(default_factory=lambda: [20000, 28888])
    gamma: float = 0.1


@dataclass
class RunConfig:
    """Length, batch, checkpoints, logging and numerics of one run.

    ``batch_size`` is per process (UltraSam: 8 per GPU on 4 GPUs). ``precision = "auto"`` and
    ``attention = "auto"`` mean bf16 autocast and fused (SDPA) attention on CUDA, fp32 and SAM's
    eager attention elsewhere. ``deterministic`` asks torch for deterministic kernels (exact
    resume on GPU; CPU runs are deterministic anyway).
    """

    steps: int = 30000
    batch_size: int = 8
    seed: int = 0
    checkpoint_every: int = 1000
    val_every: int = 1000
    log_every: int = 20
    num_workers: int = 2
    precision: str = "auto"
    attention: str = "auto"
    deterministic: bool = False


@dataclass
class TrainConfig:
    """One training run. ``output_dir`` receives checkpoints, ``metrics.jsonl`` and events."""

    output_dir: str = "ultrasam-run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first unusable value; return self when all are usable."""
        _check(bool(self.data.train), "data.train: list at least one COCO annotation file to train on")
        _check(self.data.max_objects >= 1, "data.max_objects must be >= 1 (UltraSam uses 20)")
        _check(0.0 <= self.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)")
        _check(self.data.split_by in SPLIT_BY, f"data.split_by must be one of {SPLIT_BY}")
        _check(self.model.init in INIT_KINDS, f"model.init must be one of {INIT_KINDS}")
        _check(
            self.model.init == "scratch" or bool(self.model.checkpoint),
            f"model.checkpoint: give the weights file for model.init = {self.model.init!r}",
        )
        if self.model.init != "checkpoint":
            self.model.sam_config()
        _check(self.model.frozen_encoder or not self.model.train_last_stage,
               "model.train_last_stage needs model.frozen_encoder (the stages before it stay frozen and cached)")
        _check(0.0 <= self.prompts.box_probability <= 1.0, "prompts.box_probability must be in [0, 1]")
        _check(0.0 <= self.prompts.box_jitter < 0.5, "prompts.box_jitter must be in [0, 0.5)")
        _check(0.0 <= self.prompts.free_box_probability <= 1.0, "prompts.free_box_probability must be in [0, 1]")
        _check(self.prompts.correction_clicks >= 0, "prompts.correction_clicks must be >= 0 (0: none, as UltraSam)")
        _check(self.prompts.refine or self.prompts.correction_clicks == 0,
               "prompts.correction_clicks needs prompts.refine (clicks correct the refined answer)")
        _check(self.prompts.val_prompt in VAL_PROMPTS, f"prompts.val_prompt must be one of {VAL_PROMPTS}")
        _check(self.optim.lr > 0 and self.optim.weight_decay >= 0, "optim.lr must be > 0, weight_decay >= 0")
        _check(self.optim.clip_norm >= 0, "optim.clip_norm must be >= 0 (0 disables clipping)")
        _check(self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(
            list(self.optim.milestones) == sorted(self.optim.milestones),
            "optim.milestones must be increasing",
        )
        run = self.run
        _check(run.steps >= 1 and run.batch_size >= 1, "run.steps and run.batch_size must be >= 1")
        _check(
            min(run.checkpoint_every, run.val_every, run.log_every) >= 1,
            "run.checkpoint_every, run.val_every and run.log_every must be >= 1",
        )
        _check(run.num_workers >= 0, "run.num_workers must be >= 0")
        _check(run.precision in PRECISIONS, f"run.precision must be one of {PRECISIONS}")
        _check(run.attention in ATTENTIONS, f"run.attention must be one of {ATTENTIONS}")
        return self


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from nested dicts, rejecting unknown keys."""
    return _build(TrainConfig, values, "").validate()


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = fields[name].default_factory() if callable(fields[name].default_factory) else fields[name].default
        path = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, path)
        else:
            kwargs[name] = _coerce(default, value, path)
    return cls(**kwargs)


def _coerce(default: Any, value: Any, path: str) -> Any:
    """Check ``value`` has the type of ``default`` (ints are accepted where floats are)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{path} must be {type(default).__name__}, got {value!r}")
    return value


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a JSON config file."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConfigError(f"config file {path} does not exist") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {path} is not valid JSON: {error}") from error
    return from_dict(values)


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write ``config`` as JSON atomically (temp file in the same folder, then rename)."""
    write_text_atomic(path, json.dumps(config.to_dict(), indent=2) + "\n")

