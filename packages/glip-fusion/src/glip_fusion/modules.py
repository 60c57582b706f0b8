"""GLIP's language-aware deep-fusion encoder (the ``rpn.head.dyhead_tower`` of the official model).

Parameter names equal the official checkpoint names, so loading ``rpn.head.dyhead_tower.*`` into a
:class:`FusionEncoder` is a prefix strip. Shapes: B batch, N image tokens (all levels flattened row-major (y, x),
levels in order), M text tokens, C channels. Default arguments reproduce the official GLIP-T numerics (eval mode,
float32); every quirk a cleaner design would change is a named option (``image_mask(s)``, ``offset_mode``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import BACKEND_ENV_VAR, bi_attention
from .config import OFFSET_MODES, FusionConfig
from .deform import DCN_IMPLS, dcn_function, resolve_dcn_impl
from .factored_attention import factored_bi_mha, factored_pays

__all__ = [
    "BiMultiHeadAttention",
    "BiAttentionBlock",
    "VLFuse",
    "BertEncoderLayer",
    "DyConv",
    "DyReLU",
    "FusionEncoder",
    "FusionEncoderOutput",
    "flatten_levels",
    "split_levels",
    "level_image_masks",
]


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _as_bool_mask(mask: Optional[torch.Tensor], name: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """Accept a bool mask or GLIP's 0/1 integer mask (True/1 = real); check its shape."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def flatten_levels(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Flatten multi-level maps ``[(B, C, H_l, W_l)]`` into tokens ``(B, N, C)``, row-major (y, x), levels in order.

    Returns the tokens and the ``(H_l, W_l)`` of every level (for :func:`split_levels`).
    """
    if isinstance(features, torch.Tensor) or len(features) == 0:
        raise ValueError("features must be a non-empty list of (B, C, H, W) tensors")
    B, C = features[0].shape[:2]
    sizes = []
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[0] != B or f.shape[1] != C:
            raise ValueError(f"features[{i}] must have shape (B={B}, C={C}, H, W); got {tuple(f.shape)}")
        sizes.append((f.shape[2], f.shape[3]))  # not int(): a traced export keeps the sizes symbolic
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    return tokens, sizes


def split_levels(tokens: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_levels`: ``(B, N, C)`` -> ``[(B, C, H_l, W_l)]`` (contiguous)."""
    counts = [h * w for h, w in sizes]
    if tokens.dim() != 3 or tokens.shape[1] != sum(counts):
        raise ValueError(f"tokens must have shape (B, N={sum(counts)}, C) for level sizes {list(sizes)}; "
                         f"got {tuple(tokens.shape)}")
    B, _, C = tokens.shape
    chunks = torch.split(tokens, counts, dim=1)
    return [c.transpose(1, 2).reshape(B, C, h, w).contiguous() for c, (h, w) in zip(chunks, sizes)]


def level_image_masks(image_sizes: Sequence[tuple[int, int]] | torch.Tensor, feature_sizes: Sequence[tuple[int, int]],
                      strides: Sequence[int], *, size_divisibility: int = 32,
                      device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Per-level validity masks of a zero-padded batch: the cells the image would have if it were alone.

    An image of ``(h, w)`` run alone is padded to ``(ceil(h / d) * d, ceil(w / d) * d)`` (``d = size_divisibility``)
    and every stride-``s`` feature map of a "same"-padded network (convolutions, Swin patch embedding and merging,
    GLIP's stride-2 P6/P7) then has ``ceil(padded / s)`` rows and columns. In a larger batch the same image gets more
    padding; this mask marks valid exactly those cells, so a batched image's valid cells equal the cells of the image
    alone and the rule depends only on the image's own size, never on the batch. (A pooling rule over the padded
    pixel mask would not: it depends on the batch's padded size at levels whose stride does not divide it.)

    Args:
        image_sizes: ``(h, w)`` of each unpadded image (B entries), or a ``(B, 2)`` integer tensor (a traced export
            takes the sizes as a graph input).
        feature_sizes: ``(H_l, W_l)`` of every level of the batch.
        strides: the stride of every level (GLIP: 8, 16, 32, 64, 128).
        size_divisibility: the batch padding multiple (GLIP: 32).
    Returns:
        ``[(B, H_l, W_l)]`` bool, True = valid cell.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"{len(feature_sizes)} feature sizes but {len(strides)} strides")
    divisor = max(1, int(size_divisibility))
    sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=device).reshape(-1, 2)
    padded = torch.div(sizes + divisor - 1, divisor, rounding_mode="floor") * divisor
    masks = []
    for (height, width), stride in zip(feature_sizes, strides):
        valid = torch.div(padded + stride - 1, stride, rounding_mode="floor")  # (B, 2): ceil(padded / stride)
        rows = torch.arange(height, device=sizes.device)
        cols = torch.arange(width, device=sizes.device)
        masks.append((rows[None, :, None] < valid[:, 0, None, None]) & (cols[None, None, :] < valid[:, 1, None, None]))
    return masks


