"""glip-data: Data unification for grounded detection: prompts, positive maps, COCO/O365/LVIS/MDETR/ODVG/caption readers, transforms, and a synthetic grounding world."""

from .collate import GroundingBatch, GroundingCollator, GroundingTarget, collate_grounding, pad_images
from .grounding import DetectionToGrounding, RandomSource, detection_to_grounding
from .positive_map import EntityTokens, build_positive_map, label_to_tokens, spans_to_tokens
from .prompts import chunk_classes, clean_name, detection_prompt
from .sample import GroundingSample
from .text import find_noun_phrases, find_phrase_spans
from .transforms import (
    RandomHorizontalFlip,
    RandomResize,
    TestTransform,
    ToModelTensor,
    flip_boxes,
    get_resize_size,
    swap_left_right,
    train_transforms,
)

__version__ = "0.1.0"

__all__ = [
    "DetectionToGrounding",
    "EntityTokens",
    "GroundingBatch",
    "GroundingCollator",
    "GroundingSample",
    "GroundingTarget",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSource",
    "TestTransform",
    "ToModelTensor",
    "build_positive_map",
    "chunk_classes",
    "clean_name",
    "collate_grounding",
    "detection_prompt",
    "detection_to_grounding",
    "find_noun_phrases",
    "find_phrase_spans",
    "flip_boxes",
    "get_resize_size",
    "label_to_tokens",
    "pad_images",
    "spans_to_tokens",
    "swap_left_right",
    "train_transforms",
]

# --- readers, synthetic world (part B) ---
from .convert import convert  # noqa: E402
from .readers import (  # noqa: E402
    CaptionReader,
    COCODetection,
    GroundingReader,
    LVISDetection,
    MDETRGrounding,
    MixtureDataset,
    Objects365Detection,
    ODVGReader,
    ReaderError,
)
from .shards import MixedStream, ShardedStream, write_shards  # noqa: E402
from .synth import SynthConfig, SynthWorld, generate_world  # noqa: E402

__all__ += [
    "CaptionReader",
    "COCODetection",
    "GroundingReader",
    "LVISDetection",
    "MDETRGrounding",
    "MixedStream",
    "MixtureDataset",
    "Objects365Detection",
    "ODVGReader",
    "ReaderError",
    "ShardedStream",
    "SynthConfig",
    "SynthWorld",
    "convert",
    "generate_world",
    "write_shards",
]
