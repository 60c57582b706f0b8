"""glip-data: Data unification for grounded detection: prompts, positive maps, COCO/O365/LVIS/MDETR/ODVG/caption readers, transforms, and a synthetic grounding world."""

import importlib

__version__ = "0.1.0"

# Public names resolve lazily (PEP 562): importing glip_data (e.g. for ``glip-data --help``) does not import
# torch; each name loads its module on first use.
_LAZY = {
    "LEGACY_PIXEL": "boxes",
    "batched_nms": "boxes",
    "box_area": "boxes",
    "box_iou": "boxes",
    "clip_boxes": "boxes",
    "convert_xyxy": "boxes",
    "hflip_boxes": "boxes",
    "nonempty_boxes": "boxes",
    "xywh_to_xyxy": "boxes",
    "xyxy_to_xywh": "boxes",
    "OutputLockedError": "io",
    "RunLock": "io",
    "atomic_directory": "io",
    "atomic_open": "io",
    "atomic_write_bytes": "io",
    "atomic_write_json": "io",
    "atomic_write_text": "io",
    "clean_temporaries": "io",
    "SkipReport": "report",
    "ImageFrame": "images",
    "ImageLoadError": "images",
    "load_image": "images",
    "few_shot_indices": "sampling",
    "num_caption_negatives": "packing",
    "pack_captions": "packing",
    "EntityTokens": "positive_map",
    "build_positive_map": "positive_map",
    "PHRASE_PROBLEMS": "positive_map",
    "PhraseCheck": "positive_map",
    "check_phrases": "positive_map",
    "chunk_classes": "prompts",
    "clean_name": "prompts",
    "detection_prompt": "prompts",
    "find_noun_phrases": "text",
    "find_phrase_spans": "text",
    "label_to_tokens": "positive_map",
    "spans_to_tokens": "positive_map",
    "DetectionToGrounding": "grounding",
    "GroundingBatch": "collate",
    "GroundingCollator": "collate",
    "GroundingSample": "sample",
    "GroundingTarget": "collate",
    "RandomHorizontalFlip": "transforms",
    "RandomResize": "transforms",
    "RandomSource": "grounding",
    "TestTransform": "transforms",
    "ToModelTensor": "transforms",
    "collate_grounding": "collate",
    "detection_to_grounding": "grounding",
    "get_resize_size": "transforms",
    "pad_images": "collate",
    "swap_left_right": "transforms",
    "train_transforms": "transforms",
    "CaptionReader": "readers",
    "COCODetection": "readers",
    "GroundingReader": "readers",
    "LVISDetection": "readers",
    "MDETRGrounding": "readers",
    "MixedStream": "shards",
    "MixtureDataset": "readers",
    "Objects365Detection": "readers",
    "ODVGReader": "readers",
    "ReaderError": "readers",
    "ShardedStream": "shards",
    "SynthConfig": "synth",
    "SynthWorld": "synth",
    "convert": "convert",
    "generate_world": "synth",
    "world_image_root": "synth",
    "write_shards": "shards",
}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'glip_data' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
