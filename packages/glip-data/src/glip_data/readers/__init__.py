"""Dataset readers: every format becomes :class:`glip_data.sample.GroundingSample` s.

- ``COCODetection``: COCO detection json (ODinW, Roboflow exports); caption = detection prompt of all categories.
- ``Objects365Detection``: Objects365 v1/v2 json, name typos / file layout / missing images handled.
- ``LVISDetection``: LVIS v1 json (paths from ``coco_url``, r/c/f, negative / not-exhaustive ids kept).
- ``MDETRGrounding``: MDETR grounding json (Flickr30k Entities, GoldG mixed); caption = the sentence.
- ``ODVGReader``: ODVG jsonl + label map; detection lines like COCO, grounding lines with their caption.
- ``CaptionReader``: captions with pseudo-labels (jsonl), score threshold and minimum boxes.
- ``MixtureDataset``: a seeded weighted mixture of any of the above.
"""
from glip_data.readers.base import BOX_CONVENTIONS, GroundingReader, ReaderError, RecordChecker
from glip_data.readers.captions import CaptionReader, caption_record
from glip_data.readers.coco import COCODetection
from glip_data.readers.lvis import LVISDetection
from glip_data.readers.mdetr import MDETRGrounding
from glip_data.readers.mixture import MixtureDataset
from glip_data.readers.objects365 import O365_MISSING_IMAGES, O365_NAME_FIXES, Objects365Detection
from glip_data.readers.odvg import ODVGReader, load_label_map

__all__ = [
    "BOX_CONVENTIONS",
    "CaptionReader",
    "COCODetection",
    "GroundingReader",
    "LVISDetection",
    "MDETRGrounding",
    "MixtureDataset",
    "O365_MISSING_IMAGES",
    "O365_NAME_FIXES",
    "Objects365Detection",
    "ODVGReader",
    "ReaderError",
    "RecordChecker",
    "caption_record",
    "load_label_map",
]
