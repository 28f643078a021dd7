"""Fast inference for segment_anything's image encoder, without forking it.

SAM's image encoder spends most of its time in attention, which it computes eagerly: it
materialises the (tokens x tokens) score matrix, adds the decomposed relative-position bias and
runs a separate softmax. :func:`accelerate_image_encoder` re-classes every encoder ``Attention`` as
:class:`FusedAttention`, which keeps the same parameters (and state-dict keys) and calls
``torch.nn.functional.scaled_dot_product_attention`` with that bias as ``attn_mask`` (or, with
``fold_rel_pos``, folded into extra query/key channels so no mask is needed), letting PyTorch pick
a fused kernel. The result is numerically the same function, for windowed (14 x 14 tokens) and
global (64 x 64 tokens) blocks alike.

:class:`WarmCompiled` adds an optional ``torch.compile`` whose cold start is paid on a background
thread while the eager module keeps serving. Device settings (bf16 on CPUs that have it, threads,
TF32) live in :mod:`ultrasam.device`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from segment_anything.modeling.transformer import Attention as DecoderAttention

from ultrasam.device import autocast_for
from ultrasam.tiny_vit import TinyViTEncoder


def _rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's dot products with the embeddings of its offsets to every key row and column.

    Args:
        q: (B, heads, h * w, head_dim) queries, unscaled, tokens in row-major (y, x) order.
        rel_pos_h: (Lh, head_dim) embeddings of vertical offsets.
        rel_pos_w: (Lw, head_dim) embeddings of horizontal offsets.
        hw: (h, w) token grid of the queries, which is also the key grid (self-attention).

    Returns:
        rel_h: (B, heads, h, w, h) = q . Rh[y_q - y_k] for every key row y_k;
        rel_w: (B, heads, h, w, w) = q . Rw[x_q - x_k] for every key column x_k.
    """
    h, w = hw
    table_h = get_rel_pos(h, h, rel_pos_h)  # (h, h, head_dim), SAM's own lookup/interpolation
    table_w = get_rel_pos(w, w, rel_pos_w)  # (w, w, head_dim)
    q_grid = q.unflatten(2, (h, w))  # (B, heads, h, w, head_dim)
    rel_h = torch.einsum("bnyxc,ykc->bnyxk", q_grid, table_h)
    rel_w = torch.einsum("bnyxc,xkc->bnyxk", q_grid, table_w)
    return rel_h, rel_w


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Tuple[int, int]
) -> torch.Tensor:
    """The additive attention bias of SAM's decomposed relative positions (MViTv2).

    Arguments as :func:`_rel_pos_terms`. Returns the (B, heads, h * w, h * w) bias, entry
    [q, k] = q . Rh[y_q - y_k] + q . Rw[x_q - x_k]: the term SAM's ``add_decomposed_rel_pos`` adds
    to the scaled scores before the softmax.
    """
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, hw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, h, w, h_k, w_k)
    return bias.flatten(4).flatten(2, 3)


def fold_rel_pos_into_qk(
    q: torch.Tensor, k: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
    hw: Tuple[int, int], scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys whose plain dot product is SAM's scaled score plus its position bias.

    ``q' . k' = scale * q . k + q . Rh[y_q - y_k] + q . Rw[x_q - x_k]``, because q' appends the
    query's row and column terms and k' appends one-hot codes of the key's row and column. SDPA
    then needs no (tokens x tokens) mask, so flash-style kernels apply and the bias is never
    written to memory (for a 64 x 64 global block: 64 + 64 extra channels instead of 4096).

    Args:
        q, k: (B, heads, h * w, head_dim), tokens in row-major (y, x) order.
        rel_pos_h, rel_pos_w, hw: as :func:`_rel_pos_terms`.
        scale: the attention's softmax scale (head_dim ** -0.5).

    Returns:
        (B, heads, h * w, D) queries and keys, D = head_dim + h + w rounded up to a multiple of 8
        (zero channels, for kernel alignment). Use with ``scaled_dot_product_attention(scale=1)``.
    """
    h, w = hw
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, hw)
    rows = torch.eye(h, dtype=k.dtype, device=k.device).repeat_interleave(w, dim=0)  # (h*w, h)
    cols = torch.eye(w, dtype=k.dtype, device=k.device).repeat(h, 1)  # (h*w, w)
    codes = torch.cat([rows, cols], dim=1).expand(*k.shape[:2], -1, -1)
    folded_q = torch.cat([q * scale, rel_h.flatten(2, 3).to(q.dtype), rel_w.flatten(2, 3).to(q.dtype)], -1)
    folded_k = torch.cat([k, codes], dim=-1)
    pad = (0, -folded_q.shape[-1] % 8)
    return F.pad(folded_q, pad), F.pad(folded_k, pad)


class FusedAttention(Attention):
    """SAM's image-encoder ``Attention`` with the same parameters, computed by SDPA.

    Never constructed directly: :func:`accelerate_image_encoder` re-classes existing modules, so
    weights, devices and state-dict keys are untouched.

    Attributes:
        fold_rel_pos: pass the position bias through extra q/k channels
            (:func:`fold_rel_pos_into_qk`) instead of as ``attn_mask``.
    """

    fold_rel_pos = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, dim) tokens -> (B, h, w, dim); B counts images times windows."""
        batch, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(batch, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, h * w, head_dim)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.fold_rel_pos:
            q, k = fold_rel_pos_into_qk(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, h, w, -1))


