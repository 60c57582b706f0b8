"""glip-fusion: GLIP's language-aware deep-fusion encoder.

The bi-directional image-text attention op (reference, two-SDPA and fused Triton backends), the X-MHA blocks, the
multi-level fusion wrapper, the head BERT layer with GLIP's clamps, DyConv and the stacked encoder. Depends only on
torch and torchvision; the Triton kernel (``glip_fusion.triton``) is imported lazily, never at import time.

Modules, one job each: ``attention`` (the op and its backends), ``factored_attention`` (the X-MHA reassociated for
short prompts), ``fusion_block`` (X-MHA, its block and multi-level wrapper), ``bert_layer`` (the head BERT layer),
``dyconv`` (DyConv, DyReLU and the deformable convolution), ``levels`` (tokens of a feature pyramid), ``encoder``
(the stacked tower), ``config`` (its configuration), ``_validation`` (the shared input checks).
"""

from .attention import available_backends, bi_attention, bi_attention_reference
from .bert_layer import BertEncoderLayer
from .config import FusionConfig
from .dyconv import DyConv, deform_conv2d, set_dcn_impl
from .encoder import FusionEncoder, FusionEncoderOutput
from .fusion_block import BiAttentionBlock, BiMultiHeadAttention, VLFuse
from .levels import flatten_levels, level_image_masks, split_levels

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
