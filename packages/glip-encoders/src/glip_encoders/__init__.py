"""glip-encoders: image encoders (timm backbones, Swin-T/L in GLIP's official layout) with GLIP's FPN + P6/P7, and
local BERT-family text encoders.

Image side::

    encoder = build_image_encoder("swin_tiny")            # or "swin_large", or any timm name ("resnet50", ...)
    p3, p4, p5, p6, p7 = encoder(images)                  # images (B, 3, H, W)
    encoder.load_state_dict(image_checkpoint_filter_fn(official_backbone_sd, encoder), strict=True)

Text side::

    text = TextEncoder.from_pretrained(local_dir)         # or TextEncoder.bert_base()
    tok = tokenize(load_tokenizer(local_dir), ["person. dog."])
    out = text(**tok)                                     # TextEncoderOutput(hidden, embedded, masks, aggregate)
"""

from .fpn import FPN, DropBlock2d, LastLevelP6P7
from .image import (
    ImageEncoder,
    build_image_encoder,
    image_checkpoint_filter_fn,
    image_to_official_state_dict,
    load_state_dict_file,
    load_swin_pretrained,
)
from .swin import SWIN_CONFIGS, SwinBackbone, SwinConfig
from .text import TextEncoder, TextEncoderOutput, load_tokenizer, tokenize
from .text import checkpoint_filter_fn as text_checkpoint_filter_fn

__version__ = "0.1.0"

__all__ = [
    "FPN",
    "DropBlock2d",
    "LastLevelP6P7",
    "ImageEncoder",
    "build_image_encoder",
    "image_checkpoint_filter_fn",
    "image_to_official_state_dict",
    "load_state_dict_file",
    "load_swin_pretrained",
    "SWIN_CONFIGS",
    "SwinBackbone",
    "SwinConfig",
    "TextEncoder",
    "TextEncoderOutput",
    "load_tokenizer",
    "tokenize",
    "text_checkpoint_filter_fn",
]
