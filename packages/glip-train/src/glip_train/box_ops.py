"""Anchors and box coding with GLIP's legacy ``+1`` pixel convention.

A box ``(x1, y1, x2, y2)`` covers the pixels ``x1..x2`` inclusive, so its width is ``x2 - x1 + 1``. The official
anchors and box coder use this convention. Every other box operation (conversions, clipping, IoU, NMS, flips) lives in
:mod:`glip_data.boxes`, which states the convention of each call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["AnchorGenerator", "BoxCoder"]


class AnchorGenerator(torch.nn.Module):
    """One square anchor per feature location and level (ATSS with a single aspect ratio and scale).

    The base anchor of a level with stride ``s`` and size ``S`` is centred at ``((s - 1) / 2, (s - 1) / 2)`` with
    ``+1`` widths: ``[c - (S - 1) / 2, c - (S - 1) / 2, c + (S - 1) / 2, c + (S - 1) / 2]``; e.g. P3 (8, 64) gives
    ``[-28, -28, 35, 35]``. Anchors are shifted by ``(x * s, y * s)`` over the (padded) feature grid, row-major.

    Args:
        sizes: anchor size per level (GLIP: 64, 128, 256, 512, 1024).
        strides: stride per level (GLIP: 8, 16, 32, 64, 128).
    """

    def __init__(self, sizes: Sequence[float] = (64, 128, 256, 512, 1024), strides: Sequence[int] = (8, 16, 32, 64, 128)):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"anchor sizes {tuple(sizes)} and strides {tuple(strides)} differ in length")
        self.sizes = tuple(float(s) for s in sizes)
        self.strides = tuple(int(s) for s in strides)
        cells = [self.cell_anchor(size, stride) for size, stride in zip(self.sizes, self.strides)]
        for i, cell in enumerate(cells):
            self.register_buffer(f"cell_anchor_{i}", cell, persistent=False)

    @staticmethod
    def cell_anchor(size: float, stride: int) -> torch.Tensor:
        """The ``(1, 4)`` base anchor of one level, computed exactly as the official generator does."""
        # The official code builds a (0, 0, s-1, s-1) box, sets its area to (S/s)^2 * s^2 at ratio 1 with rounding,
        # and re-centres it; for ratio 1 and integer sizes that reduces to the closed form below.
        ctr = 0.5 * (stride - 1)
        w = float(round(math.sqrt(stride * stride / 1.0)))  # round(sqrt(area / ratio)) with ratio 1
        w = w * size / stride
        half = 0.5 * (w - 1)
        return torch.tensor([[ctr - half, ctr - half, ctr + half, ctr + half]], dtype=torch.float32)

    def cell_anchors(self) -> list[torch.Tensor]:
        return [getattr(self, f"cell_anchor_{i}") for i in range(len(self.strides))]

    def forward(self, feature_sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Anchors for feature maps of the given ``(H_l, W_l)`` sizes.

        Returns:
            one ``(H_l * W_l, 4)`` float32 tensor per level (the same for every image of a batch).
        """
        if len(feature_sizes) != len(self.strides):
            raise ValueError(f"expected {len(self.strides)} feature levels, got {len(feature_sizes)}")
        anchors = []
        for (h, w), stride, cell in zip(feature_sizes, self.strides, self.cell_anchors()):
            shift_x = torch.arange(0, w * stride, step=stride, dtype=torch.float32, device=cell.device)
            shift_y = torch.arange(0, h * stride, step=stride, dtype=torch.float32, device=cell.device)
            sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)], dim=1)
            anchors.append((shifts[:, None, :] + cell[None, :, :]).reshape(-1, 4))
        return anchors


class BoxCoder:
    """ATSS box coder: ``(dx, dy, dw, dh)`` regression relative to an anchor, weights ``(10, 10, 5, 5)``, ``+1`` widths.

    Centres are ``(x1 + x2) / 2``; decoded corners are ``c ± (w - 1) / 2``; ``dw``/``dh`` are clamped at
    ``log(1000 / 16)`` before the exponential.
    """

    def __init__(self, weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Regression targets ``(K, 4)`` of ``gt_boxes (K, 4)`` with respect to ``anchors (K, 4)`` (both xyxy)."""
        wx, wy, ww, wh = self.weights
        aw = anchors[:, 2] - anchors[:, 0] + 1
        ah = anchors[:, 3] - anchors[:, 1] + 1
        ax = (anchors[:, 2] + anchors[:, 0]) / 2
        ay = (anchors[:, 3] + anchors[:, 1]) / 2
        gw = gt_boxes[:, 2] - gt_boxes[:, 0] + 1
        gh = gt_boxes[:, 3] - gt_boxes[:, 1] + 1
        gx = (gt_boxes[:, 2] + gt_boxes[:, 0]) / 2
        gy = (gt_boxes[:, 3] + gt_boxes[:, 1]) / 2
        return torch.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=1
        )

    def decode(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Boxes ``(K, 4)`` xyxy from regression ``deltas (K, 4)`` relative to ``anchors (K, 4)``."""
        if deltas.dtype != torch.float64:
            deltas = deltas.float()  # half-precision head outputs decode in float32; float64 stays float64
        anchors = anchors.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[:, 2] - anchors[:, 0] + 1
        ah = anchors[:, 3] - anchors[:, 1] + 1
        ax = (anchors[:, 2] + anchors[:, 0]) / 2
        ay = (anchors[:, 3] + anchors[:, 1]) / 2
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.bbox_xform_clip)
        cx = dx * aw + ax
        cy = dy * ah + ay
        w = torch.exp(dw) * aw
        h = torch.exp(dh) * ah
        return torch.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], dim=1)
