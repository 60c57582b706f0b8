"""glip-data: Data unification for grounded detection: prompts, positive maps, COCO/O365/LVIS/MDETR/ODVG/caption readers, transforms, and a synthetic grounding world."""

from .boxes import (
    LEGACY_PIXEL,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    convert_xyxy,
    hflip_boxes,
    nonempty_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from .collate import GroundingBatch, GroundingCollator, GroundingTarget, collate_grounding, pad_images
from .convert import convert
from .grounding import DetectionToGrounding, RandomSource, detection_to_grounding
from .images import ImageLoadError, load_image
from .packing import num_caption_negatives, pack_captions
from .positive_map import EntityTokens, build_positive_map, label_to_tokens, spans_to_tokens
from .prompts import chunk_classes, clean_name, detection_prompt
from .readers import (
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
from .sample import GroundingSample
from .sampling import few_shot_indices
from .shards import MixedStream, ShardedStream, write_shards
from .synth import SynthConfig, SynthWorld, generate_world, world_image_root
from .text import find_noun_phrases, find_phrase_spans
from .transforms import (
    RandomHorizontalFlip,
    RandomResize,
    TestTransform,
    ToModelTensor,
    get_resize_size,
    swap_left_right,
    train_transforms,
)

__version__ = "0.1.0"

__all__ = [
    # boxes (glip_data.boxes)
    "LEGACY_PIXEL",
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "convert_xyxy",
    "hflip_boxes",
    "nonempty_boxes",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
    # images
    "ImageLoadError",
    "load_image",
    # caption packing, few-shot subsets
    "few_shot_indices",
    "num_caption_negatives",
    "pack_captions",
    # prompts, phrases, positive maps
    "EntityTokens",
    "build_positive_map",
    "chunk_classes",
    "clean_name",
    "detection_prompt",
    "find_noun_phrases",
    "find_phrase_spans",
    "label_to_tokens",
    "spans_to_tokens",
    # samples, transforms, batching
    "DetectionToGrounding",
    "GroundingBatch",
    "GroundingCollator",
    "GroundingSample",
    "GroundingTarget",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSource",
    "TestTransform",
    "ToModelTensor",
    "collate_grounding",
    "detection_to_grounding",
    "get_resize_size",
    "pad_images",
    "swap_left_right",
    "train_transforms",
    # readers, shards, conversion, synthetic data
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
    "world_image_root",
    "write_shards",
]
