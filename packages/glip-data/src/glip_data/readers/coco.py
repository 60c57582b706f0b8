"""COCO detection json (also ODinW / Roboflow exports and custom COCO-format datasets).

Detection is grounding with a fixed text: every sample's ``caption`` is the detection prompt over *all* categories in
label order (:func:`glip_data.detection_prompt`, ``"person. bicycle. car"``) and each box's ``tokens_positive`` is the
span of its category's name — the official COCO fine-tuning caption with ``DISABLE_SHUFFLE`` and the evaluation
prompt (docs/official_model.md#prompts, docs/official_model.md#detection-to-grounding). Negative sampling, shuffling
and token-budget screening for pre-training belong to the detection→grounding step
(:class:`glip_data.DetectionToGrounding`), which rebuilds the caption from ``sample.labels`` and
``reader.categories``.

Categories get contiguous labels ``1..K`` in category-id order (``reader.categories = {label: name}``,
``reader.label_to_cat_id`` / ``reader.cat_id_to_label`` map back to the file's ids). A category named
``background`` / ``__background__`` (Roboflow/ODinW exports) is removed and its boxes are dropped and counted.
Crowd boxes (``iscrowd = 1``) are not training boxes: they are left out of ``sample.boxes`` and kept, flagged, in
``sample.metadata["crowd_boxes"]`` (xyxy) and ``["crowd_labels"]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glip_data.boxes import xywh_to_xyxy
from glip_data.readers.base import (
    GroundingReader,
    ReaderError,
    _is_id,
    as_boxes_tensor,
    read_coco_json,
    sanitize_boxes,
)
from glip_data.sample import GroundingSample

BACKGROUND_NAMES = frozenset({"background", "__background__"})


class COCODetection(GroundingReader):
    """A COCO-format detection file as :class:`GroundingSample` s.

    Args:
        ann_file: the COCO json (``images``, ``annotations``, ``categories``), optionally gzipped.
        image_root: directory that ``file_name`` is relative to (default: the json's folder).
        include_crowd: put crowd boxes among the training boxes too (default: flagged in metadata only).
        skip_empty: leave out images that have no training box (counted as ``image_without_boxes``); the
            official training sets do this, evaluation must not.
        **kwargs: :class:`~glip_data.readers.base.GroundingReader` options (``load_image``, ``box_convention``,
            ``errors``, ``on_bad_image``, ``tokenizer``, ``max_text_len``, ``dataset_name``).

    Attributes:
        categories: ``{label: name}``, labels ``1..K`` in category-id order (names as in the file; the prompt
            cleans them).
        category_info: one dict per label with the file's fields (``id``, ``name``, ...) plus ``label``.
        cat_id_to_label, label_to_cat_id: the id mappings.
        prompt, prompt_spans: the detection prompt of all categories and the span of each label (index label - 1).
        stats: counts of everything dropped, clipped or flagged, by reason.
    """

    task = "detection"
    has_crowd = True

    def __init__(self, ann_file, image_root=None, *, include_crowd: bool = False, skip_empty: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(ann_file, image_root, **kwargs)
        self.include_crowd = bool(include_crowd)
        self.skip_empty = bool(skip_empty)
        data = read_coco_json(self.ann_file, ("images", "annotations", "categories"))
        self._parse_categories(data["categories"])
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])
        from glip_data.prompts import clean_name, detection_prompt

        names = [self.categories[label] for label in range(1, len(self.categories) + 1)]
        for label, name in enumerate(names, 1):
            if not clean_name(name).strip():  # named by its id: the file's own key for it
                raise ReaderError(f"{self.ann_file}: category id {self.label_to_cat_id[label]!r} has the name "
                                  f"{name!r}, which is empty once cleaned and cannot be put in a prompt; give it a "
                                  "name")
        self.prompt, self.prompt_spans = detection_prompt(names)

    # -- hooks for the COCO-like formats (Objects365, LVIS) ------------------------------------------------------------

    def _category_name(self, cat: dict) -> str:
        return cat["name"]

    def _image_file(self, img: dict, where: str) -> str | None:
        """The image's path relative to ``image_root``; ``None`` (after reporting the problem) to leave it out."""
        return self.check.file_name(img.get("file_name"), where)

    def _skip_image(self, file_name: str) -> str | None:
        """A reason to leave a (known-bad) image out, or ``None``."""
        return None

    def _image_extra(self, img: dict) -> dict[str, Any] | None:
        """Per-image metadata to keep (e.g. LVIS's negative category ids)."""
        return None

    # -- parsing ------------------------------------------------------------------------------------------------------

    def _parse_categories(self, cats: list) -> None:
        seen: dict[Any, dict] = {}
        self.background_cat_ids: set = set()
        for cat in self.check.categories(cats):
            if cat["name"].strip().lower() in BACKGROUND_NAMES:
                self.background_cat_ids.add(cat["id"])
                self.stats["background_category_removed"] += 1
                continue
            seen[cat["id"]] = cat
        if not seen:
            raise ReaderError(f"{self.ann_file}: no categories (after removing background)")
        try:
            ordered = sorted(seen)
        except TypeError:
            raise ReaderError(f"{self.ann_file}: category ids are not mutually comparable: {list(seen)[:5]}") from None
        self.cat_id_to_label = {cid: i + 1 for i, cid in enumerate(ordered)}
        self.label_to_cat_id = {i + 1: cid for i, cid in enumerate(ordered)}
        self.category_info = []
        for i, cid in enumerate(ordered):
            info = dict(seen[cid])
            name = self._category_name(seen[cid])
            if name != info["name"]:
                info["original_name"] = info["name"]
            info["name"], info["label"] = name, i + 1
            self.category_info.append(info)
        self.categories = {info["label"]: info["name"] for info in self.category_info}

    def _parse_images(self, images: list) -> None:
        ids: list = []
        files: list[str] = []
        sizes: list[tuple[int, int]] = []
        extras: dict[int, dict] = {}
        self._image_index: dict[Any, int] = {}
        skipped: set = set()
        for _, img, where in self.check.image_entries(images, ("id", "width", "height"), skipped):
            w, h = img["width"], img["height"]
            name = self._image_file(img, where)
            if name is None:
                skipped.add(img["id"])
                continue
            reason = self._skip_image(name)
            if reason is not None:
                self.stats[reason] += 1
                skipped.add(img["id"])
                continue
            extra = self._image_extra(img)
            if extra:
                extras[len(ids)] = extra
            self._image_index[img["id"]] = len(ids)
            ids.append(img["id"])
            files.append(name)
            sizes.append((int(w), int(h)))
        self._skipped_image_ids = skipped
        self._all_int_ids = all(isinstance(v, int) and not isinstance(v, bool) for v in ids)
        # Compact arrays instead of lists of dicts: cheap to pickle into workers, no copy-on-read under fork.
        self._image_ids = np.asarray(ids, dtype=np.int64) if self._all_int_ids else list(ids)
        self._files = np.asarray([f.encode("utf-8") for f in files], dtype=bytes) if files else np.zeros(0, "S1")
        self._sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self._image_extras = extras

    def _parse_annotations(self, anns: list) -> None:
        img_idx: list[int] = []
        labels: list[int] = []
        bboxes: list[list[float]] = []
        crowd: list[bool] = []
        ann_ids: list = []
        positions: list[int] = []
        seen_ids: set = set()
        for j, ann in enumerate(anns):
            k, where = self.check.annotation(j, ann, ("category_id", "bbox"), self._image_index, seen_ids,
                                             self._skipped_image_ids)
            if k is None:
                continue
            cid = ann["category_id"]
            if _is_id(cid) and cid in self.background_cat_ids:
                self.stats["background_box_dropped"] += 1
                continue
            if not _is_id(cid) or cid not in self.cat_id_to_label:
                self._problem("unknown_category_id", f"{where}: category_id {cid!r} is not in 'categories'")
                continue
            box = ann["bbox"]
            if not self.check.box(box, where, "x, y, w, h"):
                continue
            img_idx.append(k)
            labels.append(self.cat_id_to_label[cid])
            bboxes.append(box)
            crowd.append(bool(ann.get("iscrowd", 0)) if self.has_crowd else False)
            ann_ids.append(ann["id"])
            positions.append(j)

        def name_boxes(reason: str, rows: np.ndarray) -> None:
            self.check.name_rows(reason, rows,
                                 lambda i: f"annotations[{positions[i]}] (id={ann_ids[i]!r}): bbox {bboxes[i]!r}")

        xywh = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        img_idx_arr = np.asarray(img_idx, dtype=np.int64)
        xyxy = xywh_to_xyxy(xywh, legacy=self.legacy)
        clipped, keep = sanitize_boxes(xyxy, self._sizes[img_idx_arr], self.box_convention, self.stats,
                                       input_wh=xywh[:, 2:], on_drop=name_boxes)
        crowd_arr = np.asarray(crowd, dtype=bool)
        self._count("crowd_flagged", (crowd_arr & keep).sum())
        order = np.nonzero(keep)[0]
        order = order[np.argsort(img_idx_arr[order], kind="stable")]  # group by image, file order within an image
        self._boxes = clipped[order].astype(np.float32)
        self._labels = np.asarray(labels, dtype=np.int64)[order] if labels else np.zeros(0, np.int64)
        self._crowd = crowd_arr[order]
        try:
            self._ann_ids = np.asarray(ann_ids, dtype=np.int64)[order]
        except (TypeError, ValueError, OverflowError):
            self._ann_ids = np.asarray(ann_ids, dtype=object)[order]
        counts = self._group_boxes(img_idx_arr[order], len(self._sizes))
        train_counts = np.bincount(img_idx_arr[order][~self._crowd], minlength=len(self._sizes)) \
            if not self.include_crowd else counts
        self._select_records(train_counts, 1 if self.skip_empty else 0)

    # -- access -------------------------------------------------------------------------------------------------------

    @property
    def num_boxes(self) -> int:
        """Training boxes over the samples this reader yields (crowd boxes excluded unless ``include_crowd``)."""
        return self._count_boxes(None if self.include_crowd else ~self._crowd)

    def image_id(self, index: int) -> Any:
        return self._image_ids[self._order[index]].item() if self._all_int_ids else self._image_ids[self._order[index]]

    def image_file(self, index: int) -> str:
        return self._files[self._order[index]].decode("utf-8")

    def image_path(self, index: int) -> Path:
        return self.resolve_path(self.image_file(index))

    def _build_sample(self, index: int) -> GroundingSample:
        i, start, end = self._record_boxes(index)
        boxes = self._boxes[start:end]
        labels = self._labels[start:end]
        crowd = self._crowd[start:end]
        train = np.ones(len(boxes), bool) if self.include_crowd else ~crowd
        file_name = self._files[i].decode("utf-8")
        width, height = (int(v) for v in self._sizes[i])
        metadata: dict[str, Any] = {
            "dataset": self.dataset_name,
            "task": self.task,
            "image_id": self._image_ids[i].item() if self._all_int_ids else self._image_ids[i],
            "file_name": file_name,
            "box_convention": self.box_convention,
            "annotation_ids": self._ann_ids[start:end][train].tolist(),
            "crowd_boxes": boxes[crowd].tolist() if not self.include_crowd else [],
            "crowd_labels": labels[crowd].tolist() if not self.include_crowd else [],
        }
        if i in self._image_extras:
            metadata.update(self._image_extras[i])
        kept_labels = labels[train]
        return GroundingSample(
            image_path=str(self.resolve_path(file_name)),
            width=width,
            height=height,
            boxes=as_boxes_tensor(boxes[train]),
            caption=self.prompt,
            tokens_positive=[list(self.prompt_spans[int(lab) - 1]) for lab in kept_labels],
            labels=torch.as_tensor(kept_labels, dtype=torch.int64),
            metadata=metadata,
        )

    def summary(self) -> dict[str, Any]:
        return {"images": len(self), "boxes": self.num_boxes, "categories": len(self.categories)}


def coco_category_names(reader: COCODetection) -> list[str]:
    """Category names in label order (index ``label - 1``)."""
    return [reader.categories[label] for label in range(1, len(reader.categories) + 1)]


__all__ = ["COCODetection", "BACKGROUND_NAMES", "coco_category_names"]

