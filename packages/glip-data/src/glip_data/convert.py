"""Lossless conversion between COCO, MDETR and ODVG annotation files.

All three are read into one neutral :class:`Collection` (images with an optional caption; annotations with a COCO
``[x, y, w, h]`` box, an optional category id and optional ``tokens_positive``) and written back out. Conversion is
about files, not training: boxes are *not* clipped or shifted (``x2 = x + w`` for the xyxy of ODVG), unknown keys are
carried along, and a round trip gives back the original file (same ids, boxes, categories, captions, spans; boxes
exact up to float rounding of ``x + w - x``).

How content moves between the formats:

* **COCO → ODVG**: detection lines; ``label`` = index of the category in id order (the label map, written next to
  the jsonl as ``<stem>_label_map.json``), plus the original ``category_id``, ``id``, ``area``, ``iscrowd`` in each
  instance and ``image_id`` on the line, so the way back restores them.
* **COCO → MDETR**: the caption of a detection image is the detection prompt of all categories
  (:func:`glip_data.detection_prompt`) and each box grounds to its category's name; such images are marked
  ``"caption_source": "detection_prompt"`` and annotations keep their real ``category_id``, so converting back gives
  detection data again.
* **MDETR → COCO**: captions and ``tokens_positive`` stay as extra fields of images/annotations (COCO tools ignore
  them) and the single ``object`` category is kept.
* **ODVG grounding → COCO/MDETR**: every region box becomes an annotation with the region's spans (found by searching
  the phrase when the line has no ``tokens_positive``), category ``object`` (id 1, as MDETR), the phrase kept as
  ``phrase``. **MDETR/COCO captions → ODVG**: one region per box (boxes are not merged), ``phrase`` = the spanned text.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glip_data.boxes import xywh_to_xyxy, xyxy_to_xywh
from glip_data.readers.base import ReaderError, RecordChecker, iter_jsonl, read_coco_json
from glip_data.readers.odvg import ODVGLabelMap, parse_odvg_instance, parse_odvg_line, parse_odvg_region

Format = Literal["coco", "mdetr", "odvg"]
FORMATS = ("coco", "mdetr", "odvg")
DETECTION_PROMPT = "detection_prompt"
OBJECT_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


@dataclass
class Annotation:
    """One box. ``bbox`` is COCO ``[x, y, w, h]``; ``category_id`` is ``None`` for pure grounding boxes."""

    bbox: list[float]
    category_id: Any = None
    tokens_positive: list[list[int]] | None = None
    id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageEntry:
    """One image (MDETR: one image-sentence pair). ``caption`` is ``None`` for detection images."""

    file_name: str
    width: int
    height: int
    id: Any = None
    caption: str | None = None
    annotations: list[Annotation] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_grounding(self) -> bool:
        return self.caption is not None and self.extra.get("caption_source") != DETECTION_PROMPT


@dataclass
class Collection:
    images: list[ImageEntry]
    categories: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    top_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_boxes(self) -> int:
        return sum(len(img.annotations) for img in self.images)


# ---------------------------------------------------------------------------------------------------------------------
# loading


def _bar(items: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="record", leave=False)


def load_coco(path: str | os.PathLike, progress: bool = False) -> Collection:
    """A COCO (or MDETR: COCO plus captions and spans) json as a :class:`Collection`.

    The records are checked by the readers' :class:`~glip_data.readers.base.RecordChecker` with the strict policy:
    a structural problem a reader would report (a duplicate or unknown id, a bad size, box or span) raises a
    :class:`ReaderError`; nothing is dropped, clipped or shifted.
    """
    path = Path(path)
    check = RecordChecker(path)
    data = read_coco_json(path, ("images", "annotations"))
    categories = data.get("categories", [])
    if not isinstance(categories, list):
        raise ReaderError(f"{path}: 'categories' must be a list, got {type(categories).__name__}")
    if "categories" not in data:
        labelled = next((j for j, a in enumerate(data["annotations"])
                         if isinstance(a, dict) and a.get("category_id") is not None), None)
        if labelled is not None:
            raise ReaderError(f"{path}: has no 'categories' key, but annotations[{labelled}] has category_id "
                              f"{data['annotations'][labelled]['category_id']!r}: add the 'categories' list "
                              "([{\"id\": ..., \"name\": ...}]) the boxes refer to")
    category_ids = {c["id"] for c in check.categories(categories)}
    images: list[ImageEntry] = []
    index: dict[Any, int] = {}
    for _, img, where in check.image_entries(data["images"], ("id", "width", "height"), set()):
        check.file_name(img.get("file_name"), where)
        if img.get("caption") is not None:
            check.caption(img["caption"], where)
        extra = {k: v for k, v in img.items() if k not in ("id", "file_name", "width", "height", "caption")}
        index[img["id"]] = len(images)
        images.append(ImageEntry(img["file_name"], img["width"], img["height"], img["id"], img.get("caption"), [],
                                 extra))
    seen: set = set()
    for j, ann in enumerate(_bar(data["annotations"], progress, f"reading {path.name}")):
        # the strict checker raises on every problem, so each call below either passes or raises
        k, where = check.annotation(j, ann, ("bbox",), index, seen, set(), require_id=False)
        check.box(ann["bbox"], where, "x, y, w, h")
        if "categories" in data and ann.get("category_id") is not None and ann["category_id"] not in category_ids:
            check.problem("unknown_category_id", f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
        entry = images[k]
        spans = ann.get("tokens_positive")
        if spans is not None:
            if entry.caption is None:
                check.problem("span_outside_caption", f"{where}: has tokens_positive but image {entry.id!r} has no "
                                                      "caption")
            spans = [list(span) for span in check.spans(spans, entry.caption, where)]
        extra = {k: v for k, v in ann.items() if k not in ("id", "image_id", "bbox", "category_id", "tokens_positive")}
        entry.annotations.append(Annotation(list(ann["bbox"]), ann.get("category_id"), spans, ann.get("id"), extra))
    top_extra = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories", "info")}
    return Collection(images, list(categories), dict(data.get("info", {})), top_extra)


load_mdetr = load_coco


def load_odvg(path: str | os.PathLike, label_map: Any = None, progress: bool = False) -> Collection:
    """An ODVG jsonl (and its label map, looked up as ``<stem>_label_map.json`` when not given) as a Collection.

    Lines, instances and regions are parsed by the ODVG reader's parsers with the strict policy (see
    :func:`load_coco`); the label names come from the label map or, without one, from the instances' ``category``.
    """
    path = Path(path)
    if label_map is None:
        guess = default_label_map_path(path)
        label_map = guess if guess.is_file() else None
    check = RecordChecker(path)
    labels = ODVGLabelMap(check, label_map)
    images: list[ImageEntry] = []
    label_to_cid: dict[int, Any] = {}
    has_object_category = False
    for lineno, rec in _bar(iter_jsonl(path), progress, f"reading {path.name}"):
        line = parse_odvg_line(check, lineno, rec)
        extra = {k: v for k, v in rec.items()
                 if k not in ("filename", "height", "width", "detection", "grounding", "image_id")}
        entry = ImageEntry(line.filename, rec["width"], rec["height"], rec.get("image_id"), None, [], extra)
        if line.kind == "grounding":
            entry.caption = line.caption
            g = rec["grounding"]
            entry.extra.update({f"grounding_{k}": v for k, v in g.items() if k not in ("caption", "regions")})
            for r, item in enumerate(line.items):
                region = parse_odvg_region(check, f"line {lineno} region {r}", item, line.caption)
                spans = [list(span) for span in region.spans]
                extra_r = {k: v for k, v in item.items() if k not in ("bbox", "tokens_positive", "category_id", "id")}
                if extra_r.get("phrase") == " ".join(entry.caption[s:e] for s, e in spans):
                    del extra_r["phrase"]  # derivable from the spans: written again on the way out
                cid = item.get("category_id")
                has_object_category |= cid is None
                for b in region.boxes:
                    entry.annotations.append(Annotation(xyxy_to_xywh(b, legacy=False), cid, spans, item.get("id"),
                                                        dict(extra_r)))
        elif line.kind == "detection":
            for n, item in enumerate(line.items):
                where = f"line {lineno} instance {n}"
                inst = parse_odvg_instance(check, where, item, labels)
                if "category_id" in item and label_to_cid.setdefault(inst.label, item["category_id"]) \
                        != item["category_id"]:
                    raise ReaderError(f"{path}: {where}: label {inst.label} maps to two category ids")
                extra_i = {k: v for k, v in item.items() if k not in ("bbox", "label", "category", "category_id", "id")}
                entry.annotations.append(Annotation(xyxy_to_xywh(inst.bbox, legacy=False), ("label", inst.label),
                                                    None, item.get("id"), extra_i))
        images.append(entry)
    names = labels.names
    # Category ids: the original ids carried by the instances when they are consistent, else label + 1.
    ids = {lab: label_to_cid.get(lab, lab + 1) for lab in names}
    if len(set(ids.values())) != len(ids):
        ids = {lab: lab + 1 for lab in names}
    categories = [{"id": ids[lab], "name": names[lab]} for lab in sorted(names, key=lambda k: ids[k])]
    for cat in categories:
        if cat["name"] == OBJECT_CATEGORY["name"]:
            cat["supercategory"] = OBJECT_CATEGORY["supercategory"]  # MDETR's single category, as it was
    for entry in images:
        for ann in entry.annotations:
            if isinstance(ann.category_id, tuple):
                ann.category_id = ids[ann.category_id[1]]
    if has_object_category:
        object_id = 1 if all(c["id"] != 1 for c in categories) else max(c["id"] for c in categories) + 1
        categories.append({**OBJECT_CATEGORY, "id": object_id})
        for entry in images:
            for ann in entry.annotations:
                if ann.category_id is None:
                    ann.category_id = object_id
    for i, entry in enumerate(images):
        if entry.id is None:
            entry.id = i + 1
    return Collection(images, categories)


def default_label_map_path(odvg_path: str | os.PathLike) -> Path:
    """``dir/name.jsonl`` -> ``dir/name_label_map.json`` (MM-GDINO's naming)."""
    p = Path(odvg_path)
    stem = p.name
    for suffix in (".gz", ".jsonl", ".json"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    return p.with_name(f"{stem}_label_map.json")


def load(path: str | os.PathLike, fmt: Format, label_map: Any = None, progress: bool = False) -> Collection:
    """Read ``path`` in format ``fmt`` (MDETR files are read as COCO: they are COCO plus captions and spans)."""
    if fmt in ("coco", "mdetr"):
        return load_coco(path, progress)
    if fmt == "odvg":
        return load_odvg(path, label_map, progress)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _sorted_categories(col: Collection) -> list[dict[str, Any]]:
    try:
        return sorted(col.categories, key=lambda c: c["id"])
    except (KeyError, TypeError) as err:
        raise ReaderError(f"categories need comparable 'id's: {err}") from None


def _ensure_object_category(col: Collection) -> list[dict[str, Any]]:
    """The categories, plus an ``object`` category when some annotation has no category id."""
    cats = list(col.categories)
    if any(a.category_id is None for img in col.images for a in img.annotations):
        object_id = 1 if all(c["id"] != 1 for c in cats) else max(c["id"] for c in cats) + 1
        cats.append({**OBJECT_CATEGORY, "id": object_id})
        for img in col.images:
            for a in img.annotations:
                if a.category_id is None:
                    a.category_id = object_id
    return cats


def _coco_dict(col: Collection, with_captions: bool, progress: bool = False) -> dict[str, Any]:
    cats = _ensure_object_category(col)
    images, anns = [], []
    next_ann = 1 + max((a.id for img in col.images for a in img.annotations if isinstance(a.id, int)), default=0)
    for img in _bar(col.images, progress, "writing"):
        grounding = img.caption is not None and (with_captions or img.is_grounding)
        record = {"id": img.id, "file_name": img.file_name, "width": img.width, "height": img.height}
        extra = dict(img.extra)
        if not with_captions and not img.is_grounding:
            extra.pop("caption_source", None)
        record.update(extra)
        if grounding:
            record["caption"] = img.caption
        images.append(record)
        for a in img.annotations:
            if a.id is None:
                a.id, next_ann = next_ann, next_ann + 1
            rec = {"id": a.id, "image_id": img.id, "category_id": a.category_id, "bbox": a.bbox}
            rec.update(a.extra)
            rec.setdefault("area", a.bbox[2] * a.bbox[3])
            rec.setdefault("iscrowd", 0)
            if grounding and a.tokens_positive is not None:
                rec["tokens_positive"] = a.tokens_positive
            anns.append(rec)
    out: dict[str, Any] = {}
    if col.info:
        out["info"] = col.info
    out.update(col.top_extra)
    out.update({"images": images, "annotations": anns, "categories": cats})
    return out


def to_coco(col: Collection, progress: bool = False) -> dict[str, Any]:
    """COCO json. Grounding captions/spans stay as extra fields; captions made from detection prompts are dropped."""
    return _coco_dict(col, with_captions=False, progress=progress)


def to_mdetr(col: Collection, progress: bool = False) -> dict[str, Any]:
    """MDETR json: every image gets a caption (detection images: the prompt of all categories, marked)."""
    from glip_data.prompts import detection_prompt

    cats = _sorted_categories(col)
    prompt, spans = (detection_prompt([c["name"] for c in cats]) if cats else ("", []))
    span_of = {c["id"]: [list(s) for s in sp] for c, sp in zip(cats, spans)}
    for img in col.images:
        if img.caption is None:
            if img.annotations and not cats:
                raise ReaderError(f"image {img.id!r} has boxes but the collection has no categories for a prompt")
            img.caption = prompt
            img.extra["caption_source"] = DETECTION_PROMPT
            for a in img.annotations:
                if a.category_id not in span_of:
                    raise ReaderError(f"image {img.id!r}: category_id {a.category_id!r} is not in the categories")
                a.tokens_positive = span_of[a.category_id]
    return _coco_dict(col, with_captions=True, progress=progress)


def to_odvg(col: Collection, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """ODVG lines and label map (category index in id order -> name)."""
    cats = _sorted_categories(col)
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    name_of = {c["id"]: c["name"] for c in cats}
    lines = []
    for img in _bar(col.images, progress, "writing"):
        rec: dict[str, Any] = {"filename": img.file_name, "height": img.height, "width": img.width}
        if img.id is not None:
            rec["image_id"] = img.id
        extra = {k: v for k, v in img.extra.items() if not k.startswith("grounding_")}
        if img.is_grounding:
            regions = []
            for a in img.annotations:
                region: dict[str, Any] = {"bbox": xywh_to_xyxy(a.bbox, legacy=False)}
                spans = a.tokens_positive or []
                region["phrase"] = a.extra.get("phrase", " ".join(img.caption[s:e] for s, e in spans))
                region["tokens_positive"] = spans
                region.update({k: v for k, v in a.extra.items() if k != "phrase"})
                if a.id is not None:
                    region["id"] = a.id
                if a.category_id is not None:
                    region["category_id"] = a.category_id
                regions.append(region)
            grounding = {"caption": img.caption, "regions": regions}
            grounding.update({k[len("grounding_"):]: v for k, v in img.extra.items() if k.startswith("grounding_")})
            rec.update(extra)
            rec["grounding"] = grounding
        else:
            extra.pop("caption_source", None)
            instances = []
            for a in img.annotations:
                if a.category_id not in label_of:
                    raise ReaderError(f"image {img.id!r}: category_id {a.category_id!r} is not in the categories")
                inst: dict[str, Any] = {"bbox": xywh_to_xyxy(a.bbox, legacy=False), "label": label_of[a.category_id],
                                        "category": name_of[a.category_id], "category_id": a.category_id}
                if a.id is not None:
                    inst["id"] = a.id
                inst.update(a.extra)
                instances.append(inst)
            rec.update(extra)
            rec["detection"] = {"instances": instances}
        lines.append(rec)
    return lines, {str(i): c["name"] for i, c in enumerate(cats)}


def save(col: Collection, path: str | os.PathLike, fmt: Format, label_map_path: str | os.PathLike | None = None,
         progress: bool = False) -> list[Path]:
    """Write ``col`` as ``fmt``; returns the files written (ODVG: the jsonl and its label map).

    Files are written under temporary names and renamed into place. An ODVG jsonl vouches for its label map: the old
    jsonl is removed first and the new one written last, so a jsonl always sits beside its own label map.
    """
    from glip_data.io import atomic_write_json, atomic_write_text

    path = Path(path)
    if fmt in ("coco", "mdetr"):
        data = to_coco(col, progress) if fmt == "coco" else to_mdetr(col, progress)
        atomic_write_json(path, data, indent=None, separators=(",", ":"))
        return [path]
    if fmt == "odvg":
        lines, label_map = to_odvg(col, progress)
        lm_path = Path(label_map_path) if label_map_path is not None else default_label_map_path(path)
        path.unlink(missing_ok=True)
        atomic_write_json(lm_path, label_map, indent=1)
        atomic_write_text(path, "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
        return [path, lm_path]
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, src_format: Format, dst_format: Format, *,
            label_map: Any = None, dst_label_map: str | os.PathLike | None = None, progress: bool = False
            ) -> list[Path]:
    """Convert an annotation file between COCO, MDETR and ODVG (see the module doc). Returns the files written.

    ``progress`` shows tqdm bars while reading and writing (the command line turns them on). ``dst`` is locked against
    a second writer and written atomically (see :func:`save`).
    """
    from glip_data.io import RunLock

    for name, fmt in (("source", src_format), ("destination", dst_format)):
        if fmt not in FORMATS:
            raise ValueError(f"unknown {name} format {fmt!r}; expected one of {FORMATS}")
    col = load(src, src_format, label_map, progress)
    dst = Path(dst)
    with RunLock.for_output(dst.resolve(), "glip-data convert"):
        try:
            return save(col, dst, dst_format, dst_label_map, progress)
        except ReaderError as exc:  # what the source lacks for the destination format
            raise ReaderError(f"{src}: cannot be written as {dst_format}: {exc}") from None


__all__ = ["Annotation", "Collection", "FORMATS", "ImageEntry", "convert", "default_label_map_path", "load",
           "load_coco", "load_mdetr", "load_odvg", "save", "to_coco", "to_mdetr", "to_odvg"]
