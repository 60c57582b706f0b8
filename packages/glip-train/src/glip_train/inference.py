"""Detection and grounding: processor -> network -> processor, each passed in explicitly.

:func:`detect` and :func:`ground` (also :meth:`glip_train.GLIP.detect` / :meth:`glip_train.GLIP.ground`, which pass
the model and its :attr:`~glip_train.GLIP.processor`) build the prompts with the :class:`~glip_train.GLIPProcessor`,
run :func:`predict` and merge the detections of every image. :func:`predict` is the one inference loop: per batch of
images the image encoder runs **once**, then every round of prompts (one prompt per image and round, for long
vocabularies split into several prompts) runs the text encoder, the fusion tower and the head on the same image
features, and the processor post-processes the network's output.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .postprocess import Detections
from .processing_glip import GLIPProcessor, ImageInput, TextQuery

__all__ = ["detect", "ground", "predict"]


def _as_list(images: Any) -> list:
    if isinstance(images, (str, Path, Image.Image, np.ndarray, bytes)):
        return [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    return images


def _check_options(threshold: Any, max_detections: Any, max_detections_per_prompt: Any, batch_size: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] (scores are probabilities); got {threshold!r}")
    for name, value in (("max_detections", max_detections), ("max_detections_per_prompt", max_detections_per_prompt)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None (no cap); got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(
    model: Any,
    processor: GLIPProcessor,
    images: Sequence[ImageInput],
    queries: Sequence[TextQuery],
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    batch_size: int = 1,
    pad_text_to_max: bool = False,
    dtype: torch.dtype | None = None,
    max_detections_per_prompt: int | None = -1,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[Detections]]:
    """Run every query; returns, per image, the detections of each of its queries in input-image pixels with
    labels already mapped to the image's class list.

    Args:
        model: the network, a :class:`glip_train.GLIP`.
        processor: its :class:`~glip_train.GLIPProcessor` (``model.processor``).
        images: the images (any :data:`ImageInput`).
        queries: prompts, each naming its image (:class:`TextQuery`).
        min_size, max_size: the test-time resize (None: the model's ``config.test_min_size`` / ``test_max_size``,
            800 / 1333 for the official checkpoints).
        batch_size: images per forward pass.
        pad_text_to_max: pad the text to 256 tokens (official; the same valid outputs, slower).
        dtype: autocast dtype for the network (post-processing stays in float32).
        max_detections_per_prompt: the cap applied to each prompt's detections (None: no cap; -1: the model's
            post-processing config).
        on_batch: called with the number of images after each batch (progress bars).
    """
    device = model.device
    per_image: list[list[Detections]] = [[] for _ in images]
    by_image: dict[int, list[TextQuery]] = {}
    for query in queries:
        by_image.setdefault(query.image_index, []).append(query)
    for start in range(0, len(images), batch_size):
        index = list(range(start, min(start + batch_size, len(images))))
        batch = processor.preprocess([images[i] for i in index], min_size, max_size)
        with _autocast(device, dtype):
            features = model.encode_images(batch.pixel_values.to(device))
        rounds = max((len(by_image.get(i, [])) for i in index), default=0)
        for r in range(rounds):
            members = [j for j, i in enumerate(index) if r < len(by_image.get(i, []))]
            round_queries = [by_image[index[j]][r] for j in members]
            input_ids, attention_mask = processor.tokenize([q.text for q in round_queries], pad_to_max=pad_text_to_max)
            sizes = [batch.image_sizes[j] for j in members]
            subset = features if len(members) == len(index) else [f[members] for f in features]
            with _autocast(device, dtype):
                out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                            image_sizes=sizes, image_features=subset)
            detections = processor.post_process(out, [q.class_tokens for q in round_queries],
                                                max_detections=max_detections_per_prompt)
            for j, query, det in zip(members, round_queries, detections):
                per_image[index[j]].append(processor.to_input_frame(det, batch.image_sizes[j],
                                                                    batch.original_sizes[j], query.labels))
        if on_batch is not None:
            on_batch(len(index))
    return per_image


def detect(
    model: Any,
    processor: GLIPProcessor,
    images: ImageInput | Sequence[ImageInput],
    classes: Any = None,
    prompt: Any = None,
    threshold: float = 0.5,
    max_detections: int | None = 100,
    min_size: int | None = None,
    max_size: int | None = None,
    *,
    max_detections_per_prompt: int | None | str = "same",
    batch_size: int = 1,
    classes_per_prompt: int | None = 40,
    pad_text_to_max: bool = False,
    dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot detection of the given classes.

    Args:
        model: the network, a :class:`glip_train.GLIP`.
        processor: its :class:`~glip_train.GLIPProcessor` (``model.processor``).
        images: one image or a list (paths, PIL images, arrays or encoded bytes; any sizes).
        classes: class names shared by every image, or one list per image. Long lists are split into prompts of at
            most ``classes_per_prompt`` classes (and 256 tokens) and the detections merged.
        prompt: instead of ``classes``, a detection prompt such as ``"person. bicycle. a red umbrella."`` (one for
            all images, or one per image); its ``.``-separated phrases are the classes.
        threshold: keep detections whose final score is at least this (0.0 keeps every post-processed one).
        max_detections: per image, after merging prompts (official rule: scores >= the k-th best; ties may keep a
            few more); None = no cap.
        min_size, max_size: test-time resize (shorter side, longer-side cap).
        max_detections_per_prompt: the cap of each prompt's own post-processing (official LVIS: 300 per chunk);
            "same" = ``max_detections``; None = no cap.
        batch_size: images per forward pass.
        classes_per_prompt: chunk size for long vocabularies (official LVIS protocol: 40). ``None`` or 0: no class
            limit, only the 256-token limit (the official COCO protocol runs its 80 classes as one prompt).
        pad_text_to_max: pad text to 256 tokens as the official code does (slower, same valid outputs).
        dtype: run the network under autocast in this dtype (``torch.bfloat16`` / ``torch.float16``).
        on_batch: progress callback (number of images done in each batch).

    Returns:
        one dict per image: ``boxes (K, 4)`` xyxy in input-image pixels, ``scores (K,)``, ``labels (K,)`` int64
        (0-based index into the image's classes), ``text_labels`` (list of class names).
    """
    per_prompt = max_detections if max_detections_per_prompt == "same" else max_detections_per_prompt
    _check_options(threshold, max_detections, per_prompt, batch_size)
    images = _as_list(images)
    queries, names = processor.detection_queries(len(images), classes, prompt, classes_per_prompt)
    parts = predict(model, processor, images, queries, min_size=min_size, max_size=max_size, batch_size=batch_size,
                    pad_text_to_max=pad_text_to_max, dtype=dtype, max_detections_per_prompt=per_prompt,
                    on_batch=on_batch)
    return [processor.to_results(p, n, threshold, max_detections) for p, n in zip(parts, names)]


