"""COCO <-> ODVG <-> MDETR conversion: round trips, and the readers see the same data in every format."""
from __future__ import annotations

import json

import pytest
import torch

from glip_data.convert import convert, default_label_map_path
from glip_data.readers import COCODetection, MDETRGrounding, ODVGReader, ReaderError
from glip_data.synth import SynthConfig, generate_world

COCO = {
    "info": {"description": "tiny"},
    "images": [{"id": 7, "file_name": "kitchen_0007.jpg", "width": 640, "height": 480, "license": 2},
               {"id": 8, "file_name": "empty.jpg", "width": 10, "height": 10}],
    "annotations": [
        {"id": 1, "image_id": 7, "category_id": 44, "bbox": [12.0, 40.5, 100.0, 80.25], "area": 8000.0, "iscrowd": 0},
        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [300, 200, 150, 90], "area": 13500, "iscrowd": 1,
         "segmentation": [[300, 200, 450, 200, 450, 290]]},
        {"id": 6, "image_id": 7, "category_id": 44, "bbox": [0.5, 0.5, 10, 10], "area": 100, "iscrowd": 0},
    ],
    "categories": [{"id": 44, "name": "mug", "supercategory": "kitchenware"}, {"id": 3, "name": "dining_table"}],
}

MDETR = {
    "images": [{"id": 0, "file_name": "9990001.jpg", "height": 375, "width": 500,
                "caption": "A man in a red hat walks a dog .", "dataset_name": "flickr",
                "tokens_negative": [[0, 32]], "sentence_id": 0, "original_img_id": 9990001,
                "tokens_positive_eval": [[[0, 5]], [[9, 18]], [[25, 30]]]}],
    "annotations": [
        {"id": 0, "image_id": 0, "category_id": 1, "bbox": [100, 40, 80, 200], "area": 16000, "iscrowd": 0,
         "tokens_positive": [[0, 5]], "phrase_ids": 101},
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 20, 30, 40.5], "area": 1200, "iscrowd": 0,
         "tokens_positive": [[9, 10], [11, 18]], "phrase_ids": 102},
    ],
    "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
}


def dump(path, obj):
    path.write_text(json.dumps(obj))
    return path


def load(path):
    return json.loads(path.read_text())


def test_coco_odvg_coco(tmp_path):
    src = dump(tmp_path / "coco.json", COCO)
    written = convert(src, tmp_path / "od.jsonl", "coco", "odvg")
    assert written == [tmp_path / "od.jsonl", tmp_path / "od_label_map.json"]
    assert load(tmp_path / "od_label_map.json") == {"0": "dining_table", "1": "mug"}  # category-id order
    first = json.loads((tmp_path / "od.jsonl").read_text().splitlines()[0])
    assert first["detection"]["instances"][0]["bbox"] == [12.0, 40.5, 112.0, 120.75]  # xyxy = x + w
    assert first["detection"]["instances"][0]["label"] == 1
    convert(tmp_path / "od.jsonl", tmp_path / "back.json", "odvg", "coco")
    back = load(tmp_path / "back.json")
    assert back["images"] == COCO["images"] and back["annotations"] == COCO["annotations"]
    # ODVG's label map holds names only: other category fields (and 'info') do not survive the trip
    assert [(c["id"], c["name"]) for c in back["categories"]] == [(3, "dining_table"), (44, "mug")]


def test_coco_mdetr_coco_is_exact(tmp_path):
    src = dump(tmp_path / "coco.json", COCO)
    convert(src, tmp_path / "m.json", "coco", "mdetr")
    m = load(tmp_path / "m.json")
    assert m["images"][0]["caption"] == "dining table. mug"  # the detection prompt, names cleaned
    assert m["images"][0]["caption_source"] == "detection_prompt"
    assert [a["tokens_positive"] for a in m["annotations"]] == [[[14, 17]], [[0, 12]], [[14, 17]]]
    convert(tmp_path / "m.json", tmp_path / "back.json", "mdetr", "coco")
    assert load(tmp_path / "back.json") == COCO


