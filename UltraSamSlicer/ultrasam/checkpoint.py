"""One loader for UltraSam, SAM, SAM-format fine-tunes (MedSAM) and this project's own files.

Every file is read with :mod:`ultrasam.safe_pickle`, so no code stored in a checkpoint runs and
mmengine need not be installed. The tensors are mapped to ``segment_anything.modeling.Sam``
names, the architecture is read off the tensor shapes, and a ``Sam`` is built and loaded strictly.

Layouts recognised:

- ``ultrasam``: mmengine checkpoint (``meta``, ``state_dict``, ``message_hub``) whose
  ``state_dict`` has ``backbone.``/``decoder.``/``bbox_head.``/``prompt_encoder.`` keys
  (see ULTRASAM_FACTS.md for the mapping, including the x0.5 on the decoder MLP's ``lin2``).
- ``sam``: a state dict in ``segment_anything`` names (``image_encoder.`` ...), bare or under
  ``model`` / ``state_dict``, optionally with DDP's ``module.`` prefix (SAM, MedSAM, ...). The
  image encoder is SAM's ViT, or a TinyViT (:mod:`ultrasam.tiny_vit`) in LiteMedSAM's layout
  (1x1 patch embedding, 256-pixel input, min-max input normalisation) or MobileSAM's (3x3
  stride-2 patch embedding, 1024-pixel input, SAM's normalisation; its unused classification
  head, ``image_encoder.head``/``norm_head``, is dropped).
- ``ultrasam-slicer``: what :func:`save_checkpoint` and the training module write.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ultrasam import safe_pickle
from ultrasam.atomic import atomic_path
from ultrasam.checkpoint_shapes import DeclaredShapeError, read_meta
from ultrasam.model_input import MEAN_STD, MIN_MAX
from ultrasam.predictor import MODES as INFERENCE_MODES
from ultrasam.tiny_vit import TinyViTEncoder

OWN_FORMAT = "ultrasam-slicer"
ULTRASAM_PREFIXES = ("backbone.", "decoder.", "bbox_head.", "prompt_encoder.")
SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
DECODER_HEADS = 8  # SAM's mask decoder; not recoverable from tensor shapes
ULTRASAM_MLP_FIX = 0.5
TINY_VIT_PATCH = "image_encoder.patch_embed.seq.0.c.weight"
TINY_VIT_HEAD = ("image_encoder.head.", "image_encoder.norm_head.")  # MobileSAM's unused classifier
TINY_VIT_GRID = 64  # every TinyViT-SAM encoder ends on SAM's 64 x 64 embedding grid
# Weights of the model built from a file may take at most this x the file's size (fp16 files
# become fp32 models), plus the fixed slack; more means its shapes claim bytes it does not hold.
MODEL_TO_FILE_RATIO = 2
MODEL_SLACK_BYTES = 1 << 20


class CheckpointError(ValueError):
    """The file is not a checkpoint this loader can use; the message says why and what to do."""


@dataclass(frozen=True)
class SamConfig:
    """Everything that fixes a SAM model's tensor shapes (defaults: SAM ViT-B, as UltraSam)."""

    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    encoder_window_size: int = 14
    encoder_mlp_ratio: float = 4.0
    encoder_use_rel_pos: bool = True
    patch_size: int = 16
    image_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # TinyViT encoders (encoder = "tiny_vit"): per stage; stage 0 is convolutional (heads and
    # window 0). patch_size is then the input pixels per embedding cell (image_size / 64).
    encoder: str = "vit"
    tiny_vit_embed_dims: tuple[int, ...] = ()
    tiny_vit_depths: tuple[int, ...] = ()
    tiny_vit_num_heads: tuple[int, ...] = ()
    tiny_vit_window_sizes: tuple[int, ...] = ()
    tiny_vit_patch_kernel: int = 1

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for SAM)."""
        return self.image_size // self.patch_size

    @property
    def input_normalisation(self) -> str:
        """How images are normalised for the encoder: LiteMedSAM's TinyViT (1x1 patch embedding)
        takes min-max [0, 1] input, every other model SAM's ImageNet mean and std."""
        return MIN_MAX if self.encoder == "tiny_vit" and self.tiny_vit_patch_kernel == 1 else MEAN_STD


