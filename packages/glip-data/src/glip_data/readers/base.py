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

``reader.report()`` prints the counts.

Box conventions (``box_convention``):

* ``"official"`` (default, parity with the official checkpoints): boxes are *inclusive pixel* coordinates, the legacy
  ``TO_REMOVE = 1`` convention of GLIP/maskrcnn-benchmark: a COCO ``[x, y, w, h]`` becomes
  ``(x, y, x + w - 1, y + h - 1)``, boxes are clipped to ``[0, W - 1] x [0, H - 1]`` (glip_spec.md §8.2, pitfall 12).
* ``"exact"``: continuous coordinates, ``(x, y, x + w, y + h)``, clipped to ``[0, W] x [0, H]``.

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

from glip_data.sample import GroundingSample

BoxConvention = Literal["official", "exact"]
ErrorPolicy = Literal["raise", "drop"]
BOX_CONVENTIONS = ("official", "exact")

# Drop/fix reasons that are about box quality: always counted, never an error.
BOX_NONPOSITIVE = "box_nonpositive_size"
BOX_CLIPPED = "box_clipped"
BOX_EMPTY_AFTER_CLIP = "box_empty_after_clip"


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


# --------------------------------------------------------------------------------------------------------------------
# boxes


def xywh_to_xyxy(boxes: np.ndarray, box_convention: str) -> np.ndarray:
    """``(K, 4)`` COCO ``[x, y, w, h]`` -> ``(K, 4)`` xyxy in the reader's convention (float64)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = boxes.copy()
    to_remove = 1.0 if box_convention == "official" else 0.0
    out[:, 2] = boxes[:, 0] + boxes[:, 2] - to_remove
    out[:, 3] = boxes[:, 1] + boxes[:, 3] - to_remove
    return out


def file_xyxy_to_internal(boxes: np.ndarray, box_convention: str) -> np.ndarray:
    """``(K, 4)`` continuous xyxy from a file (ODVG, captions) -> xyxy in the reader's convention (float64)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if box_convention == "official":
        out[:, 2:] -= 1.0
    return out


def internal_to_file_xyxy(boxes: Any, box_convention: str) -> list[list[float]]:
    """Inverse of :func:`file_xyxy_to_internal` (for writers that store continuous xyxy)."""
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    if box_convention == "official":
        out[:, 2:] += 1.0
    return out.tolist()


def sanitize_boxes(
    xyxy: np.ndarray,
    sizes_wh: np.ndarray,
    box_convention: str,
    stats: Counter,
    input_wh: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to their images and find the ones to keep, counting every change.

    Args:
        xyxy: ``(K, 4)`` boxes in the reader's convention.
        sizes_wh: ``(K, 2)`` width and height of the image each box belongs to.
        box_convention: ``"official"`` clips to ``W - 1``/``H - 1``, ``"exact"`` to ``W``/``H``.
        stats: counter updated with :data:`BOX_NONPOSITIVE`, :data:`BOX_CLIPPED`, :data:`BOX_EMPTY_AFTER_CLIP`.
        input_wh: ``(K, 2)`` width/height as written in the file, when it has them (xywh formats); a box with
            ``w <= 0`` or ``h <= 0`` there is dropped as non-positive even if the convention would shift it.

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
        nonpositive = ~((xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1]))
    nonpositive |= ~finite
    to_remove = 1.0 if box_convention == "official" else 0.0
    upper = np.stack([sizes_wh[:, 0], sizes_wh[:, 1], sizes_wh[:, 0], sizes_wh[:, 1]], axis=1) - to_remove
    clipped = np.clip(np.where(finite[:, None], xyxy, 0.0), 0.0, upper)
    changed = (clipped != np.where(finite[:, None], xyxy, 0.0)).any(axis=1) & ~nonpositive
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    keep = ~nonpositive & nonempty
    empty_after_clip = ~nonpositive & ~nonempty
    for reason, count in ((BOX_NONPOSITIVE, nonpositive.sum()), (BOX_EMPTY_AFTER_CLIP, empty_after_clip.sum()),
                          (BOX_CLIPPED, (changed & keep).sum())):
        if count:
            stats[reason] += int(count)
    return clipped, keep