@pytest.mark.parametrize("via", ["odvg", "coco"])
def test_mdetr_round_trips(tmp_path, via):
    src = dump(tmp_path / "m.json", MDETR)
    mid = tmp_path / ("mid.jsonl" if via == "odvg" else "mid.json")
    convert(src, mid, "mdetr", via)
    convert(mid, tmp_path / "back.json", via, "mdetr")
    back = load(tmp_path / "back.json")
    assert back["images"] == MDETR["images"] and back["annotations"] == MDETR["annotations"]
    assert back["categories"] == MDETR["categories"]
    if via == "odvg":
        region = json.loads(mid.read_text())["grounding"]["regions"][1]
        assert region["phrase"] == "a red hat" and region["bbox"] == [10, 20, 40, 60.5]


def test_readers_see_the_same_data_in_every_format(tmp_path):
    src = dump(tmp_path / "coco.json", COCO)
    convert(src, tmp_path / "od.jsonl", "coco", "odvg")
    convert(src, tmp_path / "m.json", "coco", "mdetr")
    coco, odvg, mdetr = COCODetection(src), ODVGReader(tmp_path / "od.jsonl",
                                                       label_map=tmp_path / "od_label_map.json"), \
        MDETRGrounding(tmp_path / "m.json")
    assert coco.categories == odvg.categories
    a, b, c = coco[0], odvg[0], mdetr[0]
    assert a.caption == b.caption == c.caption == "dining table. mug"
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.boxes, c.boxes)  # official convention in all three
    assert a.boxes.tolist() == [[12.0, 40.5, 111.0, 119.75], [0.5, 0.5, 9.5, 9.5]]
    assert a.tokens_positive == b.tokens_positive == c.tokens_positive
    assert torch.equal(a.labels, b.labels) and c.labels.tolist() == [1, 1]
    # the crowd box survives as a flagged box everywhere
    assert a.metadata["crowd_boxes"] == b.metadata["crowd_boxes"] == c.metadata["crowd_boxes"] == \
        [[300, 200, 449, 289]]


def test_foreign_odvg_to_coco_and_back(tmp_path):
    lines = [
        {"filename": "a.jpg", "height": 48, "width": 64,
         "grounding": {"caption": "a red mug on a wooden table",
                       "regions": [{"bbox": [[30, 5, 40, 20], [1, 2, 3, 4]], "phrase": "a red mug"},
                                   {"bbox": [0, 20, 64, 48], "phrase": "wooden table", "tokens_positive": [[15, 27]]}]}},
        {"filename": "b.jpg", "height": 10, "width": 10,
         "detection": {"instances": [{"bbox": [1, 1, 5, 5], "label": 0, "category": "mug"}]}},
    ]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    convert(src, tmp_path / "c.json", "odvg", "coco")
    coco = load(tmp_path / "c.json")
    assert [c["name"] for c in coco["categories"]] == ["mug", "object"]  # grounding boxes: MDETR's 'object'
    assert coco["images"][0]["caption"] == "a red mug on a wooden table"
    assert [a["tokens_positive"] for a in coco["annotations"][:3]] == [[[0, 9]], [[0, 9]], [[15, 27]]]
    convert(tmp_path / "c.json", tmp_path / "back.jsonl", "coco", "odvg")
    before, after = ODVGReader(src), ODVGReader(tmp_path / "back.jsonl")
    for x, y in zip(before, after):
        assert torch.equal(x.boxes, y.boxes) and x.caption == y.caption and x.tokens_positive == y.tokens_positive
    # from there on the trip is exact (ids were assigned once)
    convert(tmp_path / "back.jsonl", tmp_path / "c2.json", "odvg", "coco")
    assert load(tmp_path / "c2.json") == coco


