"""Metric computation. Box AP is computed by the reference evaluators themselves (pycocotools ``COCOeval`` for COCO
and ODinW, the ``lvis`` package's ``LVISEval`` for LVIS); phrase-grounding recall is computed here.

Values are fractions in [0, 1] as the evaluators return them (-1: no ground truth in that group).
"""
from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from glip_data.boxes import box_iou

__all__ = ["COCO_STAT_NAMES", "coco_box_metrics", "lvis_box_metrics", "grounding_recall"]

#: the names of ``COCOeval.stats`` for bbox, in order
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _coco_from_dict(data: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_box_metrics(gt: dict[str, Any], results: list[dict[str, Any]],
                     category_ids: Sequence[Any] | None = None, copy: bool = True) -> dict[str, Any]:
    """Box AP with pycocotools ``COCOeval`` (bbox, standard parameters: maxDets 1/10/100).

    Args:
        gt: the COCO annotation dict (every annotation with ``area`` and ``iscrowd``).
        results: COCO-format detections; may be empty.
        category_ids: the categories to average over (default: all of ``gt``).
        copy: give pycocotools copies of the records (its ``loadRes`` adds fields to them); False saves memory.

    Returns:
        ``{"AP": ..., "AP50": ..., ..., "ARl": ..., "per_category": {category id: AP}}``.
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = _coco_from_dict(gt)
    if copy:
        results = [dict(r) for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes reads results[0]; an empty result set is a COCO object without annotations
            coco_dt = _coco_from_dict({"images": list(gt["images"]), "categories": list(gt["categories"]),
                                       "annotations": []})
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        if category_ids is not None:
            evaluator.params.catIds = list(category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics: dict[str, Any] = {name: float(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}
    # per category: precision (T, R, K, A, M) at area "all" and the largest maxDets, as COCOeval.summarize averages
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_cat = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        key = cat_id.item() if isinstance(cat_id, np.generic) else cat_id  # COCOeval keeps np.unique's numpy ids
        per_cat[key] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    metrics["per_category"] = per_cat
    return metrics


def lvis_box_metrics(gt: Any, results: list[dict[str, Any]], max_dets_per_image: int,
                     copy: bool = True) -> dict[str, Any]:
    """Box AP with the ``lvis`` package's ``LVISEval`` (AP, AP50, AP75, APs/m/l, APr/c/f, AR).

    Args:
        gt: an ``lvis.LVIS`` ground truth (:func:`glip_train.evaluation.lvis_compat.lvis_from_dict`).
        results: COCO-format detections; may be empty.
        max_dets_per_image: ``LVISResults``' per-image limit and ``params.max_dets`` (300 standard, -1 for Fixed AP).
        copy: as for :func:`coco_box_metrics`.
    """
    from .lvis_compat import lvis_results, run_lvis_eval

    dt = lvis_results(gt, results, max_dets_per_image, copy=copy)
    evaluator = run_lvis_eval(gt, dt, max_dets_per_image)
    return {k: float(v) for k, v in evaluator.results.items()}


def grounding_recall(
    ranked_boxes: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    phrase_types: Sequence[Sequence[str]] | None = None,
    recall_at: Sequence[int] = (1, 5, 10),
    iou_threshold: float = 0.5,
    merge_gt: bool = False,
) -> dict[str, Any]:
    """Phrase-grounding Recall@k.

    A phrase counts as recalled at ``k`` when one of its ``k`` best predicted boxes has IoU >= ``iou_threshold`` with
    one of its ground-truth boxes (the any-box protocol) or, with ``merge_gt``, with the smallest box enclosing all
    of them (the merged-box protocol). A phrase with no predicted box is a miss. ``upper_bound`` uses every predicted
    box.

    Args:
        ranked_boxes: per phrase ``(K, 4)`` xyxy predictions, best first.
        gt_boxes: per phrase ``(n, 4)`` xyxy ground truth (n >= 1).
        phrase_types: per phrase its types (recall is also reported per type; a phrase counts in each of its types).
        recall_at: the k values.
        iou_threshold: the hit threshold.
        merge_gt: the merged-box protocol.

    Returns:
        ``{"R@1": r, ..., "upper_bound": r, "phrases": n, "by_type": {type: {"R@1": r, ..., "phrases": n}}}``.
    """
    if len(ranked_boxes) != len(gt_boxes):
        raise ValueError(f"{len(ranked_boxes)} predictions for {len(gt_boxes)} phrases")
    keys = [f"R@{k}" for k in recall_at] + ["upper_bound"]
    hits_all = np.zeros(len(keys), np.int64)
    hits_type: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(keys), np.int64))
    count_type: dict[str, int] = defaultdict(int)
    for i, (pred, gt) in enumerate(zip(ranked_boxes, gt_boxes)):
        gt = np.asarray(gt, np.float64).reshape(-1, 4)
        if len(gt) == 0:
            raise ValueError(f"phrase {i} has no ground-truth box")
        if merge_gt:
            gt = np.concatenate([gt[:, :2].min(axis=0), gt[:, 2:].max(axis=0)])[None]
        pred = np.asarray(pred, np.float64).reshape(-1, 4)
        # continuous coordinates, no +1: the Flickr30k protocol
        best = box_iou(pred, gt, legacy=False).max(axis=1) if len(pred) else np.zeros(0)
        hit = np.array([bool(len(best[:k])) and best[:k].max() >= iou_threshold for k in recall_at]
                       + [bool(len(best)) and best.max() >= iou_threshold], dtype=np.int64)
        hits_all += hit
        for t in (phrase_types[i] if phrase_types is not None else []):
            hits_type[t] += hit
            count_type[t] += 1
    n = len(gt_boxes)
    out: dict[str, Any] = {key: (float(h) / n if n else -1.0) for key, h in zip(keys, hits_all)}
    out["phrases"] = n
    out["by_type"] = {t: {**{key: float(h) / count_type[t] for key, h in zip(keys, hits_type[t])},
                          "phrases": count_type[t]} for t in sorted(count_type)}
    return out