# --------------------------------------------------------------------------------------------------------------------
# images


def open_image(path: str | os.PathLike, where: str = "") -> Any:
    """Decode an image file to a PIL RGB image; a failure raises an ``OSError`` naming the file and record."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        ctx = f" ({where})" if where else ""
        raise OSError(f"cannot open image {path}{ctx}: {err}") from err


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
        on_bad_image: when an image cannot be decoded in ``__getitem__``: ``"raise"`` an ``OSError`` naming the file,
            or ``"skip"`` to the next index (counted as ``image_unreadable`` in this process's ``stats``).
        tokenizer: a fast Hugging Face tokenizer; when given, ``sample.positive_map`` is filled
            (:func:`glip_data.positive_map.build_positive_map`, ``max_text_len`` columns).
        max_text_len: columns of the positive map (the model's 256).
        dataset_name: name recorded in ``sample.metadata["dataset"]`` (default: the file's stem).
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
    ) -> None:
        super().__init__()
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent
        self.load_images = bool(load_image)
        self.box_convention = check_convention(box_convention)
        if errors not in ("raise", "drop"):
            raise ValueError(f"errors must be 'raise' or 'drop', got {errors!r}")
        self.errors = errors
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.dataset_name = dataset_name or self.ann_file.name.split(".")[0]
        self.stats: Counter = Counter()

    # -- error policy -------------------------------------------------------------------------------------------------

    def _problem(self, reason: str, message: str) -> None:
        """A structural problem: raise (``errors="raise"``) or count under ``reason`` (``errors="drop"``)."""
        if self.errors == "raise":
            raise ReaderError(f"{self.ann_file}: {message}")
        self.stats[reason] += 1

    def _count(self, reason: str, n: Any) -> None:
        """Add ``n`` to ``stats[reason]`` (zero counts are not recorded)."""
        if int(n):
            self.stats[reason] += int(n)

    def _check_annotation(self, j: int, ann: Any, keys: tuple[str, ...], seen_ids: set, image_index: dict,
                          skipped_image_ids: set) -> tuple[int | None, str]:
        """Vet ``annotations[j]`` of a COCO-shaped file: its keys, ``id`` and ``image_id``.

        A record that is not an object or lacks ``id``, ``image_id`` or one of ``keys`` raises a
        :class:`ReaderError`. A repeated annotation id is a ``duplicate_annotation_id`` problem; an ``image_id`` not
        among the kept images is counted as ``box_of_skipped_image`` when that image was left out, else an
        ``unknown_image_id`` problem. ``seen_ids`` gains the annotation's id.

        Returns:
            ``(k, where)``: the record index of the annotation's image (``image_index[ann["image_id"]]``, ``None`` to
            drop the annotation) and the annotation's name for messages.
        """
        require(ann, ("id", "image_id", *keys), f"{self.ann_file}: annotations[{j}]")
        where = f"annotations[{j}] (id={ann['id']!r}, image_id={ann['image_id']!r})"
        if ann["id"] in seen_ids:
            self._problem("duplicate_annotation_id", f"{where}: duplicate annotation id")
            return None, where
        seen_ids.add(ann["id"])
        if ann["image_id"] not in image_index:
            if ann["image_id"] in skipped_image_ids:
                self.stats["box_of_skipped_image"] += 1
            else:
                self._problem("unknown_image_id", f"{where}: image_id is not in 'images'")
            return None, where
        return image_index[ann["image_id"]], where

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
        """Decode ``sample.image_path`` into ``sample.image`` (PIL RGB) and check it against the annotated size.

        Raises:
            OSError: the file is missing or cannot be decoded (the message names the file and the record).
            ReaderError: the decoded size differs from the annotation's ``width``/``height``.
        """
        where = f"{self.ann_file.name}, image id {sample.metadata.get('image_id')!r}"
        image = open_image(sample.image_path, where)
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
