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
import importlib

# names resolve lazily, so that ``glip --help`` and the argument parser of ``glip eval`` import no torch
_LAZY = {
    "EvaluationError": "datasets", "load_detection_dataset": "datasets", "load_flickr_dataset": "datasets",
    "gather_to_main": "distributed", "init_distributed_from_env": "distributed", "shard_indices": "distributed",
    "numpy_float_alias": "lvis_compat",
    "coco_box_metrics": "metrics", "grounding_recall": "metrics", "lvis_box_metrics": "metrics",
    "Detector": "model_api",
    "PROTOCOLS": "protocols", "DetectionProtocol": "protocols", "FlickrProtocol": "protocols",
    "LVISProtocol": "protocols", "ODinWProtocol": "protocols", "get_protocol": "protocols",
    "parse_overrides": "protocols",
    "EvalData": "runner", "EvalResult": "runner", "evaluate": "runner", "evaluate_detections": "runner",
    "load_eval_data": "runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'glip_train.evaluation' has no attribute {name!r}")


__all__ = [
    "PROTOCOLS",
    "DetectionProtocol",
    "Detector",
    "EvalData",
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
    "load_eval_data",
    "load_flickr_dataset",
    "lvis_box_metrics",
    "numpy_float_alias",
    "parse_overrides",
    "shard_indices",
]
