"""Evaluation datasets: what to run the model on (images, class names, captions) and the ground truth to score with.

* :func:`load_detection_dataset`: a COCO-format or LVIS v1 file. Images, category order and validation come from the
  glip-data readers (errors name the file and record); the evaluator gets the file's own annotations.
* :func:`load_flickr_dataset`: an MDETR-format Flickr30k Entities file (``final_flickr_separateGT_*.json``); each
  entry is one sentence, its phrases are ``tokens_positive_eval``.
* :func:`discover_odinw`: the datasets of an ODinW folder or manifest.
* :func:`load_class_names`: class-name override files (the official ``OVERRIDE_CATEGORY``).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glip_data.prompts import clean_name
from glip_data.readers import COCODetection, LVISDetection, ReaderError
from glip_data.readers.base import check_spans, read_json, require

__all__ = [
    "EvaluationError",
    "DetectionDataset",
    "FlickrEntry",
    "FlickrDataset",
    "OdinwEntry",
    "load_detection_dataset",
    "load_flickr_dataset",
    "load_class_names",
    "discover_odinw",
    "parse_flickr_sentence",
]


class EvaluationError(ValueError):
    """Bad evaluation input. The message names the file and the record."""


# --------------------------------------------------------------------------------------------------------------------
# detection (COCO, LVIS, ODinW, custom)


@dataclass
class DetectionDataset:
    """A COCO-format detection dataset ready for evaluation.

    Attributes:
        name: a short name (reports, ODinW tables).
        ann_file: the annotation file.
        kind: ``"coco"`` (pycocotools) or ``"lvis"`` (the lvis package).
        gt: the annotation dict given to the evaluator (``area`` / ``iscrowd`` filled where missing, counted).
        image_ids, image_paths, image_sizes: per image, in file order: id, path, ``(width, height)`` as annotated.
        category_ids: the evaluated categories in prompt order (ascending id; background categories removed).
        class_names: the name put in the prompt for each of ``category_ids`` (overrides applied).
        notes: counts of what was filled or removed.
    """

    name: str
    ann_file: Path
    kind: str
    gt: dict[str, Any]
    image_ids: list[Any]
    image_paths: list[Path]
    image_sizes: list[tuple[int, int]]
    category_ids: list[Any]
    class_names: list[str]
    notes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def image_index(self) -> dict[Any, int]:
        """``{image id: position}``."""
        if not hasattr(self, "_image_index"):
            self._image_index = {img_id: i for i, img_id in enumerate(self.image_ids)}
        return self._image_index

    @property
    def label_of_category(self) -> dict[Any, int]:
        """``{category id: position in category_ids}``."""
        return {cid: i for i, cid in enumerate(self.category_ids)}


def _fill_coco_fields(gt: dict[str, Any], notes: Counter) -> None:
    """pycocotools needs ``area`` and ``iscrowd`` on every annotation; fill them as COCO defines them."""
    for ann in gt["annotations"]:
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            notes["iscrowd_filled_0"] += 1
        if "area" not in ann:
            w, h = ann["bbox"][2], ann["bbox"][3]
            ann["area"] = float(w) * float(h)
            notes["area_filled_w_times_h"] += 1


def _check_lvis_fields(gt: dict[str, Any], ann_file: Path) -> None:
    """LVISEval needs r/c/f frequencies and the federated image lists; name what is missing."""
    for i, cat in enumerate(gt["categories"]):
        if cat.get("frequency") not in ("r", "c", "f"):
            raise EvaluationError(f"{ann_file}: categories[{i}] (id={cat.get('id')!r}) has no LVIS 'frequency' "
                                  f"(r/c/f), got {cat.get('frequency')!r}: is this an LVIS v1 file?")
    for i, img in enumerate(gt["images"]):
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            if not isinstance(img.get(key), list):
                raise EvaluationError(f"{ann_file}: images[{i}] (id={img.get('id')!r}) has no list {key!r}: "
                                      "is this an LVIS v1 file?")
    for ann in gt["annotations"]:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])


def load_detection_dataset(
    ann_file: str | Path,
    image_root: str | Path | None = None,
    *,
    kind: str = "coco",
    class_names: str | Path | dict | list | None = None,
    name: str | None = None,
) -> DetectionDataset:
    """Read a COCO-format (``kind="coco"``) or LVIS v1 (``kind="lvis"``) file for evaluation.

    Args:
        ann_file: the annotation json (optionally gzipped).
        image_root: folder the image paths are relative to (default: the file's folder). LVIS v1 images are found
            as ``<image_root>/<split>/<file>`` from their ``coco_url`` (``val2017/000000123.jpg``).
        kind: ``"coco"`` or ``"lvis"``.
        class_names: overrides of the names put in the prompt (see :func:`load_class_names`).
        name: the dataset's name in reports (default: the file's stem).

    Raises:
        EvaluationError: a malformed file or record (named), or a category whose name cleans to nothing.
    """
    ann_file = Path(ann_file)
    if kind not in ("coco", "lvis"):
        raise ValueError(f"kind must be 'coco' or 'lvis', got {kind!r}")
    reader_cls = LVISDetection if kind == "lvis" else COCODetection
    try:
        reader = reader_cls(ann_file, image_root, errors="raise")
    except ReaderError as exc:
        raise EvaluationError(str(exc)) from None
    except ValueError as exc:  # a category name that cleans to nothing (raised while building the prompt)
        raise EvaluationError(f"{ann_file}: {exc}") from None
    gt = read_json(ann_file)
    notes: Counter = Counter({k: v for k, v in reader.stats.items() if v})
    if kind == "lvis":
        _check_lvis_fields(gt, ann_file)
    else:
        _fill_coco_fields(gt, notes)
    sizes = {img["id"]: (int(img["width"]), int(img["height"])) for img in gt["images"]}
    image_ids = [reader.image_id(i) for i in range(len(reader))]
    paths = [reader.resolve_path(reader.image_file(i)) for i in range(len(reader))]
    labels = range(1, len(reader.categories) + 1)
    category_ids = [reader.label_to_cat_id[label] for label in labels]
    names = [reader.categories[label] for label in labels]
    if class_names is not None:
        names = load_class_names(class_names, category_ids, names, where=str(ann_file))
    return DetectionDataset(name=name or ann_file.name.split(".")[0], ann_file=ann_file, kind=kind, gt=gt,
                            image_ids=image_ids, image_paths=paths, image_sizes=[sizes[i] for i in image_ids],
                            category_ids=category_ids, class_names=names, notes=notes)


def load_class_names(source: str | Path | dict | list, category_ids: Sequence[Any], names: Sequence[str],
                     where: str = "") -> list[str]:
    """Apply class-name overrides: the name the prompt uses for each category.

    ``source`` is a file (``.json`` or a text file with one name per line in category-id order) or its content:

    * ``{"<category id>": "new name", ...}`` or ``{"old name": "new name", ...}`` (some categories);
    * ``[{"id": 1, "name": "boat"}, ...]`` (the official ``OVERRIDE_CATEGORY`` format; some or all categories);
    * ``["boat", "car", ...]`` (all categories, in category-id order).

    Raises:
        EvaluationError: an unknown category id or name, a wrong count, or a name that cleans to nothing.
    """
    label = f"class names {source}" if isinstance(source, (str, Path)) else "class names"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise EvaluationError(f"class-name file not found: {path}")
        if path.suffix.lower() in (".json", ".gz"):
            source = read_json(path)
        else:
            source = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = list(names)
    by_id = {str(cid): i for i, cid in enumerate(category_ids)}
    by_name = {name: i for i, name in enumerate(names)}
    if isinstance(source, dict):
        items = list(source.items())
    elif isinstance(source, list) and all(isinstance(x, dict) for x in source):
        items = []
        for j, item in enumerate(source):
            if "id" not in item or "name" not in item:
                raise EvaluationError(f"{label}: entry {j} needs 'id' and 'name', got {item!r}")
            items.append((str(item["id"]), item["name"]))
    elif isinstance(source, list) and all(isinstance(x, str) for x in source):
        if len(source) != len(names):
            raise EvaluationError(f"{label}: {len(source)} names for {len(names)} categories of {where}")
        items = [(str(cid), n) for cid, n in zip(category_ids, source)]
    else:
        raise EvaluationError(f"{label}: expected a dict, a list of {{id, name}} or a list of names")
    for key, new in items:
        key = str(key)
        index = by_id.get(key, by_name.get(key))
        if index is None:
            raise EvaluationError(f"{label}: {key!r} is neither a category id nor a category name of {where}")
        if not isinstance(new, str) or not clean_name(new).strip(" ."):
            raise EvaluationError(f"{label}: the name for category {key!r} must be a non-empty string, got {new!r}")
        out[index] = new
    return out


# --------------------------------------------------------------------------------------------------------------------
# ODinW


@dataclass
class OdinwEntry:
    """One ODinW dataset: its name, annotation file and image folder."""

    name: str
    ann_file: Path
    image_root: Path


def discover_odinw(annotations: str | Path | Sequence[Any], images: str | Path | None = None,
                   dataset_glob: str = "**/valid/annotations_without_background.json") -> list[OdinwEntry]:
    """The datasets of an ODinW evaluation.

    Args:
        annotations: a folder (every file matching ``dataset_glob`` is a dataset, named by its path relative to
            the folder without the split folder: ``AerialMaritimeDrone/large``), a manifest (``.json`` list of
            ``{"name", "annotations", "images"}`` or of annotation paths, relative to the manifest; ``.txt``: one
            annotation path per line), or a Python list of paths / ``(name, annotations, images)`` tuples.
        images: for a folder: the folder holding the same tree of images (default: next to each annotation file).
        dataset_glob: the pattern for a folder.
    """
    entries: list[OdinwEntry] = []
    if isinstance(annotations, (str, Path)) and Path(annotations).is_dir():
        root = Path(annotations)
        files = sorted(root.glob(dataset_glob))
        if not files:
            raise EvaluationError(f"no ODinW annotation file matches {dataset_glob!r} under {root}")
        for f in files:
            rel = f.parent.relative_to(root)
            name = str(rel.parent) if len(rel.parts) > 1 else str(rel)
            img_root = (Path(images) / rel) if images is not None else f.parent
            entries.append(OdinwEntry(name, f, img_root))
    else:
        if isinstance(annotations, (str, Path)):
            manifest = Path(annotations)
            if not manifest.is_file():
                raise EvaluationError(f"ODinW annotations not found: {manifest} (a folder or a manifest file)")
            base = manifest.parent
            items = (read_json(manifest) if manifest.suffix.lower() == ".json" else
                     [ln.strip() for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()])
            if not isinstance(items, list):
                raise EvaluationError(f"{manifest}: an ODinW manifest is a list of datasets")
        else:
            base, items, manifest = Path.cwd(), list(annotations), "the dataset list"
        for j, item in enumerate(items):
            if isinstance(item, dict):
                require(item, ("annotations",), f"{manifest}: entry {j}")
                ann = base / item["annotations"]
                img = base / item["images"] if item.get("images") else ann.parent
                name = item.get("name") or ann.parent.name
            elif isinstance(item, (tuple, list)) and len(item) == 3:
                name, ann, img = item[0], base / item[1], base / item[2]
            elif isinstance(item, (str, Path)):
                ann = base / item
                img, name = ann.parent, f"{ann.parent.parent.name}/{ann.parent.name}"
            else:
                raise EvaluationError(f"{manifest}: entry {j} must be a path or {{name, annotations, images}}, "
                                      f"got {item!r}")
            entries.append(OdinwEntry(str(name), Path(ann), Path(img)))
    names = [e.name for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvaluationError(f"ODinW dataset names must be unique; repeated: {dup}")
    return entries


# --------------------------------------------------------------------------------------------------------------------
# Flickr30k Entities (MDETR format)


@dataclass
class FlickrEntry:
    """One sentence of an image with the phrases to ground.

    Attributes:
        entry_id: the MDETR entry id (one per image and sentence).
        image_path, image_size: the image and its annotated ``(width, height)``.
        caption: the sentence.
        original_img_id, sentence_id: the Flickr30k image id and the sentence's index.
        phrases: the text of each phrase (its first span in the caption).
        phrase_spans: each phrase's ``[(start, end)]``.
        gt_boxes: per phrase ``(n, 4)`` xyxy ground-truth boxes (``x + w``: MDETR stores ``w = xmax - xmin`` of the
            Flickr30k Entities xml, so these are the xml's boxes).
        phrase_types: per phrase its Flickr30k Entities types (``[]`` when unknown).
    """

    entry_id: Any
    image_path: Path
    image_size: tuple[int, int]
    caption: str
    original_img_id: Any
    sentence_id: Any
    phrases: list[str]
    phrase_spans: list[list[tuple[int, int]]]
    gt_boxes: list[np.ndarray]
    phrase_types: list[list[str]]


@dataclass
class FlickrDataset:
    """The sentences of an MDETR-format grounding file, with counts of what was left out."""

    name: str
    ann_file: Path
    entries: list[FlickrEntry]
    notes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_phrases(self) -> int:
        return sum(len(e.phrases) for e in self.entries)


def parse_flickr_sentence(line: str) -> tuple[str, list[tuple[tuple[int, int], list[str]]]]:
    """One line of a Flickr30k Entities ``Sentences/<id>.txt`` file.

    The line marks phrases as ``[/EN#<entity>/<type>[/<type>...] words]``; the sentence is the words joined by single
    spaces (as MDETR builds its captions).

    Returns:
        ``(sentence, [((start, end), types), ...])``: each phrase's character span in the sentence and its types.
    """
    words: list[str] = []
    phrases: list[tuple[tuple[int, int], list[str]]] = []
    cursor = 0  # length of " ".join(words)
    start = None
    types: list[str] = []
    for token in line.split():
        if start is None and token.startswith("[/EN#"):
            start = cursor + (1 if words else 0)
            types = token.split("/")[2:]
            continue
        closing = start is not None and token.endswith("]")
        word = token[:-1] if closing else token
        cursor += len(word) + (1 if words else 0)
        words.append(word)
        if closing:
            phrases.append(((start, cursor), types))
            start = None
    return " ".join(words), phrases


def _sentence_types(sentences_dir: Path, original_img_id: Any, sentence_id: Any,
                    cache: dict) -> dict[tuple[int, int], list[str]] | None:
    key = str(original_img_id)
    if key not in cache:
        path = sentences_dir / f"{key}.txt"
        # as the official reader (and MDETR's): lines split at "\n", only empty ones skipped, so a line of spaces
        # is a sentence and keeps the indices of the sentences after it
        cache[key] = ([parse_flickr_sentence(ln) for ln in path.read_text(encoding="utf-8").split("\n") if ln]
                      if path.is_file() else None)
    lines = cache[key]
    if lines is None or not isinstance(sentence_id, int) or not 0 <= sentence_id < len(lines):
        return None
    return {span: types for span, types in lines[sentence_id][1]}


def load_flickr_dataset(ann_file: str | Path, image_root: str | Path | None = None, *,
                        sentences_dir: str | Path | None = None, name: str | None = None) -> FlickrDataset:
    """Read an MDETR-format grounding file (``final_flickr_separateGT_{val,test}.json``) for phrase-grounding recall.

    A phrase (one entry of ``tokens_positive_eval``) is grounded by every annotation whose ``tokens_positive`` holds
    one of its spans. Phrases without a box (counted) and sentences without phrases (counted) are left out, as the
    official evaluator does.

    Args:
        sentences_dir: the Flickr30k Entities ``Sentences`` folder, for phrase types (optional).

    Raises:
        EvaluationError: a malformed file or record (named).
    """
    ann_file = Path(ann_file)
    image_root = Path(image_root) if image_root is not None else ann_file.parent
    try:
        data = read_json(ann_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise EvaluationError(f"{ann_file}: expected an MDETR-format object with 'images' and 'annotations'")
        boxes_by_entry: dict[Any, list[tuple[list[float], list[tuple[int, int]]]]] = {}
        captions = {}
        for i, img in enumerate(data["images"]):
            require(img, ("id", "file_name", "width", "height", "caption", "tokens_positive_eval"),
                    f"{ann_file}: images[{i}]")
            if img["id"] in captions:
                raise EvaluationError(f"{ann_file}: images[{i}]: duplicate id {img['id']!r}")
            captions[img["id"]] = img["caption"]
            boxes_by_entry[img["id"]] = []
        for j, ann in enumerate(data["annotations"]):
            where = f"{ann_file}: annotations[{j}]"
            require(ann, ("image_id", "bbox", "tokens_positive"), where)
            if ann["image_id"] not in captions:
                raise EvaluationError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
            spans = check_spans(ann["tokens_positive"], captions[ann["image_id"]], where)
            box = ann["bbox"]
            if not (isinstance(box, list) and len(box) == 4):
                raise EvaluationError(f"{where}: bbox must be [x, y, w, h], got {box!r}")
            boxes_by_entry[ann["image_id"]].append((box, spans))
        notes: Counter = Counter()
        entries: list[FlickrEntry] = []
        cache: dict = {}
        types_dir = Path(sentences_dir) if sentences_dir is not None else None
        if types_dir is not None and not types_dir.is_dir():
            raise EvaluationError(f"Flickr30k Entities Sentences folder not found: {types_dir}")
        for i, img in enumerate(data["images"]):
            where = f"{ann_file}: images[{i}] (id={img['id']!r})"
            caption = img["caption"]
            span_types = (_sentence_types(types_dir, img.get("original_img_id"), img.get("sentence_id"), cache)
                          if types_dir is not None else None)
            phrases, phrase_spans, gt, types = [], [], [], []
            for k, p in enumerate(img["tokens_positive_eval"]):
                spans = check_spans(p, caption, f"{where} tokens_positive_eval[{k}]")
                if not spans:
                    raise EvaluationError(f"{where}: tokens_positive_eval[{k}] is empty")
                span_set = set(spans)
                xywh = [b for b, s in boxes_by_entry[img["id"]] if span_set & set(s)]
                if not xywh:
                    notes["phrases_without_boxes"] += 1
                    continue
                arr = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
                arr[:, 2:] += arr[:, :2]
                phrases.append(caption[spans[0][0]:spans[0][1]])
                phrase_spans.append(spans)
                gt.append(arr)
                types.append(list(span_types.get(spans[0], [])) if span_types else [])
            if not phrases:
                notes["sentences_without_phrases"] += 1
                continue
            if types_dir is not None and span_types is None:
                notes["sentences_without_types"] += 1
            entries.append(FlickrEntry(
                entry_id=img["id"], image_path=image_root / img["file_name"],
                image_size=(int(img["width"]), int(img["height"])), caption=caption,
                original_img_id=img.get("original_img_id", img["id"]), sentence_id=img.get("sentence_id", 0),
                phrases=phrases, phrase_spans=phrase_spans, gt_boxes=gt, phrase_types=types))
    except ReaderError as exc:
        raise EvaluationError(str(exc)) from None
    return FlickrDataset(name=name or ann_file.name.split(".")[0], ann_file=ann_file, entries=entries, notes=notes)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (small files: metrics)."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
