"""Batching: zero-padding images to a common size, and collating grounding samples for training."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pad_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad images at the bottom/right to the batch's largest size, rounded up to ``size_divisibility``.

    This is the official ``to_image_list``: padding happens *after* normalisation, so a pad value of 0 is the mean
    colour (glip_spec.md §2.1 step 5).

    Args:
        images: ``B`` tensors ``(C, H_i, W_i)`` of one dtype and channel count.
        size_divisibility: round the padded height and width up to a multiple of this (32 for the Swin-FPN
            models); 0 or 1 means no rounding.

    Returns:
        ``(batch, image_sizes, image_mask)``:
        ``batch`` ``(B, C, Hp, Wp)``; ``image_sizes`` ``(B, 2)`` int64 ``[h, w]`` of each unpadded image;
        ``image_mask`` ``(B, Hp, Wp)`` bool, True on real pixels.
    """
    images = list(images)
    if not images:
        raise ValueError("pad_images needs at least one image")
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a (C, H, W) tensor, got {shape}")
        if image.shape[0] != images[0].shape[0] or image.dtype != images[0].dtype:
            raise ValueError(
                f"images[{i}] has {image.shape[0]} channels / {image.dtype}, images[0] has "
                f"{images[0].shape[0]} / {images[0].dtype}"
            )
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0, got {size_divisibility}")

    max_h = max(int(image.shape[1]) for image in images)
    max_w = max(int(image.shape[2]) for image in images)
    if size_divisibility > 1:
        max_h = int(math.ceil(max_h / size_divisibility) * size_divisibility)
        max_w = int(math.ceil(max_w / size_divisibility) * size_divisibility)

    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], max_h, max_w))
    image_mask = torch.zeros((len(images), max_h, max_w), dtype=torch.bool, device=first.device)
    image_sizes = torch.zeros((len(images), 2), dtype=torch.int64)
    for i, image in enumerate(images):
        h, w = int(image.shape[1]), int(image.shape[2])
        batch[i, :, :h, :w] = image
        image_mask[i, :h, :w] = True
        image_sizes[i, 0], image_sizes[i, 1] = h, w
    return batch, image_sizes, image_mask
