"""Comparison helpers for parity checks against reference outputs (used by the test suite; useful for checking a
converted checkpoint against another implementation's outputs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glip_data.boxes import box_iou

__all__ = ["relative_error", "DetectionMatch", "match_detections"]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |ours - reference| / max |reference|`` (the parity suite's measure); shapes must agree."""
    ours = torch.as_tensor(ours, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs reference {tuple(reference.shape)}")
    scale = reference.abs().max().item()
    diff = (ours - reference).abs().max().item() if reference.numel() else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class DetectionMatch:
    """Result of :func:`match_detections`."""

    num_reference: int
    num_ours: int
    matched: int  # reference detections matched by one of ours (same label, IoU and score within tolerance)
    unmatched_ours: int  # our detections that matched no reference detection

    @property
    def recall(self) -> float:
        return self.matched / self.num_reference if self.num_reference else 1.0

    @property
    def extra_fraction(self) -> float:
        return self.unmatched_ours / self.num_reference if self.num_reference else float(self.num_ours > 0)


def match_detections(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
    ref_boxes: torch.Tensor, ref_scores: torch.Tensor, ref_labels: torch.Tensor,
    *, iou_threshold: float = 0.99, score_tolerance: float = 1e-3,
) -> DetectionMatch:
    """Match two detection sets one-to-one (greedy by reference score): same label, IoU above ``iou_threshold``
    and ``|score difference| < score_tolerance``. Order does not matter.

    IoU uses the ``+1`` pixel convention of GLIP boxes, so boxes clipped to a zero-width line at the image border
    still compare (their continuous area would be 0)."""
    boxes, ref_boxes = boxes.double().reshape(-1, 4), ref_boxes.double().reshape(-1, 4)
    scores, ref_scores = scores.double().reshape(-1), ref_scores.double().reshape(-1)
    labels, ref_labels = labels.reshape(-1), ref_labels.reshape(-1)
    used = torch.zeros(len(boxes), dtype=torch.bool)
    matched = 0
    if len(boxes) and len(ref_boxes):
        iou = box_iou(ref_boxes, boxes, legacy=True)
        for r in ref_scores.argsort(descending=True).tolist():
            ok = (labels == ref_labels[r]) & (iou[r] > iou_threshold) & ((scores - ref_scores[r]).abs() < score_tolerance) & ~used
            if ok.any():
                cand = ok.nonzero().flatten()
                best = cand[(scores[cand] - ref_scores[r]).abs().argmin()]
                used[best] = True
                matched += 1
    return DetectionMatch(len(ref_boxes), len(boxes), matched, int((~used).sum()))
