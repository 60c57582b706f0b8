"""The synthetic grounding world: reproducibility, exact boxes, true captions, and every reader on its files."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image

from glip_data.readers import CaptionReader, COCODetection, LVISDetection, MDETRGrounding, Objects365Detection
from glip_data.synth import SynthConfig, SynthWorld, generate_world

TINY = SynthConfig(num_detection=8, num_grounding=8, num_captions=4, num_val=8, min_size=96, max_size=160,
                   not_exhaustive_prob=1.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SynthWorld:
    return generate_world(tmp_path_factory.mktemp("world"), seed=7, config=TINY)


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_splits_are_independent(world, tmp_path):
    again = generate_world(tmp_path / "again", seed=7, config=TINY)
    first, second = all_files(world.root), all_files(again.root)
    assert first.keys() == second.keys() and len(first) > 30
    assert all(first[k] == second[k] for k in first)
    other = generate_world(tmp_path / "other", seed=8, config=TINY)
    assert all_files(other.root)["detection_train.json"] != first["detection_train.json"]
    # a bigger evaluation split leaves the training splits untouched
    bigger = generate_world(tmp_path / "bigger", seed=7, config=dataclasses.replace(TINY, num_val=10))
    assert bigger.detection_train.read_bytes() == world.detection_train.read_bytes()
    assert (bigger.image_root / "grounding" / "000003.jpg").read_bytes() == \
        (world.image_root / "grounding" / "000003.jpg").read_bytes()


def test_boxes_are_the_exact_pixel_extent_of_each_object(tmp_path):
    cfg = dataclasses.replace(TINY, background="plain", image_format="png", color_jitter=0, textures=("solid",),
                              num_detection=0, num_grounding=0, num_captions=0, num_val=10)
    w = generate_world(tmp_path / "exact", seed=3, config=cfg)
    reader = COCODetection(w.coco_val, w.image_root, load_image=True)  # official: x2 = last object column
    checked = 0
    for sample in reader:
        img = np.asarray(sample.image).astype(int)
        background = img[0, 0] if not _is_object(img, sample, 0, 0) else img[-1, -1]
        fg = np.abs(img - background).sum(axis=2) > 0
        for x1, y1, x2, y2 in sample.boxes.int().tolist():
            inside = fg[y1:y2 + 1, x1:x2 + 1]
            # the object touches all four edges of its box ...
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            # ... and nothing of it lies on the ring of pixels just outside (objects are >= 3 px apart)
            ring = fg[max(y1 - 1, 0):y2 + 2, max(x1 - 1, 0):x2 + 2].sum() - inside.sum()
            assert ring == 0
            checked += 1
    assert checked >= 10


def _is_object(img, sample, x, y):
    return any(x1 <= x <= x2 and y1 <= y <= y2 for x1, y1, x2, y2 in sample.boxes.tolist())


def test_files_read_back_through_every_reader(world):
    manifest = json.loads(world.manifest.read_text())
    det = COCODetection(world.detection_train, world.image_root, load_image=True)
    assert list(det.categories.values()) == list(TINY.detection_shapes)
    assert det.stats == {} and len(det) == TINY.num_detection
    assert det[0].image.size == (det[0].width, det[0].height)
    assert len(Objects365Detection(world.detection_train, world.image_root)) == TINY.num_detection  # COCO-format

    val = COCODetection(world.coco_val, world.image_root)
    assert list(val.categories.values()) == list(TINY.shapes)  # every shape, also the never-labelled ones
    assert val.stats == {}

    ground = MDETRGrounding(world.grounding_train, world.image_root, load_image=True)
    assert len(ground) == TINY.num_grounding * TINY.captions_per_image and ground.stats == {}
    assert ground[1].image.size == (ground[1].width, ground[1].height)
    phrases = " ".join(p for s in ground for p in s.phrases())
    assert any(shape in phrases for shape in manifest["unseen_shapes"])
    assert all(s.metadata["tokens_positive_eval"] == [[list(t) for t in tp] for tp in s.tokens_positive]
               for s in ground)

    captions = CaptionReader(world.captions_train, world.image_root, min_boxes=0)
    truth = CaptionReader(world.captions_train_gt, world.image_root, box_convention="exact")
    assert len(captions) == len(truth) == TINY.num_captions
    assert all(c.num_boxes == 0 and c.caption == t.caption and t.num_boxes > 0 for c, t in zip(captions, truth))

    lvis = LVISDetection(world.lvis_val, world.image_root)
    assert len(lvis) == TINY.num_val and lvis.stats == {}
    assert lvis[0].image_path == str(world.image_root / "val" / "000000.jpg")
    assert len(lvis.categories) == len(TINY.shapes) * len(TINY.colors)


def test_relations_in_captions_are_true(world):
    ground = MDETRGrounding(world.grounding_train, box_convention="exact")
    checked = 0
    for sample in ground:
        spans = [tp[0] for tp in sample.tokens_positive]
        order = sorted(range(len(spans)), key=lambda k: spans[k][0])
        for a, b in zip(order, order[1:]):
            between = sample.caption[spans[a][1]:spans[b][0]]
            ax1, ay1, ax2, ay2 = sample.boxes[a].tolist()
            bx1, by1, bx2, by2 = sample.boxes[b].tolist()
            truth = {" left of ": ax2 <= bx1, " right of ": bx2 <= ax1, " above ": ay2 <= by1, " below ": by2 <= ay1}
            if between in truth:
                assert truth[between], (sample.caption, between)
                checked += 1
    assert checked > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_and_lvis_files_load_in_the_official_apis(world, monkeypatch):
    from lvis import LVIS, LVISEval, LVISResults
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for path in (world.detection_train, world.coco_val):
        gt = COCO(str(path))
        dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in gt.dataset["annotations"]]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)  # ground truth scored against itself
    gt = LVIS(str(world.lvis_val))
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = LVISEval(gt, LVISResults(gt, dets), "bbox")
    # lvis 0.5.3 still uses the alias np.float, removed in numpy 1.24 (a known breakage of the package)
    monkeypatch.setattr(np, "float", float, raising=False)
    ev.run()
    assert ev.get_results()["AP"] == pytest.approx(1.0)


def test_lvis_metadata_and_frequencies_follow_training_counts(world):
    lvis = json.loads(world.lvis_val.read_text())
    det = json.loads(world.detection_train.read_text())
    ground = json.loads(world.grounding_train.read_text())
    images_with = {}
    for a in det["annotations"]:
        images_with.setdefault(f"{a['attributes']['color']}_{a['attributes']['shape']}", set()).add(("d", a["image_id"]))
    entry_to_image = {e["id"]: e["original_img_id"] for e in ground["images"]}
    for a in ground["annotations"]:
        key = f"{a['attributes']['color']}_{a['attributes']['shape']}"
        images_with.setdefault(key, set()).add(("g", entry_to_image[a["image_id"]]))
    for cat in lvis["categories"]:
        n = len(images_with.get(cat["name"], ()))
        assert cat["image_count"] == n
        assert cat["frequency"] == ("r" if n < 10 else "c" if n < 100 else "f")
    per_image = {}
    for a in lvis["annotations"]:
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    coco_val = json.loads(world.coco_val.read_text())
    assert len(coco_val["annotations"]) - len(lvis["annotations"]) == \
        sum(len(img["not_exhaustive_category_ids"]) for img in lvis["images"])
    for img in lvis["images"]:
        assert not set(img["neg_category_ids"]) & per_image.get(img["id"], set())  # verified absent
        assert set(img["not_exhaustive_category_ids"]) <= per_image.get(img["id"], set())
        assert re.fullmatch(r"http://synth\.glip\.invalid/val/\d{6}\.jpg", img["coco_url"])


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="detection_shapes"):
        generate_world(tmp_path, config=SynthConfig(detection_shapes=("blob",)))
    with pytest.raises(ValueError, match="min_size"):
        generate_world(tmp_path, config=SynthConfig(min_size=400, max_size=300))


def test_image_sizes_and_detection_shapes(world):
    det = json.loads(world.detection_train.read_text())
    for img in det["images"]:
        assert TINY.min_size <= img["width"] <= TINY.max_size and TINY.min_size <= img["height"] <= TINY.max_size
        with Image.open(world.image_root / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
    assert {a["attributes"]["shape"] for a in det["annotations"]} <= set(TINY.detection_shapes)


@pytest.mark.slow
def test_default_world_has_every_frequency_group_and_balanced_shapes(tmp_path):
    w = generate_world(tmp_path / "default", seed=0)
    assert all(w.counts[f"lvis_categories_{f}"] > 0 for f in "rcf")
    det = json.loads(w.detection_train.read_text())
    per_shape = [sum(a["category_id"] == c["id"] for a in det["annotations"]) for c in det["categories"]]
    assert min(per_shape) * 3 > max(per_shape)  # no shape is starved in the detection set
