"""glip-data: Data unification for grounded detection: prompts, positive maps, COCO/O365/LVIS/MDETR/ODVG/caption readers, transforms, and a synthetic grounding world."""

from .collate import pad_images
from .positive_map import EntityTokens, build_positive_map, label_to_tokens, spans_to_tokens
from .prompts import chunk_classes, clean_name, detection_prompt
from .sample import GroundingSample
from .text import find_noun_phrases, find_phrase_spans
from .transforms import TestTransform, get_resize_size

__version__ = "0.1.0"

__all__ = [
    "EntityTokens",
    "GroundingSample",
    "TestTransform",
    "build_positive_map",
    "chunk_classes",
    "clean_name",
    "detection_prompt",
    "find_noun_phrases",
    "find_phrase_spans",
    "get_resize_size",
    "label_to_tokens",
    "pad_images",
    "spans_to_tokens",
]
