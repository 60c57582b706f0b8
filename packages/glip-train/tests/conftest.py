"""Fixtures of the evaluation tests: a scripted detector (a test double of the model interface) and writers of small
COCO / LVIS / MDETR datasets whose images identify themselves by colour."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def image_code(image: Image.Image) -> int:
    """The index a test image encodes in its top-left pixel (R * 256 + G)."""
    r, g, _ = image.convert("RGB").getpixel((0, 0))
    return r * 256 + g


class ScriptedDetector:
    """Returns scripted detections per image (identified by :func:`image_code`) and records every call.

    Args:
        detections: ``{image code: [(name, [x1, y1, x2, y2], score), ...]}``; ``name`` is a class name (detect) or a
            phrase (ground) and is looked up in the names of the call, so the label order is checked for real.
        tokenizer: exposed as ``.tokenizer`` when given (the runner then checks class names against it).
    """

    def __init__(self, detections: dict[int, list[tuple[str, list[float], float]]], tokenizer: Any = None):
        self.detections = detections
        self.calls: list[dict[str, Any]] = []
        if tokenizer is not None:
            self.tokenizer = tokenizer

    def _results(self, images, names_per_image):
        out = []
        for image, names in zip(images, names_per_image):
            rows = [(names.index(n), box, s) for n, box, s in self.detections.get(image_code(image), []) if n in names]
            out.append({"boxes": np.asarray([r[1] for r in rows], np.float32).reshape(-1, 4),
                        "scores": np.asarray([r[2] for r in rows], np.float32),
                        "labels": np.asarray([r[0] for r in rows], np.int64)})
        return out

    def detect(self, images, classes, **kwargs):
        self.calls.append({"method": "detect", "classes": list(classes), "codes": [image_code(i) for i in images],
                           **kwargs})
        return self._results(images, [list(classes)] * len(images))

    def ground(self, images, captions, phrases, **kwargs):
        self.calls.append({"method": "ground", "captions": list(captions), "phrases": [list(p) for p in phrases],
                           "codes": [image_code(i) for i in images], **kwargs})
        return self._results(images, [list(p) for p in phrases])


def write_image(path: Path, code: int, size: tuple[int, int]) -> None:
    """A PNG of ``size = (w, h)`` whose top-left pixel encodes ``code``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (code // 256, code % 256, 7)).save(path)


def write_detection_dataset(root: Path, sizes: list[tuple[int, int]], categories: list[tuple[int, str]],
                            boxes: list[tuple[int, int, list[float]]], *, lvis: dict | None = None,
                            name: str = "ann.json", image_ids: list[int] | None = None,
                            file_sizes: list[tuple[int, int]] | None = None, code_offset: int = 0) -> Path:
    """A COCO (or, with ``lvis``, LVIS v1) file with one image per entry of ``sizes`` (code = index).

    Args:
        boxes: ``(image index, category id, [x, y, w, h])``.
        lvis: ``{"frequency": {cat id: "r"|"c"|"f"}, "neg": {image index: [cat ids]},
            "not_exhaustive": {image index: [cat ids]}}``.
        image_ids: the ids of the images (default 1..n).
        file_sizes: the sizes of the written image files when they should differ from the annotated ``sizes``.
        code_offset: image ``i`` gets the code ``code_offset + i``.
    """
    image_ids = image_ids or list(range(1, len(sizes) + 1))
    images = []
    for i, (w, h) in enumerate(sizes):
        rel = f"images/{i:03d}.png"
        write_image(root / rel, code_offset + i, (file_sizes or sizes)[i])
        img = {"id": image_ids[i], "width": w, "height": h}
        if lvis is None:
            img["file_name"] = rel
        else:
            img["coco_url"] = f"http://test.invalid/{rel}"
            img["neg_category_ids"] = lvis.get("neg", {}).get(i, [])
            img["not_exhaustive_category_ids"] = lvis.get("not_exhaustive", {}).get(i, [])
        images.append(img)
    anns = [{"id": j + 1, "image_id": image_ids[i], "category_id": c, "bbox": list(b),
             "area": float(b[2] * b[3]), "iscrowd": 0} for j, (i, c, b) in enumerate(boxes)]
    cats = []
    for cid, cname in categories:
        cat = {"id": cid, "name": cname}
        if lvis is not None:
            cat["frequency"] = lvis["frequency"][cid]
        cats.append(cat)
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture
def scripted_detector():
    return ScriptedDetector


@pytest.fixture
def detection_dataset_writer():
    return write_detection_dataset


@pytest.fixture
def image_writer():
    return write_image
