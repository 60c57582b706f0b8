"""The one sample type that every reader produces: detection, grounding and caption data alike.

GLIP's central idea is that detection is context-free grounding: every record becomes an image, boxes, a text,
and, for every box, the character spans of the text it matches. The token-level positive map is derived from
those spans once a tokenizer is known (:func:`glip_data.positive_map.build_positive_map`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Span = tuple[int, int]


@dataclass
class GroundingSample:
    """One image with its boxes and the text they ground to.

    Attributes:
        image_path: where the image lives (a local path; readers resolve it against the dataset's image root).
        width, height: size of the image in pixels, as recorded by the annotation (checked when the image loads).
        boxes: ``(K, 4)`` float32, xyxy in image pixels.
        caption: the text. For detection data it is a prompt built from category names.
        tokens_positive: for each of the K boxes, the list of ``(start, end)`` character spans of ``caption`` it
            matches (end exclusive). An empty list means the box grounds to nothing in this caption.
        labels: ``(K,)`` int64 contiguous category ids (1-based) for detection data; 1 for every box of grounding
            and caption data, as the official code does.
        positive_map: ``(K, max_text_len)`` bool, filled once a tokenizer is applied; None before.
        image: the decoded image (``PIL.Image`` RGB or a ``(3, H, W)`` tensor) once loaded; None before.
        metadata: dataset name, image id, original ids, phrase info for evaluation, and anything a reader keeps.
    """

    image_path: str
    width: int
    height: int
    boxes: torch.Tensor
    caption: str
    tokens_positive: list[list[Span]]
    labels: torch.Tensor
    positive_map: torch.Tensor | None = None
    image: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if len(self.tokens_positive) != len(self.boxes) or len(self.labels) != len(self.boxes):
            raise ValueError(
                f"{self.image_path}: {len(self.boxes)} boxes but {len(self.tokens_positive)} span lists and "
                f"{len(self.labels)} labels"
            )
        for spans in self.tokens_positive:
            for start, end in spans:
                if not (0 <= start < end <= len(self.caption)):
                    raise ValueError(
                        f"{self.image_path}: span ({start}, {end}) is outside the caption of length "
                        f"{len(self.caption)}: {self.caption!r}"
                    )

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def phrases(self) -> list[str]:
        """The text each box grounds to (its spans joined by a space)."""
        return [" ".join(self.caption[s:e] for s, e in spans) for spans in self.tokens_positive]
