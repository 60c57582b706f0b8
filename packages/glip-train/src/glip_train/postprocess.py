"""From head outputs to detections, exactly as the official ``ATSSPostProcessor``
(``docs/official_model.md#class-scores``, ``#post-processing``).

Per image and level: class scores are the mean of the token probabilities of each class (``SCORE_AGG MEAN``), the
0.05 candidate threshold applies *before* centerness, the top ``pre_nms_top_n`` candidates are ranked by
``score * sigmoid(centerness)``, boxes are decoded and clipped, and the final score is
``sqrt(score * sigmoid(centerness))``. Across levels: per-class NMS (``+1`` IoU, 0.6) and the max-detections rule.

Unlike the official code, class scores have exactly as many columns as the prompt has classes (no 80-column ceiling).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glip_data.boxes import batched_nms, clip_boxes

from .box_ops import BoxCoder
from .model_config import PostProcessConfig

__all__ = ["PostProcessConfig", "Detections", "aggregate_token_scores", "cap_detections", "passes_threshold",
           "ATSSPostProcessor"]


@dataclass
class Detections:
    """Detections of one image, in the network-input frame (resized, unpadded).

    Attributes:
        boxes: ``(K, 4)`` xyxy.
        scores: ``(K,)`` ``sqrt(class score * sigmoid(centerness))``.
        labels: ``(K,)`` int64, 0-based class index into the image's class list.
        pre_nms: the candidates before NMS (boxes, scores, labels) when requested, for inspection.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    pre_nms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def cap_detections(scores: torch.Tensor, max_detections: int | None) -> torch.Tensor:
    """The official detection cap: ``(K,)`` bool, True for the detections to keep.

    With more than ``max_detections`` detections, every score at least the ``(K - max + 1)``-th smallest is kept, so
    ties at the boundary can keep a few more (official ``kthvalue`` rule). None keeps everything.
    """
    n = scores.numel()
    if max_detections is None or n <= max_detections:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if max_detections < 1:
        raise ValueError(f"max_detections must be a positive integer or None; got {max_detections!r}")
    kth = torch.kthvalue(scores.detach().float().cpu(), n - max_detections + 1).values.item()
    return scores >= kth


def passes_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The one score-threshold rule: ``(K,)`` bool, True for the detections whose final score is **at least**
    ``threshold`` (``>=``; 0 keeps every detection). ``detect`` / ``ground`` (``--threshold``) and
    ``glip pseudo-label`` (``--threshold``) keep detections by it."""
    return scores >= threshold


def aggregate_token_scores(token_probs: torch.Tensor, class_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Class scores as the mean probability of each class's tokens.

    Args:
        token_probs: ``(L, M)`` sigmoid of the word-region logits for L locations and M tokens.
        class_tokens: for each of C classes, its token indices (all < M, none empty).

    Returns:
        ``(L, C)`` class scores.
    """
    num_tokens = token_probs.shape[-1]
    columns = []
    for c, tokens in enumerate(class_tokens):
        if len(tokens) == 0:
            raise ValueError(f"class {c} has no tokens")
        if max(tokens) >= num_tokens or min(tokens) < 0:
            raise ValueError(f"class {c} uses token {max(tokens)} but the text has only {num_tokens} tokens")
        # gather + mean keeps the official summation order exactly (a matmul would differ in the last ulp)
        columns.append(token_probs[:, list(tokens)].mean(-1))
    if not columns:
        return token_probs.new_zeros(token_probs.shape[0], 0)
    return torch.stack(columns, dim=-1)


class ATSSPostProcessor:
    """Turns per-level head outputs of a batch into per-image :class:`Detections`."""

    def __init__(self, config: PostProcessConfig | None = None, box_coder: BoxCoder | None = None):
        self.config = config or PostProcessConfig()
        self.box_coder = box_coder or BoxCoder()

    @torch.no_grad()
    def __call__(
        self,
        box_regression: Sequence[torch.Tensor],
        centerness: Sequence[torch.Tensor],
        token_logits: Sequence[torch.Tensor],
        anchors: Sequence[torch.Tensor],
        image_sizes: Sequence[tuple[int, int]],
        class_tokens: Sequence[Sequence[Sequence[int]]],
        *,
        keep_pre_nms: bool = False,
    ) -> list[Detections]:
        """Post-process a batch.

        Args:
            box_regression: per level ``(B, 4, H_l, W_l)``.
            centerness: per level ``(B, 1, H_l, W_l)`` logits.
            token_logits: per level ``(B, H_l * W_l, M)`` word-region logits.
            anchors: per level ``(H_l * W_l, 4)``.
            image_sizes: per image ``(h, w)`` of the unpadded network input (clipping frame).
            class_tokens: per image, per class, the token indices of that class in the image's text.
            keep_pre_nms: also return the pre-NMS candidates.

        Returns:
            one :class:`Detections` per image.
        """
        batch = len(image_sizes)
        if len(class_tokens) != batch:
            raise ValueError(f"{len(class_tokens)} class-token maps for {batch} images")
        results = []
        for i in range(batch):
            per_level = [
                self._single_level(reg[i], ctr[i], logits[i], anc, image_sizes[i], class_tokens[i])
                for reg, ctr, logits, anc in zip(box_regression, centerness, token_logits, anchors)
            ]
            boxes = torch.cat([p[0] for p in per_level])
            scores = torch.cat([p[1] for p in per_level])
            labels = torch.cat([p[2] for p in per_level])
            results.append(self._select(boxes, scores, labels, keep_pre_nms))
        return results

    def _single_level(self, reg, ctr, logits, anchors, image_size, class_tokens):
        cfg = self.config
        h, w = int(image_size[0]), int(image_size[1])
        deltas = reg.permute(1, 2, 0).reshape(-1, 4)  # (HW, 4), row-major locations
        ctr_prob = ctr.reshape(-1).sigmoid()  # (HW,)
        cls = aggregate_token_scores(logits.float().sigmoid(), class_tokens)  # (HW, C)
        candidates = cls > cfg.candidate_threshold
        k = min(int(candidates.sum()), cfg.pre_nms_top_n)
        ranked = (cls * ctr_prob[:, None])[candidates]
        ranked, order = ranked.topk(k, sorted=False)
        loc_cls = candidates.nonzero()[order]
        loc, cls_idx = loc_cls[:, 0], loc_cls[:, 1]
        boxes = self.box_coder.decode(deltas[loc], anchors[loc])
        boxes = clip_boxes(boxes, height=h, width=w, legacy=True)
        if cfg.min_box_size > 0:
            bw = boxes[:, 2] - boxes[:, 0] + 1
            bh = boxes[:, 3] - boxes[:, 1] + 1
            keep = (bw >= cfg.min_box_size) & (bh >= cfg.min_box_size)
            boxes, ranked, cls_idx = boxes[keep], ranked[keep], cls_idx[keep]
        return boxes, torch.sqrt(ranked), cls_idx

    def _select(self, boxes, scores, labels, keep_pre_nms) -> Detections:
        cfg = self.config
        pre = (boxes, scores, labels) if keep_pre_nms else None
        keep = batched_nms(boxes, scores, labels, cfg.nms_threshold, legacy=True)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = cap_detections(scores, cfg.detections_per_image)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return Detections(boxes=boxes, scores=scores, labels=labels, pre_nms=pre)
