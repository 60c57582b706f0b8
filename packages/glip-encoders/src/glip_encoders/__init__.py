"""glip-encoders: Image encoders (timm backbones, Swin-T/L in GLIP's official layout) with GLIP's FPN + P6/P7, and local BERT-family text encoders."""

__version__ = "0.1.0"
