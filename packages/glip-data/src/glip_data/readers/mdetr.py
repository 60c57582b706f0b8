"""MDETR grounding json (Flickr30k Entities ``final_flickr_separateGT_*.json``, GoldG ``final_mixed_train*.json``).

COCO-shaped, one ``images`` entry per (image, sentence) with its ``caption``; every annotation carries
``tokens_positive``, the ``[start, end)`` character spans of the caption its box grounds to. The caption is used
verbatim (no negatives, docs/official_model.md#grounding-data) and every box gets label 1, as in the official code.

Boxes: ``[x, y, w, h]`` -> xyxy with the official convention ``x2 = x + w - 1``, clipped to ``[0, W - 1]``
(``box_convention="official"``, the default; ``"exact"`` gives ``x + w`` and ``[0, W]``).

Evaluation fields are kept in ``sample.metadata``: ``tokens_positive_eval`` (one entry per annotated phrase, in phrase
order), ``sentence_id``, ``original_img_id``, ``dataset_name``, ``tokens_negative``, ``original_id``,
``data_source``, and per box ``phrase_ids`` (when the file has them).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from glip_data.boxes import xywh_to_xyxy
from glip_data.readers.base import GroundingReader, as_boxes_tensor, read_coco_json, sanitize_boxes
from glip_data.sample import GroundingSample

#: Image-level fields copied into ``sample.metadata`` when present.
MDETR_IMAGE_FIELDS = ("sentence_id", "original_img_id", "dataset_name", "tokens_negative", "original_id",
                      "data_source")


class MDETRGrounding(GroundingReader):
    """An MDETR-style grounding file as :class:`GroundingSample` s (one per image entry, i.e. per sentence).

    Args:
        ann_file: the json (optionally gzipped).
        image_root: directory ``file_name`` is relative to.
        skip_empty: leave out entries without any kept training box (counted as ``image_without_boxes``); crowd
            boxes (``iscrowd = 1``) are flagged in ``metadata["crowd_boxes"]`` and are not training boxes, as in COCO.
        **kwargs: :class:`~glip_data.readers.base.GroundingReader` options.
    """

    task = "grounding"

    def __init__(self, ann_file, image_root=None, *, skip_empty: bool = False, **kwargs: Any) -> None:
        super().__init__(ann_file, image_root, **kwargs)
        data = read_coco_json(self.ann_file, ("images", "annotations"))
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])
        # as COCO: crowd boxes are not training boxes, so an entry with only crowd boxes is empty
        self._select_records(self._training_box_counts(), 1 if skip_empty else 0)

    def _parse_images(self, images: list) -> None:
        self._entries: list[tuple] = []  # (image id, file name, width, height, caption, metadata extras)
        self._index: dict[Any, int] = {}
        skipped: set = set()
        keys = ("id", "file_name", "width", "height", "caption")
        for _, img, where in self.check.image_entries(images, keys, skipped):
            w, h, caption = img["width"], img["height"], img["caption"]
            if self.check.file_name(img["file_name"], where) is None or not self.check.caption(caption, where):
                skipped.add(img["id"])
                continue
            extras = {k: img[k] for k in MDETR_IMAGE_FIELDS if k in img}
            if "tokens_positive_eval" in img:
                phrases = self._eval_phrases(img["tokens_positive_eval"], caption, where)
                if phrases is None:
                    skipped.add(img["id"])
                    continue
                extras["tokens_positive_eval"] = phrases
            self._index[img["id"]] = len(self._entries)
            self._entries.append((img["id"], img["file_name"], int(w), int(h), caption, extras))
        self._skipped = skipped

    def _eval_phrases(self, phrases: Any, caption: str, where: str) -> list[list[list[int]]] | None:
        """``tokens_positive_eval``: one list of spans per phrase; ``None`` (after reporting) when invalid."""
        where = f"{where} tokens_positive_eval"
        if not isinstance(phrases, list):
            self._problem("span_outside_caption", f"{where}: must be a list of span lists, got {phrases!r}")
            return None
        checked = []
        for spans in phrases:
            spans = self.check.spans(spans, caption, where)
            if spans is None:
                return None
            checked.append([list(s) for s in spans])
        return checked

    def _parse_annotations(self, anns: list) -> np.ndarray:
        """Read the boxes (sets the box arrays and ``self._offsets``); returns the ``(R,)`` number of kept boxes of
        each entry, crowd boxes included."""
        owner: list[int] = []
        bboxes: list = []
        spans: list[list[tuple[int, int]]] = []
        ids: list = []
        phrase_ids: list = []
        crowd: list[bool] = []
        seen: set = set()
        for j, ann in enumerate(anns):
            k, where = self.check.annotation(j, ann, ("bbox", "tokens_positive"), self._index, seen, self._skipped)
            if k is None:
                continue
            box = ann["bbox"]
            if not self.check.box(box, where, "x, y, w, h"):
                continue
            box_spans = self.check.spans(ann["tokens_positive"], self._entries[k][4], where)
            if box_spans is None:
                continue
            if not box_spans:
                self.stats["box_without_span"] += 1
            owner.append(k)
            bboxes.append(box)
            spans.append(box_spans)
            ids.append(ann["id"])
            phrase_ids.append(ann.get("phrase_ids"))
            crowd.append(bool(ann.get("iscrowd", 0)))
        xywh = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
        owner_arr = np.asarray(owner, dtype=np.int64)
        sizes = np.asarray([(e[2], e[3]) for e in self._entries], dtype=np.float64).reshape(-1, 2)

        def name_boxes(reason: str, rows: np.ndarray) -> None:
            self.check.name_rows(reason, rows, lambda i: f"annotation id={ids[i]!r} (image_id="
                                                         f"{self._entries[owner[i]][0]!r}): bbox {bboxes[i]!r}")

        clipped, keep = sanitize_boxes(xywh_to_xyxy(xywh, legacy=self.legacy), sizes[owner_arr],
                                       self.box_convention, self.stats, input_wh=xywh[:, 2:], on_drop=name_boxes)
        crowd_arr = np.asarray(crowd, dtype=bool)
        if crowd_arr.any():
            self._count("crowd_flagged", (crowd_arr & keep).sum())
        order = np.nonzero(keep)[0]
        order = order[np.argsort(owner_arr[order], kind="stable")]
        self._boxes = clipped[order].astype(np.float32)
        self._spans = [spans[i] for i in order]
        self._ann_ids = [ids[i] for i in order]
        self._phrase_ids = [phrase_ids[i] for i in order]
        self._crowd = crowd_arr[order]
        return self._group_boxes(owner_arr[order], len(self._entries))

    def image_path(self, index: int) -> Path:
        return self.resolve_path(self._entries[int(self._order[index])][1])

    def _build_sample(self, index: int) -> GroundingSample:
        k, start, end = self._record_boxes(index)
        image_id, file_name, width, height, caption, extras = self._entries[k]
        train = ~self._crowd[start:end]
        boxes = self._boxes[start:end]
        keep_idx = [start + i for i in range(end - start) if train[i]]
        metadata: dict[str, Any] = {
            "dataset": self.dataset_name,
            "task": self.task,
            "image_id": image_id,
            "file_name": file_name,
            "box_convention": self.box_convention,
            "annotation_ids": [self._ann_ids[i] for i in keep_idx],
            "crowd_boxes": boxes[~train].tolist(),
            **extras,
        }
        if any(self._phrase_ids[i] is not None for i in keep_idx):
            metadata["phrase_ids"] = [self._phrase_ids[i] for i in keep_idx]
        return GroundingSample(
            image_path=str(self.resolve_path(file_name)),
            width=width,
            height=height,
            boxes=as_boxes_tensor(boxes[train]),
            caption=caption,
            tokens_positive=[list(self._spans[i]) for i in keep_idx],
            labels=torch.ones(len(keep_idx), dtype=torch.int64),
            metadata=metadata,
        )

    @property
    def num_boxes(self) -> int:
        """Training boxes (crowd boxes excluded) over the samples this reader yields."""
        return self._count_boxes(~self._crowd)

    def summary(self) -> dict[str, Any]:
        return {"entries": len(self), "boxes": self.num_boxes,
                "images": len({self._entries[int(k)][1] for k in self._order})}


__all__ = ["MDETRGrounding", "MDETR_IMAGE_FIELDS"]
