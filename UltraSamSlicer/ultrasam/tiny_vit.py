"""TinyViT image encoder of the SAM family (MobileSAM, LiteMedSAM), in plain PyTorch.

A drop-in for ``segment_anything``'s ``ImageEncoderViT``: (B, 3, S, S) normalised, padded input ->
(B, 256, 64, 64) image embedding, with ``img_size`` = S. Module and tensor names follow the
published checkpoints (``patch_embed.seq``, ``layers.i.blocks.j``, ``neck``), so their state dicts
load strictly.

Architecture (TinyViT-5M as MobileSAM uses it for SAM):

- patch embedding: two conv + batch-norm layers with a GELU between. MobileSAM uses 3x3 convs of
  stride 2 (S = 1024 -> 256 x 256 tokens); LiteMedSAM replaced them by 1x1 convs of stride 1
  (S = 256 -> 256 x 256 tokens);
- stage 0: MBConv blocks (inverted residual: 1x1 expand, 3x3 depth-wise, 1x1 project);
- stages 1-3: windowed self-attention with a learnt bias per head and per (|dy|, |dx|) offset,
  a 3x3 depth-wise conv, then an MLP, each stage but the last followed by a patch merge
  (1x1, 3x3 depth-wise, 1x1 convs). The merges halve the grid, except the last, which keeps it
  (stride 1), so the last two stages both run on the 64 x 64 output grid;
- neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d to 256 channels (as SAM's ViT neck).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

EMBEDDING_CHANNELS = 256  # the SAM prompt encoder's and mask decoder's width


class ConvBN(nn.Sequential):
    """Bias-free conv followed by batch norm (``c``, ``bn``: the checkpoints' names)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, C, S / stride**2, S / stride**2)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, kernel, stride), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, kernel, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on (B, C, H, W)."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) or (B, H*W, C) tokens -> (B, H'*W', C') tokens, H' = H / stride."""

    def __init__(self, resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.transpose(1, 2).reshape(len(x), -1, self.resolution, self.resolution)
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head attention over (B, w*w, C) window tokens with a learnt relative-offset bias.

    ``qkv`` holds, per head, its query, key and value rows one after the other (the checkpoints'
    layout), and the bias table has one column per distinct (|dy|, |dx|) in a w x w window.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", _offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, heads, N, d)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, -1))


def _offset_index(window: int) -> torch.Tensor:
    """(w*w, w*w) column of the bias table for each pair of window positions."""
    cells = list(itertools.product(range(window), range(window)))
    offsets = {offset: i for i, offset in enumerate(itertools.product(range(window), range(window)))}
    index = [[offsets[(abs(a[0] - b[0]), abs(a[1] - b[1]))] for b in cells] for a in cells]
    return torch.tensor(index, dtype=torch.long)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, depth-wise conv, MLP on (B, H*W, C) tokens of an H x H grid."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        side = self.resolution
        x = x + self._windowed_attention(x.view(batch, side, side, dim)).reshape(batch, tokens, dim)
        grid = self.local_conv(x.transpose(1, 2).reshape(batch, dim, side, side))
        x = grid.flatten(2).transpose(1, 2)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, H, C) -> (B, H, H, C): attention within w x w windows, the grid zero-padded to a multiple of w."""
        batch, side, _, dim = x.shape
        w = self.window
        pad = (w - side % w) % w
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        count = (side + pad) // w
        windows = x.view(batch, count, w, count, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        out = self.attn(windows).view(batch, count, count, w, w, dim).transpose(2, 3)
        return out.reshape(batch, side + pad, side + pad, dim)[:, :side, :side]


class Stage(nn.Module):
    """A stage's blocks, then its patch merge (``downsample``) when it has one."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """TinyViT image encoder for SAM: (B, 3, S, S) -> (B, 256, G, G), G = S / (4 * stride**2).

    Args:
        img_size: S, the square model input side.
        embed_dims, depths, num_heads, window_sizes: per stage (stage 0 is convolutional, so its
            heads and window are unused).
        patch_kernel: 1 (LiteMedSAM: 1x1, stride 1) or 3 (MobileSAM: 3x3, stride 2).
    """

    def __init__(self, img_size: int = 256, embed_dims: Sequence[int] = (64, 128, 160, 320),
                 depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (2, 4, 5, 10),
                 window_sizes: Sequence[int] = (7, 7, 14, 7), patch_kernel: int = 1,
                 mlp_ratio: float = 4.0, mbconv_expand_ratio: float = 4.0) -> None:
        super().__init__()
        self.img_size = img_size
        stride = 1 if patch_kernel == 1 else 2
        self.patch_embed = PatchEmbed(3, embed_dims[0], patch_kernel, stride)
        resolution = img_size // stride**2
        last = len(depths) - 1
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            merge_stride = 1 if i == last - 1 else 2  # the last merge keeps the grid
            merge = None if i == last else PatchMerging(resolution, embed_dims[i], embed_dims[i + 1], merge_stride)
            if i == 0:
                blocks = [MBConv(embed_dims[0], mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(embed_dims[i], resolution, num_heads[i], window_sizes[i], mlp_ratio)
                          for _ in range(depth)]
            self.layers.append(Stage(blocks, merge))
            if merge is not None:
                resolution //= merge_stride
        self.grid = resolution
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], EMBEDDING_CHANNELS, 1, bias=False),
            LayerNorm2d(EMBEDDING_CHANNELS),
            nn.Conv2d(EMBEDDING_CHANNELS, EMBEDDING_CHANNELS, 3, padding=1, bias=False),
            LayerNorm2d(EMBEDDING_CHANNELS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_last_stage(self.forward_to_last_stage(x))

    def forward_to_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) input -> (B, G*G, C) tokens entering the last stage, C its width."""
        x = self.patch_embed(x)
        for stage in self.layers[:-1]:
            x = stage(x)
        return x

    def forward_last_stage(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, G*G, C) tokens entering the last stage -> (B, 256, G, G) image embedding."""
        x = self.layers[-1](tokens)
        grid = x.transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)
        return self.neck(grid)

    def last_stage_modules(self) -> list[nn.Module]:
        """What :meth:`forward_last_stage` runs: the last stage and the neck."""
        return [self.layers[-1], self.neck]
