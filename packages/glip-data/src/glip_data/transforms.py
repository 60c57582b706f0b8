"""Image transforms: the official test transform and the training augmentations.

Official pre-processing (docs/official_model.md#preprocessing): load as PIL RGB; resize the shorter side to
``min_size`` with the longer side capped at ``max_size`` (PIL bilinear, via torchvision); ``to_tensor``; reverse
channels to **BGR**; multiply by 255; normalise with the BGR mean/std below. The network input is therefore BGR on
a 0–255 scale; the official checkpoints expect exactly that. Images enter through :func:`glip_data.load_image`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .boxes import hflip_boxes
from .grounding import RandomSource
from .images import load_image
from .sample import GroundingSample

# Per-channel statistics in BGR order, 0-255 scale (cfg.INPUT.PIXEL_MEAN / PIXEL_STD of the official configs).
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (57.375, 57.120, 58.395)

# The official multi-scale training sizes (shorter side) and longer-side cap.
TRAIN_MIN_SIZES = (480, 560, 640, 720, 800)
TRAIN_MAX_SIZE = 1333


def get_resize_size(image_size: tuple[int, int], min_size: int, max_size: int | None) -> tuple[int, int]:
    """Output size of the official resize, as ``(new_w, new_h)``.

    The rules of the official ``Resize.get_size`` (docs/official_model.md#preprocessing), rounding included:

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

    Raises:
        ValueError: a size is not positive, or the image is so elongated that a side of the result would be 0 pixels
            (e.g. a 1x4000 image at 800/1333: the short side becomes ``round(1333 / 4000) = 0``).
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
    new_w, new_h = (size, int(size * h / w)) if w < h else (int(size * w / h), size)
    if new_w < 1 or new_h < 1:
        raise ValueError(
            f"image size (w, h) = ({w}, {h}) cannot be resized with min_size={min_size}, max_size={max_size}: the "
            f"result {new_w}x{new_h} has a zero side (aspect ratio {max(w, h) / min(w, h):.0f}:1)"
        )
    return new_w, new_h


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> ``(3, H, W)`` float32 network input: BGR, ×255, normalised (official order of operations)."""
    tensor = TF.to_tensor(image)[[2, 1, 0]] * 255
    return TF.normalize(tensor, mean=list(PIXEL_MEAN_BGR), std=list(PIXEL_STD_BGR))


class TestTransform:
    """The official test-time transform: PIL image -> ``(3, H, W)`` normalised BGR tensor.

    Args:
        min_size: shorter side after resizing (official test: 800).
        max_size: cap on the longer side (official: 1333).

    Call with anything :func:`glip_data.load_image` accepts (a PIL image of any mode, a numpy array, a path,
    encoded bytes); it is loaded with that function and raises its :class:`~glip_data.ImageLoadError`. An image
    :func:`~glip_data.load_image` returned is taken in the frame it was loaded in; anything else is read upright. Pad a batch of outputs with :func:`glip_data.collate.pad_images`.
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
        return to_model_tensor(self.resize(load_image(image)))

    def __repr__(self) -> str:
        return f"TestTransform(min_size={self.min_size}, max_size={self.max_size})"


# --- training transforms on GroundingSample ---------------------------------------------------------------------


def _image_size(sample: GroundingSample) -> tuple[int, int]:
    """(w, h) of the sample's decoded image, checked against the recorded width/height."""
    image = sample.image
    if image is None:
        raise ValueError(f"{sample.image_path}: the sample has no decoded image (sample.image is None); load it first")
    if isinstance(image, Image.Image):
        size = image.size
    elif isinstance(image, torch.Tensor) and image.dim() == 3:
        size = (int(image.shape[2]), int(image.shape[1]))
    else:
        raise TypeError(f"{sample.image_path}: sample.image must be a PIL image or a (3, H, W) tensor")
    if size != (sample.width, sample.height):
        raise ValueError(
            f"{sample.image_path}: the image is {size[0]}x{size[1]} but the sample records "
            f"width={sample.width}, height={sample.height}"
        )
    return size


class RandomResize:
    """Multi-scale training resize: shorter side drawn from ``min_sizes``, longer side capped at ``max_size``.

    The image is resized with PIL bilinear (official rules, :func:`get_resize_size`); boxes are scaled by
    ``(new_w / w, new_h / h)``; ``width``/``height`` become the new size and the original size is kept in
    ``metadata["orig_size"]`` (``(w, h)``, set once).

    Args:
        min_sizes: candidate shorter sides (official: 480, 560, 640, 720, 800); one int for a fixed size.
        max_size: longer-side cap (official 1333).
        rng: random source (see :class:`glip_data.grounding.RandomSource`).
    """

    def __init__(self, min_sizes: int | Sequence[int] = TRAIN_MIN_SIZES, max_size: int | None = TRAIN_MAX_SIZE,
                 rng: Any = None) -> None:
        self.min_sizes = (min_sizes,) if isinstance(min_sizes, int) else tuple(min_sizes)
        if not self.min_sizes:
            raise ValueError("min_sizes is empty")
        self.max_size = max_size
        self.rng = RandomSource(rng)

    def __call__(self, sample: GroundingSample) -> GroundingSample:
        w, h = _image_size(sample)
        if not isinstance(sample.image, Image.Image):
            raise TypeError(f"{sample.image_path}: RandomResize works on PIL images (resize before ToModelTensor)")
        new_w, new_h = get_resize_size((w, h), self.rng.choice(self.min_sizes), self.max_size)
        image = TF.resize(sample.image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR)
        scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=torch.float32)
        metadata = dict(sample.metadata)
        metadata.setdefault("orig_size", (w, h))
        return replace(sample, image=image, boxes=sample.boxes * scale, width=new_w, height=new_h, metadata=metadata)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", flags=re.IGNORECASE)


