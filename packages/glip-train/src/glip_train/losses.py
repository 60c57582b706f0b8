"""GLIP's training losses and ATSS target assignment, numerically equal to the official implementation.

Inputs are the head outputs of :class:`glip_train.head.GLIPHead` (one tensor per FPN level, P3..P7), the anchors of
:class:`glip_train.box_ops.AnchorGenerator` and, per image, the ground-truth boxes with their positive map.
Anchors are flattened level after level (row-major inside a level), images one after another.

Conventions (they are those of the official loss; several are legacy quirks kept on purpose):

* **Boxes** are ``xyxy`` in network-input pixels (the resized image before batch padding) with the inclusive-pixel
  convention: a box covers ``x2 - x1 + 1`` pixels. The assignment IoU counts ``+1`` in widths, heights and the
  intersection; the box coder uses ``+1`` widths with centres ``(x1 + x2) / 2`` and weights ``(10, 10, 5, 5)``
  (:class:`glip_train.box_ops.BoxCoder`, whose expressions are the loss's own, so float32 targets agree bit for bit).
  The GIoU loss, in contrast, measures areas *without* ``+1``.
* **ATSS assignment** (per image, vectorised over ground truths): on every level the ``topk`` (9) anchors whose
  centres are nearest to the GT centre (L2) are candidates; the GT's IoU threshold is the mean plus the *unbiased*
  standard deviation of its candidates' IoUs; a candidate is positive when its IoU reaches the threshold *and* its
  centre lies inside the GT by more than 0.01 px on all four sides. An anchor claimed by several GTs goes to the one
  with the highest IoU (exact ties: the lower GT index). Everything else is negative.
* **Targets.** A positive anchor learns the positive-map row of its GT (binary: any non-zero entry counts, as the
  official collator re-binarises the normalised map). A negative anchor learns a one-hot "no-object" target at the
  last position of the model's text length, token ``max_text_len - 1`` (255). That column exists only when the batch
  text is ``max_text_len`` tokens wide and it counts only where it is a real token, i.e. for captions that fill all
  256 positions; with text padded to the longest prompt (``M < 256``) there is no such column and negatives learn
  all zeros, which is exactly what the official loss does for captions shorter than 256 tokens. Regression targets
  are the box-coder encoding of the matched GT; the centerness target is
  ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of the anchor centre against the GT decoded back from its
  regression target.
* **Losses** (``P`` positives, ``num_pos_avg = max(P summed over ranks / world size, 1)``):

  - ``loss_dot_product_token``: sigmoid focal loss (alpha 0.25, gamma 2) summed over every anchor and every
    text-masked token, divided by ``num_pos_avg``;
  - ``loss_reg``: ``2.0 * sum(ctr * (1 - GIoU)) / (sum of ctr over ranks / world size)`` on positives, GIoU between the
    decoded prediction (``x2, y2`` raised to at least ``x1, y1``) and the decoded target, with ``1e-7`` added to the
    union and to the enclosing area before they are combined (``torchvision`` adds it to the denominators only:
    equal algebraically, rounded differently);
  - ``loss_centerness``: binary cross-entropy with logits (summed) between the centerness logits of the positives and
    their centerness targets, divided by ``num_pos_avg``.

  The official loss also returns a class focal loss on the frozen ``cls_logits`` multiplied by 0; it is left out.
  Their sum is the training objective. The whole computation runs in float32 (half-precision head outputs are
  promoted, as the official ``custom_fwd`` does under autocast) or float64 when the head outputs are float64.
* **Distributed training**: the two normalisers are averaged over ranks with one ``all_reduce`` when
  ``torch.distributed`` is initialised (:func:`mean_over_ranks`), so every rank must call the loss equally often.
  DDP's gradient averaging then gives the gradient of the loss of the global batch.

What the loss expects from the data side: boxes clipped to the image and empty boxes dropped (the official dataset
does both). The loss does not clip; it raises a :class:`ValueError` naming the image for non-finite boxes or boxes
with ``x2 < x1`` or ``y2 < y1``. An image without boxes is allowed (the official loss crashes on it, its trainer skips
such batches): all its anchors are negative, so it contributes only to the token loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchvision

from glip_data.boxes import box_iou

from .box_ops import BoxCoder

__all__ = [
    "ATSSAssignment",
    "GLIPLoss",
    "GLIPLossOutput",
    "GLIPTargets",
    "atss_assign",
    "atss_assign_details",
    "mean_over_ranks",
]

#: the official "not claimed" IoU sentinel of the assignment
_UNCLAIMED = -1e8
#: an anchor centre must lie this far (pixels) inside a GT on every side to be a positive candidate
_CENTRE_MARGIN = 0.01
#: epsilon of the official GIoU, added to the union and to the enclosing area
_GIOU_EPS = 1e-7


@dataclass
class ATSSAssignment:
    """ATSS assignment of one image, with the intermediate quantities for inspection.

    ``A`` anchors (all levels), ``n`` GT boxes, ``K = sum over levels of min(topk, A_l)`` candidates per GT.

    Attributes:
        matched_gt: ``(A,)`` int64 matched GT index, ``-1`` for negatives.
        matched_iou: ``(A,)`` IoU with the matched GT, 0 for negatives.
        ious: ``(A, n)`` IoU with ``+1`` widths.
        distances: ``(A, n)`` distance between anchor and GT centres.
        candidate_idxs: ``(K, n)`` int64 flat anchor index of the candidates, level after level, nearest first
            within a level (the order of exactly equal distances is torch's ``topk`` order).
        candidate_ious: ``(K, n)`` their IoUs.
        iou_mean, iou_std, iou_thresh: ``(n,)`` per-GT mean, unbiased std and threshold (mean + std).
        is_pos_iou: ``(K, n)`` bool, candidate IoU >= threshold.
        is_in_gts: ``(K, n)`` bool, candidate centre inside the GT by more than 0.01.
        is_pos: ``(K, n)`` bool, both.
    """

    matched_gt: torch.Tensor
    matched_iou: torch.Tensor
    ious: torch.Tensor
    distances: torch.Tensor
    candidate_idxs: torch.Tensor
    candidate_ious: torch.Tensor
    iou_mean: torch.Tensor
    iou_std: torch.Tensor
    iou_thresh: torch.Tensor
    is_pos_iou: torch.Tensor
    is_in_gts: torch.Tensor
    is_pos: torch.Tensor


@dataclass
class GLIPTargets:
    """Training targets of a batch (``B`` images, ``A`` anchors, ``M`` text tokens, ``P`` positives).

    Attributes:
        assignments: per image, its :class:`ATSSAssignment`.
        matched_gt: ``(B, A)`` int64 matched GT index within the image, ``-1`` for negatives.
        token_targets: ``(B, A, M)`` bool token targets (positives: the positive-map row of their GT; negatives: the
            no-object one-hot at token ``max_text_len - 1`` when the text has that column). Entries outside the text
            mask are not used by the loss.
        pos_inds: ``(P,)`` int64 flat index ``b * A + a`` of the positives, ascending.
        reg_targets: ``(P, 4)`` box-coder targets of the positives.
        centerness_targets: ``(P,)`` centerness targets of the positives.
    """

    assignments: list[ATSSAssignment]
    matched_gt: torch.Tensor
    token_targets: torch.Tensor
    pos_inds: torch.Tensor
    reg_targets: torch.Tensor
    centerness_targets: torch.Tensor


@dataclass
class GLIPLossOutput:
    """Everything :meth:`GLIPLoss.compute` produced.

    Attributes:
        losses: ``{"loss_reg", "loss_centerness", "loss_dot_product_token"}`` scalars (``loss_reg`` already weighted);
            their sum is the training objective.
        targets: the :class:`GLIPTargets` of this rank's batch.
        num_pos_avg: scalar, ``max(positives summed over ranks / world size, 1)``.
        centerness_sum_avg: scalar, centerness targets summed over ranks / world size.
    """

    losses: dict[str, torch.Tensor]
    targets: GLIPTargets
    num_pos_avg: torch.Tensor
    centerness_sum_avg: torch.Tensor


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks of the default process group and divided by the world size.

    The identity when ``torch.distributed`` is not initialised (or has one rank). A collective: every rank must call
    it with a tensor of the same shape.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / dist.get_world_size()
    return values


# ---------------------------------------------------------------------------------------------------------------------
# input checks


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_boxes(boxes: torch.Tensor, where: str, values: bool = True) -> None:
    """Shape ``(n, 4)``; with ``values``, also finite coordinates and ``x2 >= x1``, ``y2 >= y1``."""
    if not isinstance(boxes, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where} must have shape (n, 4) xyxy, got {_shape(boxes)}")
    if not values or boxes.numel() == 0:
        return
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError(f"{where} contains non-finite coordinates")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}[{row}] = {boxes[row].tolist()} has x2 < x1 or y2 < y1 (boxes are xyxy; the data pipeline should "
            "clip boxes to the image and drop empty ones)"
        )


def _target_field(target, key: str, index: int) -> torch.Tensor:
    """``target[key]`` of a mapping, or the attribute of a target object (e.g. ``glip_data`` ``GroundingTarget``)."""
    if isinstance(target, Mapping):
        if key not in target:
            raise KeyError(f"targets[{index}] has no {key!r} (keys: {sorted(target)})")
        return target[key]
    if not hasattr(target, key):
        raise KeyError(f"targets[{index}] ({type(target).__name__}) has no {key!r}")
    return getattr(target, key)


def _check_anchor_levels(anchors_per_level: Sequence[torch.Tensor], where: str) -> list[torch.Tensor]:
    if isinstance(anchors_per_level, torch.Tensor):
        raise TypeError(f"{where} must be a list with one (A_l, 4) tensor per level, got a single tensor")
    levels = list(anchors_per_level)
    if not levels:
        raise ValueError(f"{where} is empty; expected one (A_l, 4) tensor per level")
    for i, level in enumerate(levels):
        if not isinstance(level, torch.Tensor) or level.dim() != 2 or level.shape[1] != 4:
            shape = _shape(level) if isinstance(level, torch.Tensor) else type(level).__name__
            raise ValueError(f"{where}[{i}] must have shape (A_l, 4), got {shape}")
    return levels


# ---------------------------------------------------------------------------------------------------------------------
# geometry


def _centres(boxes: torch.Tensor) -> torch.Tensor:
    """``(K, 2)`` box centres ``((x1 + x2) / 2, (y1 + y2) / 2)``."""
    return torch.stack([(boxes[:, 2] + boxes[:, 0]) / 2, (boxes[:, 3] + boxes[:, 1]) / 2], dim=1)


def atss_assign_details(
    anchors_per_level: Sequence[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9
) -> ATSSAssignment:
    """ATSS assignment of one image with its intermediate quantities (see the module docstring for the rule).

    Args:
        anchors_per_level: one ``(A_l, 4)`` xyxy tensor per level, concatenated in this order.
        gt_boxes: ``(n, 4)`` xyxy GT boxes in the anchors' pixel frame; ``n`` may be 0 (every anchor negative).
        topk: candidates per level and GT (``min(topk, A_l)`` on small levels).

    Computed in float32, or float64 if the anchors or boxes are float64.
    """
    levels = _check_anchor_levels(anchors_per_level, "anchors_per_level")
    _check_boxes(gt_boxes, "gt_boxes")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    dtype = torch.promote_types(torch.promote_types(levels[0].dtype, gt_boxes.dtype), torch.float32)
    anchors = torch.cat(levels).to(dtype)
    gt = gt_boxes.to(device=anchors.device, dtype=dtype)
    num_anchors, num_gt = anchors.shape[0], gt.shape[0]
    num_candidates = sum(min(topk, level.shape[0]) for level in levels)

    ious = box_iou(anchors, gt, legacy=True)  # (A, n), the official +1 IoU operation for operation
    anchor_centres = _centres(anchors)  # (A, 2)
    distances = (anchor_centres[:, None, :] - _centres(gt)[None, :, :]).pow(2).sum(-1).sqrt()  # (A, n)
    if num_gt == 0:
        empty_kn = anchors.new_zeros(num_candidates, 0)
        no_gt = anchors.new_zeros(0)
        return ATSSAssignment(
            matched_gt=torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device),
            matched_iou=anchors.new_zeros(num_anchors), ious=ious, distances=distances,
            candidate_idxs=empty_kn.long(), candidate_ious=empty_kn, iou_mean=no_gt, iou_std=no_gt, iou_thresh=no_gt,
            is_pos_iou=empty_kn.bool(), is_in_gts=empty_kn.bool(), is_pos=empty_kn.bool(),
        )

    # nearest anchors per level, for all GTs at once: topk along the anchor axis of the level's (A_l, n) block
    candidates, start = [], 0
    for level in levels:
        end = start + level.shape[0]
        k = min(topk, level.shape[0])
        candidates.append(distances[start:end].topk(k, dim=0, largest=False).indices + start)
        start = end
    candidate_idxs = torch.cat(candidates)  # (K, n)
    candidate_ious = ious.gather(0, candidate_idxs)
    iou_mean = candidate_ious.mean(0)
    iou_std = candidate_ious.std(0)  # unbiased (N - 1), as the official code
    iou_thresh = iou_mean + iou_std
    is_pos_iou = candidate_ious >= iou_thresh[None, :]

    cand_x = anchor_centres[:, 0][candidate_idxs]  # (K, n)
    cand_y = anchor_centres[:, 1][candidate_idxs]
    inside = torch.stack([cand_x - gt[:, 0], cand_y - gt[:, 1], gt[:, 2] - cand_x, gt[:, 3] - cand_y], dim=1)
    is_in_gts = inside.min(dim=1).values > _CENTRE_MARGIN
    is_pos = is_pos_iou & is_in_gts

    # candidate columns hold distinct anchors, so one scatter writes each positive pair's IoU once
    claimed = torch.full_like(ious, _UNCLAIMED)
    claimed.scatter_(0, candidate_idxs, torch.where(is_pos, candidate_ious, claimed.new_tensor(_UNCLAIMED)))
    best_iou, best_gt = claimed.max(dim=1)  # highest IoU wins; the official tie order of torch's max
    positive = best_iou != _UNCLAIMED
    return ATSSAssignment(
        matched_gt=torch.where(positive, best_gt, torch.full_like(best_gt, -1)),
        matched_iou=torch.where(positive, best_iou, torch.zeros_like(best_iou)),
        ious=ious, distances=distances, candidate_idxs=candidate_idxs, candidate_ious=candidate_ious,
        iou_mean=iou_mean, iou_std=iou_std, iou_thresh=iou_thresh, is_pos_iou=is_pos_iou, is_in_gts=is_in_gts,
        is_pos=is_pos,
    )


def atss_assign(anchors_per_level: Sequence[torch.Tensor], gt_boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS assignment of one image: ``(A,)`` int64 matched GT index per anchor, ``-1`` for negatives.

    Args:
        anchors_per_level: one ``(A_l, 4)`` xyxy tensor per level.
        gt_boxes: ``(n, 4)`` xyxy GT boxes (``n`` may be 0).
        topk: candidates per level and GT.
    """
    return atss_assign_details(anchors_per_level, gt_boxes, topk).matched_gt


def _centerness_targets(gt_decoded: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """``(P,)`` centerness of the anchor centres ``anchors (P, 4)`` inside the boxes ``gt_decoded (P, 4)``."""
    centre = _centres(anchors)
    left_right = torch.stack([centre[:, 0] - gt_decoded[:, 0], gt_decoded[:, 2] - centre[:, 0]], dim=1)
    top_bottom = torch.stack([centre[:, 1] - gt_decoded[:, 1], gt_decoded[:, 3] - centre[:, 1]], dim=1)
    ratio_x = left_right.min(dim=1).values / left_right.max(dim=1).values
    ratio_y = top_bottom.min(dim=1).values / top_bottom.max(dim=1).values
    return torch.sqrt(ratio_x * ratio_y)


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(P,)`` ``1 - GIoU`` of xyxy boxes, areas without ``+1``, eps in the union and the enclosing area."""
    px1, py1 = pred[:, 0], pred[:, 1]
    px2 = torch.max(px1, pred[:, 2])  # a predicted box never has negative extent
    py2 = torch.max(py1, pred[:, 3])
    tx1, ty1, tx2, ty2 = target.unbind(dim=1)
    pred_area = (px2 - px1) * (py2 - py1)
    target_area = (tx2 - tx1) * (ty2 - ty1)
    ix1, iy1 = torch.max(px1, tx1), torch.max(py1, ty1)
    ix2, iy2 = torch.min(px2, tx2), torch.min(py2, ty2)
    overlaps = (ix2 > ix1) & (iy2 > iy1)
    inter = torch.where(overlaps, (ix2 - ix1) * (iy2 - iy1), torch.zeros_like(ix1))
    enclosing = (torch.max(px2, tx2) - torch.min(px1, tx1)) * (torch.max(py2, ty2) - torch.min(py1, ty1)) + _GIOU_EPS
    union = pred_area + target_area - inter + _GIOU_EPS
    giou = inter / union - (enclosing - union) / enclosing
    return 1 - giou


def _flatten_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level ``(B, C, H, W)`` maps -> ``(B, A, C)`` (row-major locations, levels concatenated)."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class GLIPLoss(torch.nn.Module):
    """GLIP's training objective: ATSS assignment, token focal loss, centerness-weighted GIoU and centerness BCE.

    Args:
        topk: ATSS candidates per level and GT (official ``ATSS.TOPK`` 9 with one anchor per location).
        reg_loss_weight: weight of the GIoU loss (official 2.0).
        token_loss_weight: weight of the dot-product token loss (official 1.0).
        focal_alpha, focal_gamma: token focal-loss parameters (official 0.25, 2.0).
        max_text_len: the model's text length (256); negatives' no-object target sits at token ``max_text_len - 1``.
        reduce_over_ranks: maps the ``(2,)`` float64 tensor ``[positives, sum of centerness targets]`` of this rank to
            its average over ranks; default :func:`mean_over_ranks` (identity outside ``torch.distributed``).

    Call it like the official head's training branch::

        losses = GLIPLoss()(box_regression=[(B, 4, H, W)], centerness=[(B, 1, H, W)], token_logits=[(B, H*W, M)],
                            anchors=[(H*W, 4)], targets=[{"boxes": (n, 4), "positive_map": (n, M)}],
                            text_mask=(B, M))

    ``targets[i]["boxes"]`` are xyxy network-input pixels of image ``i`` (the anchors' frame);
    ``targets[i]["positive_map"]`` marks the tokens each box grounds to (non-zero = positive); objects with ``boxes``
    and ``positive_map`` attributes (``glip_data``'s ``GroundingTarget``) are accepted as well. ``text_mask`` is True
    (or > 0) on real tokens. Returns the loss dict (see :meth:`compute` for targets and normalisers as well).
    """

    def __init__(
        self,
        topk: int = 9,
        reg_loss_weight: float = 2.0,
        token_loss_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_text_len: int = 256,
        reduce_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if max_text_len < 1:
            raise ValueError(f"max_text_len must be >= 1, got {max_text_len}")
        self.topk = int(topk)
        self.reg_loss_weight = float(reg_loss_weight)
        self.token_loss_weight = float(token_loss_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.max_text_len = int(max_text_len)
        self.reduce_over_ranks = reduce_over_ranks if reduce_over_ranks is not None else mean_over_ranks
        self.box_coder = BoxCoder()

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The loss dict ``{"loss_reg", "loss_centerness", "loss_dot_product_token"}`` (the arguments of
        :meth:`compute`; see the class docstring)."""
        return self.compute(*args, **kwargs).losses

    # -----------------------------------------------------------------------------------------------------------------

    def _check_inputs(self, box_regression, centerness, token_logits, anchors, targets, text_mask) -> tuple[int, int]:
        """Validate shapes; returns ``(B, M)``."""
        named = {"box_regression": box_regression, "centerness": centerness, "token_logits": token_logits,
                 "anchors": anchors}
        for name, value in named.items():
            if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a list with one tensor per level, got {type(value).__name__}")
        num_levels = len(box_regression)
        if num_levels == 0:
            raise ValueError("box_regression is empty; expected one (B, 4, H, W) tensor per level")
        for name, value in named.items():
            if len(value) != num_levels:
                raise ValueError(f"{name} has {len(value)} levels, box_regression has {num_levels}")
        batch = box_regression[0].shape[0] if box_regression[0].dim() == 4 else -1
        if batch == 0:
            raise ValueError("box_regression[0] has an empty batch dimension")
        num_tokens = token_logits[0].shape[-1] if token_logits[0].dim() == 3 else -1
        for level in range(num_levels):
            reg = box_regression[level]
            if reg.dim() != 4 or reg.shape[1] != 4 or reg.shape[0] != batch:
                raise ValueError(f"box_regression[{level}] has shape {_shape(reg)}, expected ({batch}, 4, H, W)")
            h, w = reg.shape[2:]
            expected = {
                "centerness": (centerness[level], (batch, 1, h, w)),
                "token_logits": (token_logits[level], (batch, h * w, num_tokens)),
                "anchors": (anchors[level], (h * w, 4)),
            }
            for name, (tensor, shape) in expected.items():
                if not isinstance(tensor, torch.Tensor) or _shape(tensor) != shape:
                    got = _shape(tensor) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ValueError(
                        f"{name}[{level}] has shape {got}, expected {shape} to match box_regression[{level}] "
                        f"{_shape(reg)}" + (" and token_logits[0]" if name == "token_logits" else "")
                    )
        if num_tokens > self.max_text_len:
            raise ValueError(f"token_logits have {num_tokens} tokens, more than max_text_len={self.max_text_len}")
        if not isinstance(text_mask, torch.Tensor) or _shape(text_mask) != (batch, num_tokens):
            got = _shape(text_mask) if isinstance(text_mask, torch.Tensor) else type(text_mask).__name__
            raise ValueError(f"text_mask has shape {got}, expected (B, M) = {(batch, num_tokens)}")
        if isinstance(targets, Mapping) or len(targets) != batch:
            got = "a dict" if isinstance(targets, Mapping) else f"{len(targets)} entries"
            raise ValueError(f"targets must be a list with one dict per image ({batch}), got {got}")
        for i, target in enumerate(targets):
            boxes, positive_map = _target_field(target, "boxes", i), _target_field(target, "positive_map", i)
            _check_boxes(boxes, f"targets[{i}]['boxes']", values=False)  # values: in build_targets
            if not isinstance(positive_map, torch.Tensor) or _shape(positive_map) != (boxes.shape[0], num_tokens):
                got = _shape(positive_map) if isinstance(positive_map, torch.Tensor) else type(positive_map).__name__
                raise ValueError(
                    f"targets[{i}]['positive_map'] has shape {got}, expected (n boxes, M) = "
                    f"{(boxes.shape[0], num_tokens)}"
                )
        return batch, num_tokens

    def build_targets(
        self,
        anchors: Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor] | object],
        num_tokens: int,
        dtype: torch.dtype = torch.float32,
    ) -> GLIPTargets:
        """ATSS assignment and per-anchor targets of a batch.

        Args:
            anchors: one ``(A_l, 4)`` tensor per level, the same for every image.
            targets: per image ``{"boxes": (n, 4), "positive_map": (n, M)}`` (or an object with these attributes).
            num_tokens: ``M``, the text width of the batch.
            dtype: dtype of the geometry and the regression / centerness targets.
        """
        levels = [a.to(dtype) for a in _check_anchor_levels(anchors, "anchors")]
        flat_anchors = torch.cat(levels)
        device = flat_anchors.device
        num_anchors = flat_anchors.shape[0]
        no_object = self.max_text_len - 1
        assignments, token_targets, pos_inds, reg_targets = [], [], [], []
        for i, target in enumerate(targets):
            boxes = _target_field(target, "boxes", i).to(device=device, dtype=dtype)
            positive_map = _target_field(target, "positive_map", i).to(device) != 0
            _check_boxes(boxes, f"targets[{i}]['boxes']")
            assignment = atss_assign_details(levels, boxes, self.topk)
            matched = assignment.matched_gt
            positive = matched >= 0
            tokens = torch.zeros(num_anchors, num_tokens, dtype=torch.bool, device=device)
            if boxes.shape[0]:
                tokens[positive] = positive_map[matched[positive]]
            if no_object < num_tokens:
                tokens[~positive, no_object] = True
            anchor_idx = positive.nonzero()[:, 0]
            assignments.append(assignment)
            token_targets.append(tokens)
            pos_inds.append(anchor_idx + i * num_anchors)
            reg_targets.append(self.box_coder.encode(boxes[matched[anchor_idx]], flat_anchors[anchor_idx]))
        pos_inds_all = torch.cat(pos_inds)
        reg_targets_all = torch.cat(reg_targets)
        anchors_pos = flat_anchors[pos_inds_all % num_anchors]
        centerness = _centerness_targets(self.box_coder.decode(reg_targets_all, anchors_pos), anchors_pos)
        return GLIPTargets(
            assignments=assignments,
            matched_gt=torch.stack([a.matched_gt for a in assignments]),
            token_targets=torch.stack(token_targets),
            pos_inds=pos_inds_all,
            reg_targets=reg_targets_all,
            centerness_targets=centerness,
        )

    def compute(
        self,
        box_regression: Sequence[torch.Tensor],
        centerness: Sequence[torch.Tensor],
        token_logits: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        targets: Sequence[Mapping[str, torch.Tensor] | object],
        text_mask: torch.Tensor,
    ) -> GLIPLossOutput:
        """Losses together with the targets and the normalisers (same arguments as :meth:`forward`)."""
        batch, num_tokens = self._check_inputs(box_regression, centerness, token_logits, anchors, targets, text_mask)
        head = [*box_regression, *centerness, *token_logits]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in head) else torch.float32
        device = box_regression[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            anchors = [a.to(device) for a in anchors]
            batch_targets = self.build_targets(anchors, targets, num_tokens, dtype)
            flat_anchors = torch.cat(anchors).to(dtype)
            num_anchors = flat_anchors.shape[0]
            reg = _flatten_levels(box_regression).to(dtype).reshape(-1, 4)  # (B*A, 4)
            ctr_logits = _flatten_levels(centerness).to(dtype).reshape(-1)  # (B*A,)

            pos_inds = batch_targets.pos_inds
            ctr_targets = batch_targets.centerness_targets
            local = torch.stack([ctr_targets.new_tensor(float(pos_inds.numel())), ctr_targets.sum()]).double()
            averaged = self.reduce_over_ranks(local)
            num_pos_avg = averaged[0].clamp(min=1.0)
            ctr_sum_avg = averaged[1]

            # real-token columns only, flattened image, anchor, token: the official masked_select order
            token_mask = text_mask.to(device) > 0
            selected_logits, selected_targets = [], []
            for b in range(batch):
                columns = token_mask[b].nonzero()[:, 0]
                selected_logits.append(torch.cat([t[b].index_select(1, columns) for t in token_logits]).reshape(-1))
                selected_targets.append(batch_targets.token_targets[b].index_select(1, columns).reshape(-1))
            token_loss = torchvision.ops.sigmoid_focal_loss(
                torch.cat(selected_logits).to(dtype), torch.cat(selected_targets).to(dtype),
                alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum",
            ) / num_pos_avg.to(dtype)

            anchors_pos = flat_anchors[pos_inds % num_anchors]
            pred_boxes = self.box_coder.decode(reg[pos_inds], anchors_pos)
            gt_boxes = self.box_coder.decode(batch_targets.reg_targets, anchors_pos)
            reg_sum = (_giou_loss(pred_boxes, gt_boxes) * ctr_targets).sum()
            # a rank without positives contributes 0 whatever the other ranks hold (never 0 / 0)
            safe_ctr = torch.where(ctr_sum_avg > 0, ctr_sum_avg, torch.ones_like(ctr_sum_avg)).to(dtype)
            reg_loss = reg_sum / safe_ctr
            ctr_loss = torch.nn.functional.binary_cross_entropy_with_logits(
                ctr_logits[pos_inds], ctr_targets, reduction="sum"
            ) / num_pos_avg.to(dtype)
        losses = {
            "loss_reg": reg_loss * self.reg_loss_weight,
            "loss_centerness": ctr_loss,
            "loss_dot_product_token": token_loss * self.token_loss_weight,
        }
        return GLIPLossOutput(losses, batch_targets, num_pos_avg, ctr_sum_avg)
