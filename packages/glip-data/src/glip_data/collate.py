"""Batching: zero-padding images to a common size, and collating grounding samples for training."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .positive_map import build_positive_map
from .sample import GroundingSample


def pad_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad images at the bottom/right to the batch's largest size, rounded up to ``size_divisibility``.

    This is the official ``to_image_list``: padding happens *after* normalisation, so a pad value of 0 is the mean
    colour (docs/official_model.md#preprocessing).

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


@dataclass
class GroundingTarget:
    """Training targets of one image.

    Attributes:
        boxes: ``(K, 4)`` float32 xyxy in the (resized) network-input frame.
        labels: ``(K,)`` int64 category ids (1 for grounding data).
        positive_map: ``(K, L)`` bool, the tokens each box grounds to (``L`` = the batch's text length).
        image_size: ``(h, w)`` of the unpadded image.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    positive_map: torch.Tensor
    image_size: tuple[int, int]


@dataclass
class GroundingBatch:
    """A collated training batch.

    Attributes:
        images: ``(B, 3, Hp, Wp)`` zero-padded network inputs.
        image_sizes: ``(B, 2)`` int64 ``[h, w]`` before padding.
        image_mask: ``(B, Hp, Wp)`` bool, True on real pixels.
        input_ids: ``(B, L)`` int64 token ids ([CLS] caption [SEP] [PAD]...).
        attention_mask: ``(B, L)`` int64, 1 on real tokens.
        positive_map: ``(sum K, L)`` bool, every box of the batch in order (the official collator's concatenated,
            binarised map).
        targets: per-image :class:`GroundingTarget`.
        captions: the B captions.
        metadata: the B samples' metadata dicts.
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    image_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positive_map: torch.Tensor
    targets: list[GroundingTarget]
    captions: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)


def _fit_width(positive_map: torch.Tensor, width: int, where: str) -> torch.Tensor:
    """Crop or zero-extend a ``(K, W)`` map to ``width`` columns; cropping must not lose a positive."""
    positive_map = positive_map.bool()
    if positive_map.shape[1] > width:
        if positive_map[:, width:].any():
            raise ValueError(f"{where}: the positive map has positives at token >= {width}, the text length")
        return positive_map[:, :width]
    if positive_map.shape[1] < width:
        return torch.cat([positive_map, positive_map.new_zeros(positive_map.shape[0], width - positive_map.shape[1])], 1)
    return positive_map


def collate_grounding(
    samples: Sequence[GroundingSample],
    tokenizer: Any,
    max_len: int = 256,
    pad_text_to: str = "max",
    size_divisibility: int = 32,
) -> GroundingBatch:
    """Collate transformed grounding samples into a training batch.

    Args:
        samples: samples whose ``image`` is a ``(3, H, W)`` network-input tensor (after
            :class:`glip_data.transforms.ToModelTensor`).
        tokenizer: a fast Hugging Face tokenizer.
        max_len: the model's text length; captions are truncated to it (boxes grounded past it get empty rows and
            are reported by :func:`glip_data.build_positive_map`).
        pad_text_to: ``"max"`` pads every caption to ``max_len`` (official ``PAD_MAX``; required for exact
            training parity because the loss's "no-object" token 255 only exists at full length,
            docs/official_model.md#quirks item 9), or
            ``"longest"`` to the longest caption of the batch (faster; the positive maps are cut to that length).
        size_divisibility: image padding multiple (see :func:`pad_images`).

    A sample's ``positive_map`` is used when present, else built from ``tokens_positive``.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate_grounding needs at least one sample")
    if pad_text_to not in ("max", "longest"):
        raise ValueError(f"pad_text_to must be 'max' or 'longest', got {pad_text_to!r}")
    for sample in samples:
        if not isinstance(sample.image, torch.Tensor):
            raise TypeError(
                f"{sample.image_path}: sample.image is {type(sample.image).__name__}, expected the (3, H, W) network "
                "input tensor; apply the transforms (ToModelTensor) before collating"
            )

    images, image_sizes, image_mask = pad_images([s.image for s in samples], size_divisibility)
    captions = [s.caption for s in samples]
    text = tokenizer(
        captions,
        padding="max_length" if pad_text_to == "max" else "longest",
        max_length=max_len,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = text["input_ids"].long()
    attention_mask = text["attention_mask"].long()
    length = input_ids.shape[1]

    targets = []
    for i, sample in enumerate(samples):
        positive_map = sample.positive_map
        if positive_map is None:
            positive_map = build_positive_map(tokenizer, sample.caption, sample.tokens_positive, max_len=max_len)
        if positive_map.shape[0] != sample.num_boxes:
            raise ValueError(
                f"{sample.image_path}: positive_map has {positive_map.shape[0]} rows for {sample.num_boxes} boxes"
            )
        positive_map = _fit_width(positive_map, length, sample.image_path)
        h, w = (int(v) for v in image_sizes[i])
        targets.append(GroundingTarget(sample.boxes, sample.labels, positive_map, (h, w)))

    return GroundingBatch(
        images=images,
        image_sizes=image_sizes,
        image_mask=image_mask,
        input_ids=input_ids,
        attention_mask=attention_mask,
        positive_map=torch.cat([t.positive_map for t in targets], dim=0),
        targets=targets,
        captions=captions,
        metadata=[dict(s.metadata) for s in samples],
    )


class GroundingCollator:
    """``collate_fn`` for a DataLoader: ``GroundingCollator(tokenizer, ...)(samples) -> GroundingBatch``."""

    def __init__(self, tokenizer: Any, max_len: int = 256, pad_text_to: str = "max", size_divisibility: int = 32):
        if pad_text_to not in ("max", "longest"):
            raise ValueError(f"pad_text_to must be 'max' or 'longest', got {pad_text_to!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pad_text_to = pad_text_to
        self.size_divisibility = size_divisibility

    def __call__(self, samples: Sequence[GroundingSample]) -> GroundingBatch:
        return collate_grounding(samples, self.tokenizer, self.max_len, self.pad_text_to, self.size_divisibility)
