"""The only interface the evaluation runner uses to talk to a model (so any detector, or a test double, fits)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Detector"]


@runtime_checkable
class Detector(Protocol):
    """What :func:`glip_train.evaluation.evaluate` needs from a model (``glip_train.GLIP`` implements it).

    Both methods return one dict per image: ``"boxes"`` ``(K, 4)`` xyxy in input-image pixels (GLIP's legacy
    inclusive-pixel boxes, as the official post-processing produces them), ``"scores"`` ``(K,)``, ``"labels"``
    ``(K,)`` int, the 0-based index into ``classes`` (detect) or into the image's phrases (ground). Tensors or arrays.
    """

    def detect(
        self,
        images: Sequence[Any],
        classes: Sequence[str],
        *,
        threshold: float,
        max_detections: int | None,
        max_detections_per_prompt: int,
        classes_per_prompt: int,
        batch_size: int,
        min_size: int | None,
        max_size: int | None,
    ) -> list[dict[str, Any]]:
        """Detect ``classes`` (shared by every image); long lists run as several prompts of at most
        ``classes_per_prompt`` classes (0: only the 256-token limit), each capped at ``max_detections_per_prompt``
        detections, then merged and capped at ``max_detections`` per image (``None``: no cap)."""
        ...

    def ground(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        phrases: Sequence[Sequence[str]],
        *,
        threshold: float,
        max_detections: int | None,
        batch_size: int,
        min_size: int | None,
        max_size: int | None,
    ) -> list[dict[str, Any]]:
        """Ground ``phrases[i]`` (each located at its first occurrence in ``captions[i]``) in image ``i``."""
        ...
