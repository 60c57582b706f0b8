"""GLIP's ATSS head with word-region alignment (official ``VLDyHead``; ``docs/official_model.md#predictors``).

The head runs the deep-fusion tower (``glip_fusion.FusionEncoder``) over the five FPN maps and the text, then per level
predicts box regression (with a learned scale), centerness and the word-region alignment logits. Parameter names are
the official ones under ``rpn.head.`` so that official checkpoints load by a prefix strip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glip_fusion import FusionEncoder

from .model_config import GLIPConfig

__all__ = ["Scale", "GLIPHead", "HeadOutput"]

LOGIT_CLAMP = 50000.0


class Scale(nn.Module):
    """A learned scalar multiplier (one per FPN level for the box regression)."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@dataclass
class HeadOutput:
    """Raw per-level head outputs.

    Attributes:
        box_regression: per level ``(B, 4, H_l, W_l)`` (after the learned scale).
        centerness: per level ``(B, 1, H_l, W_l)`` logits.
        token_logits: per level ``(B, H_l * W_l, M)`` word-region alignment logits (row-major locations).
        proj_tokens: ``(B, M, C)`` the projected, normalised text used by the alignment.
        features: the fused visual maps, per level ``(B, C, H_l, W_l)``.
        lang_hidden: ``(B, M, D_text)`` the fused text.
        intermediates: ``(features, lang_hidden)`` after every tower module, when requested.
    """

    box_regression: list[torch.Tensor]
    centerness: list[torch.Tensor]
    token_logits: list[torch.Tensor]
    proj_tokens: torch.Tensor
    features: list[torch.Tensor]
    lang_hidden: torch.Tensor
    intermediates: list | None = None


class GLIPHead(nn.Module):
    """Fusion tower + predictors.

    Args:
        config: the model configuration (channels, fusion depth, text width, ...).
    """

    def __init__(self, config: GLIPConfig):
        super().__init__()
        channels = config.fpn_channels
        text_dim = config.text_dim
        self.use_fused_text = config.uses_fused_text
        self.dyhead_tower = FusionEncoder(config.fusion)
        bias_value = -math.log((1 - config.prior_prob) / config.prior_prob)
        # frozen and unused, kept so that official checkpoints load strictly (docs/official_model.md#quirks item 8)
        self.cls_logits = nn.Conv2d(channels, config.num_cls_logits, kernel_size=1)
        self.cls_logits.requires_grad_(False)
        self.bbox_pred = nn.Conv2d(channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(channels, 1, kernel_size=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in config.anchor_strides])
        self.dot_product_projection_text = nn.Linear(text_dim, channels, bias=True)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)
        nn.init.constant_(self.cls_logits.bias, bias_value)

    def forward(
        self,
        features: list[torch.Tensor],
        lang_hidden: torch.Tensor,
        lang_embedded: torch.Tensor,
        text_mask: torch.Tensor,
        image_masks: list[torch.Tensor] | None = None,
        output_intermediates: bool = False,
    ) -> HeadOutput:
        """Run the tower and the predictors.

        Args:
            features: FPN maps P3..P7, each ``(B, C, H_l, W_l)``.
            lang_hidden: ``(B, M, D)`` last BERT layer (the tower's text input).
            lang_embedded: ``(B, M, D)`` BERT output with padding zeroed (GLIP-T(A) aligns against it).
            text_mask: ``(B, M)`` bool, True = real token.
            image_masks: per level ``(B, H_l, W_l)`` bool, True = real pixel; used only in batch-invariant mode.
        """
        tower = self.dyhead_tower(
            features, lang_hidden, text_mask, image_masks=image_masks, output_intermediates=output_intermediates
        )
        fused = tower.features
        text = tower.lang_hidden if self.use_fused_text else lang_embedded
        text = F.normalize(text, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(text / 2.0)  # (B, M, C)
        token_bias = torch.matmul(text, self.bias_lang) + self.bias0  # (B, M)
        inv_temperature = self.log_scale.exp()

        box_regression, centerness, token_logits = [], [], []
        for level, x in enumerate(fused):
            box_regression.append(self.scales[level](self.bbox_pred(x)))
            centerness.append(self.centerness(x))
            queries = x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major locations
            logits = torch.matmul(queries, proj_tokens.transpose(-1, -2)) / inv_temperature + token_bias[:, None, :]
            token_logits.append(logits.clamp(min=-LOGIT_CLAMP, max=LOGIT_CLAMP))
        return HeadOutput(
            box_regression=box_regression,
            centerness=centerness,
            token_logits=token_logits,
            proj_tokens=proj_tokens,
            features=fused,
            lang_hidden=tower.lang_hidden,
            intermediates=tower.intermediates,
        )
