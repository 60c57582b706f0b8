"""Detections between the model and the evaluators: per-image predictions, columnar COCO results, box conventions,
the Fixed-AP / per-image selections, and the ``detections.json`` writer and reader.

Everything is kept as numpy columns (one row per detection) so that LVIS-sized runs (millions of detections) stay
cheap until the evaluator needs its list of dicts.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glip_data.boxes import xyxy_to_xywh

from .datasets import DetectionDataset, EvaluationError

__all__ = [
    "ImagePredictions",
    "ResultColumns",
    "top_k_per_group",
    "collect_results",
    "load_results",
    "write_results",
]


@dataclass
class ImagePredictions:
    """The model's output for one image, in the annotated image's pixel frame.

    Attributes:
        boxes: ``(K, 4)`` float32 xyxy.
        scores: ``(K,)`` float32.
        labels: ``(K,)`` int64, index into the dataset's classes (or the entry's phrases for grounding).
        unreadable: the image could not be read (skipped; no detections).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    unreadable: bool = False

    @classmethod
    def empty(cls, unreadable: bool = False) -> "ImagePredictions":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), unreadable)

    @classmethod
    def from_model(cls, result: dict[str, Any], scale_xy: tuple[float, float] = (1.0, 1.0)) -> "ImagePredictions":
        """From one model result dict (tensors or arrays); boxes are multiplied by ``(sx, sy)``."""
        boxes = _numpy(result["boxes"], np.float32).reshape(-1, 4)
        scores = _numpy(result["scores"], np.float32).reshape(-1)
        labels = _numpy(result["labels"], np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"model result with {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        sx, sy = scale_xy
        if sx != 1.0 or sy != 1.0:
            boxes = boxes * np.asarray([sx, sy, sx, sy], dtype=np.float32)
        return cls(boxes, scores, labels)


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def top_k_per_group(groups: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Rows to keep so that each group has at most its ``k`` best scores (ties: the earlier row first).

    Args:
        groups: ``(N,)`` int group of each row (image for a per-image cap, category for Fixed AP).
        scores: ``(N,)`` scores.
        k: the budget per group.

    Returns:
        ``(M,)`` int64 kept row indices, ascending.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((np.arange(n), -np.asarray(scores, np.float64), np.asarray(groups)))
    sorted_groups = np.asarray(groups)[order]
    first = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    rank = np.arange(n) - group_start
    return np.sort(order[rank < k]).astype(np.int64)


@dataclass
class ResultColumns:
    """COCO-format detections as columns.

    Attributes:
        image_index: ``(N,)`` int64 position of the image in the dataset.
        label: ``(N,)`` int64 position of the category in ``dataset.category_ids``.
        bbox: ``(N, 4)`` float32 ``[x, y, w, h]``.
        score: ``(N,)`` float32.
    """

    image_index: np.ndarray
    label: np.ndarray
    bbox: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    def take(self, rows: np.ndarray) -> "ResultColumns":
        return ResultColumns(self.image_index[rows], self.label[rows], self.bbox[rows], self.score[rows])

    def records(self, dataset: DetectionDataset) -> Iterable[dict[str, Any]]:
        """The COCO results records (``image_id``, ``category_id``, ``bbox``, ``score``), in row order."""
        image_ids, cat_ids = dataset.image_ids, dataset.category_ids
        bboxes = self.bbox.astype(np.float64).tolist()
        scores = self.score.astype(np.float64).tolist()
        for i, lab, box, score in zip(self.image_index.tolist(), self.label.tolist(), bboxes, scores):
            yield {"image_id": image_ids[i], "category_id": cat_ids[lab], "bbox": box, "score": score}


def collect_results(dataset: DetectionDataset, predictions: Sequence[ImagePredictions],
                    box_convention: str) -> ResultColumns:
    """Columns of every image's predictions, in dataset order (``predictions[i]`` is image ``i``), with the boxes in
    COCO ``[x, y, w, h]`` by :func:`glip_data.xyxy_to_xywh` in float32 (as the official conversion):
    ``box_convention`` ``"inclusive"`` is ``legacy=True`` (``w = x2 - x1 + 1``, the official COCO conversion),
    ``"exact"`` is ``legacy=False`` (``w = x2 - x1``, the official LVIS conversion)."""
    if box_convention not in ("inclusive", "exact"):
        raise ValueError(f"box convention must be 'inclusive' or 'exact', got {box_convention!r}")
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} images")
    counts = [len(p.scores) for p in predictions]
    num_classes = len(dataset.category_ids)
    for i, p in enumerate(predictions):
        if len(p.labels) and (p.labels.min() < 0 or p.labels.max() >= num_classes):
            raise ValueError(f"image {dataset.image_ids[i]!r}: label {int(p.labels.max())} outside the "
                             f"{num_classes} classes")
    image_index = np.repeat(np.arange(len(predictions), dtype=np.int64), counts)
    cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
    boxes = cat([p.boxes for p in predictions], (0, 4), np.float32).reshape(-1, 4)
    return ResultColumns(image_index, cat([p.labels for p in predictions], (0,), np.int64),
                         xyxy_to_xywh(boxes, legacy=box_convention == "inclusive"),
                         cat([p.scores for p in predictions], (0,), np.float32))


def load_results(source: str | Path | list, dataset: DetectionDataset) -> ResultColumns:
    """Read COCO-format detections (a ``detections.json`` path or the list) and check them against ``dataset``.

    Raises:
        EvaluationError: a record that is not a detection, an image id or category id the annotations do not have,
            or a non-finite score/box (the record and the file are named).
    """
    where = str(source) if isinstance(source, (str, Path)) else "detections"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise EvaluationError(f"detections file not found: {path}")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(source, list):
        raise EvaluationError(f"{where}: COCO results are a JSON list of detections, got {type(source).__name__}")
    images, labels = dataset.image_index, dataset.label_of_category
    n = len(source)
    image_index = np.zeros(n, np.int64)
    label = np.zeros(n, np.int64)
    bbox = np.zeros((n, 4), np.float64)
    score = np.zeros(n, np.float64)
    for j, rec in enumerate(source):
        if not isinstance(rec, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(rec):
            raise EvaluationError(f"{where}: detection {j} needs image_id, category_id, bbox, score; got {rec!r}")
        if rec["image_id"] not in images:
            raise EvaluationError(f"{where}: detection {j} has image_id {rec['image_id']!r}, which is not an image "
                                  f"of {dataset.ann_file}")
        if rec["category_id"] not in labels:
            raise EvaluationError(f"{where}: detection {j} has category_id {rec['category_id']!r}, which is not an "
                                  f"evaluated category of {dataset.ann_file}")
        box = rec["bbox"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4):
            raise EvaluationError(f"{where}: detection {j}: bbox must be [x, y, w, h], got {box!r}")
        image_index[j], label[j] = images[rec["image_id"]], labels[rec["category_id"]]
        bbox[j], score[j] = box, rec["score"]
    bad = ~(np.isfinite(bbox).all(axis=1) & np.isfinite(score))
    if bad.any():
        j = int(np.nonzero(bad)[0][0])
        raise EvaluationError(f"{where}: detection {j} has a non-finite bbox or score: {source[j]!r}")
    # keep the file's values exactly (float64): the evaluators then see what the file says
    return ResultColumns(image_index, label, bbox, score)


def write_results(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Stream records to a JSON list file (one detection per line) under a temporary name, renamed into place when
    complete (a killed run never leaves a truncated file); returns how many were written."""
    from glip_data.io import atomic_open

    n = 0
    with atomic_open(path) as fh:
        fh.write("[")
        for rec in records:
            fh.write(("\n" if n == 0 else ",\n") + json.dumps(rec, separators=(",", ":")))
            n += 1
        fh.write("\n]\n" if n else "]\n")
    return n
