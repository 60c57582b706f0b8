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

from collections import Counter
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
        entities: dicts with ``tokens_positive`` (list of ``[start, end)``), optional ``phrase`` and ``category_id``
            (the class of a class-list pseudo-label), and optionally
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
        if ent.get("category_id") is not None:  # a class-list pseudo-label: the class's id
            out["category_id"] = int(ent["category_id"])
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


def parse_entities(entities: Any, caption: str, where: str) -> tuple[list[list[list[int]]], list[tuple]]:
    """Check a caption line's entities: ``(spans of every entity, one row per box: (box, score, spans, entity
    index))``. Boxes without scores score 1.0.

    Raises:
        ReaderError: naming the first entity that is malformed (``where`` entity ``e``: what is wrong).
    """
    if not isinstance(entities, list):
        raise ReaderError(f"{where}: 'entities' must be a list")
    entity_spans, rows = [], []
    for e, ent in enumerate(entities):
        ewhere = f"{where} entity {e}"
        require(ent, ("tokens_positive",), ewhere)
        spans = check_spans(ent["tokens_positive"], caption, ewhere)
        boxes = ent.get("boxes", [])
        scores = ent.get("scores", [1.0] * len(boxes) if isinstance(boxes, list) else None)
        if not isinstance(boxes, list) or not all(_is_box(b) for b in boxes):
            raise ReaderError(f"{ewhere}: 'boxes' must be a list of [x1, y1, x2, y2]")
        if not isinstance(scores, list) or len(scores) != len(boxes) or not all(_is_number(x) for x in scores):
            raise ReaderError(f"{ewhere}: 'scores' must be one number per box")
        entity_spans.append([list(s) for s in spans])
        rows.extend((box, float(score), spans, e) for box, score in zip(boxes, scores))
    return entity_spans, rows


def caption_record_to_sample(record: dict[str, Any], image_path: str, where: str, *, score_threshold: float = 0.5,
                             min_boxes: int = 1, box_convention: str = "official",
                             stats: Counter | None = None) -> GroundingSample | None:
    """One caption line (a record of a pseudo-labelled shard) as a sample, filtered as :class:`CaptionReader`
    filters a file: boxes scoring above ``score_threshold``, clipped to the image; None when fewer than
    ``min_boxes`` remain (counted in ``stats`` as ``too_few_boxes``).

    Raises:
        ReaderError: a malformed record, naming ``where``.
    """
    stats = stats if stats is not None else Counter()
    require(record, ("width", "height", "caption"), where)
    width, height, caption = record["width"], record["height"], record["caption"]
    if not _is_number(width) or not _is_number(height) or width <= 0 or height <= 0:
        raise ReaderError(f"{where}: bad image size {width!r} x {height!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise ReaderError(f"{where}: empty caption")
    entity_spans, rows = parse_entities(record.get("entities", []), caption, where)
    kept = [row for row in rows if row[1] > score_threshold]
    if len(rows) > len(kept):
        stats["box_below_score_threshold"] += len(rows) - len(kept)
    raw = np.asarray([row[0] for row in kept], dtype=np.float64).reshape(-1, 4)
    internal = convert_xyxy(raw, from_legacy=False, to_legacy=is_legacy(box_convention))
    sizes = np.tile(np.asarray([[width, height]], dtype=np.float64), (len(kept), 1))
    clipped, keep = sanitize_boxes(internal, sizes, box_convention, stats, input_wh=raw[:, 2:] - raw[:, :2])
    kept = [row for row, ok in zip(kept, keep) if ok]
    if len(kept) < min_boxes:
        stats["too_few_boxes"] += 1
        return None
    metadata = {"task": "caption", "file_name": record.get("image"), "box_convention": box_convention,
                "scores": [row[1] for row in kept], "entity_index": [row[3] for row in kept],
                "entities_tokens_positive": entity_spans}
    if record.get("image_id") is not None:
        metadata["image_id"] = record["image_id"]
    return GroundingSample(
        image_path=image_path,
        width=int(width),
        height=int(height),
        boxes=as_boxes_tensor(clipped[keep].astype(np.float32)),
        caption=caption,
        tokens_positive=[[tuple(s) for s in row[2]] for row in kept],
        labels=torch.ones(len(kept), dtype=torch.int64),
        metadata=metadata,
    )


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
            try:
                entity_spans, rows = parse_entities(entities, caption, where)
            except ReaderError as err:
                if self.errors == "raise":
                    raise
                self._problem("bad_entity", str(err).removeprefix(f"{self.ann_file}: "))
                continue
            rec_boxes = [row[0] for row in rows]
            rec_scores = [row[1] for row in rows]
            rec_spans = [row[2] for row in rows]
            rec_ent = [row[3] for row in rows]
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


__all__ = ["CaptionReader", "caption_record", "caption_record_to_sample", "parse_entities"]