def _match_case(template: str, word: str) -> str:
    if template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word.capitalize()
    return word


def swap_left_right(caption: str, tokens_positive: Sequence[Sequence[tuple[int, int]]]
                    ) -> tuple[str, list[list[tuple[int, int]]]]:
    """Swap the whole words "left" and "right" in a caption (case kept) and move the spans accordingly.

    "left" and "right" differ in length, so every character span after a swapped word shifts; a span boundary
    inside a swapped word (unusual) is moved to the word's start (for starts) or end (for ends).

    Returns:
        ``(new_caption, new_tokens_positive)``.
    """
    edits = []  # (start, end, replacement) in the old caption
    for m in _LEFT_RIGHT.finditer(caption):
        new = "right" if m.group().lower() == "left" else "left"
        edits.append((m.start(), m.end(), _match_case(m.group(), new)))
    if not edits:
        return caption, [list(spans) for spans in tokens_positive]

    pieces, cursor = [], 0
    new_bounds = []  # (old start, old end, new start, new end) per edit
    shift = 0
    for start, end, text in edits:
        pieces.append(caption[cursor:start])
        pieces.append(text)
        new_bounds.append((start, end, start + shift, start + shift + len(text)))
        shift += len(text) - (end - start)
        cursor = end
    pieces.append(caption[cursor:])
    new_caption = "".join(pieces)

    def move(pos: int, is_end: bool) -> int:
        delta = 0
        for old_s, old_e, new_s, new_e in new_bounds:
            if old_s < pos < old_e:  # inside a swapped word
                return new_e if is_end else new_s
            if pos >= old_e:
                delta = new_e - old_e
        return pos + delta

    new_spans = [[(move(s, False), move(e, True)) for s, e in spans] for spans in tokens_positive]
    return new_caption, new_spans


class RandomHorizontalFlip:
    """Flip the image and its boxes left-right with probability ``prob`` (official 0.5).

    Args:
        prob: flip probability.
        swap_left_right: also swap the words "left"/"right" in the caption and move the spans (see
            :func:`swap_left_right`). Off by default: the official code flips grounding data without touching the
            caption (docs/official_model.md#quirks item 17), which teaches the model wrong left/right groundings.
        legacy: box convention of :func:`glip_data.hflip_boxes` (official: True, ``x1' = W - x2 - 1``).
        rng: random source.

    A computed ``positive_map`` is dropped when the caption changes (recompute it at collation).
    """

    def __init__(self, prob: float = 0.5, swap_left_right: bool = False, legacy: bool = True,
                 rng: Any = None) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        self.prob = prob
        self.swap_left_right = swap_left_right
        self.legacy = legacy
        self.rng = RandomSource(rng)

    def __call__(self, sample: GroundingSample) -> GroundingSample:
        if not self.rng.random() < self.prob:
            return sample
        return self.flip(sample)

    def flip(self, sample: GroundingSample) -> GroundingSample:
        """Flip unconditionally."""
        w, _ = _image_size(sample)
        image = TF.hflip(sample.image)  # PIL or tensor
        boxes = hflip_boxes(sample.boxes, width=w, legacy=self.legacy)
        caption, spans, positive_map = sample.caption, sample.tokens_positive, sample.positive_map
        if self.swap_left_right:
            caption, spans = swap_left_right(caption, spans)
            if caption != sample.caption:
                positive_map = None
        metadata = dict(sample.metadata)
        metadata["hflip"] = not metadata.get("hflip", False)
        return replace(sample, image=image, boxes=boxes, caption=caption, tokens_positive=spans,
                       positive_map=positive_map, metadata=metadata)


class ToModelTensor:
    """PIL image -> ``(3, H, W)`` normalised BGR tensor (:func:`to_model_tensor`), on a GroundingSample."""

    def __call__(self, sample: GroundingSample) -> GroundingSample:
        _image_size(sample)
        # the pixels stay as they are (no EXIF rotation here): the boxes refer to them
        image = load_image(sample.image, where=sample.image_path, frame="stored")
        return replace(sample, image=to_model_tensor(image))


class Compose:
    """Apply callables ``GroundingSample -> GroundingSample`` in order."""

    def __init__(self, transforms: Sequence[Callable[[GroundingSample], GroundingSample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: GroundingSample) -> GroundingSample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(type(t).__name__ for t in self.transforms)
        return f"Compose([{inner}])"


def train_transforms(
    min_sizes: int | Sequence[int] = TRAIN_MIN_SIZES,
    max_size: int | None = TRAIN_MAX_SIZE,
    flip_prob: float = 0.5,
    swap_left_right: bool = False,
    legacy: bool = True,
    rng: Any = None,
) -> Compose:
    """The official training pipeline: multi-scale resize, horizontal flip, then BGR×255 normalisation.

    One random source drives both random steps (pass an int seed for reproducibility; the default None uses the
    global :mod:`random`, which DataLoader workers re-seed).
    """
    source = RandomSource(rng)
    return Compose([
        RandomResize(min_sizes, max_size, rng=source),
        RandomHorizontalFlip(flip_prob, swap_left_right=swap_left_right, legacy=legacy, rng=source),
        ToModelTensor(),
    ])
