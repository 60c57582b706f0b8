"""glip-fusion: GLIP's language-aware deep-fusion encoder: fused bi-directional image-text attention (Triton), X-MHA blocks, head BERT layer, DyConv."""

__version__ = "0.1.0"
