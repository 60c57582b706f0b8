"""Run the ``lvis`` package (0.5.3, the reference LVIS evaluator) on current numpy and on edge cases it does not take.

* ``LVISEval.accumulate`` calls ``np.float``, an alias of the builtin ``float`` that numpy removed in 1.24. We do not
  pin an old numpy: :func:`numpy_float_alias` puts the alias back (the builtin ``float``, exactly what it was) for the
  duration of a call and removes it afterwards, so nothing else in the process sees it.
* ``LVIS`` only reads a path with ``json.load``; :func:`lvis_from_dict` builds one from an already-loaded (possibly
  gzipped, already validated) annotation dict.
* ``LVISResults`` fails on an empty result list (it reads ``results[0]``); :func:`lvis_results` gives an empty result
  set instead, which ``LVISEval`` scores like any other (AP 0 for categories with ground truth).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["numpy_float_alias", "lvis_from_dict", "lvis_results", "run_lvis_eval"]

_ALIAS_LOCK = threading.Lock()


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Within the block, ``numpy.float`` is the builtin ``float`` (as in numpy < 1.24). Restores the previous state."""
    with _ALIAS_LOCK:
        had = "float" in np.__dict__
        if not had:
            np.float = float  # type: ignore[attr-defined]
        try:
            yield
        finally:
            if not had:
                del np.float  # type: ignore[attr-defined]


def lvis_from_dict(data: dict[str, Any]) -> Any:
    """An ``lvis.LVIS`` ground truth holding ``data`` (``images``, ``annotations``, ``categories``)."""
    from lvis import LVIS

    gt = LVIS.__new__(LVIS)
    gt.logger = logging.getLogger("lvis.lvis")
    gt.dataset = data
    gt._create_index()
    return gt


def lvis_results(gt: Any, results: list[dict[str, Any]], max_dets: int, copy: bool = True) -> Any:
    """``lvis.LVISResults(gt, results, max_dets)``, also for an empty ``results`` list.

    Args:
        gt: the ``LVIS`` ground truth.
        results: COCO-format detections (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        max_dets: per-image limit applied by ``LVISResults`` (-1: none).
        copy: give ``LVISResults`` copies (it adds fields to the dicts); False saves memory when the caller is done
            with the records.
    """
    from lvis import LVISResults

    if copy:
        results = [dict(r) for r in results]
    if results:
        logger = logging.getLogger("lvis.results")
        level = logger.level
        logger.setLevel(logging.ERROR)  # "Assuming user provided the results in correct format": we checked them
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # its logger.warn
                return LVISResults(gt, results, max_dets=max_dets)
        finally:
            logger.setLevel(level)
    empty = LVISResults.__new__(LVISResults)
    empty.logger = logging.getLogger("lvis.results")
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                     "annotations": []}
    empty._create_index()
    return empty


def run_lvis_eval(gt: Any, dt: Any, max_dets: int) -> Any:
    """Run ``lvis.LVISEval`` (bbox) with ``params.max_dets = max_dets`` and return the evaluator (``.results``)."""
    from lvis import LVISEval

    evaluator = LVISEval(gt, dt, iou_type="bbox")
    evaluator.params.max_dets = max_dets
    with numpy_float_alias(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        evaluator.run()
    return evaluator
