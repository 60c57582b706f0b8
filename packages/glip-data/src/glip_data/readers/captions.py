"""Captions with pseudo-labels (GLIP's Cap4M/Cap24M data, docs/official_model.md#caption-data) as JSON Lines.

One image per line::

    {"image": "cc3m/000123.jpg", "width": 500, "height": 375,
     "caption": "a dog runs after a red ball",
     "entities": [{"phrase": "a dog", "tokens_positive": [[0, 5]],
                   "boxes": [[10, 20, 210, 300]], "scores": [0.93]},
                  {"phrase": "a red ball", "tokens_positive": [[16, 26]],
                   "boxes": [[300, 200, 340, 240], [20, 30, 40, 50]], "scores": [0.81, 0.32]}]}

Boxes are absolute ``[x1, y1, x2, y2]`` in continuous coordinates (``x2 = x + w``), like ODVG; ``phrase`` is
informational. Entities group boxes (the official "v2" layout): an entity's spans apply to all its boxes, and the
reader flattens them to one box per row. ``boxes``/``scores`` may be absent: a caption-only line (input of
pseudo-labelling) then has entities with spans only.

Filtering as the official caption loader: a box is kept when its score is **strictly greater** than
``score_threshold`` (``CAPTION_CONF``, 0.5 in the GLIP-L config); a line with fewer than ``min_boxes`` kept boxes
(``CAPTION_MIN_BOX = 1``) is left out (the official loader resamples another image instead; a map-style dataset
drops it at construction, which is equivalent), counted as ``too_few_boxes``. Every box gets label 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glip_data.boxes import convert_xyxy
from glip_data.readers.base import (
    GroundingReader,
    ReaderError,
    _is_box,
    _is_number,
    as_boxes_tensor,
    check_spans,
    is_legacy,
    iter_jsonl,
    require,
    sanitize_boxes,
)
from glip_data.sample import GroundingSample


def caption_record(
    image: str,
    width: int,
    height: int,
    caption: str,
    entities: list[dict[str, Any]],
    *,
    box_convention: str = "official",
    **extra: Any,
) -> dict[str, Any]:
    """Build one caption line (e.g. from a pseudo-labeller's predictions).

    Args:
        entities: dicts with ``tokens_positive`` (list of ``[start, end)``), optional ``phrase``, and optionally
            ``boxes`` (``(n, 4)`` xyxy in ``box_convention``, e.g. a model's output) and ``scores`` (``n``).
        box_convention: the convention of the given boxes; they are stored as continuous xyxy, so reading the line
            back with the same convention returns the same boxes.
        **extra: more top-level fields to store (e.g. ``image_id``).
    """
    legacy = is_legacy(box_convention)
    out_entities = []
    for ent in entities:
        spans = check_spans([list(s) for s in ent["tokens_positive"]], caption, f"entity {ent.get('phrase')!r}")
        out: dict[str, Any] = {}
        if "phrase" in ent:
            out["phrase"] = ent["phrase"]
        out["tokens_positive"] = [list(s) for s in spans]
        if ent.get("boxes") is not None:
            boxes = np.asarray(ent["boxes"], dtype=np.float64).reshape(-1, 4)
            scores = np.asarray(ent.get("scores", np.ones(len(boxes))), dtype=np.float64).reshape(-1)
            if len(scores) != len(boxes):
                raise ValueError(f"entity {ent.get('phrase')!r}: {len(boxes)} boxes but {len(scores)} scores")
            out["boxes"] = convert_xyxy(boxes, from_legacy=legacy, to_legacy=False).tolist()
            out["scores"] = scores.tolist()
        out_entities.append(out)
    return {"image": image, "width": int(width), "height": int(height), "caption": caption,
            "entities": out_entities, **extra}


class CaptionReader(GroundingReader):
    """A pseudo-labelled caption ``.jsonl`` file as :class:`GroundingSample` s.

    Args:
        ann_file: the JSON Lines file (optionally gzipped).
        image_root: directory ``image`` is relative to.
        score_threshold: keep boxes with ``score > score_threshold`` (boxes without scores count as 1.0).
        min_boxes: leave out lines with fewer kept boxes (``0`` keeps caption-only lines).
        **kwargs: :class:`~glip_data.readers.base.GroundingReader` options.
    """

    task = "caption"

    def __init__(self, ann_file, image_root=None, *, score_threshold: float = 0.5, min_boxes: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(ann_file, image_root, **kwargs)
        self.score_threshold = float(score_threshold)
        self.min_boxes = int(min_boxes)
        self._records: list[tuple] = []
        owner: list[int] = []
        boxes: list = []
        scores: list[float] = []
        spans: list = []
        entity_index: list[int] = []
        for lineno, rec in iter_jsonl(self.ann_file):
            where = f"{self.ann_file}: line {lineno}"
            require(rec, ("image", "width", "height", "caption"), where)
            w, h, caption = rec["width"], rec["height"], rec["caption"]
            line = f"line {lineno}"
            if not self.check.image_size(w, h, line) or not self.check.caption(caption, line) \
                    or self.check.file_name(rec["image"], line, key="image") is None:
                continue
            entities = rec.get("entities", [])
            if not isinstance(entities, list):
                self._problem("bad_record", f"line {lineno}: 'entities' must be a list")
                continue
            k = len(self._records)
            rec_boxes, rec_scores, rec_spans, rec_ent = [], [], [], []
            ok = True
            entity_spans = []
            for e, ent in enumerate(entities):
                ewhere = f"{where} entity {e}"
                try:
                    require(ent, ("tokens_positive",), ewhere)
                    ent_spans = check_spans(ent["tokens_positive"], caption, ewhere)
                    ent_boxes = ent.get("boxes", [])
                    ent_scores = ent.get("scores", [1.0] * len(ent_boxes) if isinstance(ent_boxes, list) else None)
                    if not isinstance(ent_boxes, list) or not all(_is_box(b) for b in ent_boxes):
                        raise ReaderError(f"{ewhere}: 'boxes' must be a list of [x1, y1, x2, y2]")
                    if not isinstance(ent_scores, list) or len(ent_scores) != len(ent_boxes) \
                            or not all(_is_number(s) for s in ent_scores):
                        raise ReaderError(f"{ewhere}: 'scores' must be one number per box")
                except ReaderError as err:
                    if self.errors == "raise":
                        raise
                    self._problem("bad_entity", str(err).removeprefix(f"{self.ann_file}: "))
                    ok = False
                    break
                entity_spans.append([list(s) for s in ent_spans])
                for b, s in zip(ent_boxes, ent_scores):
                    rec_boxes.append(b)
                    rec_scores.append(float(s))
                    rec_spans.append(ent_spans)
                    rec_ent.append(e)
            if not ok:
                continue
            passing = sum(1 for s in rec_scores if s > self.score_threshold)
            self._count("box_below_score_threshold", len(rec_scores) - passing)
            if passing < self.min_boxes:
                self.stats["too_few_boxes"] += 1
                continue
            extras = {"entities_tokens_positive": entity_spans}
            if "image_id" in rec:
                extras["image_id"] = rec["image_id"]
            self._records.append((lineno, rec["image"], int(w), int(h), caption, extras))
            for b, s, sp, e in zip(rec_boxes, rec_scores, rec_spans, rec_ent):
                if s > self.score_threshold:
                    owner.append(k)
                    boxes.append(b)
                    scores.append(s)
                    spans.append(sp)
                    entity_index.append(e)
        raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        owner_arr = np.asarray(owner, dtype=np.int64)
        sizes = np.asarray([(r[2], r[3]) for r in self._records], dtype=np.float64).reshape(-1, 2)
        internal = convert_xyxy(raw, from_legacy=False, to_legacy=self.legacy)
        clipped, keep = sanitize_boxes(internal, sizes[owner_arr], self.box_convention, self.stats,
                                       input_wh=raw[:, 2:] - raw[:, :2], on_drop=self._line_box_namer(owner, boxes))
        order = np.nonzero(keep)[0]  # already grouped by line
        self._boxes = clipped[order].astype(np.float32)
        self._scores = np.asarray(scores, dtype=np.float32)[order] if scores else np.zeros(0, np.float32)
        self._spans = [spans[i] for i in order]
        self._entity = [entity_index[i] for i in order]
        counts = self._group_boxes(owner_arr[order], len(self._records))
        # A line whose boxes were all removed by box sanitising now has too few too.
        self._select_records(counts, self.min_boxes, "too_few_boxes")

    def image_path(self, index: int) -> Path:
        return self.resolve_path(self._records[int(self._order[index])][1])

    def _build_sample(self, index: int) -> GroundingSample:
        k, start, end = self._record_boxes(index)
        lineno, image, width, height, caption, extras = self._records[k]
        metadata = {
            "dataset": self.dataset_name,
            "task": self.task,
            "image_id": extras.get("image_id", lineno),
            "line": lineno,
            "file_name": image,
            "box_convention": self.box_convention,
            "scores": self._scores[start:end].tolist(),
            "entity_index": self._entity[start:end],
            "entities_tokens_positive": extras["entities_tokens_positive"],
        }
        return GroundingSample(
            image_path=str(self.resolve_path(image)),
            width=width,
            height=height,
            boxes=as_boxes_tensor(self._boxes[start:end]),
            caption=caption,
            tokens_positive=[list(s) for s in self._spans[start:end]],
            labels=torch.ones(end - start, dtype=torch.int64),
            metadata=metadata,
        )

    def caption_texts(self) -> list[str]:
        """The captions of the lines this reader yields, in order (the pool negative captions are drawn from)."""
        return [self._records[int(k)][4] for k in self._order]

    def summary(self) -> dict[str, Any]:
        return {"captions": len(self), "boxes": self.num_boxes, "score_threshold": self.score_threshold,
                "min_boxes": self.min_boxes}


__all__ = ["CaptionReader", "caption_record"]