def accelerate_image_encoder(
    model: Union[Sam, ImageEncoderViT], fold_rel_pos: bool = False
) -> Union[Sam, ImageEncoderViT]:
    """Switch every attention of a SAM image encoder to :class:`FusedAttention`, in place.

    Safe to call again (e.g. to change ``fold_rel_pos``); works for inference and training
    (gradients flow to ``rel_pos_h/w``). Accepts the whole ``Sam`` or its ``image_encoder``;
    returns the same object.

    Args:
        fold_rel_pos: see :class:`FusedAttention`; both ways compute SAM's function, which is
            faster depends on the device and its SDPA kernels (docs/BENCHMARKS.md).
    """
    encoder = model.image_encoder if isinstance(model, Sam) else model
    if isinstance(encoder, TinyViTEncoder):
        return model  # its windowed attention already runs fused (SDPA)
    if not isinstance(encoder, ImageEncoderViT):
        raise TypeError(
            f"expected a segment_anything Sam or ImageEncoderViT, got {type(model).__name__}; "
            "load the model with ultrasam.checkpoint.load_model first"
        )
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = FusedAttention
            module.fold_rel_pos = fold_rel_pos
    return model


class FusedDecoderAttention(DecoderAttention):
    """The mask decoder's ``Attention`` (token <-> image cross-attention and token self-attention)
    with the same parameters, computed by one SDPA call instead of matmul, softmax, matmul and the
    copies of its head transposes. Re-classed by :func:`accelerate_mask_decoder`, never built."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, Nq, C) queries, (B, Nk, C) keys and values -> (B, Nq, C)."""
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, heads, Nq, C' / heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def accelerate_mask_decoder(model: Sam) -> Sam:
    """Switch every attention of a SAM mask decoder to :class:`FusedDecoderAttention`, in place.

    The same function (SDPA's default scale is segment_anything's 1 / sqrt(head_dim)); a click runs
    about 30 fewer small operations. Returns the same model.
    """
    for module in model.mask_decoder.modules():
        if isinstance(module, DecoderAttention):
            module.__class__ = FusedDecoderAttention
    return model


class WarmCompiled:
    """A module that runs eagerly until its ``torch.compile``'d form is warm, then runs that.

    Compilation (tens of seconds for ViT-B's encoder, about 20 s for the mask decoder on a CPU)
    happens in warm-up calls with ``examples`` on a background thread, so the first embedding and
    the first click are served by the eager module meanwhile. Once warm, a call whose inputs have
    the shapes (and non-tensor values) of a warmed example runs compiled; any other call runs
    eagerly, so nothing ever recompiles on the caller's thread. Inductor keeps its kernels in its
    on-disk cache (``TORCHINDUCTOR_CACHE_DIR``), which makes later cold starts much shorter. A
    failed compilation leaves the eager path in use and is reported in :attr:`error`.

    Args:
        module: the module to compile, e.g. ``sam.image_encoder`` or ``sam.mask_decoder``.
        examples: (args, kwargs) pairs to warm, e.g. ``[((x1,), {}), ((x16,), {})]`` for the encoder
            with (1, 3, 1024, 1024) and (16, 3, 1024, 1024) inputs: one click, one volume batch.
        device: where the module's parameters are.
        precision: "float32" or "bfloat16" (resolved): warm-up and calls run under
            ``ultrasam.device.autocast_for(device, precision)``, as the predictor runs the
            encoder (the decoder runs in "float32").
        background: warm on a thread (default) or block until warm.
        compile_kwargs: passed to ``torch.compile`` (e.g. ``mode``, ``backend``).

    Attributes:
        served: how many calls ran ``"compiled"`` and ``"eager"``.
    """

    def __init__(
        self,
        module: nn.Module,
        examples: Sequence[Tuple[tuple, dict]],
        device: Union[str, torch.device],
        precision: str = "float32",
        background: bool = True,
        **compile_kwargs,
    ) -> None:
        self.module = module
        self.error: Optional[BaseException] = None
        self.served: Counter = Counter()
        self._examples = list(examples)
        self._device = torch.device(device)
        self._precision = precision
        self._compiled = None
        self._warmed: set = set()
        self._compile_kwargs = {"dynamic": False, **compile_kwargs}
        self._thread = threading.Thread(target=self._warm, name="ultrasam-compile", daemon=True)
        self._thread.start()
        if not background:
            self.wait()

    @property
    def ready(self) -> bool:
        """True once every example has been compiled and run."""
        return self._compiled is not None

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until warm-up ends (or ``timeout`` seconds); returns :attr:`ready`."""
        self._thread.join(timeout)
        return self.ready

    def _warm(self) -> None:
        try:
            compiled = torch.compile(self.module, **self._compile_kwargs)
            with torch.inference_mode(), autocast_for(self._device, self._precision):
                for args, kwargs in self._examples:
                    compiled(*args, **kwargs)
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self._warmed = {_signature(args, kwargs) for args, kwargs in self._examples}
            self._compiled = compiled
        except Exception as error:  # any compiler failure: stay eager, say why
            self.error = error

    def __call__(self, *args, **kwargs):
        """The module's output for these inputs, compiled when warm for their shapes.

        Runs under inference mode and the warm-up's ``autocast_for``, so the compiled graph's
        guards hold.
        """
        warm = self._compiled is not None and _signature(args, kwargs) in self._warmed
        self.served["compiled" if warm else "eager"] += 1
        with torch.inference_mode(), autocast_for(self._device, self._precision):
            return (self._compiled if warm else self.module)(*args, **kwargs)


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a ``dynamic=False`` graph is specialised on: tensor shapes/dtypes/devices, other values."""

    def key(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.device
        if isinstance(value, (tuple, list)):
            return tuple(key(item) for item in value)
        return value

    return key(args), tuple((name, key(value)) for name, value in sorted(kwargs.items()))
