"""glip-train: The GLIP detector: assembly, ATSS head, post-processing, official-checkpoint conversion, detect/ground API and the glip command line."""

__version__ = "0.1.0"
