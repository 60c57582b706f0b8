"""Shared machinery of the dataset readers: file loading, box conventions, drop accounting, lazy images.

Every reader is a map-style ``torch.utils.data.Dataset`` whose ``__getitem__`` returns a
:class:`~glip_data.sample.GroundingSample`. Readers parse their annotation file once, at construction, into plain
arrays and lists (no open file handles, so they pickle into DataLoader workers and work with
``DistributedSampler``); images are decoded only when asked (``load_image=True`` or :meth:`GroundingReader.load_image`).

Bad input never passes silently. Two kinds of trouble are told apart:

* *structural* problems of a record (a missing key, a duplicate id, an unknown image or category id, a span outside
  its caption): with ``errors="raise"`` (the default) a :class:`ReaderError` names the file and the record; with
  ``errors="drop"`` the record is dropped and counted under its reason in ``reader.stats``;
* *box quality* (boxes reaching outside the image, boxes with no area): always fixed or dropped, and counted.

``reader.report()`` prints the counts. Every record dropped for a problem or a box without area is also *named*:
``reader.check.dropped`` holds, per reason, the first :data:`NAMED_DROPS` messages ``"<record>: <what is wrong>"``
(``glip train`` reports them; the counts stay in ``reader.stats``).

Box conventions (``box_convention``):

* ``"official"`` (default, parity with the official checkpoints): boxes are *inclusive pixel* coordinates, the legacy
  ``TO_REMOVE = 1`` convention of GLIP/maskrcnn-benchmark: a COCO ``[x, y, w, h]`` becomes
  ``(x, y, x + w - 1, y + h - 1)``, boxes are clipped to ``[0, W - 1] x [0, H - 1]``
  (docs/official_model.md#grounding-data, docs/official_model.md#box-conventions).
* ``"exact"``: continuous coordinates, ``(x, y, x + w, y + h)``, clipped to ``[0, W] x [0, H]``.

The arithmetic is :mod:`glip_data.boxes` (``legacy=True`` for ``"official"``). The structural checks of a record
live in :class:`RecordChecker`, which the converter (:mod:`glip_data.convert`) uses too, so every format has one
parser.

Files that store ``xyxy`` (ODVG, captions) hold continuous coordinates (``x2 = x + w``, as the ecosystem's converters
write them), so the same object gets the same box whichever format it is read from. After clipping, a box is kept
only if ``x2 > x1`` and ``y2 > y1`` (so in the official convention a one-pixel-wide box is dropped, as in the
official ``remove_empty``).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from glip_data.boxes import clip_boxes, nonempty_boxes
from glip_data.images import ImageFrame, load_image as _load_image
from glip_data.sample import GroundingSample

BoxConvention = Literal["official", "exact"]
ErrorPolicy = Literal["raise", "drop"]
BOX_CONVENTIONS = ("official", "exact")

# Drop/fix reasons that are about box quality: always counted, never an error.
BOX_NONPOSITIVE = "box_nonpositive_size"
BOX_CLIPPED = "box_clipped"
BOX_EMPTY_AFTER_CLIP = "box_empty_after_clip"
#: dropped records named per reason in ``RecordChecker.dropped`` (the rest are only counted)
NAMED_DROPS = 100


class ReaderError(ValueError):
    """A malformed annotation file or record. The message names the file and the record."""


# --------------------------------------------------------------------------------------------------------------------
# files


def _open_text(path: Path) -> io.TextIOBase:
    """Open a text file, transparently gunzipping ``*.gz`` (and anything starting with the gzip magic)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file (optionally gzip-compressed) with an error that names the file and the position."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ReaderError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, record)`` for every non-blank line of a JSON Lines file (optionally gzipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ReaderError(f"{path}:{lineno}: not valid JSON ({err.msg}, column {err.colno})") from None


