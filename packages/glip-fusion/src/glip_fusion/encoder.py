"""GLIP's deep-fusion tower (the ``rpn.head.dyhead_tower`` of the official model): the stacked blocks.

Parameter names equal the official checkpoint names, so loading ``rpn.head.dyhead_tower.*`` into a
:class:`FusionEncoder` is a prefix strip. Shapes: B batch, N image tokens (all levels flattened row-major (y, x),
levels in order), M text tokens, C channels. Default arguments reproduce the official GLIP-T numerics (eval mode,
float32); every quirk a cleaner design would change is a named option (``image_masks``, ``offset_mode``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .bert_layer import BertEncoderLayer
from .config import FusionConfig
from .dyconv import DyConv
from .fusion_block import VLFuse

__all__ = ["FusionEncoder", "FusionEncoderOutput"]


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