@dataclass
class LoadedModel:
    """A ready ``Sam`` plus what the loader found (for ``ultrasam info`` and the UI)."""

    model: Sam
    kind: str
    config: SamConfig
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ultrasam(self) -> bool:
        return self.kind == "ultrasam" or self.info.get("postprocess") == "ultrasam"


def sam_from_config(config: SamConfig) -> Sam:
    """A randomly initialised ``Sam`` of the given shape (eval mode, on the CPU)."""
    grid = config.embedding_size
    encoder = tiny_vit_from_config(config) if config.encoder == "tiny_vit" else ImageEncoderViT(
        depth=config.encoder_depth,
        embed_dim=config.encoder_embed_dim,
        img_size=config.image_size,
        mlp_ratio=config.encoder_mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.encoder_num_heads,
        patch_size=config.patch_size,
        qkv_bias=True,
        use_rel_pos=config.encoder_use_rel_pos,
        global_attn_indexes=config.encoder_global_attn_indexes,
        window_size=config.encoder_window_size,
        out_chans=config.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=DECODER_HEADS,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    model.input_normalisation = config.input_normalisation  # read by ultrasam.model_input
    return model.eval()


def tiny_vit_from_config(config: SamConfig) -> TinyViTEncoder:
    return TinyViTEncoder(
        img_size=config.image_size,
        embed_dims=config.tiny_vit_embed_dims,
        depths=config.tiny_vit_depths,
        num_heads=config.tiny_vit_num_heads,
        window_sizes=config.tiny_vit_window_sizes,
        patch_kernel=config.tiny_vit_patch_kernel,
        mlp_ratio=config.encoder_mlp_ratio,
    )


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Read a :class:`SamConfig` off the shapes of a state dict in ``segment_anything`` names."""
    _require(state_dict, ["mask_decoder.mask_tokens.weight", "prompt_encoder.mask_downscaling.3.weight"])
    _require_shapes(state_dict)
    encoder = _tiny_vit_fields(state_dict) if TINY_VIT_PATCH in state_dict else _vit_fields(state_dict)
    return SamConfig(
        **encoder,
        prompt_embed_dim=int(state_dict["mask_decoder.mask_tokens.weight"].shape[1]),
        mask_in_chans=int(state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        decoder_depth=_count_indexed(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_mlp_dim=int(state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        num_multimask_outputs=int(state_dict["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
        iou_head_depth=_count_indexed(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=int(state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
    )


def _vit_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SamConfig's ViT encoder fields, read off the tensor shapes."""
    _require(state_dict, ["image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed"])
    patch = state_dict["image_encoder.patch_embed.proj.weight"]
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(state_dict["image_encoder.pos_embed"].shape[1])
    depth = _count_indexed(state_dict, r"image_encoder\.blocks\.(\d+)\.")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state_dict
    heads, window, global_blocks = max(embed_dim // 64, 1), 0, tuple(range(depth))
    if use_rel_pos:
        sizes = _relative_position_sizes(state_dict, depth, embed_dim)
        heads = embed_dim // int(state_dict["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_blocks = tuple(i for i, size in enumerate(sizes) if size == grid)
        window = next((size for size in sizes if size != grid), 0)
    return dict(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=heads,
        encoder_global_attn_indexes=global_blocks,
        encoder_window_size=window,
        encoder_mlp_ratio=state_dict["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        encoder_use_rel_pos=use_rel_pos,
        patch_size=patch_size,
        image_size=grid * patch_size,
    )


def _tiny_vit_fields(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """SamConfig's TinyViT encoder fields, read off the tensor shapes.

    Stage i's width is its first block's output width, its heads and window come from the
    attention-bias table (heads x window**2). The patch embedding's kernel (1 or 3) fixes the
    input size: the encoder's grid is 64 cells, 4 input pixels each after a 1x1 stride-1
    embedding (256 px, LiteMedSAM), 16 after two 3x3 stride-2 convs (1024 px, MobileSAM).
    """
    stages = _count_indexed(state_dict, r"image_encoder\.layers\.(\d+)\.")
    dims, depths, heads, windows = [], [], [], []
    for i in range(stages):
        prefix = f"image_encoder.layers.{i}.blocks."
        depths.append(_count_indexed(state_dict, re.escape(prefix) + r"(\d+)\."))
        if i == 0:
            dims.append(int(state_dict[prefix + "0.conv3.c.weight"].shape[0]))
            heads.append(0)
            windows.append(0)
            continue
        biases = state_dict[prefix + "0.attn.attention_biases"]
        dims.append(int(state_dict[prefix + "0.attn.proj.weight"].shape[0]))
        heads.append(int(biases.shape[0]))
        windows.append(int(round(biases.shape[1] ** 0.5)))
    kernel = int(state_dict[TINY_VIT_PATCH].shape[-1])
    pixels_per_cell = 4 if kernel == 1 else 16
    return dict(
        encoder="tiny_vit",
        encoder_embed_dim=dims[-1],
        encoder_depth=sum(depths),
        encoder_num_heads=heads[-1],
        encoder_global_attn_indexes=(),
        encoder_window_size=windows[-1],
        encoder_mlp_ratio=state_dict["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1],
        encoder_use_rel_pos=False,
        patch_size=pixels_per_cell,
        image_size=TINY_VIT_GRID * pixels_per_cell,
        tiny_vit_embed_dims=tuple(dims),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
        tiny_vit_patch_kernel=kernel,
    )


def build_sam(state_dict: Mapping[str, torch.Tensor]) -> Sam:
    """A ``Sam`` whose shape is read off ``state_dict`` (SAM names), loaded strictly.

    The architecture is checked on the ``meta`` device first, so shapes that do not fit are
    refused before any memory is allocated.
    """
    config = check_fits(state_dict)
    model = sam_from_config(config)
    model.load_state_dict(state_dict, strict=True)
    return model


def check_fits(state_dict: Mapping[str, torch.Tensor], max_bytes: int | None = None) -> SamConfig:
    """The config ``state_dict`` describes, after checking every name and shape against a model of
    that config built on the ``meta`` device (no memory); with ``max_bytes``, the model's weights
    must fit in that many bytes. Raises :class:`CheckpointError` naming the first misfit."""
    try:
        config = config_from_state_dict(state_dict)
        with torch.device("meta"):
            model = sam_from_config(config)
    except (ValueError, RuntimeError, ZeroDivisionError, OverflowError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"the tensor shapes describe no valid SAM-architecture model ({_first_line(error)})") from None
    missing, unexpected = _key_mismatch(model.state_dict().keys(), state_dict.keys())
    if missing or unexpected:
        raise CheckpointError(
            "the weights do not fit a SAM-architecture model: "
            + _describe_mismatch(missing, unexpected)
        )
    for name, expected in model.state_dict().items():
        if expected.shape != state_dict[name].shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(state_dict[name].shape)}, a SAM model of this "
                f"size needs {tuple(expected.shape)}; the file is not a SAM-architecture checkpoint"
            )
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if max_bytes is not None and weight_bytes > max_bytes:
        raise CheckpointError(f"the tensor shapes describe a model of {weight_bytes / 1e6:.0f} MB, more than the "
                              f"file holds ({max_bytes / 1e6:.0f} MB allowed); the file is damaged or crafted")
    return config


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load any supported checkpoint file into a ``Sam`` on ``device`` (eval mode).

    Raises:
        CheckpointError: a one-line reason (missing, damaged, crafted, unsafe, another model), always
            before the tensors are read when their declared shapes do not fit.
    """
    check_declared_shapes(path)
    raw = read_checkpoint_object(path)
    kind, state_dict, info = _identify(raw, Path(path))
    model = build_sam(state_dict).to(device)
    config = config_from_state_dict(state_dict)
    info.setdefault("postprocess", "ultrasam" if kind == "ultrasam" else "sam")
    info["weight_count"] = sum(t.numel() for t in state_dict.values())  # incl. the PE buffer
    info["architecture"] = _describe_config(config)
    return LoadedModel(model=model, kind=kind, config=config, info=info)


def check_declared_shapes(path: str | os.PathLike) -> None:
    """Refuse, before any tensor data is read, a file whose declared tensors do not fit its own
    bytes or a SAM-architecture model (:mod:`ultrasam.checkpoint_shapes`)."""
    path = _existing_torch_file(path)
    meta = _unpickle(path, read_meta)
    try:
        _, state_dict, _ = _identify(meta, path)
        check_fits(state_dict, MODEL_TO_FILE_RATIO * path.stat().st_size + MODEL_SLACK_BYTES)
    except CheckpointError as error:
        message = str(error)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except Exception as error:  # noqa: BLE001 -- a crafted layout fails in many ways; each is a refusal
        raise CheckpointError(f"{path}: not a usable checkpoint ({type(error).__name__}: {_first_line(error)})") from None


def read_checkpoint_object(path: str | os.PathLike) -> Any:
    """Unpickle a checkpoint file with :mod:`ultrasam.safe_pickle` onto the CPU."""
    path = _existing_torch_file(path)
    return _unpickle(path, lambda file: torch.load(file, map_location="cpu", pickle_module=safe_pickle,
                                                   weights_only=False))


def _existing_torch_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or download the weights")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty; download it again")
    if _looks_like_legacy_torch(path):
        raise CheckpointError(f"{path}: saved in PyTorch's pre-1.6 format, which cannot be checked before "
                              "loading; load it with torch and save it again with torch.save")
    if not zipfile.is_zipfile(path) and _starts_as_zip(path):
        raise CheckpointError(f"{path}: the checkpoint is truncated or damaged ({size} bytes: it starts as torch's "
                              "zip format but the archive's directory at its end is missing); download it again")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({size} bytes, not torch's zip format); "
            "a truncated download looks like this too: download it again"
        )
    return path


def _unpickle(path: Path, reader) -> Any:
    """``reader(path)`` with every way a damaged or crafted file can fail turned into CheckpointError."""
    try:
        return reader(path)
    except safe_pickle.UnsafePickleError as error:
        raise CheckpointError(f"{path}: refused: {error}. Only load checkpoints from sources you trust") from None
    except DeclaredShapeError as error:
        raise CheckpointError(f"{path}: refused before loading: {error}; the file is damaged or crafted") from None
    except MemoryError:
        raise CheckpointError(f"{path}: the file asks for more memory than there is; it is damaged or crafted") from None
    except Exception as error:  # noqa: BLE001 -- any failure of a damaged file is a refusal, never a traceback
        raise CheckpointError(
            f"{path}: the checkpoint is damaged or truncated ({type(error).__name__}: "
            f"{_first_line(error)}); download it again"
        ) from None


def save_checkpoint(path: str | os.PathLike, model: Sam, meta: Mapping[str, Any] | None = None,
                    float16: bool = False) -> Path:
    """Write ``model`` in this project's format, atomically (a crash leaves the old file intact).

    The file holds only tensors, plain Python values and the config, so :func:`load_model` (and
    ``torch.load(weights_only=True)``) read it back. ``float16`` stores floating-point tensors in
    half precision (half the file; :func:`load_model` casts them back into the float32 model).
    """
    path = Path(path)
    state_dict = {name: _stored(tensor.detach().cpu(), float16) for name, tensor in model.state_dict().items()}
    payload = {
        "format": OWN_FORMAT,
        "version": 1,
        "config": asdict(config_from_state_dict(state_dict)),
        "meta": dict(meta or {}),
        "model": state_dict,
    }
    atomic_torch_save(payload, path)
    return path


def _stored(tensor: torch.Tensor, float16: bool) -> torch.Tensor:
    return tensor.half() if float16 and tensor.is_floating_point() else tensor


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """``torch.save`` so that a crash or a full disk leaves the previous file (or none), never half
    a file; a failure raises :class:`~ultrasam.atomic.WriteError` naming ``path``."""
    with atomic_path(path, check=_complete_zip) as temporary:
        torch.save(payload, temporary)


def _complete_zip(path: Path) -> None:
    """Raise unless ``path`` is a whole zip archive (torch's format): its directory is read from
    the end and every record must lie within the file."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.header_offset + record.compress_size > size:
                raise ValueError(f"record {record.filename} runs past the end of the file")


def convert_ultrasam_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map UltraSam's mmdet names to ``segment_anything`` names (ULTRASAM_FACTS.md's table)."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "prompt_encoder.label_encoder.label_embedding.weight":
            converted.update(_split_label_embedding(tensor))
        elif name.endswith(".attn.in_proj_bias"):
            for projection, bias in zip("qkv", tensor.chunk(3)):
                converted[_rename(name).replace("in_proj_bias", f"{projection}_proj.bias")] = bias
        else:
            renamed = _rename(name)
            if re.fullmatch(r"mask_decoder\.transformer\.layers\.\d+\.mlp\.lin2\.(weight|bias)", renamed):
                tensor = tensor * ULTRASAM_MLP_FIX
            converted[renamed] = tensor
    return converted


# (pattern, replacement) applied in order; the first match wins.
_RENAMES = [
    (r"^backbone\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^backbone\.pos_embed$", "image_encoder.pos_embed"),
    (r"^backbone\.layers\.(\d+)\.ln1\.", r"image_encoder.blocks.\1.norm1."),
    (r"^backbone\.layers\.(\d+)\.ln2\.", r"image_encoder.blocks.\1.norm2."),
    (r"^backbone\.layers\.(\d+)\.attn\.", r"image_encoder.blocks.\1.attn."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"image_encoder.blocks.\1.mlp.lin1."),
    (r"^backbone\.layers\.(\d+)\.ffn\.layers\.1\.", r"image_encoder.blocks.\1.mlp.lin2."),
    (r"^backbone\.channel_reduction\.", "image_encoder.neck."),
    (r"^decoder\.layers\.(\d+)\.(\w+)\.attn\.([qkv])_proj_weight$",
     r"mask_decoder.transformer.layers.\1.\2.\3_proj.weight"),
    (r"^decoder\.layers\.(\d+)\.(\w+)\.attn\.", r"mask_decoder.transformer.layers.\1.\2."),
    (r"^decoder\.layers\.(\d+)\.mlp\.layers\.0\.0\.", r"mask_decoder.transformer.layers.\1.mlp.lin1."),
    (r"^decoder\.layers\.(\d+)\.mlp\.layers\.1\.", r"mask_decoder.transformer.layers.\1.mlp.lin2."),
    (r"^decoder\.layers\.", "mask_decoder.transformer.layers."),
    (r"^decoder\.final_attn_token_to_image\.attn\.([qkv])_proj_weight$",
     r"mask_decoder.transformer.final_attn_token_to_image.\1_proj.weight"),
    (r"^decoder\.final_attn_token_to_image\.attn\.", "mask_decoder.transformer.final_attn_token_to_image."),
    (r"^decoder\.post_norm\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^bbox_head\.", "mask_decoder."),
    (r"^prompt_encoder\.", "prompt_encoder."),
]

# Rows of UltraSam's 11-row label embedding, in order (ULTRASAM_FACTS.md).
_LABEL_ROWS = [
    "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.point_embeddings.0.weight",
    "prompt_encoder.point_embeddings.1.weight",
    "prompt_encoder.point_embeddings.2.weight",
    "prompt_encoder.point_embeddings.3.weight",
    "prompt_encoder.not_a_point_embed.weight",
    ("mask_decoder.mask_tokens.weight", 4),
    "mask_decoder.iou_token.weight",
]


def _rename(name: str) -> str:
    for pattern, replacement in _RENAMES:
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    raise CheckpointError(f"unexpected tensor {name!r} in an UltraSam-layout checkpoint")


def _split_label_embedding(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    expected_rows = sum(entry[1] if isinstance(entry, tuple) else 1 for entry in _LABEL_ROWS)
    if weight.shape[0] != expected_rows:
        raise CheckpointError(
            f"UltraSam label embedding has {weight.shape[0]} rows, expected {expected_rows}"
        )
    parts, row = {}, 0
    for entry in _LABEL_ROWS:
        name, rows = entry if isinstance(entry, tuple) else (entry, 1)
        parts[name] = weight[row:row + rows].clone()
        row += rows
    return parts


def _identify(raw: Any, path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Return (kind, state dict in SAM names, info) for an unpickled checkpoint."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a checkpoint dictionary")
    if raw.get("format") == OWN_FORMAT:
        if not isinstance(raw.get("model"), Mapping):
            raise CheckpointError(f"{path}: an {OWN_FORMAT} file without its 'model' tensors; the file is damaged")
        meta = dict(raw.get("meta", {}))
        rules = {"postprocess": meta["postprocess"]} if meta.get("postprocess") in INFERENCE_MODES else {}
        return OWN_FORMAT, _tensors_only(raw["model"], path), {**rules, "meta": meta}
    for wrapper in (None, "state_dict", "model"):
        candidate = raw if wrapper is None else raw.get(wrapper)
        if not isinstance(candidate, Mapping):
            continue
        tensors = _strip_prefix(_tensors_only(candidate, path, strict=False), "module.")
        if tensors and all(name.startswith(ULTRASAM_PREFIXES) for name in tensors) and any(
            name.startswith("backbone.") for name in tensors
        ):
            return "ultrasam", convert_ultrasam_state_dict(tensors), _mmengine_info(raw)
        if tensors and any(name.startswith("image_encoder.") for name in tensors):
            return "sam", *_drop_tiny_vit_head(tensors, {"wrapper": wrapper or "none"})
    names = sorted(_tensors_only(raw, path, strict=False))[:5]
    raise CheckpointError(
        f"{path}: not a SAM, UltraSam or MedSAM checkpoint: expected tensors named "
        f"{'/'.join(SAM_PREFIXES)}* (SAM) or {'/'.join(ULTRASAM_PREFIXES)}* (UltraSam), "
        f"found top-level entries {sorted(map(str, raw))[:8]}" + (f" and tensors like {names}" if names else "")
    )


def _drop_tiny_vit_head(tensors: dict[str, torch.Tensor], info: dict[str, Any]):
    """MobileSAM's files keep TinyViT's ImageNet classifier, which SAM never runs: drop it, say so."""
    if TINY_VIT_PATCH not in tensors:
        return tensors, info
    head = sorted(name for name in tensors if name.startswith(TINY_VIT_HEAD))
    if head:
        info["dropped_unused"] = head
    return {name: t for name, t in tensors.items() if name not in head}, info


def _tensors_only(mapping: Mapping, path: Path, strict: bool = True) -> dict[str, torch.Tensor]:
    tensors = {str(k): v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
    if strict and len(tensors) != len(mapping):
        raise CheckpointError(f"{path}: the model entry holds non-tensor values; the file is damaged")
    return tensors


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if tensors and all(name.startswith(prefix) for name in tensors):
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}
    return tensors


def _mmengine_info(raw: Mapping) -> dict[str, Any]:
    meta = raw.get("meta") if isinstance(raw.get("meta"), Mapping) else {}
    info: dict[str, Any] = {"postprocess": "ultrasam"}
    for key in ("iter", "epoch", "mmengine_version", "time"):
        if key in meta:
            info[key] = meta[key].item() if hasattr(meta[key], "item") else meta[key]
    info["has_training_config"] = "cfg" in meta
    return info


def _require(state_dict: Mapping[str, Any], names: list[str]) -> None:
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise CheckpointError(
            f"the weights are not a SAM-architecture model: missing {missing}; "
            f"found {len(state_dict)} tensors like {sorted(state_dict)[:4]}"
        )


def _count_indexed(state_dict: Mapping[str, Any], pattern: str) -> int:
    indices = {int(m.group(1)) for name in state_dict if (m := re.match(pattern, name))}
    return max(indices) + 1 if indices else 0


def _key_mismatch(expected, found) -> tuple[list[str], list[str]]:
    expected, found = set(expected), set(found)
    return sorted(expected - found), sorted(found - expected)


def _describe_mismatch(missing: list[str], unexpected: list[str], shown: int = 6) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:shown]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:shown]})")
    return "; ".join(parts)


