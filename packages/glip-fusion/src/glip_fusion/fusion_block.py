"""GLIP's X-MHA fusion block: bi-directional image-text attention with layer scale, and its multi-level wrapper.

* :class:`BiMultiHeadAttention`: the projections around :func:`glip_fusion.bi_attention` (official
  ``BiMultiHeadAttention``);
* :class:`BiAttentionBlock`: layer norms and layer-scaled residuals (official ``BiAttentionBlockForCheckpoint``);
* :class:`VLFuse`: flattens the FPN levels into image tokens (:func:`glip_fusion.flatten_levels`), runs the block
  and splits them back.

Parameter names equal the official checkpoint names (``b_attn.attn.v_proj.weight`` ...). Shapes: B batch, N image
tokens (all levels flattened), M text tokens.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._validation import as_bool_mask
from .attention import BACKEND_ENV_VAR, bi_attention
from .factored_attention import factored_bi_mha, factored_pays
from .levels import flatten_levels, split_levels

__all__ = ["BiMultiHeadAttention", "BiAttentionBlock", "VLFuse"]


class BiMultiHeadAttention(nn.Module):
    """GLIP's bi-directional multi-head attention between image tokens and text tokens (X-MHA;
    docs/official_model.md#x-mha).

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
            no gradient is recorded, no attention dropout applies and the prompt is shorter than a head (where it
            was measured to pay: X-MHA 3.4 s -> 0.4 s per GLIP-T image with a 4-class prompt on 2 cores).
            True / False force it on / off.
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
        return (as_bool_mask(text_mask, "text_mask", (v.shape[0], l.shape[1])),
                as_bool_mask(image_mask, "image_mask", (v.shape[0], v.shape[1])))

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
    input (quirk 2 of docs/official_model.md#quirks), which the checkpoints were trained with. Parameters:
    ``layer_norm_v``, ``layer_norm_l``, ``attn`` (a :class:`BiMultiHeadAttention`), ``gamma_v`` ``(v_dim,)``,
    ``gamma_l`` ``(l_dim,)`` initialised to ``init_values`` (GLIP: 1 / number of fusion blocks).

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