def require(record: Any, keys: tuple[str, ...], where: str) -> None:
    """Raise a :class:`ReaderError` naming ``where`` if ``record`` is not a dict holding all ``keys``."""
    if not isinstance(record, dict):
        raise ReaderError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ReaderError(f"{where}: missing key(s) {missing} (present: {sorted(record)[:12]})")


def check_spans(spans: Any, text: str, where: str) -> list[tuple[int, int]]:
    """Validate a ``tokens_positive`` entry (a list of ``[start, end)`` pairs) against ``text``."""
    if not isinstance(spans, (list, tuple)):
        raise ReaderError(f"{where}: tokens_positive must be a list of [start, end] pairs, got {spans!r}")
    out = []
    for span in spans:
        if (
            not isinstance(span, (list, tuple))
            or len(span) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
        ):
            raise ReaderError(f"{where}: a span must be two integers [start, end], got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(text):
            raise ReaderError(
                f"{where}: span [{start}, {end}) is outside the caption of length {len(text)}: {text!r}"
            )
        out.append((start, end))
    return out


def _is_number(v: Any) -> bool:
    """An int or float (``bool`` excluded)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_box(v: Any) -> bool:
    """Four numbers (``[x, y, w, h]`` or ``[x1, y1, x2, y2]``, as a list or tuple)."""
    return isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_number(x) for x in v)


def _is_image_size(w: Any, h: Any) -> bool:
    """An image ``width``/``height`` pair as a file must give it: positive integers (``640.0`` accepted)."""
    return _is_number(w) and _is_number(h) and w > 0 and h > 0 and int(w) == w and int(h) == h


def check_convention(box_convention: str) -> str:
    if box_convention not in BOX_CONVENTIONS:
        raise ValueError(f"box_convention must be one of {BOX_CONVENTIONS}, got {box_convention!r}")
    return box_convention


def read_coco_json(path: str | os.PathLike, lists: tuple[str, ...]) -> dict[str, Any]:
    """A COCO-shaped json (COCO, Objects365, LVIS, MDETR): a JSON object holding the top-level ``lists``."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ReaderError(f"{path}: expected a JSON object with {', '.join(lists)}, got {type(data).__name__}")
    for key in lists:
        if key not in data:
            raise ReaderError(f"{path}: missing top-level key {key!r} (present: {sorted(data)})")
        if not isinstance(data[key], list):
            raise ReaderError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _is_id(v: Any) -> bool:
    """A record id as files give them: an int (``bool`` excluded) or a string."""
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


# --------------------------------------------------------------------------------------------------------------------
# record checks


class RecordChecker:
    """The structural checks of annotation records, shared by the readers and the converter.

    A *problem* of a record (a duplicate id, an unknown image id, a bad box, a span outside its caption...) raises a
    :class:`ReaderError` naming ``source`` and the record when ``errors="raise"``, or is counted in ``stats`` under
    its reason when ``errors="drop"``; the check then answers ``None``/``False`` and the caller leaves the record
    out. A record that is not an object or lacks a required key always raises. The converter uses the strict
    policy, so a file converts only if a reader would read it without dropping a record.

    Args:
        source: the file, for messages.
        errors: ``"raise"`` or ``"drop"``.
        stats: the counter of dropped records (a new one by default).
        skips: a :class:`glip_data.report.SkipReport` that also names (and counts) every dropped record (a
            command's report).

    Attributes:
        dropped: ``{reason: [message, ...]}``, the first :data:`NAMED_DROPS` dropped records of each reason, each
            message ``"<record>: <what is wrong>"`` (``stats`` has the full counts).
    """

    def __init__(self, source: str | os.PathLike, errors: ErrorPolicy = "raise", stats: Counter | None = None,
                 skips: Any = None) -> None:
        if errors not in ("raise", "drop"):
            raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
        self.source = source
        self.errors = errors
        self.stats = stats if stats is not None else Counter()
        self.skips = skips
        self.dropped: dict[str, list[str]] = {}

    def problem(self, reason: str, message: str) -> None:
        """Raise ``message`` (``"<record>: <what is wrong>"``, prefixed with the file) or count and name it under
        ``reason``."""
        if self.errors == "raise":
            raise ReaderError(f"{self.source}: {message}")
        self.stats[reason] += 1
        self.name(reason, message)

    def name(self, reason: str, message: str) -> None:
        """Name a dropped record (``message``: ``"<record>: <what is wrong>"``): kept in :attr:`dropped` if
        ``reason`` has room, and reported to ``skips`` when there is one."""
        named = self.dropped.setdefault(reason, [])
        if len(named) < NAMED_DROPS:
            named.append(message)
        if self.skips is not None:
            record, _, what = message.partition(": ")
            self.skips.skip(reason.replace("_", " "), f"{self.source} {record}", what or None)

    def name_rows(self, reason: str, rows: np.ndarray, describe: Any) -> None:
        """Name the dropped rows ``rows`` of a reason (``describe(row) -> message``): all of them when there is a
        ``skips`` report (it counts every one), else as many as :attr:`dropped` has room for."""
        room = len(rows) if self.skips is not None else NAMED_DROPS - len(self.dropped.get(reason, ()))
        for row in rows[:max(room, 0)]:
            self.name(reason, describe(int(row)))

    def count(self, reason: str, n: Any = 1) -> None:
        """Add ``n`` to ``stats[reason]`` (zero counts are not recorded): facts, not problems."""
        if int(n):
            self.stats[reason] += int(n)

    def require(self, record: Any, keys: tuple[str, ...], where: str) -> None:
        """Raise (always) unless ``record`` is a JSON object holding all ``keys``."""
        require(record, keys, f"{self.source}: {where}")

    def image_size(self, width: Any, height: Any, where: str) -> bool:
        if _is_image_size(width, height):
            return True
        self.problem("bad_image_size", f"{where}: width/height must be positive integers, got {width!r}x{height!r}")
        return False

    def file_name(self, name: Any, where: str, key: str = "file_name") -> str | None:
        """An image path as the file gives it (a non-empty string), or ``None`` (problem ``missing_file_name``)."""
        if isinstance(name, str) and name:
            return name
        self.problem("missing_file_name", f"{where}: missing or empty {key!r}")
        return None

    def caption(self, caption: Any, where: str) -> bool:
        if isinstance(caption, str):
            return True
        self.problem("bad_caption", f"{where}: caption must be a string, got {caption!r}")
        return False

    def box(self, box: Any, where: str, layout: str) -> bool:
        """Four numbers (``layout`` names them in the message: ``"x, y, w, h"`` or ``"x1, y1, x2, y2"``)."""
        if _is_box(box):
            return True
        self.problem("bad_bbox", f"{where}: bbox must be [{layout}] numbers, got {box!r}")
        return False

    def spans(self, spans: Any, text: str, where: str) -> list[tuple[int, int]] | None:
        """:func:`check_spans` with the policy (problem ``span_outside_caption``)."""
        try:
            return check_spans(spans, text, f"{self.source}: {where}")
        except ReaderError as err:
            if self.errors == "raise":
                raise
            self.stats["span_outside_caption"] += 1
            self.name("span_outside_caption", str(err).removeprefix(f"{self.source}: "))
            return None

    # -- COCO-shaped files (COCO, Objects365, LVIS, MDETR) ------------------------------------------------------------

    def categories(self, categories: list) -> list[dict]:
        """The valid ``categories`` entries in file order: objects with ``id`` and a string ``name``; a repeated id
        is a ``duplicate_category_id`` problem."""
        out: list[dict] = []
        seen: set = set()
        for i, cat in enumerate(categories):
            where = f"categories[{i}]"
            self.require(cat, ("id", "name"), where)
            if not isinstance(cat["name"], str):
                raise ReaderError(f"{self.source}: {where}: 'name' must be a string, got {cat['name']!r}")
            if not _is_id(cat["id"]):
                self.problem("bad_category_id", f"{where}: id must be an integer or a string, got {cat['id']!r}")
                continue
            if cat["id"] in seen:
                self.problem("duplicate_category_id", f"{where}: duplicate category id {cat['id']!r}")
                continue
            seen.add(cat["id"])
            out.append(cat)
        return out

    def image_entries(self, images: list, keys: tuple[str, ...], skipped: set) -> Iterator[tuple[int, dict, str]]:
        """Yield ``(i, entry, where)`` for the usable ``images[i]``: objects with ``keys`` (always required), a new
        int/str ``id`` (``duplicate_image_id``, ``bad_image_id``), a positive integer size (``bad_image_size``; such
        an id joins ``skipped``, so its boxes count as ``box_of_skipped_image``). A caller that rejects a yielded
        entry adds its id to ``skipped`` too."""
        seen: set = set()
        for i, img in enumerate(images):
            self.require(img, keys, f"images[{i}]")
            where = f"images[{i}] (id={img['id']!r})"
            if not _is_id(img["id"]):
                self.problem("bad_image_id", f"{where}: id must be an integer or a string")
                continue
            if img["id"] in seen:
                self.problem("duplicate_image_id", f"{where}: duplicate image id")
                continue
            seen.add(img["id"])
            if not self.image_size(img["width"], img["height"], where):
                skipped.add(img["id"])
                continue
            yield i, img, where

    def annotation(self, j: int, ann: Any, keys: tuple[str, ...], image_index: dict, seen_ids: set,
                   skipped_image_ids: set, *, require_id: bool = True) -> tuple[int | None, str]:
        """Vet ``annotations[j]``: its keys (``id`` unless ``require_id=False``, ``image_id`` and ``keys``; always
        required), a new ``id`` (``duplicate_annotation_id``; ``seen_ids`` gains it) and a known ``image_id``
        (``unknown_image_id``; one of ``skipped_image_ids`` is counted as ``box_of_skipped_image``).

        Returns:
            ``(image_index[ann["image_id"]], where)``, or ``(None, where)`` to leave the annotation out.
        """
        self.require(ann, (("id",) if require_id else ()) + ("image_id", *keys), f"annotations[{j}]")
        where = f"annotations[{j}] (id={ann.get('id')!r}, image_id={ann['image_id']!r})"
        if "id" in ann:
            if not _is_id(ann["id"]):
                self.problem("bad_annotation_id", f"{where}: id must be an integer or a string")
                return None, where
            if ann["id"] in seen_ids:
                self.problem("duplicate_annotation_id", f"{where}: duplicate annotation id")
                return None, where
            seen_ids.add(ann["id"])
        image_id = ann["image_id"]
        if _is_id(image_id) and image_id in image_index:
            return image_index[image_id], where
        if _is_id(image_id) and image_id in skipped_image_ids:
            self.count("box_of_skipped_image")
        else:
            self.problem("unknown_image_id", f"{where}: image_id {image_id!r} is not in 'images'")
        return None, where


# --------------------------------------------------------------------------------------------------------------------
# boxes


def is_legacy(box_convention: str) -> bool:
    """``True`` for the ``"official"`` convention (inclusive pixels, ``legacy=True`` in :mod:`glip_data.boxes`)."""
    return check_convention(box_convention) == "official"


def sanitize_boxes(
    xyxy: np.ndarray,
    sizes_wh: np.ndarray,
    box_convention: str,
    stats: Counter,
    input_wh: np.ndarray | None = None,
    on_drop: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to their images and find the ones to keep, counting every change.

    Args:
        xyxy: ``(K, 4)`` boxes in the reader's convention.
        sizes_wh: ``(K, 2)`` width and height of the image each box belongs to.
        box_convention: ``"official"`` clips to ``W - 1``/``H - 1``, ``"exact"`` to ``W``/``H``.
        stats: counter updated with :data:`BOX_NONPOSITIVE`, :data:`BOX_CLIPPED`, :data:`BOX_EMPTY_AFTER_CLIP`.
        input_wh: ``(K, 2)`` width/height as written in the file, when it has them (xywh formats); a box with
            ``w <= 0`` or ``h <= 0`` there is dropped as non-positive even if the convention would shift it.
        on_drop: called as ``on_drop(reason, rows)`` with the ``(n,)`` rows dropped for each reason (to name them,
            :meth:`RecordChecker.name_rows`).

    Returns:
        ``(clipped (K, 4) float64, keep (K,) bool)``.
    """
    xyxy = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    sizes_wh = np.asarray(sizes_wh, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(xyxy).all(axis=1)
    if input_wh is not None:
        input_wh = np.asarray(input_wh, dtype=np.float64).reshape(-1, 2)
        nonpositive = ~((input_wh[:, 0] > 0) & (input_wh[:, 1] > 0))
    else:
        nonpositive = ~nonempty_boxes(xyxy)
    nonpositive |= ~finite
    finite_xyxy = np.where(finite[:, None], xyxy, 0.0)
    clipped = clip_boxes(finite_xyxy, height=sizes_wh[:, 1], width=sizes_wh[:, 0], legacy=is_legacy(box_convention))
    changed = (clipped != finite_xyxy).any(axis=1) & ~nonpositive
    nonempty = nonempty_boxes(clipped)
    keep = ~nonpositive & nonempty
    empty_after_clip = ~nonpositive & ~nonempty
    for reason, count in ((BOX_NONPOSITIVE, nonpositive.sum()), (BOX_EMPTY_AFTER_CLIP, empty_after_clip.sum()),
                          (BOX_CLIPPED, (changed & keep).sum())):
        if count:
            stats[reason] += int(count)
    if on_drop is not None:
        for reason, rows in ((BOX_NONPOSITIVE, nonpositive), (BOX_EMPTY_AFTER_CLIP, empty_after_clip)):
            if rows.any():
                on_drop(reason, np.nonzero(rows)[0])
    return clipped, keep


# --------------------------------------------------------------------------------------------------------------------
# the base class


class GroundingReader(Dataset):
    """Base of every reader: a map-style dataset of :class:`GroundingSample`.

    Subclasses parse their file in ``__init__`` (after calling ``super().__init__``) into *records* (an image, or an
    image entry with its caption) and flat per-box arrays sorted by record, call :meth:`_group_boxes` and
    :meth:`_select_records`, and implement :meth:`_build_sample` (using :meth:`_record_boxes`). ``__len__`` and
    :attr:`num_boxes` follow from the grouping.

    Args:
        ann_file: the annotation file.
        image_root: directory the image paths of the file are relative to (``None``: the annotation file's folder).
        load_image: decode the image in ``__getitem__`` (otherwise ``sample.image`` is ``None`` until
            :meth:`load_image` is called).
        box_convention: ``"official"`` (inclusive pixels, GLIP's ``+1`` convention) or ``"exact"``; see the module doc.
        errors: ``"raise"`` a :class:`ReaderError` on a structural problem of a record, or ``"drop"`` the record and
            count it.
        on_bad_image: when an image cannot be decoded in ``__getitem__``: ``"raise"`` the
            :class:`~glip_data.ImageLoadError` (an ``OSError``) naming the file,
            or ``"skip"`` to the next index (counted as ``image_unreadable`` in this process's ``stats``).
        tokenizer: a fast Hugging Face tokenizer; when given, ``sample.positive_map`` is filled
            (:func:`glip_data.positive_map.build_positive_map`, ``max_text_len`` columns).
        max_text_len: columns of the positive map (the model's 256).
        dataset_name: name recorded in ``sample.metadata["dataset"]`` (default: the file's stem).
        skips: a :class:`glip_data.report.SkipReport` naming every dropped record and skipped image (a command's
            report; the counts are in ``stats`` either way).
    """

    task: str = "grounding"

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike | None = None,
        *,
        load_image: bool = False,
        box_convention: BoxConvention = "official",
        errors: ErrorPolicy = "raise",
        on_bad_image: Literal["raise", "skip"] = "raise",
        tokenizer: Any = None,
        max_text_len: int = 256,
        dataset_name: str | None = None,
        skips: Any = None,
    ) -> None:
        super().__init__()
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent
        self.load_images = bool(load_image)
        self.box_convention = check_convention(box_convention)
        self.stats: Counter = Counter()
        self.check = RecordChecker(self.ann_file, errors, self.stats, skips)  # validates ``errors``
        self.errors = errors
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.dataset_name = dataset_name or self.ann_file.name.split(".")[0]

    @property
    def legacy(self) -> bool:
        """Whether the boxes use the legacy inclusive-pixel convention (``box_convention="official"``)."""
        return is_legacy(self.box_convention)

    # -- error policy -------------------------------------------------------------------------------------------------

    def _problem(self, reason: str, message: str) -> None:
        """A structural problem: raise (``errors="raise"``) or count under ``reason`` (``errors="drop"``)."""
        self.check.problem(reason, message)

    def _count(self, reason: str, n: Any) -> None:
        """Add ``n`` to ``stats[reason]`` (zero counts are not recorded)."""
        self.check.count(reason, n)

    # -- boxes grouped by record --------------------------------------------------------------------------------------
    # A reader holds the kept boxes of all its R records in flat (K, ...) arrays sorted by record; ``self._offsets``
    # (R + 1,) says where each record's boxes start, and ``self._order`` (N,) lists the records it yields: sample
    # ``index`` is record ``self._order[index]``, whose boxes are rows ``_offsets[k]:_offsets[k + 1]``.

    def _group_boxes(self, owner: np.ndarray, num_records: int) -> np.ndarray:
        """Set ``self._offsets`` from the record of every kept box.

        Args:
            owner: ``(K,)`` int record index of each kept box, non-decreasing (the box arrays are sorted by record).
            num_records: ``R``, the number of records (those without boxes included).

        Returns:
            ``(R,)`` int64 number of boxes of each record.
        """
        counts = np.bincount(owner, minlength=num_records)
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return counts

    def _line_box_namer(self, owner: list[int], boxes: list) -> Any:
        """``on_drop`` of :func:`sanitize_boxes` for line-based files (``self._records[k][0]``: line number)."""
        return lambda reason, rows: self.check.name_rows(
            reason, rows, lambda i: f"line {self._records[owner[i]][0]}: box {boxes[i]!r}")

    def _training_box_counts(self) -> np.ndarray:
        """``(R,)`` number of non-crowd boxes of each record (``self._crowd``: ``(K,)`` bool, set by the reader)."""
        num_records = len(self._offsets) - 1
        owner = np.repeat(np.arange(num_records), np.diff(self._offsets))
        return np.bincount(owner[~self._crowd], minlength=num_records)

    def _select_records(self, counts: np.ndarray, min_boxes: int, drop_reason: str = "image_without_boxes") -> None:
        """Set ``self._order`` to the records with at least ``min_boxes`` boxes, in file order.

        Args:
            counts: ``(R,)`` boxes of each record (only those that should count towards ``min_boxes``).
            min_boxes: ``0`` keeps every record; ``skip_empty`` is ``1``.
            drop_reason: the ``stats`` key the left-out records are counted under.
        """
        self._order = np.nonzero(counts >= min_boxes)[0]
        self._count(drop_reason, len(counts) - len(self._order))

    def _record_boxes(self, index: int) -> tuple[int, int, int]:
        """``(k, start, end)``: the record ``k`` of sample ``index`` and its boxes' rows ``[start, end)``."""
        k = int(self._order[index])
        return k, int(self._offsets[k]), int(self._offsets[k + 1])

    def _count_boxes(self, counted: np.ndarray | None = None) -> int:
        """Boxes of the records this reader yields; ``counted``: ``(K,)`` bool, only those boxes (``None``: all)."""
        selected = np.zeros(len(self._offsets) - 1, dtype=bool)
        selected[self._order] = True
        per_box = np.repeat(selected, np.diff(self._offsets))
        if counted is not None:
            per_box &= counted
        return int(per_box.sum())

    @property
    def num_boxes(self) -> int:
        """Boxes over the samples this reader yields."""
        return self._count_boxes()

    # -- dataset protocol ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order)

    def _build_sample(self, index: int) -> GroundingSample:  # pragma: no cover
        raise NotImplementedError

    def resolve_path(self, relative: str) -> Path:
        """Where an image named in the file lives on disk."""
        return self.image_root / relative

    def image_path(self, index: int) -> Path:
        """Where the image of sample ``index`` lives on disk (without reading it)."""
        return Path(self._build_sample(index).image_path)

    def __getitem__(self, index: int) -> GroundingSample:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        index = index % n
        if not self.load_images:
            return self._finish(self._build_sample(index))
        tries = n if self.on_bad_image == "skip" else 1
        for attempt in range(tries):
            sample = self._build_sample((index + attempt) % n)
            try:
                self.load_image(sample)
            except OSError as err:
                if self.on_bad_image == "raise":
                    raise
                self.stats["image_unreadable"] += 1
                if self.check.skips is not None:
                    self.check.skips.skip("unreadable image", sample.image_path, str(err))
                else:
                    warnings.warn(f"{err}; skipping to the next index", stacklevel=2)
                continue
            return self._finish(sample)
        raise OSError(f"{self.ann_file}: no readable image in the whole dataset")

    def _finish(self, sample: GroundingSample) -> GroundingSample:
        if self.tokenizer is not None:
            from glip_data.positive_map import build_positive_map

            sample.positive_map = build_positive_map(
                self.tokenizer, sample.caption, sample.tokens_positive, max_len=self.max_text_len
            )
        return sample

    def load_image(self, sample: GroundingSample) -> GroundingSample:
        """Decode ``sample.image_path`` into ``sample.image`` (:func:`glip_data.load_image`: PIL RGB, in the frame of
        the annotation, :meth:`glip_data.ImageFrame.matching` its width and height) and check it against the
        annotated size.

        Raises:
            ImageLoadError: the file is missing or cannot be decoded (an ``OSError`` naming the file and the record).
            ReaderError: the decoded size differs from the annotation's ``width``/``height``.
        """
        where = f"{self.ann_file.name}, image id {sample.metadata.get('image_id')!r}"
        image = _load_image(sample.image_path, where=where, frame=ImageFrame.matching(sample.width, sample.height))
        self._check_size(sample, image)
        sample.image = image
        return sample

    def _check_size(self, sample: GroundingSample, image: Any) -> None:
        if image.size != (sample.width, sample.height):
            raise ReaderError(
                f"{sample.image_path}: decoded size {image.size[0]}x{image.size[1]} differs from the annotation's "
                f"{sample.width}x{sample.height} ({self.ann_file.name}, image id {sample.metadata.get('image_id')!r})"
            )

    # -- reporting ----------------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Counts describing what was read (subclasses add theirs)."""
        return {"samples": len(self)}

    def report(self) -> str:
        """A human-readable account: what was read and everything dropped, clipped or flagged, by reason."""
        head = f"{type(self).__name__}({self.ann_file})"
        summary = ", ".join(f"{k}={v}" for k, v in self.summary().items())
        lines = [f"{head}: {summary}"]
        counts = sorted((k, v) for k, v in self.stats.items() if v)
        for reason, count in counts:
            lines.append(f"  {reason}: {count}")
        if not counts:
            lines.append("  nothing dropped or changed")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.ann_file)!r}, samples={len(self)})"


def as_boxes_tensor(boxes: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