def _h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GLIP's hard sigmoid ``ReLU6(x + 3) / 6`` (kept in this form for bit-parity; F.hardsigmoid rounds differently)."""
    return F.relu6(x + 3.0) / 6.0


class _HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _h_sigmoid(x)


# ----------------------------------------------------------------------------------------------------------------
# X-MHA fusion


class BiMultiHeadAttention(nn.Module):
    """GLIP's bi-directional multi-head attention between image tokens and text tokens (X-MHA; docs/official_model.md#x-mha).

    Parameters (official names): ``v_proj``, ``l_proj``, ``values_v_proj``, ``values_l_proj``, ``out_v_proj``,
    ``out_l_proj`` (xavier-uniform weights, zero biases). Queries are scaled by ``head_dim ** -0.5`` after the bias,
    as in the official code.

    Args:
        v_dim, l_dim: image / text feature widths (GLIP: 256, 768). embed_dim, num_heads: GLIP: 2048, 8.
        dropout: attention dropout on both probability maps (training only). clamp: logits clamp (None = off).
        backend: :func:`glip_fusion.bi_attention` backend. skip_masked_text: padded text rows of the text update
            are returned as zeros (they never reach a valid output; off by default because the official model
            computes them and the parity fixture records them).
        factored: compute the X-MHA with the image-side projections folded into the text side
            (:func:`glip_fusion.factored_attention.factored_bi_mha`, equal to float rounding). None (default):
            when the backend is "auto" (and ``$GLIP_FUSION_BACKEND`` unset or "auto"), the tensors are on the CPU,
            no gradient is recorded, no attention dropout applies and the prompt is shorter than a head (where it was measured to pay: X-MHA 3.4 s -> 0.4 s per GLIP-T image with a
            4-class prompt on 2 cores). True / False force it on / off.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1,
                 clamp: Optional[float] = 50000.0, backend: str = "auto", skip_masked_text: bool = False,
                 factored: Optional[bool] = None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.v_dim, self.l_dim, self.embed_dim, self.num_heads = v_dim, l_dim, embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.dropout = dropout
        self.clamp = clamp
        self.backend = backend
        self.skip_masked_text = skip_masked_text
        self.factored = factored

        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                    self.out_l_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, E)`` -> ``(B, H, L, E/H)``; channel c goes to head c // head_dim."""
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def check_inputs(self, v: torch.Tensor, l: torch.Tensor, text_mask: Optional[torch.Tensor],
                     image_mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Validate the shapes of :meth:`forward`'s inputs; returns the masks as bool tensors (or None)."""
        if v.dim() != 3 or v.shape[-1] != self.v_dim:
            raise ValueError(f"v must have shape (B, N, v_dim={self.v_dim}); got {tuple(v.shape)}")
        if l.dim() != 3 or l.shape[-1] != self.l_dim or l.shape[0] != v.shape[0]:
            raise ValueError(f"l must have shape (B={v.shape[0]}, M, l_dim={self.l_dim}); got {tuple(l.shape)}")
        return (_as_bool_mask(text_mask, "text_mask", (v.shape[0], l.shape[1])),
                _as_bool_mask(image_mask, "image_mask", (v.shape[0], v.shape[1])))

    def uses_factored(self, v: torch.Tensor, num_text_tokens: int) -> bool:
        """Whether :meth:`forward` takes the factored path for image tokens ``v`` and a prompt of that length."""
        if self.factored is not None:
            return self.factored
        if self.backend != "auto" or os.environ.get(BACKEND_ENV_VAR, "auto") != "auto":
            return False  # an explicit backend choice (argument or environment) is honoured
        if v.device.type != "cpu" or torch.is_grad_enabled() or (self.training and self.dropout > 0):
            return False  # measured on CPU inference only; no attention dropout in the factored form
        return factored_pays(num_text_tokens, self.head_dim)

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: v ``(B, N, v_dim)``, l ``(B, M, l_dim)``, text_mask ``(B, M)`` (bool or 0/1, 1 = real),
        image_mask ``(B, N)`` or None (None = official: padded image positions are attended to by text).

        Returns ``(delta_v (B, N, v_dim), delta_l (B, M, l_dim))``.
        """
        text_mask, image_mask = self.check_inputs(v, l, text_mask, image_mask)
        B, N, _ = v.shape
        M = l.shape[1]
        if self.uses_factored(v, M):
            return factored_bi_mha(self, v, l, text_mask, image_mask)

        q = self._heads(self.v_proj(v) * self.scale)  # official order: scale after the bias
        k = self._heads(self.l_proj(l))
        v_v = self._heads(self.values_v_proj(v))
        v_l = self._heads(self.values_l_proj(l))
        o_v, o_l = bi_attention(q, k, v_v, v_l, text_mask, image_mask, scale=1.0,
                                dropout_p=self.dropout if self.training else 0.0, clamp=self.clamp,
                                backend=self.backend, skip_masked_text=self.skip_masked_text)
        o_v = o_v.transpose(1, 2).reshape(B, N, self.embed_dim)  # merge heads: channel = head * head_dim + d
        o_l = o_l.transpose(1, 2).reshape(B, M, self.embed_dim)
        return self.out_v_proj(o_v), self.out_l_proj(o_l)


class BiAttentionBlock(nn.Module):
    """X-MHA block with layer scale (official ``BiAttentionBlockForCheckpoint``).

    ``v' = LN_v(v) + gamma_v * dV`` and ``l' = LN_l(l) + gamma_l * dL``: the residual is added to the **layer-normed**
    input (quirk 2 of docs/official_model.md#quirks), which the checkpoints were trained with. Parameters: ``layer_norm_v``, ``layer_norm_l``,
    ``attn`` (a :class:`BiMultiHeadAttention`), ``gamma_v`` ``(v_dim,)``, ``gamma_l`` ``(l_dim,)`` initialised to
    ``init_values`` (GLIP: 1 / number of fusion blocks).

    Passing ``image_mask`` to :meth:`forward` masks padded image positions in the text-direction softmax, which makes
    results independent of batch padding (clean mode); the default None reproduces the official model (quirk 1).
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1,
                 init_values: float = 1.0 / 6, clamp: Optional[float] = 50000.0, backend: str = "auto",
                 skip_masked_text: bool = False):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout=dropout, clamp=clamp,
                                         backend=backend, skip_masked_text=skip_masked_text)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), float(init_values)))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), float(init_values)))

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                image_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """v ``(B, N, v_dim)``, l ``(B, M, l_dim)`` -> ``(v', l')`` of the same shapes."""
        v = self.layer_norm_v(v)
        l = self.layer_norm_l(l)
        delta_v, delta_l = self.attn(v, l, text_mask, image_mask)
        return v + self.gamma_v * delta_v, l + self.gamma_l * delta_l


