"""glip-fusion: GLIP's language-aware deep-fusion encoder.

The bi-directional image-text attention op (reference, two-SDPA and fused Triton backends), the X-MHA blocks, the
multi-level fusion wrapper, the head BERT layer with GLIP's clamps, DyConv and the stacked encoder. Depends only on
torch and torchvision; the Triton kernel (``glip_fusion.triton``) is imported lazily, never at import time.
"""

from .attention import available_backends, bi_attention, bi_attention_reference
from .config import FusionConfig
from .deform import deform_conv2d, set_dcn_impl
from .modules import (
    BertEncoderLayer,
    BiAttentionBlock,
    BiMultiHeadAttention,
    DyConv,
    FusionEncoder,
    FusionEncoderOutput,
    VLFuse,
    flatten_levels,
    level_image_masks,
    split_levels,
)

__version__ = "0.2.0"

__all__ = [
    "bi_attention",
    "available_backends",
    "bi_attention_reference",
    "FusionConfig",
    "deform_conv2d",
    "set_dcn_impl",
    "BiMultiHeadAttention",
    "BiAttentionBlock",
    "VLFuse",
    "BertEncoderLayer",
    "DyConv",
    "FusionEncoder",
    "FusionEncoderOutput",
    "flatten_levels",
    "split_levels",
    "level_image_masks",
]
