"""The one box module: conversions, clipping, areas, IoU, NMS and flips, in both of GLIP's pixel conventions.

Boxes are ``(..., 4)`` ``(x1, y1, x2, y2)`` unless a name says ``xywh``. Two conventions exist and every function
names the one it uses with its ``legacy`` keyword (docs/official_model.md#box-conventions):

* **legacy** (``legacy=True``, the inclusive-pixel convention of GLIP / maskrcnn-benchmark): a box covers the pixels
  ``x1..x2`` *inclusive*, so its width is ``x2 - x1 + 1`` (:data:`LEGACY_PIXEL`). GLIP uses it in the anchors, the
  box coder, the ATSS IoU, NMS, clipping (to ``W - 1``) and the COCO ``xywh`` it writes for evaluation.
* **continuous** (``legacy=False``): a box spans ``[x1, x2)`` in continuous coordinates, width ``x2 - x1``. GLIP uses
  it for GIoU areas, the LVIS ``xywh`` and the Flickr30k IoU; the ecosystem's files (ODVG, captions) store it.

Mixing them shifts AP by a few tenths (docs/official_model.md#quirks item 12), which is why ``legacy`` is a
required keyword wherever a wrong default would go unnoticed, and image sizes are keyword-only (``height=``,
``width=``) so that they cannot be swapped.

Element-wise functions (conversions, clipping, areas, the empty test, flips) take a ``torch.Tensor`` or a
``numpy.ndarray`` and return the same type; the xywh conversions also take plain lists (one box or a list of boxes)
and keep Python arithmetic, so integers stay integers in files. :func:`box_iou` takes tensors or arrays;
:func:`batched_nms` takes tensors.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torchvision

#: The extra pixel of the legacy convention: a legacy box ``(x1, x2)`` is ``x2 - x1 + LEGACY_PIXEL`` wide.
LEGACY_PIXEL = 1.0

Boxes = TypeVar("Boxes", torch.Tensor, np.ndarray)

__all__ = [
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
]


def _pixel(legacy: Any) -> float:
    """The width offset of a convention: :data:`LEGACY_PIXEL` for ``legacy=True``, 0 otherwise."""
    if not isinstance(legacy, (bool, np.bool_)):
        raise TypeError(f"legacy must be True (inclusive pixels, x2 - x1 + 1) or False (continuous), got {legacy!r}")
    return LEGACY_PIXEL if legacy else 0.0


def _check(boxes: Any, name: str = "boxes") -> None:
    if not isinstance(boxes, (torch.Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray of shape (..., 4), got {type(boxes).__name__}")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (..., 4), got {tuple(boxes.shape)}")


def _stack(columns: list, like: Any) -> Any:
    if isinstance(like, torch.Tensor):
        return torch.stack(columns, dim=-1)
    return np.stack(columns, axis=-1)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _map_list(boxes: list | tuple, fn: Callable[..., list]) -> list:
    """Apply ``fn(a, b, c, d)`` to one box (four numbers) or to every box of a (nested) list of boxes."""
    if len(boxes) == 4 and all(_is_number(v) for v in boxes):
        return fn(*boxes)
    out = []
    for box in boxes:
        if not isinstance(box, (list, tuple)):
            raise ValueError(f"a box must be four numbers, got {box!r}")
        out.append(_map_list(box, fn))
    return out


def xywh_to_xyxy(boxes: Any, *, legacy: bool) -> Any:
    """``(x, y, w, h)`` -> ``(x1, y1, x2, y2)``: ``x2 = x + w - 1`` when ``legacy`` (COCO files read the official
    way), ``x2 = x + w`` otherwise.

    Args:
        boxes: ``(..., 4)`` tensor or array, or a list (one box or a list of boxes).

    Returns:
        the same type and shape (integer input stays integer in the continuous convention).
    """
    off = _pixel(legacy)

    def one(x, y, w, h):
        return [x, y, x + w - off, y + h - off] if off else [x, y, x + w, y + h]

    if isinstance(boxes, (list, tuple)):
        return _map_list(boxes, one)
    _check(boxes)
    return _stack(one(boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]), boxes)


def xyxy_to_xywh(boxes: Any, *, legacy: bool) -> Any:
    """``(x1, y1, x2, y2)`` -> ``(x, y, w, h)``: ``w = x2 - x1 + 1`` when ``legacy`` (the official COCO results),
    ``w = x2 - x1`` otherwise (LVIS results, ODVG/COCO conversion). Same types as :func:`xywh_to_xyxy`."""
    off = _pixel(legacy)

    def one(x1, y1, x2, y2):
        return [x1, y1, x2 - x1 + off, y2 - y1 + off] if off else [x1, y1, x2 - x1, y2 - y1]

    if isinstance(boxes, (list, tuple)):
        return _map_list(boxes, one)
    _check(boxes)
    return _stack(one(boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]), boxes)


def convert_xyxy(boxes: Boxes, *, from_legacy: bool, to_legacy: bool) -> Boxes:
    """Re-express xyxy boxes in the other convention: the same pixels, ``x2``/``y2`` moved by one.

    ``from_legacy=False, to_legacy=True`` turns a continuous box from a file (``x2 = x + w``) into the legacy one
    (``x2 = x + w - 1``); the reverse writes a legacy box to such a file. ``(..., 4)`` tensor or array in and out.
    """
    shift = _pixel(from_legacy) - _pixel(to_legacy)
    _check(boxes)
    if shift == 0:
        return boxes.clone() if isinstance(boxes, torch.Tensor) else boxes.copy()
    return _stack([boxes[..., 0], boxes[..., 1], boxes[..., 2] + shift, boxes[..., 3] + shift], boxes)


def _limit(size: Any, off: float, name: str, like: Any) -> Any:
    """``size - off`` as a clipping bound: a number, or ``(K,)`` per-box sizes as a ``(K, 1)`` column."""
    if _is_number(size):
        if not size > 0:
            raise ValueError(f"{name} must be positive, got {size!r}")
        return size - off
    if isinstance(like, torch.Tensor):
        size = torch.as_tensor(size, dtype=like.dtype, device=like.device)
    else:
        size = np.asarray(size, dtype=like.dtype if like.dtype.kind == "f" else np.float64)
    if size.shape != like.shape[:-1]:
        raise ValueError(f"{name} must be a number or one value per box {tuple(like.shape[:-1])}, got shape "
                         f"{tuple(size.shape)}")
    return (size - off)[..., None]


def clip_boxes(boxes: Boxes, *, height: Any, width: Any, legacy: bool = True) -> Boxes:
    """Clip xyxy boxes to the image: ``[0, W - 1] x [0, H - 1]`` when ``legacy`` (official ``clip_to_image``),
    ``[0, W] x [0, H]`` otherwise. Boxes are not removed (see :func:`nonempty_boxes`); NaN stays NaN.

    Args:
        boxes: ``(..., 4)`` tensor or array.
        height, width: image size in pixels: numbers, or one value per box (shape ``boxes.shape[:-1]``).
        legacy: the box convention (default: GLIP's inclusive pixels).

    Returns:
        the clipped boxes, a new tensor / array of the same type.
    """
    off = _pixel(legacy)
    _check(boxes)
    x_max, y_max = _limit(width, off, "width", boxes), _limit(height, off, "height", boxes)
    x, y = boxes[..., 0::2], boxes[..., 1::2]
    if isinstance(boxes, torch.Tensor):
        x = x.clamp(min=0, max=x_max) if _is_number(x_max) else torch.minimum(x.clamp(min=0), x_max)
        y = y.clamp(min=0, max=y_max) if _is_number(y_max) else torch.minimum(y.clamp(min=0), y_max)
    else:
        x, y = np.clip(x, 0, x_max), np.clip(y, 0, y_max)
    return _stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], boxes)


def nonempty_boxes(boxes: Boxes) -> Boxes:
    """Boolean mask ``boxes.shape[:-1]``: finite boxes with ``x2 > x1`` and ``y2 > y1``.

    This is the official ``remove_empty`` test in either convention, so a legacy box one pixel wide (``x2 == x1``)
    counts as empty, as it does in the official data loaders.
    """
    _check(boxes)
    if isinstance(boxes, torch.Tensor):
        finite = torch.isfinite(boxes).all(dim=-1)
    else:
        finite = np.isfinite(boxes).all(axis=-1)
    return finite & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def box_area(boxes: Boxes, *, legacy: bool) -> Boxes:
    """Areas ``boxes.shape[:-1]``: ``(x2 - x1 + 1) * (y2 - y1 + 1)`` when ``legacy``, ``(x2 - x1) * (y2 - y1)``
    otherwise. Nothing is clamped (as in the official ``BoxList.area`` and torchvision): an inverted box gets a
    negative side."""
    off = _pixel(legacy)
    _check(boxes)
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return (w + off) * (h + off) if off else w * h


def box_iou(boxes1: Boxes, boxes2: Boxes, *, legacy: bool) -> Boxes:
    """Pairwise IoU ``(K1, K2)`` of xyxy ``boxes1 (K1, 4)`` and ``boxes2 (K2, 4)``: the one IoU of the project (the
    ATSS assignment of the loss with ``legacy=True``, NMS's test, the Flickr30k recall with ``legacy=False``).

    The legacy convention is the official ``boxlist_iou`` (ATSS assignment) operation for operation: intersection
    sides ``min(x2) - max(x1) + 1`` clamped at 0, areas with ``+1`` sides. A pair whose union is not positive (two
    empty boxes) has IoU 0, not NaN: it overlaps nothing. Tensors (any device) or numpy arrays; the result has the
    input's type and dtype.
    """
    off = _pixel(legacy)
    if isinstance(boxes1, np.ndarray) and isinstance(boxes2, np.ndarray):
        return box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2), legacy=legacy).numpy()
    _check(boxes1, "boxes1")
    _check(boxes2, "boxes2")
    if not isinstance(boxes1, torch.Tensor) or not isinstance(boxes2, torch.Tensor):
        raise TypeError("boxes1 and boxes2 must both be tensors or both numpy arrays")
    if boxes1.ndim != 2 or boxes2.ndim != 2:
        raise ValueError(f"box_iou takes (K1, 4) and (K2, 4) boxes, got {tuple(boxes1.shape)} and "
                         f"{tuple(boxes2.shape)}")
    area1, area2 = box_area(boxes1, legacy=legacy), box_area(boxes2, legacy=legacy)
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt + off).clamp(min=0) if off else (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float, *,
                legacy: bool = True) -> torch.Tensor:
    """Per-label greedy NMS, as the official ``ml_nms``: the indices of the kept boxes, **in ascending order**.

    Within each label, boxes are visited by decreasing score and a box is suppressed when its IoU with a kept box
    is strictly greater than ``iou_threshold``; boxes of different labels never suppress each other. The kept
    indices are returned sorted (candidate order), not by score, exactly as the official post-processor sees them.
    Equal scores are visited lowest index first on CPU (CUDA sorts, like the official kernel's, promise no order).

    The legacy IoU is computed by ``torchvision.ops.nms`` on boxes whose ``x2``/``y2`` are moved by one, which is
    the ``+1`` IoU exactly (up to float rounding). Labels are processed one at a time (no coordinate-offset trick,
    whose large offsets would round float32 coordinates).

    Args:
        boxes: ``(K, 4)`` xyxy.
        scores: ``(K,)``.
        labels: ``(K,)`` integers.
        iou_threshold: suppress IoU ``> iou_threshold`` (GLIP: 0.6).
        legacy: the box convention (default: GLIP's inclusive pixels).

    Returns:
        ``(n,)`` int64 indices into ``boxes``, ascending.
    """
    off = _pixel(legacy)
    _check(boxes)
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 2:
        raise TypeError(f"batched_nms takes a (K, 4) tensor of boxes, got {type(boxes).__name__}")
    if scores.shape != boxes.shape[:1] or labels.shape != boxes.shape[:1]:
        raise ValueError(f"boxes {tuple(boxes.shape)}, scores {tuple(scores.shape)} and labels "
                         f"{tuple(labels.shape)} disagree on the number of boxes")
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0:
        return keep.nonzero().flatten()
    shifted = boxes + torch.tensor([0.0, 0.0, off, off], dtype=boxes.dtype, device=boxes.device) if off else boxes
    for label in torch.unique(labels):
        idx = (labels == label).nonzero().flatten()
        keep[idx[torchvision.ops.nms(shifted[idx], scores[idx], float(iou_threshold))]] = True
    return keep.nonzero().flatten()


def hflip_boxes(boxes: Boxes, *, width: Any, legacy: bool = True) -> Boxes:
    """Mirror xyxy boxes left-right in an image ``width`` pixels wide.

    Legacy (official ``BoxList.transpose``): ``x1' = W - x2 - 1``, ``x2' = W - x1 - 1``; continuous:
    ``x1' = W - x2``, ``x2' = W - x1``. Both are involutions. ``(..., 4)`` tensor or array in and out.
    """
    off = _pixel(legacy)
    _check(boxes)
    if not _is_number(width) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    # (W - x) - 1 in the official order of operations, so float boxes flip bit for bit as there
    x1, x2 = (width - boxes[..., 2] - off, width - boxes[..., 0] - off) if off else (width - boxes[..., 2],
                                                                                      width - boxes[..., 0])
    return _stack([x1, boxes[..., 1], x2, boxes[..., 3]], boxes)
