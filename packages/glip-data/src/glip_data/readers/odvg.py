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

The record parsing (:func:`parse_odvg_line`, :func:`parse_odvg_instance`, :func:`parse_odvg_region`,
:class:`ODVGLabelMap`) is shared with the converter (:mod:`glip_data.convert`): one parser for the format.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glip_data.boxes import convert_xyxy
from glip_data.readers.base import (
    GroundingReader,
    ReaderError,
    RecordChecker,
    _is_box,
    as_boxes_tensor,
    iter_jsonl,
    read_json,
    sanitize_boxes,
)
from glip_data.sample import GroundingSample
from glip_data.text import find_phrase_spans

Span = tuple[int, int]


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


# --------------------------------------------------------------------------------------------------------------------
# record parsing, shared with the converter


@dataclass
class ODVGLine:
    """One valid line: its header and its annotations, not yet checked one by one.

    ``kind`` is ``"detection"``, ``"grounding"`` or ``None`` (neither block: an image without annotations);
    ``items`` are the raw ``instances`` or ``regions``; ``record`` is the whole line (for the converter's extras).
    """

    lineno: int
    filename: str
    width: int
    height: int
    kind: str | None
    caption: str | None
    items: list
    record: dict


@dataclass
class ODVGInstance:
    """A checked detection instance. ``bbox`` is xyxy as in the file (continuous)."""

    bbox: list
    label: int
    crowd: bool
    record: dict


@dataclass
class ODVGRegion:
    """A checked grounding region: its boxes (xyxy as in the file, one or more), its spans in the caption, and
    whether they were found by searching the phrase (no ``tokens_positive`` in the file)."""

    boxes: list
    spans: list[Span]
    searched: bool
    phrase: Any
    crowd: bool
    record: dict


def parse_odvg_line(check: RecordChecker, lineno: int, rec: Any) -> ODVGLine | None:
    """Check a line's header (``filename``, ``height``, ``width``: always required) and the shape of its block.

    Problems: ``bad_image_size``, ``missing_file_name``, ``bad_record`` (a malformed ``detection``/``grounding``
    block, or both blocks on one line). Returns ``None`` to leave the line out.
    """
    where = f"line {lineno}"
    check.require(rec, ("filename", "height", "width"), where)
    w, h = rec["width"], rec["height"]
    if not check.image_size(w, h, where) or check.file_name(rec["filename"], where, key="filename") is None:
        return None
    line = ODVGLine(lineno, rec["filename"], int(w), int(h), None, None, [], rec)
    if "detection" in rec and "grounding" in rec:
        check.problem("bad_record", f"{where}: has both a 'detection' and a 'grounding' block")
        return None
    if "detection" in rec:
        det = rec["detection"]
        if not isinstance(det, dict) or not isinstance(det.get("instances"), list):
            check.problem("bad_record", f"{where}: 'detection' must be an object with an 'instances' list")
            return None
        line.kind, line.items = "detection", det["instances"]
    elif "grounding" in rec:
        g = rec["grounding"]
        if not isinstance(g, dict) or not isinstance(g.get("caption"), str) \
                or not isinstance(g.get("regions", []), list):
            check.problem("bad_record", f"{where}: 'grounding' needs a 'caption' string and a 'regions' list")
            return None
        line.kind, line.caption, line.items = "grounding", g["caption"], g.get("regions", [])
    return line


class ODVGLabelMap:
    """The names of a file's labels: the given label map, or the ``category`` names of its instances.

    Args:
        check: the file's checker.
        label_map: a label map file or dict, or ``None`` to infer the names.
    """

    def __init__(self, check: RecordChecker, label_map: str | os.PathLike | dict | None = None) -> None:
        self.check = check
        self.given = load_label_map(label_map)
        self.inferred: dict[int, str] = {}

    @property
    def names(self) -> dict[int, str]:
        """``{label: name}`` (the given map, or the names seen so far)."""
        return self.given if self.given is not None else self.inferred

    def accept(self, label: int, category: Any, where: str) -> bool:
        """Whether ``label`` is known (problem ``unknown_label`` when a map was given). Without a map the instance
        must name its category, consistently (a ReaderError otherwise)."""
        if self.given is not None:
            if label in self.given:
                return True
            self.check.problem("unknown_label", f"{where}: label {label} is not in the label map")
            return False
        if not isinstance(category, str) or not category.strip():
            raise ReaderError(f"{self.check.source}: {where}: no label map was given and the instance has no "
                              "'category' name to infer it from; pass a label map")
        if self.inferred.setdefault(label, category) != category:
            raise ReaderError(f"{self.check.source}: {where}: label {label} is called both "
                              f"{self.inferred[label]!r} and {category!r}")
        return True


def parse_odvg_instance(check: RecordChecker, where: str, inst: Any, labels: ODVGLabelMap) -> ODVGInstance | None:
    """Check one detection instance: an xyxy ``bbox`` (``bad_bbox``) and an integer ``label`` (``bad_label``) that
    ``labels`` knows. Returns ``None`` to leave it out."""
    if not isinstance(inst, dict) or not _is_box(inst.get("bbox")):
        check.problem("bad_bbox", f"{where}: needs 'bbox' [x1, y1, x2, y2], got {inst!r}")
        return None
    label = inst.get("label")
    if not isinstance(label, int) or isinstance(label, bool):
        check.problem("bad_label", f"{where}: 'label' must be an integer, got {label!r}")
        return None
    if not labels.accept(label, inst.get("category"), where):
        return None
    return ODVGInstance(inst["bbox"], label, bool(inst.get("iscrowd", 0)), inst)


