"""Objects365 v1 / v2 (COCO-structured json) with the dataset's known quirks handled.

* **Category order.** The ``categories`` lists of the v1 train and val files are in different orders; labels are
  assigned in category-id order (as for every COCO reader), so train and val agree.
* **Name typos** (v2 mostly: ``Moniter/TV``, ``Bakset``, ``Ballon``, ...): with ``fix_names=True`` (default) the names
  in :data:`O365_NAME_FIXES` are corrected and stray leading/trailing spaces removed (``"Formula 1 "``). The name as
  written in the file stays in ``reader.category_info[i]["original_name"]``. Prompts use the fixed names.
* **File layout.** v2 ``file_name`` s carry a prefix and a patch folder (``images/v2/patch3/objects365_v2_....jpg``),
  and both ``objects365_v1_*`` and ``objects365_v2_*`` names occur. An image is looked for at ``image_root/file_name``,
  then at ``image_root/patchN/name``, then at ``image_root/name`` — whichever exists (default order).
* **Images missing on disk.** The three v2 images of :data:`O365_MISSING_IMAGES` are left out (counted as
  ``known_missing_image``).
* **Swapped width/height**: when a decoded image is exactly the annotated size transposed (an EXIF orientation is
  not the cause: the image is read in the frame of the annotation), the sample's ``width``/``height`` take the
  decoded size and ``sample.metadata["wh_swapped"] = True`` (a warning, counted
  as ``wh_swapped`` in this process's ``stats``); boxes are kept as annotated. Any other size mismatch is an error.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from glip_data.readers.coco import COCODetection
from glip_data.sample import GroundingSample

#: Typos in the released Objects365 category names (mostly v2) and their corrections.
O365_NAME_FIXES: dict[str, str] = {
    "Moniter/TV": "Monitor/TV",
    "Bakset": "Basket",
    "Ballon": "Balloon",
    "Hotair ballon": "Hot-air balloon",
    "Dinning Table": "Dining Table",
    "Billards": "Billiards",
    "Extention Cord": "Extension Cord",
    "Mushroon": "Mushroom",
    "Tape Measur/ Ruler": "Tape Measure/Ruler",
    "Campel": "Camel",
    "Buttefly": "Butterfly",
    "Noddles": "Noodles",
    "Table Teniis paddle": "Table Tennis paddle",
    "French": "French Horn",
}

#: Images listed in the v2 annotations that are not in the released image folders (``patchN/name``).
O365_MISSING_IMAGES: frozenset[str] = frozenset({
    "patch16/objects365_v2_00908726.jpg",
    "patch6/objects365_v1_00320532.jpg",
    "patch6/objects365_v1_00320534.jpg",
})


def fix_o365_name(name: str) -> str:
    """The corrected Objects365 category name (typo table, then surrounding spaces removed)."""
    return O365_NAME_FIXES.get(name.strip(), name.strip())


def _patch_relative(file_name: str) -> str:
    """``images/v2/patch3/x.jpg`` -> ``patch3/x.jpg`` (the last folder and the name)."""
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    return "/".join(parts[-2:])


class Objects365Detection(COCODetection):
    """Objects365 v1 or v2 (COCO-format json) as :class:`GroundingSample` s.

    Args:
        ann_file: ``objects365_{train,val}.json`` (v1) or ``zhiyuan_objv2_{train,val}.json`` (v2).
        image_root: the folder the images are under (see the module doc for how paths are looked up).
        version: ``"v1"``, ``"v2"``, or ``"auto"`` (v2 when any ``file_name`` has a ``patchN`` folder or an
            ``objects365_v2_`` name).
        fix_names: correct the known category-name typos (:data:`O365_NAME_FIXES`).
        skip_missing: leave out the known-missing images (:data:`O365_MISSING_IMAGES`).
        **kwargs: :class:`~glip_data.readers.coco.COCODetection` options.
    """

    def __init__(self, ann_file, image_root=None, *, version: Literal["auto", "v1", "v2"] = "auto",
                 fix_names: bool = True, skip_missing: bool = True, **kwargs: Any) -> None:
        if version not in ("auto", "v1", "v2"):
            raise ValueError(f"version must be 'auto', 'v1' or 'v2', got {version!r}")
        self.fix_names = bool(fix_names)
        self.skip_missing = bool(skip_missing)
        self._requested_version = version
        self._seen_v2_layout = False
        super().__init__(ann_file, image_root, **kwargs)
        if version == "auto":
            self.version = "v2" if self._seen_v2_layout else "v1"
        else:
            self.version = version
        self.renamed = {info["original_name"]: info["name"] for info in self.category_info
                        if "original_name" in info}

    def _category_name(self, cat: dict) -> str:
        return fix_o365_name(cat["name"]) if self.fix_names else cat["name"]

    def _image_file(self, img: dict, where: str) -> str | None:
        name = super()._image_file(img, where)
        if name is not None and ("/patch" in "/" + name.replace("\\", "/") or "objects365_v2_" in name):
            self._seen_v2_layout = True
        return name

    def _skip_image(self, file_name: str) -> str | None:
        if self.skip_missing and _patch_relative(file_name) in O365_MISSING_IMAGES:
            return "known_missing_image"
        return None

    def resolve_path(self, relative: str) -> Path:
        candidates = [relative, _patch_relative(relative), PurePosixPath(relative).name]
        for cand in candidates:
            path = self.image_root / cand
            if os.path.exists(path):
                return path
        return self.image_root / relative  # not there: the error on loading names the path as annotated

    def _check_size(self, sample: GroundingSample, image: Any) -> None:
        if image.size == (sample.height, sample.width) and sample.width != sample.height:
            self.stats["wh_swapped"] += 1
            warnings.warn(
                f"{sample.image_path}: decoded size {image.size} is the annotated {sample.width}x{sample.height} "
                "transposed; using the decoded size",
                stacklevel=3,
            )
            sample.width, sample.height = image.size
            sample.metadata["wh_swapped"] = True
            return
        super()._check_size(sample, image)

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "version": self.version, "renamed_categories": len(self.renamed)}


__all__ = ["Objects365Detection", "O365_NAME_FIXES", "O365_MISSING_IMAGES", "fix_o365_name"]
