"""The head BERT layer of GLIP's fusion tower: a post-LN BERT layer with GLIP's ±50000 clamps.

Plain torch with Hugging Face ``BertLayer`` parameter names, so the tower's ``{i}.attention.self.query.weight`` ...
load by prefix. Shapes: B batch, M text tokens, C hidden width.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import as_bool_mask

__all__ = ["BertEncoderLayer"]


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
    """The head BERT layer of GLIP's fusion tower: a post-LN BERT layer with GLIP's ±50000 clamps
    (docs/official_model.md#head-bert-layer).

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
        mask = as_bool_mask(text_mask, "text_mask", (B, M))
        additive = None
        if mask is not None:
            additive = (~mask).to(hidden.dtype)[:, None, None, :] * torch.finfo(hidden.dtype).min
        a = self.attention(hidden, additive)
        return self.output(self.intermediate(a), a)