class VLFuse(nn.Module):
    """Multi-level early-fusion wrapper: flatten the FPN levels, run the X-MHA block, split back.

    Child ``b_attn`` (a :class:`BiAttentionBlock`), so keys read ``b_attn.attn.v_proj.weight`` etc. With
    ``use_checkpoint=True`` the block is gradient-checkpointed (``torch.utils.checkpoint``, non-reentrant) whenever
    gradients are being recorded, as GLIP's ``MODEL.DYHEAD.USE_CHECKPOINT`` does.
    """

    def __init__(self, v_dim: int = 256, l_dim: int = 768, embed_dim: int = 2048, num_heads: int = 8,
                 dropout: float = 0.1, init_values: float = 1.0 / 6, clamp: Optional[float] = 50000.0,
                 backend: str = "auto", use_checkpoint: bool = False, skip_masked_text: bool = False):
        super().__init__()
        self.b_attn = BiAttentionBlock(v_dim, l_dim, embed_dim, num_heads, dropout=dropout, init_values=init_values,
                                       clamp=clamp, backend=backend, skip_masked_text=skip_masked_text)
        self.use_checkpoint = use_checkpoint

    def forward(self, features: Sequence[torch.Tensor], lang: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                image_masks: Optional[Sequence[torch.Tensor]] = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Args:
            features: ``[(B, C, H_l, W_l)]`` (GLIP: P3..P7). lang: ``(B, M, Cl)`` text hidden states.
            text_mask: ``(B, M)``, 1/True = real token. image_masks: ``[(B, H_l, W_l)]`` bool or None (official).
        Returns: ``(fused features [(B, C, H_l, W_l)], fused lang (B, M, Cl))``.
        """
        v, sizes = flatten_levels(features)
        image_mask = None
        if image_masks is not None:
            if len(image_masks) != len(sizes):
                raise ValueError(f"image_masks has {len(image_masks)} levels but features has {len(sizes)}")
            for i, (m, (h, w)) in enumerate(zip(image_masks, sizes)):
                if tuple(m.shape) != (v.shape[0], h, w):
                    raise ValueError(f"image_masks[{i}] must have shape (B={v.shape[0]}, {h}, {w}); "
                                     f"got {tuple(m.shape)}")
            image_mask = torch.cat([m.reshape(m.shape[0], -1) for m in image_masks], dim=1)
        if self.use_checkpoint and torch.is_grad_enabled():
            v, lang = checkpoint(self.b_attn, v, lang, text_mask, image_mask, use_reentrant=False)
        else:
            v, lang = self.b_attn(v, lang, text_mask, image_mask)
        return split_levels(v, sizes), lang


# ----------------------------------------------------------------------------------------------------------------
# head BERT layer


class _BertSelfAttention(nn.Module):
    """``attention.self``: query/key/value projections and the clamped, masked softmax attention."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, clamp: Optional[float]):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.clamp = clamp
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, M, _ = x.shape
        return x.view(B, M, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, M, d)

    def forward(self, hidden: torch.Tensor, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden ``(B, M, C)``, additive_mask ``(B, 1, 1, M)`` (0 for real keys, very negative for padding)."""
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if self.clamp is not None:  # GLIP CLAMP_BERTATTN_{MIN,MAX}: before the mask is added
            scores = scores.clamp(min=-self.clamp, max=self.clamp)
        if additive_mask is not None:
            scores = scores + additive_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v)  # (B, h, M, d)
        B, _, M, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(B, M, self.num_heads * self.head_dim)


class _BertSelfOutput(nn.Module):
    """``attention.output``: ``LN(dropout(dense(ctx)) + hidden)``."""

    def __init__(self, hidden_size: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ctx: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(ctx)) + hidden)


class _BertAttention(nn.Module):
    """``attention`` = ``self`` (:class:`_BertSelfAttention`) + ``output`` (:class:`_BertSelfOutput`)."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float, hidden_dropout: float,
                 eps: float, clamp: Optional[float]):
        super().__init__()
        self.self = _BertSelfAttention(hidden_size, num_heads, attention_dropout, clamp)
        self.output = _BertSelfOutput(hidden_size, hidden_dropout, eps)

    def forward(self, hidden: torch.Tensor, additive_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(hidden, additive_mask), hidden)


class _BertIntermediate(nn.Module):
    """``intermediate``: ``clamp(GELU(clamp(dense(a))))`` (the two clamps are unconditional in GLIP)."""

    def __init__(self, hidden_size: int, intermediate_size: int, clamp: Optional[float]):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.clamp = clamp

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        u = _maybe_clamp(self.dense(a), self.clamp)
        return _maybe_clamp(F.gelu(u), self.clamp)  # exact (erf) GELU, as BERT's "gelu"


class _BertOutput(nn.Module):
    """``output``: ``clamp(LN(clamp(dropout(dense(u))) + a))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float, eps: float, clamp: Optional[float]):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.clamp = clamp

    def forward(self, u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        o = _maybe_clamp(self.dropout(self.dense(u)), self.clamp)
        return _maybe_clamp(self.LayerNorm(o + a), self.clamp)


def _maybe_clamp(x: torch.Tensor, clamp: Optional[float]) -> torch.Tensor:
    return x if clamp is None else x.clamp(min=-clamp, max=clamp)


class BertEncoderLayer(nn.Module):
    """The head BERT layer of GLIP's fusion tower: a post-LN BERT layer with GLIP's ±50000 clamps (docs/official_model.md#head-bert-layer).

    Written in plain torch with Hugging Face ``BertLayer`` parameter names (``attention.self.{query,key,value}``,
    ``attention.output.dense``, ``attention.output.LayerNorm``, ``intermediate.dense``, ``output.dense``,
    ``output.LayerNorm``). Any width / head count works (e.g. 384 / 12 / 1536 for a MiniLM-sized text tower).

    ``clamp`` is applied to the attention scores (before the padding mask is added) and after the FFN dense, the
    GELU, the output dense and the output LayerNorm, as the official layer does; ``clamp=None`` turns all five off.
    Initialisation: PyTorch defaults (the official layer never runs BERT's init; checkpoints overwrite it anyway).
    """

    def __init__(self, hidden_size: int = 768, num_heads: int = 12, intermediate_size: int = 3072,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 clamp: Optional[float] = 50000.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.attention = _BertAttention(hidden_size, num_heads, attention_dropout, hidden_dropout, layer_norm_eps,
                                        clamp)
        self.intermediate = _BertIntermediate(hidden_size, intermediate_size, clamp)
        self.output = _BertOutput(hidden_size, intermediate_size, hidden_dropout, layer_norm_eps, clamp)

    def forward(self, hidden: torch.Tensor, text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden ``(B, M, C)``, text_mask ``(B, M)`` (bool or 0/1, 1 = real) -> ``(B, M, C)``.

        Padded keys get the additive mask ``finfo(dtype).min`` (as Hugging Face's extended attention mask); padded
        query rows are still computed (GLIP keeps them).
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (B, M, {self.hidden_size}); got {tuple(hidden.shape)}")
        B, M, _ = hidden.shape
        mask = _as_bool_mask(text_mask, "text_mask", (B, M))
        additive = None
        if mask is not None:
            additive = (~mask).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min
        a = self.attention(hidden, additive)
        return self.output(self.intermediate(a), a)


# ----------------------------------------------------------------------------------------------------------------
# DyConv


class ModulatedDeformConv3x3(nn.Module):
    """3x3 modulated deformable convolution (DCNv2), the spatial attention of :class:`DyConv`.

    ``weight (C_out, C_in, 3, 3)``, ``bias (C_out,)``, padding 1, one deformable group. Offsets ``(B, 18, Ho, Wo)``
    are (dy, dx) per tap, taps row-major; ``mask (B, 9, Ho, Wo)`` in [0, 1]. Like the official op (which is
    ``custom_fwd(cast_inputs=float32)``) it runs in float32 under autocast. Init: uniform(±1/sqrt(C_in*9)), bias 0.

    ``impl`` (an attribute, also settable on a whole model with :func:`glip_fusion.set_dcn_impl`):
    ``"gather"`` (:func:`glip_fusion.deform_conv2d`: row gather + GEMM, several times faster on CPU, forward and
    backward), ``"torchvision"`` (:func:`torchvision.ops.deform_conv2d`), ``"grid_sample"``
    (:func:`glip_fusion.deform.deform_conv2d_grid_sample`: plain ONNX ops, what exported graphs use) or ``"auto"``
    (default: ``$GLIP_DCN_IMPL`` if set, else ``"gather"`` on CPU and ``"torchvision"`` on other devices). All compute
    the same function.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, impl: str = "auto"):
        super().__init__()
        if impl != "auto" and impl not in DCN_IMPLS:
            raise ValueError(f"impl must be 'auto' or one of {DCN_IMPLS}; got {impl!r}")
        self.stride = stride
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1] * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=3, stride={self.stride}, padding=1, "
                f"impl={self.impl!r}")

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        op = dcn_function(resolve_dcn_impl(self.impl, x.device))
        if _autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return op(x.float(), offset.float(), self.weight.float(), self.bias.float(),
                          stride=self.stride, padding=1, mask=mask.float())
        return op(x, offset, self.weight, self.bias, stride=self.stride, padding=1, mask=mask)


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` (torch >= 2.4) with a fallback for older torch."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class _Conv3x3Norm(nn.Module):
    """``DyConv.{i}``: ``conv`` (deformable or plain 3x3) followed by ``bn`` (GroupNorm, or absent)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, deformable: bool, gn_groups: Optional[int],
                 dcn_impl: str = "auto"):
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride, impl=dcn_impl)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            nn.init.normal_(self.conv.weight, 0.0, 0.01)  # official DyConv.init_weights (plain convs only)
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.GroupNorm(gn_groups, out_channels) if gn_groups else None

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv(x, offset, mask) if self.deformable else self.conv(x)
        return self.bn(y) if self.bn is not None else y


class DyReLU(nn.Module):
    """Dynamic ReLU (task-aware attention), reduction 4, K2 with bias: ``relu.fc.0`` / ``relu.fc.2``.

    ``g = GAP(x)`` -> Linear(C, C/4) -> ReLU -> Linear(C/4, 4C) -> hard sigmoid -> ``(a1, b1, a2, b2)``;
    ``out = max(x * (2(a1 - .5) + 1) + (b1 - .5), x * 2(a2 - .5) + (b2 - .5))`` per channel.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, 4 * channels), _HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        coeffs = self.fc(F.adaptive_avg_pool2d(x, 1).view(B, C)).view(B, 4 * C, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, C, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        # x * a + b with the add in place: the same rounding as the plain expression, one map-sized pass less
        return torch.maximum((x * a1).add_(b1), (x * a2).add_(b2))



class DyConv(nn.Module):
    """One DyHead block: spatial-aware (DCNv2), scale-aware (``AttnConv``) and task-aware (DyReLU) attention.

    Parameters (official names): ``DyConv.0`` (stride 1, applied to the coarser level l+1), ``DyConv.1`` (stride 1,
    same level), ``DyConv.2`` (stride 2, applied to the finer level l-1), each ``conv`` + ``bn`` (GroupNorm(16));
    ``offset`` (Conv2d(C, 27, 3): 18 offsets + 9 mask logits); ``AttnConv.1`` (Conv2d(C, 1, 1) between a global
    average pool and a ReLU); ``relu.fc.{0,2}`` (:class:`DyReLU`). All weights are shared across levels.

    For level l (docs/official_model.md#dyconv): offsets/mask from ``offset(x_l)``; terms ``GN(DCN_1(x_l))``, ``GN(DCN_2(x_{l-1}))``
    (l > 0) and ``upsample(GN(DCN_0(x_{l+1})))`` (l < L-1, bilinear, ``align_corners=True``); each term is weighted
    by ``hsigmoid(ReLU(AttnConv(term)))`` (a scalar per sample, pooled over the whole padded map) and the terms are
    averaged; then DyReLU.

    ``offset_mode``:
        ``"official"`` (default, parity): the coarser-level conv consumes level l's offsets reinterpreted in memory
        at level l+1's resolution, ``flatten(off_l[b])[:18*H'*W'].view(18, H', W')`` (the official CUDA kernel reads
        the buffer with the output's strides; quirk 3). ``"per_level"`` (clean alternative, for training your
        own model): the coarser-level conv uses offsets predicted from level l+1's own features.

    Flags (``use_deform``, ``use_dyfuse``, ``use_dyrelu``) switch the three attentions; off means a plain 3x3 conv
    (init N(0, 0.01)), a plain mean of the terms, and a ReLU. The attentions need ``in_channels == out_channels``.
    ``dcn_impl``: the deformable convolutions' implementation (:class:`ModulatedDeformConv3x3`'s ``impl``).
    """

    def __init__(self, in_channels: int = 256, out_channels: int = 256, *, use_gn: bool = True, gn_groups: int = 16,
                 use_deform: bool = True, use_dyfuse: bool = True, use_dyrelu: bool = True,
                 offset_mode: str = "official", dcn_impl: str = "auto"):
        super().__init__()
        if offset_mode not in OFFSET_MODES:
            raise ValueError(f"offset_mode must be one of {OFFSET_MODES}; got {offset_mode!r}")
        if (use_dyfuse or use_dyrelu) and in_channels != out_channels:
            raise ValueError(f"use_dyfuse / use_dyrelu need in_channels == out_channels (got {in_channels} and "
                             f"{out_channels}); GLIP switches them off for such a first block")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.offset_mode = offset_mode
        groups = gn_groups if use_gn else None
        self.DyConv = nn.ModuleList([_Conv3x3Norm(in_channels, out_channels, s, use_deform, groups, dcn_impl)
                                     for s in (1, 1, 2)])
        if use_dyfuse:
            self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, 1, kernel_size=1),
                                          nn.ReLU(inplace=True))
            nn.init.normal_(self.AttnConv[1].weight, 0.0, 0.01)
            nn.init.zeros_(self.AttnConv[1].bias)
        else:
            self.AttnConv = None
        self.relu = DyReLU(out_channels) if use_dyrelu else nn.ReLU()
        # the official offset conv keeps PyTorch's default init
        self.offset = nn.Conv2d(in_channels, 27, kernel_size=3, padding=1) if use_deform else None

    @staticmethod
    def _reinterpret(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Read the per-sample buffer of ``t (B, K, H, W)`` as ``(B, K, h, w)``: its first ``K*h*w`` values."""
        B, K = t.shape[:2]
        h, w = size
        return t.reshape(B, -1)[:, : K * h * w].reshape(B, K, h, w)

    def _conv_terms(self, feats: Sequence[torch.Tensor], level: int, offsets: list) -> list[torch.Tensor]:
        """The 1-3 terms of ``level`` in the official order [same level, finer level, coarser level]."""
        x = feats[level]
        H, W = x.shape[-2:]
        off = offsets[level]
        terms = [self.DyConv[1](x, *off)]
        if level > 0:
            fine = feats[level - 1]
            out_hw = ((fine.shape[-2] - 1) // 2 + 1, (fine.shape[-1] - 1) // 2 + 1)  # 3x3, stride 2, pad 1
            if out_hw != (H, W):
                raise ValueError(f"level {level - 1} of size {tuple(fine.shape[-2:])} gives {out_hw} after the "
                                 f"stride-2 conv, but level {level} is {(H, W)}; levels must halve (ceil) in size")
            terms.append(self.DyConv[2](fine, *off))
        if level < len(feats) - 1:
            coarse = feats[level + 1]
            h, w = coarse.shape[-2:]
            if self.offset is None:
                coarse_off = ()
            elif self.offset_mode == "per_level":
                coarse_off = offsets[level + 1]
            else:
                if h * w > H * W:
                    raise ValueError(f"offset_mode='official' needs level {level + 1} ({h}x{w}) to be no larger "
                                     f"than level {level} ({H}x{W})")
                coarse_off = tuple(self._reinterpret(t, (h, w)) for t in off)
            up = self.DyConv[0](coarse, *coarse_off)
            terms.append(F.interpolate(up, size=(H, W), mode="bilinear", align_corners=True))
        return terms

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[(B, C_in, H_l, W_l)]`` (finest first) -> ``[(B, C_out, H_l, W_l)]``."""
        if isinstance(features, torch.Tensor) or len(features) == 0:
            raise ValueError("DyConv expects a non-empty list of (B, C, H, W) maps, finest level first")
        B = features[0].shape[0]
        for i, f in enumerate(features):
            if f.dim() != 4 or f.shape[0] != B or f.shape[1] != self.in_channels:
                raise ValueError(f"features[{i}] must have shape (B={B}, C={self.in_channels}, H, W); "
                                 f"got {tuple(f.shape)}")
        offsets: list = []
        for f in features:
            if self.offset is None:
                offsets.append(())
            else:
                om = self.offset(f)  # (B, 27, H, W)
                offsets.append((om[:, :18], om[:, 18:].sigmoid()))

        outs = []
        for level in range(len(features)):
            terms = self._conv_terms(features, level, offsets)
            if self.AttnConv is not None:
                terms = [t * _h_sigmoid(self.AttnConv(t)) for t in terms]  # (B, C, H, W) * (B, 1, 1, 1)
            # the mean over the terms, summed in order and divided: bitwise equal to torch.mean(torch.stack(terms), 0)
            # without the stacked copy (the weighted terms are fresh tensors, the plain ones are not)
            fused = terms[0] if self.AttnConv is not None else terms[0].clone()
            for t in terms[1:]:
                fused.add_(t)
            outs.append(fused.div_(len(terms)))
        return [self.relu(y) for y in outs]


# ----------------------------------------------------------------------------------------------------------------
# the tower


@dataclass
class FusionEncoderOutput:
    """Output of :class:`FusionEncoder`.

    Attributes:
        features: fused visual maps ``[(B, C, H_l, W_l)]``.
        lang_hidden: fused text ``(B, M, Cl)`` (the input unchanged for a tower without early fusion).
        intermediates: with ``output_intermediates=True``, ``(features, lang_hidden)`` after every module
            (GLIP-T: 18 entries), else None.
    """

    features: list[torch.Tensor]
    lang_hidden: Optional[torch.Tensor]
    intermediates: Optional[list[tuple[list[torch.Tensor], Optional[torch.Tensor]]]] = None


class FusionEncoder(nn.ModuleList):
    """GLIP's deep-fusion tower: ``[VLFuse, BertEncoderLayer, DyConv] x num_blocks`` or ``[DyConv] x num_blocks``.

    An ``nn.ModuleList`` whose indices equal the official ``rpn.head.dyhead_tower.{i}`` indices. Built from a
    :class:`~glip_fusion.FusionConfig` (keyword overrides of its fields apply on top, e.g.
    ``FusionEncoder(num_blocks=2, channels=64)``); presets :meth:`glip_t` (6 fused blocks), :meth:`glip_l` (8),
    :meth:`glip_t_a` (6 DyConv-only blocks). For the first block DyConv's attentions are on only when
    ``in_channels == channels`` (the official rule).
    """

    def __init__(self, config: Optional[FusionConfig] = None, **overrides):
        config = (config or FusionConfig()).replace(**overrides) if overrides else (config or FusionConfig())
        modules: list[nn.Module] = []
        in_channels = config.in_channels or config.channels
        for i in range(config.num_blocks):
            c_in = in_channels if i == 0 else config.channels
            if config.early_fusion:
                modules.append(VLFuse(c_in, config.lang_dim, config.embed_dim, config.num_heads,
                                      dropout=config.dropout, init_values=config.layer_scale_init,
                                      clamp=config.clamp, backend=config.backend,
                                      use_checkpoint=config.gradient_checkpointing,
                                      skip_masked_text=config.skip_masked_text))
                modules.append(BertEncoderLayer(config.lang_dim, config.bert_num_heads, config.bert_intermediate_size,
                                                hidden_dropout=config.bert_dropout,
                                                attention_dropout=config.bert_dropout,
                                                layer_norm_eps=config.bert_layer_norm_eps, clamp=config.clamp))
            same = c_in == config.channels
            modules.append(DyConv(c_in, config.channels, use_gn=config.use_gn, use_deform=config.use_deform and same,
                                  use_dyfuse=config.use_dyfuse and same, use_dyrelu=config.use_dyrelu and same,
                                  offset_mode=config.offset_mode, dcn_impl=config.dcn_impl))
        super().__init__(modules)
        self.config = config
        self.num_blocks = config.num_blocks
        self.early_fusion = config.early_fusion

    # presets ------------------------------------------------------------------------------------------------------

    @classmethod
    def glip_t(cls, **overrides) -> "FusionEncoder":
        """GLIP-T (B/C/released): 6 x [VLFuse, BertEncoderLayer, DyConv] (18 modules)."""
        return cls(FusionConfig.glip_t(**overrides))

    @classmethod
    def glip_l(cls, **overrides) -> "FusionEncoder":
        """GLIP-L: 8 x [VLFuse, BertEncoderLayer, DyConv] (24 modules), layer scale init 1/8."""
        return cls(FusionConfig.glip_l(**overrides))

    @classmethod
    def glip_t_a(cls, **overrides) -> "FusionEncoder":
        """GLIP-T(A): 6 x DyConv, no deep fusion (the text passes through unchanged)."""
        return cls(FusionConfig.glip_t_a(**overrides))

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether every X-MHA block is gradient-checkpointed in training."""
        return any(m.use_checkpoint for m in self if isinstance(m, VLFuse))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        for m in self:
            if isinstance(m, VLFuse):
                m.use_checkpoint = bool(enable)

    # forward ------------------------------------------------------------------------------------------------------

    def forward(self, features: Sequence[torch.Tensor], lang_hidden: Optional[torch.Tensor] = None,
                text_mask: Optional[torch.Tensor] = None, image_masks: Optional[Sequence[torch.Tensor]] = None,
                output_intermediates: bool = False) -> FusionEncoderOutput:
        """Run the tower.

        Args:
            features: ``[(B, C, H_l, W_l)]``, finest first (GLIP: P3..P7).
            lang_hidden: ``(B, M, Cl)`` text hidden states (required with early fusion).
            text_mask: ``(B, M)`` bool or 0/1, 1 = real token.
            image_masks: ``[(B, H_l, W_l)]`` bool, True = real; only the X-MHA text-direction softmax uses them
                (clean, batch-invariant mode). None = official behaviour (padding attended to).
            output_intermediates: also return ``(features, lang_hidden)`` after every module.
        """
        if self.early_fusion and lang_hidden is None:
            raise ValueError("lang_hidden (B, M, Cl) is required by a FusionEncoder with early fusion")
        feats = list(features)
        lang = lang_hidden
        intermediates: Optional[list] = [] if output_intermediates else None
        for module in self:
            if isinstance(module, VLFuse):
                feats, lang = module(feats, lang, text_mask, image_masks)
            elif isinstance(module, BertEncoderLayer):
                lang = module(lang, text_mask)
            else:
                feats = module(feats)
            if intermediates is not None:
                intermediates.append((feats, lang))
        return FusionEncoderOutput(features=feats, lang_hidden=lang, intermediates=intermediates)
