"""The image tokens of a multi-level feature pyramid: flattening, splitting back, per-image validity masks.

The X-MHA reads all FPN levels as one token sequence: ``N = sum_l H_l * W_l`` tokens, each level row-major (y, x),
levels in order (GLIP: P3..P7). :func:`level_image_masks` marks the cells of a padded batch that belong to each
image.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["flatten_levels", "split_levels", "level_image_masks"]


def flatten_levels(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Flatten multi-level maps ``[(B, C, H_l, W_l)]`` into tokens ``(B, N, C)``, row-major (y, x), levels in order.

    Returns the tokens and the ``(H_l, W_l)`` of every level (for :func:`split_levels`).
    """
    if isinstance(features, torch.Tensor) or len(features) == 0:
        raise ValueError("features must be a non-empty list of (B, C, H, W) tensors")
    B, C = features[0].shape[:2]
    sizes = []
    for i, f in enumerate(features):
        if f.dim() != 4 or f.shape[0] != B or f.shape[1] != C:
            raise ValueError(f"features[{i}] must have shape (B={B}, C={C}, H, W); got {tuple(f.shape)}")
        sizes.append((f.shape[2], f.shape[3]))  # not int(): a traced export keeps the sizes symbolic
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    return tokens, sizes


def split_levels(tokens: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`flatten_levels`: ``(B, N, C)`` -> ``[(B, C, H_l, W_l)]`` in channels-last memory (the
    tokens' own layout: for one image, views of ``tokens`` without a copy). The convolutions of DyConv and the head
    run on channels-last maps at least as fast on CPU, and :func:`flatten_levels` of them reads rows."""
    counts = [h * w for h, w in sizes]
    if tokens.dim() != 3 or tokens.shape[1] != sum(counts):
        raise ValueError(f"tokens must have shape (B, N={sum(counts)}, C) for level sizes {list(sizes)}; "
                         f"got {tuple(tokens.shape)}")
    B, _, C = tokens.shape
    chunks = torch.split(tokens, counts, dim=1)
    return [c.reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
            for c, (h, w) in zip(chunks, sizes)]


def level_image_masks(image_sizes: Sequence[tuple[int, int]] | torch.Tensor, feature_sizes: Sequence[tuple[int, int]],
                      strides: Sequence[int], *, size_divisibility: int = 32,
                      device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Per-level validity masks of a zero-padded batch: the cells the image would have if it were alone.

    An image of ``(h, w)`` run alone is padded to ``(ceil(h / d) * d, ceil(w / d) * d)`` (``d = size_divisibility``)
    and every stride-``s`` feature map of a "same"-padded network (convolutions, Swin patch embedding and merging,
    GLIP's stride-2 P6/P7) then has ``ceil(padded / s)`` rows and columns. In a larger batch the same image gets more
    padding; this mask marks valid exactly those cells, so a batched image's valid cells equal the cells of the image
    alone and the rule depends only on the image's own size, never on the batch. (A pooling rule over the padded
    pixel mask would not: it depends on the batch's padded size at levels whose stride does not divide it.)

    Args:
        image_sizes: ``(h, w)`` of each unpadded image (B entries), or a ``(B, 2)`` integer tensor (a traced export
            takes the sizes as a graph input).
        feature_sizes: ``(H_l, W_l)`` of every level of the batch.
        strides: the stride of every level (GLIP: 8, 16, 32, 64, 128).
        size_divisibility: the batch padding multiple (GLIP: 32).
    Returns:
        ``[(B, H_l, W_l)]`` bool, True = valid cell.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"{len(feature_sizes)} feature sizes but {len(strides)} strides")
    divisor = max(1, int(size_divisibility))
    sizes = torch.as_tensor(image_sizes, dtype=torch.int64, device=device).reshape(-1, 2)
    padded = torch.div(sizes + divisor - 1, divisor, rounding_mode="floor") * divisor
    masks = []
    for (height, width), stride in zip(feature_sizes, strides):
        valid = torch.div(padded + stride - 1, stride, rounding_mode="floor")  # (B, 2): ceil(padded / stride)
        rows = torch.arange(height, device=sizes.device)
        cols = torch.arange(width, device=sizes.device)
        masks.append((rows[None, :, None] < valid[:, 0, None, None])
                     & (cols[None, None, :] < valid[:, 1, None, None]))
    return masks
