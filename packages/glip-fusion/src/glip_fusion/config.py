"""Typed configuration of the deep-fusion tower (:class:`glip_fusion.FusionEncoder`).

Every field is validated when the config is built, so a typo in an enum-like string or an impossible size fails at
once with the field's name and the allowed values, not after a model of hundreds of millions of parameters has been
constructed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ._validation import check_positive_int, check_probability
from .attention import BACKENDS
from .dyconv import DCN_IMPLS, OFFSET_MODES

__all__ = ["FusionConfig", "OFFSET_MODES", "FUSION_BACKENDS"]

#: what ``FusionConfig.backend`` accepts (``glip_fusion.bi_attention`` backends plus "auto")
FUSION_BACKENDS = ("auto", *BACKENDS)
#: what ``FusionConfig.dcn_impl`` accepts
DCN_SETTINGS = ("auto", *DCN_IMPLS)


@dataclass(frozen=True)
class FusionConfig:
    """The deep-fusion tower: ``[VLFuse, BertEncoderLayer, DyConv] x num_blocks`` (or ``[DyConv] x num_blocks``).

    Defaults are GLIP-T's tower (see ``docs/official_model.md#fusion-tower``); :meth:`glip_t`, :meth:`glip_l`,
    :meth:`glip_t_a` are the official presets.

    Attributes:
        num_blocks: number of blocks (GLIP-T 6, GLIP-L 8).
        early_fusion: X-MHA + head BERT layers in every block (False: DyConv only, GLIP-T(A)).
        channels: width of the tower's image features. in_channels: width of its input maps (None: ``channels``);
            for the first block the DyConv attentions are on only when they are equal (the official rule).
        lang_dim: width of the text features.
        embed_dim, num_heads: X-MHA projection width and heads (GLIP: 2048, 8 -> head dim 256).
        dropout: X-MHA attention dropout on both probability maps (training only).
        init_values: layer-scale init of the X-MHA residuals; None = 1 / num_blocks (official).
        bert_num_heads, bert_intermediate_size, bert_dropout, bert_layer_norm_eps: the head BERT layers.
        use_gn, use_deform, use_dyfuse, use_dyrelu: DyConv's GroupNorm, deformable convs, scale-aware attention and
            dynamic ReLU.
        offset_mode: "official" (coarser-level offsets reinterpreted in memory, quirk 3) or "per_level" (clean).
        dcn_impl: DyConv's deformable convolutions: "auto" (the gather + GEMM kernel on CPU, torchvision elsewhere;
            ``$GLIP_DCN_IMPL``), "gather" (:func:`glip_fusion.deform_conv2d`), "torchvision" or "grid_sample" (plain
            ONNX ops, for exported graphs).
        clamp: the ±50000 clamps of X-MHA logits, head BERT scores/FFN (None = off).
        backend: ``glip_fusion.bi_attention`` backend ("auto", "reference", "sdpa", "triton").
        gradient_checkpointing: checkpoint every X-MHA block in training (official ``DYHEAD.USE_CHECKPOINT``).
        skip_masked_text: padded text rows of the text update are returned as zeros (never reach a valid output).
    """

    num_blocks: int = 6
    early_fusion: bool = True
    channels: int = 256
    in_channels: Optional[int] = None
    lang_dim: int = 768
    embed_dim: int = 2048
    num_heads: int = 8
    dropout: float = 0.1
    init_values: Optional[float] = None
    bert_num_heads: int = 12
    bert_intermediate_size: int = 3072
    bert_dropout: float = 0.1
    bert_layer_norm_eps: float = 1e-12
    use_gn: bool = True
    use_deform: bool = True
    use_dyfuse: bool = True
    use_dyrelu: bool = True
    offset_mode: str = "official"
    dcn_impl: str = "auto"
    clamp: Optional[float] = 50000.0
    backend: str = "auto"
    gradient_checkpointing: bool = False
    skip_masked_text: bool = False

    def __post_init__(self) -> None:
        for name in ("num_blocks", "channels", "lang_dim", "embed_dim", "num_heads", "bert_num_heads",
                     "bert_intermediate_size"):
            check_positive_int(f"FusionConfig.{name}", getattr(self, name))
        if self.in_channels is not None:
            check_positive_int("FusionConfig.in_channels", self.in_channels)
        if self.offset_mode not in OFFSET_MODES:
            raise ValueError(f"FusionConfig.offset_mode must be one of {OFFSET_MODES}; got {self.offset_mode!r}")
        if self.dcn_impl not in DCN_SETTINGS:
            raise ValueError(f"FusionConfig.dcn_impl must be one of {DCN_SETTINGS}; got {self.dcn_impl!r}")
        if self.backend not in FUSION_BACKENDS:
            raise ValueError(f"FusionConfig.backend must be one of {FUSION_BACKENDS}; got {self.backend!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"FusionConfig.embed_dim ({self.embed_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.early_fusion and self.lang_dim % self.bert_num_heads:
            raise ValueError(f"FusionConfig.lang_dim ({self.lang_dim}) must be divisible by bert_num_heads "
                             f"({self.bert_num_heads})")
        if self.use_gn and self.channels % 16:
            raise ValueError(f"FusionConfig.channels ({self.channels}) must be divisible by 16 for DyConv's "
                             "GroupNorm(16) (or set use_gn=False)")
        if self.use_dyrelu and self.channels % 4:
            raise ValueError(f"FusionConfig.channels ({self.channels}) must be divisible by 4 for DyReLU")
        check_probability("FusionConfig.dropout", self.dropout)
        check_probability("FusionConfig.bert_dropout", self.bert_dropout)
        if self.clamp is not None and (isinstance(self.clamp, bool) or not isinstance(self.clamp, (int, float))
                                       or not self.clamp > 0 or math.isinf(self.clamp)):
            raise ValueError(f"FusionConfig.clamp must be a positive finite number or None; got {self.clamp!r}")
        if self.init_values is not None and not isinstance(self.init_values, (int, float)):
            raise ValueError(f"FusionConfig.init_values must be a number or None; got {self.init_values!r}")

    # presets ---------------------------------------------------------------------------------------------------------
    @classmethod
    def glip_t(cls, **overrides: Any) -> "FusionConfig":
        """GLIP-T (B), (C) and the released GLIP-T: 6 fused blocks."""
        return cls(**{"num_blocks": 6, "early_fusion": True, **overrides})

    @classmethod
    def glip_l(cls, **overrides: Any) -> "FusionConfig":
        """GLIP-L: 8 fused blocks (layer scale 1/8)."""
        return cls(**{"num_blocks": 8, "early_fusion": True, **overrides})

    @classmethod
    def glip_t_a(cls, **overrides: Any) -> "FusionConfig":
        """GLIP-T (A): 6 DyConv blocks, no deep fusion."""
        return cls(**{"num_blocks": 6, "early_fusion": False, **overrides})

    # derived / (de)serialisation ---------------------------------------------------------------------------------------
    @property
    def layer_scale_init(self) -> float:
        return 1.0 / self.num_blocks if self.init_values is None else float(self.init_values)

    def replace(self, **changes: Any) -> "FusionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FusionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FusionConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