def _describe_config(config: SamConfig) -> str:
    if config == SamConfig():
        return "SAM ViT-B (UltraSam's architecture)"
    if config.encoder == "tiny_vit":
        layout = "LiteMedSAM" if config.tiny_vit_patch_kernel == 1 else "MobileSAM"
        return (
            f"TinyViT encoder in {layout}'s layout: widths {list(config.tiny_vit_embed_dims)}, depths "
            f"{list(config.tiny_vit_depths)}, input {config.image_size}, {config.input_normalisation} "
            "input normalisation"
        )
    return (
        f"SAM-architecture ViT: width {config.encoder_embed_dim}, depth {config.encoder_depth}, "
        f"{config.encoder_num_heads} heads, input {config.image_size}"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else "no detail"


def _require_shapes(state_dict: Mapping[str, Any]) -> None:
    """The tensors the config is read from must have the ranks and non-zero sizes SAM gives them."""
    ranks = {"image_encoder.patch_embed.proj.weight": 4, "image_encoder.pos_embed": 4,
             "mask_decoder.mask_tokens.weight": 2, "prompt_encoder.mask_downscaling.3.weight": 4,
             "image_encoder.blocks.0.mlp.lin1.weight": 2,
             "mask_decoder.transformer.layers.0.mlp.lin1.weight": 2,
             "mask_decoder.iou_prediction_head.layers.0.weight": 2}
    for name, rank in ranks.items():
        if name not in state_dict:
            continue  # reported by the key comparison
        shape = tuple(state_dict[name].shape)
        if len(shape) != rank or 0 in shape:
            raise CheckpointError(f"tensor {name} has shape {shape}; SAM needs {rank} non-zero sizes there")


def _relative_position_sizes(state_dict: Mapping[str, Any], depth: int, embed_dim: int) -> list[int]:
    """Attention window of each encoder block, read off its relative-position tables; each table
    is checked itself, so a bad one is named rather than blamed on its neighbour."""
    sizes = []
    for block in range(depth):
        names = [f"image_encoder.blocks.{block}.attn.rel_pos_{axis}" for axis in "hw"]
        _require(state_dict, names)
        shape, other = (tuple(state_dict[name].shape) for name in names)
        if len(shape) != 2 or shape[0] % 2 == 0 or shape[1] == 0 or embed_dim % shape[1]:
            raise CheckpointError(f"tensor {names[0]} has shape {shape}; SAM needs (2 x window - 1, head width) "
                                  f"with a head width dividing {embed_dim}")
        if other != shape:
            raise CheckpointError(f"tensor {names[0]} has shape {shape} but {names[1]} has {other}; "
                                  "SAM's two tables of a block have the same shape")
        sizes.append((shape[0] + 1) // 2)
    return sizes


def _starts_as_zip(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(4) == b"PK\x03\x04"


def _looks_like_legacy_torch(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(2) == b"\x80\x02"  # pickle protocol 2, torch's pre-1.6 format
