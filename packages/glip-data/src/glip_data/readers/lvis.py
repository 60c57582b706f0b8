"""LVIS v1 json (federated annotations) as :class:`GroundingSample` s.

* Image paths: LVIS v1 images have no ``file_name``; the path is the last two components of ``coco_url``
  (``http://images.cocodataset.org/val2017/000000123.jpg`` -> ``val2017/000000123.jpg``), relative to
  ``image_root``. A ``file_name`` (MDETR/GLIP's "minival inserted image name" files) is used when present.
* Categories keep LVIS's fields (``synonyms``, ``def``, ``frequency`` r/c/f, ``image_count``...) in
  ``reader.category_info``; ``reader.frequencies`` maps label -> ``"r" | "c" | "f"``. LVIS v1 ids are ``1..1203``, so
  labels equal ids there (in general labels are contiguous in id order, as for COCO).
* Every sample keeps the image's ``neg_category_ids`` (verified absent) and ``not_exhaustive_category_ids`` in its
  metadata, as *LVIS category ids* (what the evaluator speaks), and also as labels under
  ``neg_labels`` / ``not_exhaustive_labels``.
* LVIS has no crowd boxes.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from glip_data.readers.coco import COCODetection

FREQUENCIES = ("r", "c", "f")


def lvis_image_path(img: dict) -> str | None:
    """The image path relative to the image root: ``file_name`` if present, else ``split/name`` from ``coco_url``."""
    name = img.get("file_name")
    if isinstance(name, str) and name:
        return name
    url = img.get("coco_url")
    if not isinstance(url, str) or not url:
        return None
    parts = [p for p in urlparse(url).path.split("/") if p]
    if not parts:
        return None
    return "/".join(parts[-2:])


class LVISDetection(COCODetection):
    """An LVIS v1 file (``lvis_v1_{train,val}.json``, ``lvis_od_val.json``, minival) as :class:`GroundingSample` s.

    Args and attributes: as :class:`~glip_data.readers.coco.COCODetection`, plus ``frequencies``.
    """

    has_crowd = False

    def _image_file(self, img: dict, where: str) -> str | None:
        path = lvis_image_path(img)
        if path is None:
            self._problem("missing_file_name", f"{where}: neither 'file_name' nor a usable 'coco_url'")
        return path

    def _image_extra(self, img: dict) -> dict[str, Any] | None:
        extra: dict[str, Any] = {}
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = img.get(key, [])
            if not isinstance(ids, list):
                self._problem(f"bad_{key}", f"image id {img['id']!r}: {key} must be a list, got {ids!r}")
                ids = []
            known = [c for c in ids if c in self.cat_id_to_label]
            if len(known) != len(ids):
                unknown = [c for c in ids if c not in self.cat_id_to_label]
                self._problem("unknown_category_id", f"image id {img['id']!r}: {key} has unknown ids {unknown[:5]}")
            extra[key] = known
            extra[key.replace("category_ids", "labels")] = [self.cat_id_to_label[c] for c in known]
        return extra

    def _parse_categories(self, cats: list) -> None:
        super()._parse_categories(cats)
        self.frequencies = {info["label"]: info.get("frequency") for info in self.category_info}
        bad = {f for f in self.frequencies.values() if f is not None and f not in FREQUENCIES}
        if bad:
            self._problem("bad_frequency", f"categories: frequency must be one of {FREQUENCIES}, got {sorted(bad)}")

    def summary(self) -> dict[str, Any]:
        counts = {f: sum(1 for v in self.frequencies.values() if v == f) for f in FREQUENCIES}
        return {**super().summary(), **{f"categories_{f}": n for f, n in counts.items()}}


__all__ = ["LVISDetection", "lvis_image_path", "FREQUENCIES"]
