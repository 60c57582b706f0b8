"""GLIP's feature pyramid: FPN over C3..C5 plus the P6/P7 top blocks (official names and numerics).

Official module names (``backbone.fpn.*``): ``fpn_inner{2,3,4}`` (1x1 lateral convs with bias),
``fpn_layer{2,3,4}`` (3x3 output convs, padding 1, with bias) and ``top_blocks.p6`` / ``top_blocks.p7``
(3x3 stride-2 convs). No normalisation, no activation except the ReLU between P6 and P7.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DropBlock2d", "LastLevelP6P7", "FPN"]


def _kaiming_uniform_conv(conv: nn.Conv2d) -> nn.Conv2d:
    # official conv_with_kaiming_uniform / LastLevelP6P7 init: kaiming_uniform(a=1), zero bias
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018) as configured in GLIP's FPN (``MODEL.FPN.DROP_PROB/DROP_SIZE``).

    In training: block centres are drawn per sample and position with probability
    ``gamma = drop_prob / block_size**2`` (one mask shared by all channels); every ``block_size x block_size``
    square around a centre is zeroed and the result is rescaled by ``numel(mask) / sum(mask)``.
    In eval mode (or with ``drop_prob == 0``) it is the identity.
    """

    def __init__(self, drop_prob: float = 0.3, block_size: int = 3):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"DropBlock2d: drop_prob must be in [0, 1), got {drop_prob}")
        if block_size < 1:
            raise ValueError(f"DropBlock2d: block_size must be >= 1, got {block_size}")
        self.drop_prob = drop_prob
        self.block_size = block_size

    def block_mask(self, seeds: torch.Tensor) -> torch.Tensor:
        """Keep-mask from block centres.

        Args:
            seeds: ``(B, H, W)`` float, 1 at block centres.

        Returns:
            ``(B, H, W)`` float, 0 inside every block, 1 elsewhere.
        """
        k = self.block_size
        dilated = F.max_pool2d(seeds[:, None], kernel_size=k, stride=1, padding=k // 2)
        if k % 2 == 0:  # even blocks: the pooled map is one larger; keep the top-left aligned part
            dilated = dilated[:, :, :-1, :-1]
        return 1.0 - dilated[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> same shape."""
        if x.dim() != 4:
            raise ValueError(f"DropBlock2d expects (B, C, H, W), got shape {tuple(x.shape)}")
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size**2
        seeds = (torch.rand(x.shape[0], *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        mask = self.block_mask(seeds)
        # official rescale; the clamp only avoids 0/0 when everything happens to be dropped
        return x * mask[:, None] * (mask.numel() / mask.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}"


class LastLevelP6P7(nn.Module):
    """Extra levels: ``P6 = p6(x)``, ``P7 = p7(ReLU(P6))`` (3x3, stride 2, padding 1).

    ``x`` is P5 when ``in_channels == out_channels`` (GLIP: 256 == 256) and C5 otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = _kaiming_uniform_conv(nn.Conv2d(in_channels, out_channels, 3, 2, 1))
        self.p7 = _kaiming_uniform_conv(nn.Conv2d(out_channels, out_channels, 3, 2, 1))
        self.use_p5 = in_channels == out_channels

    def forward(self, c5: torch.Tensor, p5: torch.Tensor) -> list[torch.Tensor]:
        """C5 ``(B, C5, H, W)``, P5 ``(B, C, H, W)`` -> [P6 ``(B, C, H6, W6)``, P7 ``(B, C, H7, W7)``]."""
        p6 = self.p6(p5 if self.use_p5 else c5)
        p7 = self.p7(F.relu(p6))
        return [p6, p7]


class FPN(nn.Module):
    """Top-down FPN over the last three backbone levels, plus P6/P7.

    Args:
        in_channels_list: channels of (C3, C4, C5).
        out_channels: width of every output level (GLIP: 256).
        p6p7_in_channels: input channels of ``top_blocks.p6``; ``None`` = ``out_channels`` (P6 from P5, as GLIP);
            pass ``in_channels_list[-1]`` to compute P6 from C5 (RetinaNet style).
        drop_block: DropBlock on the top-down sums before ``fpn_layer3``/``fpn_layer2`` in training (GLIP default
            on: ``MODEL.FPN.DROP_BLOCK``); the sums passed further down stay undropped, as in the official code.
        drop_prob, drop_block_size: its parameters (official 0.3, 3).

    ``forward([C3, C4, C5])`` -> ``[P3, P4, P5, P6, P7]``, each ``(B, out_channels, H_l, W_l)``.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int = 256, p6p7_in_channels: int | None = None,
                 drop_block: bool = True, drop_prob: float = 0.3, drop_block_size: int = 3):
        super().__init__()
        if len(in_channels_list) != 3 or any(c <= 0 for c in in_channels_list):
            raise ValueError(f"FPN: in_channels_list must hold the 3 positive channel counts of C3..C5, "
                             f"got {list(in_channels_list)}")
        self.in_channels_list = list(in_channels_list)
        self.out_channels = out_channels
        # official numbering: index 1 would be C2 (absent), so C3..C5 use 2..4
        for idx, channels in zip((2, 3, 4), in_channels_list):
            self.add_module(f"fpn_inner{idx}", _kaiming_uniform_conv(nn.Conv2d(channels, out_channels, 1)))
            self.add_module(f"fpn_layer{idx}", _kaiming_uniform_conv(nn.Conv2d(out_channels, out_channels, 3, 1, 1)))
        self.top_blocks = LastLevelP6P7(out_channels if p6p7_in_channels is None else p6p7_in_channels, out_channels)
        self.drop_block = DropBlock2d(drop_prob, drop_block_size) if drop_block else None

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 3:
            raise ValueError(f"FPN expects 3 feature maps (C3, C4, C5), got {len(features)}")
        c3, c4, c5 = features
        t5 = self.fpn_inner4(c5)
        p5 = self.fpn_layer4(t5)
        t4 = self.fpn_inner3(c4) + F.interpolate(t5, size=c4.shape[-2:], mode="nearest")
        p4 = self.fpn_layer3(self._drop(t4))
        t3 = self.fpn_inner2(c3) + F.interpolate(t4, size=c3.shape[-2:], mode="nearest")
        p3 = self.fpn_layer2(self._drop(t3))
        return [p3, p4, p5, *self.top_blocks(c5, p5)]

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_block(x) if self.drop_block is not None else x