def parse_odvg_region(check: RecordChecker, where: str, region: Any, caption: str) -> ODVGRegion | None:
    """Check one grounding region: ``bbox`` one xyxy box or a non-empty list of them (``bad_bbox``), and its spans:
    ``tokens_positive`` inside the caption, or when absent the ``phrase`` (a string, or a list of fragments searched
    left to right, case-sensitively) found in the caption (``span_outside_caption``). Returns ``None`` to leave it
    out."""
    if not isinstance(region, dict) or "bbox" not in region:
        check.problem("bad_bbox", f"{where}: needs 'bbox'")
        return None
    boxes = [region["bbox"]] if _is_box(region["bbox"]) else region["bbox"]
    if not isinstance(boxes, list) or not boxes or not all(_is_box(b) for b in boxes):
        check.problem("bad_bbox", f"{where}: bbox must be xyxy or a list of xyxy boxes, got {region['bbox']!r}")
        return None
    phrase = region.get("phrase")
    if "tokens_positive" in region:
        spans = check.spans(region["tokens_positive"], caption, where)
        if spans is None:
            return None
        return ODVGRegion(boxes, spans, False, phrase, bool(region.get("iscrowd", 0)), region)
    try:
        spans = find_phrase_spans(caption, [phrase], ignore_case=False)[0]
    except (TypeError, ValueError):
        check.problem("span_outside_caption",
                      f"{where}: no tokens_positive and the phrase {phrase!r} is not in the caption {caption!r}")
        return None
    return ODVGRegion(boxes, spans, True, phrase, bool(region.get("iscrowd", 0)), region)


# --------------------------------------------------------------------------------------------------------------------
# the reader


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
        labels = ODVGLabelMap(self.check, label_map)
        self._records: list[tuple] = []  # (line, filename, w, h, kind, caption|None, extras)
        owner: list[int] = []
        boxes: list = []
        raw_labels: list[int] = []
        spans: list = []
        phrases: list = []
        crowd: list[bool] = []
        for lineno, rec in iter_jsonl(self.ann_file):
            line = parse_odvg_line(self.check, lineno, rec)
            if line is None:
                continue
            k = len(self._records)
            extras = {key: rec[key] for key in ("image_id", "id") if key in rec}
            kind = line.kind or "detection"
            self._records.append((lineno, line.filename, line.width, line.height, kind, line.caption, extras))
            if line.kind is None:
                self.stats["record_without_annotations"] += 1
            for j, item in enumerate(line.items):
                if line.kind == "detection":
                    inst = parse_odvg_instance(self.check, f"line {lineno} instance {j}", item, labels)
                    if inst is None:
                        continue
                    owner.append(k)
                    boxes.append(inst.bbox)
                    raw_labels.append(inst.label)
                    spans.append(None)
                    phrases.append(None)
                    crowd.append(inst.crowd)
                    continue
                region = parse_odvg_region(self.check, f"line {lineno} region {j}", item, line.caption)
                if region is None:
                    continue
                self._count("spans_found_by_search", region.searched)
                phrase = " ".join(region.phrase) if isinstance(region.phrase, list) else region.phrase
                for b in region.boxes:
                    owner.append(k)
                    boxes.append(b)
                    raw_labels.append(-1)
                    spans.append(region.spans)
                    phrases.append(phrase)
                    crowd.append(region.crowd)

        keys = sorted(labels.names)
        self.odvg_to_label = {key: i + 1 for i, key in enumerate(keys)}
        self.label_to_odvg = {i + 1: key for i, key in enumerate(keys)}
        self.categories = {i + 1: labels.names[key] for i, key in enumerate(keys)}
        if self.categories:
            from glip_data.prompts import clean_name, detection_prompt

            for key in keys:
                if not clean_name(labels.names[key]).strip():  # named by its label: the file's own key for it
                    raise ReaderError(f"{self.ann_file}: label {key!r} has the name {labels.names[key]!r}, which is "
                                      "empty once cleaned and cannot be put in a prompt; give it a name")
            self.prompt, self.prompt_spans = detection_prompt(list(self.categories.values()))
        else:
            self.prompt, self.prompt_spans = "", []

        owner_arr = np.asarray(owner, dtype=np.int64)
        sizes = np.asarray([(r[2], r[3]) for r in self._records], dtype=np.float64).reshape(-1, 2)
        raw = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        # files hold continuous xyxy: the official convention reads x2 - 1
        internal = convert_xyxy(raw, from_legacy=False, to_legacy=self.legacy)
        clipped, keep = sanitize_boxes(internal, sizes[owner_arr], self.box_convention, self.stats,
                                       input_wh=raw[:, 2:] - raw[:, :2], on_drop=self._line_box_namer(owner, boxes))
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

    def image_path(self, index: int) -> Path:
        return self.resolve_path(self._records[int(self._order[index])][1])

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


__all__ = ["ODVGInstance", "ODVGLabelMap", "ODVGLine", "ODVGReader", "ODVGRegion", "load_label_map",
           "parse_odvg_instance", "parse_odvg_line", "parse_odvg_region"]

