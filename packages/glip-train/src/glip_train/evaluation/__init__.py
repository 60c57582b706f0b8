"""The official GLIP evaluation protocols: COCO, LVIS (Fixed AP and standard), Flickr30k Entities, ODinW, and any
COCO-format dataset.

>>> from glip_train import GLIP
>>> from glip_train.evaluation import evaluate
>>> model = GLIP.from_pretrained("glip-t/").eval()
>>> result = evaluate(model, "coco", "instances_val2017.json", "val2017/", out_dir="eval/coco")  # doctest: +SKIP
>>> result.metrics["AP"]  # doctest: +SKIP

Every run writes ``detections.json`` and ``metrics.json`` (the metrics and every protocol parameter) and prints a
table; see docs/evaluation.md for the protocols, the box conventions and the commands that reproduce the published
numbers.
"""
from .datasets import EvaluationError, load_detection_dataset, load_flickr_dataset
from .detections import xyxy_to_xywh
from .distributed import gather_to_main, init_distributed_from_env, shard_indices
from .lvis_compat import numpy_float_alias
from .metrics import coco_box_metrics, grounding_recall, lvis_box_metrics
from .model_api import Detector
from .protocols import (
    PROTOCOLS,
    DetectionProtocol,
    FlickrProtocol,
    LVISProtocol,
    ODinWProtocol,
    get_protocol,
    parse_overrides,
)
from .runner import EvalResult, evaluate, evaluate_detections

__all__ = [
    "PROTOCOLS",
    "DetectionProtocol",
    "Detector",
    "EvalResult",
    "EvaluationError",
    "FlickrProtocol",
    "LVISProtocol",
    "ODinWProtocol",
    "coco_box_metrics",
    "evaluate",
    "evaluate_detections",
    "gather_to_main",
    "get_protocol",
    "grounding_recall",
    "init_distributed_from_env",
    "load_detection_dataset",
    "load_flickr_dataset",
    "lvis_box_metrics",
    "numpy_float_alias",
    "parse_overrides",
    "shard_indices",
    "xyxy_to_xywh",
]
