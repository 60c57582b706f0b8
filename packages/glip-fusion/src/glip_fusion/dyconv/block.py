"""One DyHead block of GLIP's fusion tower (:class:`DyConv`): spatial-aware (DCNv2), scale-aware and task-aware
(:class:`DyReLU`) attention over the FPN levels.

Parameter names equal the official checkpoint names (``DyConv.{0,1,2}``, ``offset``, ``AttnConv.1``,
``relu.fc.{0,2}``). Shapes: B batch, C channels, ``(H_l, W_l)`` the size of level l (finest first).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dcn import ModulatedDeformConv3x3

__all__ = ["DyConv", "DyReLU", "OFFSET_MODES"]

#: DyConv's coarser-level offsets: the official memory reinterpretation, or offsets predicted per level (clean)
OFFSET_MODES = ("official", "per_level")


def _h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GLIP's hard sigmoid ``ReLU6(x + 3) / 6`` (kept in this form for bit-parity; F.hardsigmoid rounds differently)."""
    return F.relu6(x + 3.0) / 6.0


class _HSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _h_sigmoid(x)


class _Conv3x3Norm(nn.Module):
    """``DyConv.{i}``: ``conv`` (deformable or plain 3x3) followed by ``bn`` (GroupNorm, or absent)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, deformable: bool, gn_groups: Optional[int],
                 dcn_impl: str = "auto"):
        super().__init__()
        self.deformable = deformable
        if deformable:
            self.conv = ModulatedDeformConv3x3(in_channels, out_channels, stride, impl=dcn_impl)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
            nn.init.normal_(self.conv.weight, 0.0, 0.01)  # official DyConv.init_weights (plain convs only)
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.GroupNorm(gn_groups, out_channels) if gn_groups else None

    def forward(self, x: torch.Tensor, offset: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv(x, offset, mask) if self.deformable else self.conv(x)
        return self.bn(y) if self.bn is not None else y


class DyReLU(nn.Module):
    """Dynamic ReLU (task-aware attention), reduction 4, K2 with bias: ``relu.fc.0`` / ``relu.fc.2``.

    ``g = GAP(x)`` -> Linear(C, C/4) -> ReLU -> Linear(C/4, 4C) -> hard sigmoid -> ``(a1, b1, a2, b2)``;
    ``out = max(x * (2(a1 - .5) + 1) + (b1 - .5), x * 2(a2 - .5) + (b2 - .5))`` per channel.
    """

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, 4 * channels), _HSigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        coeffs = self.fc(F.adaptive_avg_pool2d(x, 1).view(B, C)).view(B, 4 * C, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, C, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        # x * a + b with the add in place: the same rounding as the plain expression, one map-sized pass less
        return torch.maximum((x * a1).add_(b1), (x * a2).add_(b2))


class DyConv(nn.Module):
    """One DyHead block: spatial-aware (DCNv2), scale-aware (``AttnConv``) and task-aware (DyReLU) attention.

    Parameters (official names): ``DyConv.0`` (stride 1, applied to the coarser level l+1), ``DyConv.1`` (stride 1,
    same level), ``DyConv.2`` (stride 2, applied to the finer level l-1), each ``conv`` + ``bn`` (GroupNorm(16));
    ``offset`` (Conv2d(C, 27, 3): 18 offsets + 9 mask logits); ``AttnConv.1`` (Conv2d(C, 1, 1) between a global
    average pool and a ReLU); ``relu.fc.{0,2}`` (:class:`DyReLU`). All weights are shared across levels.

    For level l (docs/official_model.md#dyconv): offsets/mask from ``offset(x_l)``; terms ``GN(DCN_1(x_l))``,
    ``GN(DCN_2(x_{l-1}))`` (l > 0) and ``upsample(GN(DCN_0(x_{l+1})))`` (l < L-1, bilinear, ``align_corners=True``);
    each term is weighted by ``hsigmoid(ReLU(AttnConv(term)))`` (a scalar per sample, pooled over the whole padded
    map) and the terms are averaged; then DyReLU.

    ``offset_mode``:
        ``"official"`` (default, parity): the coarser-level conv consumes level l's offsets reinterpreted in memory
        at level l+1's resolution, ``flatten(off_l[b])[:18*H'*W'].view(18, H', W')`` (the official CUDA kernel reads
        the buffer with the output's strides; quirk 3). ``"per_level"`` (clean alternative, for training your
        own model): the coarser-level conv uses offsets predicted from level l+1's own features.

    Flags (``use_deform``, ``use_dyfuse``, ``use_dyrelu``) switch the three attentions; off means a plain 3x3 conv
    (init N(0, 0.01)), a plain mean of the terms, and a ReLU. The attentions need ``in_channels == out_channels``.
    ``dcn_impl``: the deformable convolutions' implementation (:class:`ModulatedDeformConv3x3`'s ``impl``).
    """

    def __init__(self, in_channels: int = 256, out_channels: int = 256, *, use_gn: bool = True, gn_groups: int = 16,
                 use_deform: bool = True, use_dyfuse: bool = True, use_dyrelu: bool = True,
                 offset_mode: str = "official", dcn_impl: str = "auto"):
        super().__init__()
        if offset_mode not in OFFSET_MODES:
            raise ValueError(f"offset_mode must be one of {OFFSET_MODES}; got {offset_mode!r}")
        if (use_dyfuse or use_dyrelu) and in_channels != out_channels:
            raise ValueError(f"use_dyfuse / use_dyrelu need in_channels == out_channels (got {in_channels} and "
                             f"{out_channels}); GLIP switches them off for such a first block")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.offset_mode = offset_mode
        groups = gn_groups if use_gn else None
        self.DyConv = nn.ModuleList([_Conv3x3Norm(in_channels, out_channels, s, use_deform, groups, dcn_impl)
                                     for s in (1, 1, 2)])
        if use_dyfuse:
            self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, 1, kernel_size=1),
                                          nn.ReLU(inplace=True))
            nn.init.normal_(self.AttnConv[1].weight, 0.0, 0.01)
            nn.init.zeros_(self.AttnConv[1].bias)
        else:
            self.AttnConv = None
        self.relu = DyReLU(out_channels) if use_dyrelu else nn.ReLU()
        # the official offset conv keeps PyTorch's default init
        self.offset = nn.Conv2d(in_channels, 27, kernel_size=3, padding=1) if use_deform else None

    @staticmethod
    def _reinterpret(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Read the per-sample buffer of ``t (B, K, H, W)`` as ``(B, K, h, w)``: its first ``K*h*w`` values."""
        B, K = t.shape[:2]
        h, w = size
        return t.reshape(B, -1)[:, : K * h * w].reshape(B, K, h, w)

    def _conv_terms(self, feats: Sequence[torch.Tensor], level: int, offsets: list) -> list[torch.Tensor]:
        """The 1-3 terms of ``level`` in the official order [same level, finer level, coarser level]."""
        x = feats[level]
        H, W = x.shape[-2:]
        off = offsets[level]
        terms = [self.DyConv[1](x, *off)]
        if level > 0:
            fine = feats[level - 1]
            out_hw = ((fine.shape[-2] - 1) // 2 + 1, (fine.shape[-1] - 1) // 2 + 1)  # 3x3, stride 2, pad 1
            if out_hw != (H, W):
                raise ValueError(f"level {level - 1} of size {tuple(fine.shape[-2:])} gives {out_hw} after the "
                                 f"stride-2 conv, but level {level} is {(H, W)}; levels must halve (ceil) in size")
            terms.append(self.DyConv[2](fine, *off))
        if level < len(feats) - 1:
            coarse = feats[level + 1]
            h, w = coarse.shape[-2:]
            if self.offset is None:
                coarse_off = ()
            elif self.offset_mode == "per_level":
                coarse_off = offsets[level + 1]
            else:
                if h * w > H * W:
                    raise ValueError(f"offset_mode='official' needs level {level + 1} ({h}x{w}) to be no larger "
                                     f"than level {level} ({H}x{W})")
                coarse_off = tuple(self._reinterpret(t, (h, w)) for t in off)
            up = self.DyConv[0](coarse, *coarse_off)
            terms.append(F.interpolate(up, size=(H, W), mode="bilinear", align_corners=True))
        return terms

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[(B, C_in, H_l, W_l)]`` (finest first) -> ``[(B, C_out, H_l, W_l)]``."""
        if isinstance(features, torch.Tensor) or len(features) == 0:
            raise ValueError("DyConv expects a non-empty list of (B, C, H, W) maps, finest level first")
        B = features[0].shape[0]
        for i, f in enumerate(features):
            if f.dim() != 4 or f.shape[0] != B or f.shape[1] != self.in_channels:
                raise ValueError(f"features[{i}] must have shape (B={B}, C={self.in_channels}, H, W); "
                                 f"got {tuple(f.shape)}")
        offsets: list = []
        for f in features:
            if self.offset is None:
                offsets.append(())
            else:
                om = self.offset(f)  # (B, 27, H, W)
                offsets.append((om[:, :18], om[:, 18:].sigmoid()))

        outs = []
        for level in range(len(features)):
            terms = self._conv_terms(features, level, offsets)
            if self.AttnConv is not None:
                terms = [t * _h_sigmoid(self.AttnConv(t)) for t in terms]  # (B, C, H, W) * (B, 1, 1, 1)
            # the mean over the terms, summed in order and divided: bitwise equal to torch.mean(torch.stack(terms), 0)
            # without the stacked copy (the weighted terms are fresh tensors, the plain ones are not)
            fused = terms[0] if self.AttnConv is not None else terms[0].clone()
            for t in terms[1:]:
                fused.add_(t)
            outs.append(fused.div_(len(terms)))
        return [self.relu(y) for y in outs]
