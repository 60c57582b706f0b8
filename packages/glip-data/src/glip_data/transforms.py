"""Image transforms: the official test transform and the training augmentations.

Official pre-processing (glip_spec.md §2.1): load as PIL RGB; resize the shorter side to ``min_size`` with the
longer side capped at ``max_size`` (PIL bilinear, via torchvision); ``to_tensor``; reverse channels to **BGR**;
multiply by 255; normalise with the BGR mean/std below. The network input is therefore BGR on a 0–255 scale; the
official checkpoints expect exactly that.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .sample import GroundingSample

# Per-channel statistics in BGR order, 0-255 scale (cfg.INPUT.PIXEL_MEAN / PIXEL_STD of the official configs).
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (57.375, 57.120, 58.395)

# The official multi-scale training sizes (shorter side) and longer-side cap.
TRAIN_MIN_SIZES = (480, 560, 640, 720, 800)
TRAIN_MAX_SIZE = 1333


def get_resize_size(image_size: tuple[int, int], min_size: int, max_size: int | None) -> tuple[int, int]:
    """Output size of the official resize, as ``(new_w, new_h)``.

    The rules of the official ``Resize.get_size`` (glip_spec.md §2.1), rounding included:

    * the target shorter side is ``s = min_size``; if ``long / short * s > max_size`` it becomes
      ``s = int(round(max_size * short / long))`` (Python's round: halves go to even);
    * if the shorter side already equals ``s`` the size is kept;
    * otherwise the shorter side becomes ``s`` and the longer ``int(s * long / short)`` (truncation).

    Args:
        image_size: ``(w, h)`` in pixels (PIL's ``Image.size`` order).
        min_size: target length of the shorter side.
        max_size: cap on the longer side, or None for no cap.

    Returns:
        ``(new_w, new_h)``.
    """
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (w, h), got {image_size!r}")
    w, h = (int(v) for v in image_size)
    if w <= 0 or h <= 0:
        raise ValueError(f"image_size must be positive, got (w, h) = ({w}, {h})")
    if min_size <= 0:
        raise ValueError(f"min_size must be positive, got {min_size}")
    size = min_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


def to_rgb_image(image: Any) -> Image.Image:
    """Return ``image`` as a PIL RGB image.

    Accepts a PIL image of any mode — grayscale (``L``, ``I;16``...), palette (``P``), ``RGBA``/``LA`` (the alpha
    channel is dropped, not composited: PIL's ``convert("RGB")``, which is what the official loader does), ``CMYK``
    — or a numpy ``uint8`` array ``(H, W)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 HWC, got dtype {image.dtype}")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return Image.fromarray(image).convert("RGB")
        raise ValueError(f"numpy image must have shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    raise TypeError(f"expected a PIL image or a numpy uint8 array, got {type(image).__name__}")


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``(3, H, W)`` float32 network input: BGR, ×255, normalised (official order of operations)."""
    tensor = TF.to_tensor(image)[[2, 1, 0]] * 255
    return TF.normalize(tensor, mean=list(PIXEL_MEAN_BGR), std=list(PIXEL_STD_BGR))


class TestTransform:
    """The official test-time transform: PIL image -> ``(3, H, W)`` normalised BGR tensor.

    Args:
        min_size: shorter side after resizing (official test: 800).
        max_size: cap on the longer side (official: 1333).

    Call with a PIL image (any mode; converted with :func:`to_rgb_image`) or a numpy ``uint8`` HWC array. Pad a
    batch of outputs with :func:`glip_data.collate.pad_images`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, min_size: int = 800, max_size: int | None = 1333) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def resize(self, image: Image.Image) -> Image.Image:
        new_w, new_h = get_resize_size(image.size, self.min_size, self.max_size)
        # torchvision's resize on a PIL image is PIL's bilinear resize, exactly as the official transform.
        return TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR)

    def __call__(self, image: Any) -> torch.Tensor:
        return to_model_tensor(self.resize(to_rgb_image(image)))

    def __repr__(self) -> str:
        return f"TestTransform(min_size={self.min_size}, max_size={self.max_size})"
