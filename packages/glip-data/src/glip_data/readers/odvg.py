"""ODVG JSON Lines (Open-GroundingDino / MM-Grounding-DINO): one image per line, detection or grounding.

Every line has ``filename`` (relative to the image root), ``height``, ``width`` and one of

* ``detection.instances[]``: ``bbox`` ``[x1, y1, x2, y2]`` (absolute, continuous), ``label`` (an index into the
  label map ``{"0": "person", ...}``), ``category`` (the name, informational);
* ``grounding``: ``caption`` and ``regions[]`` with ``bbox`` (one xyxy box or a list of them), ``phrase`` (a string or
  a list of fragments) and ``tokens_positive`` (``[start, end)`` spans into the caption; when absent, the phrase's
  fragments are searched in the caption left to right, and a phrase that is not found is a problem).

A line with neither block is an image without annotations (pseudo-labelling input); it is kept and counted.
An instance or region with ``"iscrowd": 1`` (an extra key our converter writes for COCO crowd boxes) is flagged like
COCO crowd boxes: kept in ``metadata["crowd_boxes"]``, not a training box.

Detection lines become detection samples exactly like :class:`~glip_data.readers.coco.COCODetection`: caption = the
detection prompt of all label-map names, labels ``1..K`` in label-map key order (``reader.categories``), each box
grounded to its name. Grounding lines become grounding samples (caption verbatim, label 1 per box). The label map comes
from ``label_map`` (a file or a dict) or, when not given, from the ``category`` names of the detection instances.
The file is read by content, not by extension (MM-GDINO names its jsonl files ``*.json``).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from glip_data.readers.base import (
    GroundingReader,
    ReaderError,
    _is_box,
    _is_image_size,
    as_boxes_tensor,
    check_spans,
    file_xyxy_to_internal,
    iter_jsonl,
    read_json,
    require,
    sanitize_boxes,
)
from glip_data.sample import GroundingSample


def load_label_map(label_map: str | os.PathLike | dict | None) -> dict[int, str] | None:
    """A label map file or dict (``{"0": "person", ...}``) as ``{int: name}``; ``None`` passes through."""
    if label_map is None:
        return None
    source = label_map if isinstance(label_map, dict) else read_json(label_map)
    where = "label_map" if isinstance(label_map, dict) else str(label_map)
    if not isinstance(source, dict) or not source:
        raise ReaderError(f"{where}: a label map must be a non-empty JSON object {{\"0\": \"name\", ...}}")
    out: dict[int, str] = {}
    for key, name in source.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise ReaderError(f"{where}: label map key {key!r} is not an integer") from None
        if not isinstance(name, str) or not name.strip():
            raise ReaderError(f"{where}: label {key!r} has no usable name: {name!r}")
        out[idx] = name
    return out


def find_phrase_spans(caption: str, phrase: str | list[str]) -> list[tuple[int, int]] | None:
    """Spans of a phrase (or of its fragments, searched left to right) in ``caption``; ``None`` if not found."""
    fragments = [phrase] if isinstance(phrase, str) else list(phrase)
    spans, cursor = [], 0
    for frag in fragments:
        if not isinstance(frag, str) or not frag:
            return None
        start = caption.find(frag, cursor)
        if start < 0:
            return None
        spans.append((start, start + len(frag)))
        cursor = start + len(frag)
    return spans


class ODVGReader(GroundingReader):
    """An ODVG ``.jsonl`` file as :class:`GroundingSample` s.

    Args:
        ann_file: the JSON Lines file (optionally gzipped).
        image_root: directory ``filename`` is relative to.
        label_map: the label map (path or dict) for detection lines; ``None``: inferred from ``category`` fields.
        skip_empty: leave out lines without any kept box (counted as ``image_without_boxes``).
        **kwargs: :class:`~glip_data.readers.base.GroundingReader` options.

    Attributes:
        categories: ``{label: name}`` of the label map (labels ``1..K`` in key order; empty without detection lines).
        label_to_odvg, odvg_to_label: label <-> label-map key.
    """

    def __init__(self, ann_file, image_root=None, *, label_map=None, skip_empty: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(ann_file, image_root, **kwargs)
        given_map = load_label_map(label_map)
        self._records: list[tuple] = []  # (line, filename, w, h, kind, caption|None, extras)
        owner: list[int] = []
        boxes: list = []
        raw_labels: list[int] = []
        spans: list = []
        phrases: list = []
        crowd: list[bool] = []
        inferred: dict[int, str] = {}
        for lineno, rec in iter_jsonl(self.ann_file):
            where = f"line {lineno}"
            require(rec, ("filename", "height", "width"), f"{self.ann_file}: {where}")
            w, h = rec["width"], rec["height"]
            if not _is_image_size(w, h):
                self._problem("bad_image_size", f"{where}: width/height must be positive integers, got {w!r}x{h!r}")
                continue
            k = len(self._records)
            extras = {key: rec[key] for key in ("image_id", "id") if key in rec}
            if "detection" in rec:
                det = rec["detection"]
                if not isinstance(det, dict) or not isinstance(det.get("instances"), list):
                    self._problem("bad_record", f"{where}: 'detection' must be an object with an 'instances' list")
                    continue
                self._records.append((lineno, rec["filename"], int(w), int(h), "detection", None, extras))
                for j, inst in enumerate(det["instances"]):
                    iwhere = f"{where} instance {j}"
                    if not isinstance(inst, dict) or not _is_box(inst.get("bbox")):
                        self._problem("bad_bbox", f"{iwhere}: needs 'bbox' [x1, y1, x2, y2], got {inst!r}")
                        continue
                    lab = inst.get("label")
                    if not isinstance(lab, int) or isinstance(lab, bool):
                        self._problem("bad_label", f"{iwhere}: 'label' must be an integer, got {lab!r}")
                        continue
                    if given_map is None:
                        cat = inst.get("category")
                        if not isinstance(cat, str):
                            raise ReaderError(
                                f"{self.ann_file}: {iwhere}: no label map was given and the instance has no "
                                "'category' name to infer it from; pass label_map=<file>"
                            )
                        if inferred.setdefault(lab, cat) != cat:
                            raise ReaderError(
                                f"{self.ann_file}: {iwhere}: label {lab} is called both {inferred[lab]!r} and {cat!r}"
                            )
                    elif lab not in given_map:
                        self._problem("unknown_label", f"{iwhere}: label {lab} is not in the label map")
                        continue
                    owner.append(k)
                    boxes.append(inst["bbox"])
                    raw_labels.append(lab)
                    spans.append(None)
                    phrases.append(None)
                    crowd.append(bool(inst.get("iscrowd", 0)))
            elif "grounding" in rec:
                g = rec["grounding"]
                if not isinstance(g, dict) or not isinstance(g.get("caption"), str) \
                        or not isinstance(g.get("regions", []), list):
                    self._problem("bad_record", f"{where}: 'grounding' needs a 'caption' string and a 'regions' list")
                    continue
                caption = g["caption"]
                self._records.append((lineno, rec["filename"], int(w), int(h), "grounding", caption, extras))
                for j, region in enumerate(g.get("regions", [])):
                    rwhere = f"{self.ann_file}: {where} region {j}"
                    if not isinstance(region, dict) or "bbox" not in region:
                        self._problem("bad_bbox", f"{where} region {j}: needs 'bbox'")
                        continue
                    rboxes = [region["bbox"]] if _is_box(region["bbox"]) else region["bbox"]
                    if not isinstance(rboxes, list) or not rboxes or not all(_is_box(b) for b in rboxes):
                        self._problem("bad_bbox", f"{where} region {j}: bbox must be xyxy or a list of xyxy boxes")
                        continue
                    try:
                        if "tokens_positive" in region:
                            rspans = check_spans(region["tokens_positive"], caption, rwhere)
                        else:
                            rspans = find_phrase_spans(caption, region.get("phrase"))
                            if rspans is None:
                                raise ReaderError(
                                    f"{rwhere}: no tokens_positive and the phrase {region.get('phrase')!r} "
                                    f"is not in the caption {caption!r}"
                                )
                            self.stats["spans_found_by_search"] += 1
                    except ReaderError:
                        if self.errors == "raise":
                            raise
                        self.stats["span_outside_caption"] += 1
                        continue
                    phrase = region.get("phrase")
                    phrase = " ".join(phrase) if isinstance(phrase, list) else phrase
                    for b in rboxes:
                        owner.append(k)
                        boxes.append(b)
                        raw_labels.append(-1)
                        spans.append(rspans)
                        phrases.append(phrase)
                        crowd.append(bool(region.get("iscrowd", 0)))
            else:
                self._records.append((lineno, rec["filename"], int(w), int(h), "detection", None, extras))
                self.stats["record_without_annotations"] += 1

        label_map_final = given_map if given_map is not None else inferred
        keys = sorted(label_map_final)
        self.odvg_to_label = {key: i + 1 for i, key in enumerate(keys)}
        self.label_to_odvg = {i + 1: key for i, key in enumerate(keys)}
        self.categories = {i + 1: label_map_final[key] for i, key in enumerate(keys)}
        if self.categories:
            from glip_data.prompts import detection_prompt

            self.prompt, self.prompt_spans = detection_prompt(list(self.categories.values()))
        else:
            self.prompt, self.prompt_spans = "", []

        owner_arr = np.asarray(owner, dtype=np.int64)
        sizes = np.asarray([(r[2], r[3]) for r in self._records], dtype=np.float64).reshape(-1, 2)
        raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        clipped, keep = sanitize_boxes(file_xyxy_to_internal(raw, self.box_convention), sizes[owner_arr],
                                       self.box_convention, self.stats, input_wh=raw[:, 2:] - raw[:, :2])
        order = np.nonzero(keep)[0]
        order = order[np.argsort(owner_arr[order], kind="stable")]
        self._boxes = clipped[order].astype(np.float32)
        self._labels = np.asarray([self.odvg_to_label.get(raw_labels[i], 1) for i in order], dtype=np.int64)
        self._spans = [spans[i] for i in order]
        self._phrases = [phrases[i] for i in order]
        crowd_arr = np.asarray(crowd, dtype=bool)
        self._count("crowd_flagged", (crowd_arr & keep).sum())
        self._crowd = crowd_arr[order]
        self._group_boxes(owner_arr[order], len(self._records))
        # as COCO: crowd boxes are not training boxes, so a line with only crowd boxes is empty
        self._select_records(self._training_box_counts(), 1 if skip_empty else 0)

    @property
    def num_boxes(self) -> int:
        """Training boxes (crowd boxes excluded) over the samples this reader yields."""
        return self._count_boxes(~self._crowd)

    def _build_sample(self, index: int) -> GroundingSample:
        k, start, end = self._record_boxes(index)
        lineno, file_name, width, height, kind, caption, extras = self._records[k]
        metadata: dict[str, Any] = {
            "dataset": self.dataset_name,
            "task": kind,
            "image_id": extras.get("image_id", extras.get("id", lineno)),
            "line": lineno,
            "file_name": file_name,
            "box_convention": self.box_convention,
        }
        train = [i for i in range(start, end) if not self._crowd[i]]
        crowd = [i for i in range(start, end) if self._crowd[i]]
        labels = self._labels[train]
        metadata["crowd_boxes"] = self._boxes[crowd].tolist()
        metadata["crowd_labels"] = self._labels[crowd].tolist()
        if kind == "detection":
            caption = self.prompt
            tokens_positive = [list(self.prompt_spans[int(lab) - 1]) for lab in labels]
        else:
            tokens_positive = [list(self._spans[i]) for i in train]
            metadata["phrases"] = [self._phrases[i] for i in train]
        return GroundingSample(
            image_path=str(self.resolve_path(file_name)),
            width=width,
            height=height,
            boxes=as_boxes_tensor(self._boxes[train]),
            caption=caption,
            tokens_positive=tokens_positive,
            labels=torch.as_tensor(labels, dtype=torch.int64),
            metadata=metadata,
        )

    def summary(self) -> dict[str, Any]:
        kinds = [self._records[int(k)][4] for k in self._order]
        return {"images": len(self), "boxes": self.num_boxes, "detection_records": kinds.count("detection"),
                "grounding_records": kinds.count("grounding"), "categories": len(self.categories)}


__all__ = ["ODVGReader", "load_label_map", "find_phrase_spans"]