def test_synthetic_world_round_trips(tmp_path):
    w = generate_world(tmp_path / "w", seed=2, config=SynthConfig(num_detection=5, num_grounding=5, num_captions=0,
                                                                  num_val=0, min_size=64, max_size=96))
    convert(w.detection_train, tmp_path / "d.jsonl", "coco", "odvg")
    convert(tmp_path / "d.jsonl", tmp_path / "d.json", "odvg", "mdetr")
    convert(tmp_path / "d.json", tmp_path / "d_back.json", "mdetr", "coco")
    original, back = load(w.detection_train), load(tmp_path / "d_back.json")
    assert back["images"] == original["images"] and back["annotations"] == original["annotations"]
    convert(w.grounding_train, tmp_path / "g.jsonl", "mdetr", "odvg")
    convert(tmp_path / "g.jsonl", tmp_path / "g.json", "odvg", "mdetr")
    original, back = load(w.grounding_train), load(tmp_path / "g.json")
    assert back["images"] == original["images"] and back["annotations"] == original["annotations"]


def test_errors_name_the_file(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"filename": "a.jpg", "height": 5, "width": 5,
                               "detection": {"instances": [{"bbox": [0, 0, 1, 1], "label": 3}]}}) + "\n")
    with pytest.raises(ReaderError, match=r"x\.jsonl: line 1 instance 0: no label map was given"):
        convert(src, tmp_path / "y.json", "odvg", "coco")
    assert default_label_map_path(tmp_path / "o365_od.json") == tmp_path / "o365_od_label_map.json"
    with pytest.raises(ValueError, match="unknown destination format 'yolo'"):
        convert(src, tmp_path / "y.json", "odvg", "yolo")
    bad = dump(tmp_path / "bad.json", {"images": [{"id": 1, "file_name": "a", "width": 5, "height": 5}],
                                       "annotations": [{"id": 1, "image_id": 2, "bbox": [0, 0, 1, 1]}]})
    with pytest.raises(ReaderError, match=r"bad\.json: annotations\[0\] \(id=1, image_id=2\): image_id 2 is not in"):
        convert(bad, tmp_path / "y.jsonl", "coco", "odvg")


@pytest.mark.parametrize(
    "patch, reason, needle",
    [
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 44, "bbox": [0, 0, 2]}]}, "bad_bbox", "bbox must be"),
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 44, "bbox": [0, 0, 2, 2]},
                          {"id": 1, "image_id": 7, "category_id": 44, "bbox": [0, 0, 3, 3]}]},
         "duplicate_annotation_id", "duplicate annotation id"),
        ({"images": [{"id": 7, "file_name": "a.jpg", "width": 0, "height": 10}], "annotations": []},
         "bad_image_size", "width/height must be positive integers"),
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 99, "bbox": [0, 0, 2, 2]}]},
         "unknown_category_id", "category_id 99"),
    ],
)
def test_converter_and_reader_share_the_record_checks(tmp_path, patch, reason, needle):
    """One parser per format: what a reader drops (and counts) with errors="drop", the converter refuses."""
    src = dump(tmp_path / "coco.json", {**COCO, **patch})
    with pytest.raises(ReaderError, match=needle):
        convert(src, tmp_path / "out.jsonl", "coco", "odvg")
    assert COCODetection(src, errors="drop").stats[reason] == 1


def test_odvg_converter_and_reader_share_the_line_checks(tmp_path):
    both = {"filename": "a.jpg", "height": 5, "width": 5, "detection": {"instances": []},
            "grounding": {"caption": "a cat", "regions": []}}
    bad_region = {"filename": "b.jpg", "height": 5, "width": 5,
                  "grounding": {"caption": "a cat", "regions": [{"bbox": [0, 0, 2, 2], "phrase": "A cat"}]}}
    for line, reason, needle in ((both, "bad_record", "both a 'detection' and a 'grounding'"),
                                 (bad_region, "span_outside_caption", "phrase 'A cat' is not in the caption")):
        src = tmp_path / "x.jsonl"
        src.write_text(json.dumps(line) + "\n")
        with pytest.raises(ReaderError, match=needle):
            convert(src, tmp_path / "y.json", "odvg", "coco")
        assert ODVGReader(src, errors="drop").stats[reason] == 1