def ground(
    model: Any,
    processor: GLIPProcessor,
    images: ImageInput | Sequence[ImageInput],
    captions: str | Sequence[str],
    phrases: Any = None,
    threshold: float = 0.5,
    max_detections: int | None = 100,
    min_size: int | None = None,
    max_size: int | None = None,
    *,
    batch_size: int = 1,
    pad_text_to_max: bool = False,
    dtype: torch.dtype | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Phrase grounding: one caption per image; each phrase is located at its first occurrence in its caption.

    Args:
        captions: one caption per image (a single string for a single image).
        phrases: the entities to ground, each of which must occur in its caption: one list per image, or one flat
            list shared by every image (as ``classes`` in :func:`detect`); None extracts noun phrases with the
            offline rule-based chunker (``glip_data.find_noun_phrases``).
        Other arguments as :func:`detect`.

    Returns:
        as :func:`detect`, with ``labels`` indexing the image's phrases and ``text_labels`` the phrases.
    """
    _check_options(threshold, max_detections, max_detections, batch_size)
    images = _as_list(images)
    captions = [captions] if isinstance(captions, str) else list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: pass one caption per image")
    queries, names = processor.grounding_queries(captions, phrases)
    parts = predict(model, processor, images, queries, min_size=min_size, max_size=max_size, batch_size=batch_size,
                    pad_text_to_max=pad_text_to_max, dtype=dtype, max_detections_per_prompt=max_detections,
                    on_batch=on_batch)
    return [processor.to_results(p, n, threshold, max_detections) for p, n in zip(parts, names)]
