"""glip-data: Data unification for grounded detection: prompts, positive maps, COCO/O365/LVIS/MDETR/ODVG/caption readers, transforms, and a synthetic grounding world."""

__version__ = "0.1.0"
