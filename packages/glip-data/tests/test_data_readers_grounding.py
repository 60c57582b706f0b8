"""Grounding readers: MDETR json, ODVG jsonl, pseudo-labelled captions. Tiny files written in tmp_path."""
from __future__ import annotations

import gzip
import json

import pytest

from glip_data.readers import CaptionReader, MDETRGrounding, ODVGReader, ReaderError, caption_record


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


CAPTION = "A man in a red hat walks a dog ."


def mdetr_file(tmp_path, annotations=None, **image_extra):
    image = {"id": 0, "file_name": "9990001.jpg", "height": 375, "width": 500, "caption": CAPTION,
             "dataset_name": "flickr", "tokens_negative": [[0, 32]], "sentence_id": 2, "original_img_id": 9990001,
             "tokens_positive_eval": [[[0, 5]], [[9, 18]], [[25, 30]]], **image_extra}
    if annotations is None:
        annotations = [
            {"id": 0, "image_id": 0, "category_id": 1, "bbox": [100, 40, 80, 200], "area": 16000, "iscrowd": 0,
             "tokens_positive": [[0, 5]], "phrase_ids": 101},
            {"id": 1, "image_id": 0, "category_id": 1, "bbox": [450.5, 330, 60, 60], "area": 3600, "iscrowd": 0,
             "tokens_positive": [[25, 30]], "phrase_ids": 103},
        ]
    return write_json(tmp_path / "final_flickr_separateGT_val.json",
                      {"images": [image], "annotations": annotations,
                       "categories": [{"id": 1, "name": "object", "supercategory": "object"}]})


def test_mdetr_boxes_spans_and_eval_fields(tmp_path):
    reader = MDETRGrounding(mdetr_file(tmp_path))
    sample = reader[0]
    assert sample.caption == CAPTION
    # official: x2 = x + w - 1, y2 = y + h - 1, clamped to [0, W - 1] x [0, H - 1]
    assert sample.boxes.tolist() == [[100, 40, 179, 239], [450.5, 330, 499, 374]]
    assert sample.phrases() == ["A man", "a dog"]
    assert sample.labels.tolist() == [1, 1]
    meta = sample.metadata
    assert meta["tokens_positive_eval"] == [[[0, 5]], [[9, 18]], [[25, 30]]]
    assert meta["sentence_id"] == 2 and meta["original_img_id"] == 9990001
    assert meta["phrase_ids"] == [101, 103] and meta["dataset_name"] == "flickr"
    assert reader.stats == {"box_clipped": 1}


def test_mdetr_span_outside_caption(tmp_path):
    anns = [{"id": 0, "image_id": 0, "bbox": [1, 1, 5, 5], "tokens_positive": [[20, 40]]}]
    path = mdetr_file(tmp_path, anns)
    with pytest.raises(ReaderError, match=r"annotations\[0\].*span \[20, 40\) is outside the caption of length 32"):
        MDETRGrounding(path)
    reader = MDETRGrounding(path, errors="drop")
    assert reader.stats["span_outside_caption"] == 1 and reader[0].num_boxes == 0
    with pytest.raises(ReaderError, match="tokens_positive_eval"):
        MDETRGrounding(mdetr_file(tmp_path, [], tokens_positive_eval=[[[0, 99]]]))


def test_mdetr_missing_caption_names_record(tmp_path):
    path = write_json(tmp_path / "m.json", {"images": [{"id": 3, "file_name": "x.jpg", "height": 5, "width": 5}],
                                            "annotations": []})
    with pytest.raises(ReaderError, match=r"m\.json: images\[0\]: missing key\(s\) \['caption'\]"):
        MDETRGrounding(path)


# --- ODVG ---------------------------------------------------------------------------------------------------------------

ODVG_LINES = [
    {"filename": "kitchen_0007.jpg", "height": 480, "width": 640,
     "detection": {"instances": [{"bbox": [12, 40, 112, 120], "label": 0, "category": "mug"},
                                 {"bbox": [600, 400, 700, 500], "label": 2, "category": "dining table"}]}},
    {"filename": "street_0042.jpg", "height": 375, "width": 500,
     "grounding": {"caption": "a red mug on a wooden table",
                   "regions": [{"bbox": [30, 50, 90, 110], "phrase": "a red mug", "tokens_positive": [[0, 9]]},
                               {"bbox": [[0, 100, 500, 375], [10, 10, 20, 20]], "phrase": ["wooden", "table"]}]}},
    {"filename": "unlabelled.jpg", "height": 10, "width": 10},
]


def test_odvg_detection_and_grounding_lines(tmp_path):
    path = write_jsonl(tmp_path / "o365_train_od.json", ODVG_LINES)  # by content, not by extension
    write_json(tmp_path / "label_map.json", {"0": "mug", "2": "dining table", "1": "cup"})
    reader = ODVGReader(path, label_map=tmp_path / "label_map.json")
    assert reader.categories == {1: "mug", 2: "cup", 3: "dining table"}
    assert len(reader) == 3

    det = reader[0]
    assert det.caption == "mug. cup. dining table" and det.metadata["task"] == "detection"
    assert det.labels.tolist() == [1, 3]
    # xyxy files hold continuous boxes: official convention subtracts 1 from x2/y2, clips to W-1/H-1
    assert det.boxes.tolist() == [[12, 40, 111, 119], [600, 400, 639, 479]]
    assert det.phrases() == ["mug", "dining table"]

    g = reader[1]
    assert g.caption == "a red mug on a wooden table" and g.labels.tolist() == [1, 1, 1]
    assert g.boxes.tolist() == [[30, 50, 89, 109], [0, 100, 499, 374], [10, 10, 19, 19]]
    # the second region has no tokens_positive: fragments searched left to right
    assert g.tokens_positive == [[(0, 9)], [(15, 21), (22, 27)], [(15, 21), (22, 27)]]
    assert reader.stats["spans_found_by_search"] == 1 and reader.stats["record_without_annotations"] == 1
    assert reader[2].num_boxes == 0

    exact = ODVGReader(path, label_map=tmp_path / "label_map.json", box_convention="exact")
    assert exact[0].boxes.tolist() == [[12, 40, 112, 120], [600, 400, 640, 480]]


def test_odvg_label_map_inferred_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl.gz", ODVG_LINES, gz=True)
    reader = ODVGReader(path)  # no label map: names from the 'category' fields
    assert reader.categories == {1: "mug", 2: "dining table"}

    with pytest.raises(ReaderError, match=r"line 1 instance 1: label 2 is not in the label map"):
        ODVGReader(path, label_map={"0": "mug"})
    assert ODVGReader(path, label_map={"0": "mug"}, errors="drop").stats["unknown_label"] == 1

    bad = [{"filename": "x.jpg", "height": 10, "width": 10,
            "grounding": {"caption": "a cat", "regions": [{"bbox": [0, 0, 5, 5], "phrase": "a dog"}]}}]
    with pytest.raises(ReaderError, match=r"line 1 region 0: no tokens_positive and the phrase 'a dog'"):
        ODVGReader(write_jsonl(tmp_path / "b.jsonl", bad))
    no_cat = [{"filename": "x.jpg", "height": 10, "width": 10,
               "detection": {"instances": [{"bbox": [0, 0, 5, 5], "label": 0}]}}]
    with pytest.raises(ReaderError, match="no label map was given"):
        ODVGReader(write_jsonl(tmp_path / "c.jsonl", no_cat))
    broken = tmp_path / "d.jsonl"
    broken.write_text(json.dumps(ODVG_LINES[0]) + "\n{oops\n")
    with pytest.raises(ReaderError, match=r"d\.jsonl:2: not valid JSON"):
        ODVGReader(broken)


# --- captions -----------------------------------------------------------------------------------------------------------


def test_captions_score_threshold_and_min_boxes(tmp_path):
    lines = [
        {"image": "cc/1.jpg", "width": 100, "height": 80, "caption": "a dog runs after a red ball",
         "entities": [{"phrase": "a dog", "tokens_positive": [[0, 5]], "boxes": [[10, 20, 50, 60], [7, 7, 8, 8]],
                       "scores": [0.93, 0.99]},
                      {"phrase": "a red ball", "tokens_positive": [[17, 27]],
                       "boxes": [[60, 10, 70, 20], [1, 1, 9, 9], [5, 5, 15, 15]], "scores": [0.81, 0.5, 0.51]}]},
        {"image": "cc/2.jpg", "width": 100, "height": 80, "caption": "a cat",
         "entities": [{"tokens_positive": [[0, 5]], "boxes": [[1, 1, 20, 20]], "scores": [0.4]}]},
        {"image": "cc/3.jpg", "width": 100, "height": 80, "caption": "a bird", "entities": [{"tokens_positive": [[2, 6]]}]},
    ]
    path = write_jsonl(tmp_path / "cap.jsonl", lines)
    reader = CaptionReader(path, tmp_path)
    assert len(reader) == 1  # "a cat" has no box above 0.5, "a bird" none at all
    sample = reader[0]
    # score > 0.5 strictly: 0.5 is dropped, 0.51 kept; each entity's spans apply to all its boxes
    assert sample.metadata["scores"] == pytest.approx([0.93, 0.81, 0.51])
    assert sample.phrases() == ["a dog", "a red ball", "a red ball"]
    assert sample.boxes.tolist() == [[10, 20, 49, 59], [60, 10, 69, 19], [5, 5, 14, 14]]
    assert sample.metadata["entity_index"] == [0, 1, 1]
    assert reader.stats["too_few_boxes"] == 2 and reader.stats["box_below_score_threshold"] == 2
    # [7, 7, 8, 8] is one pixel wide: empty in the official (inclusive-pixel) convention
    assert reader.stats["box_empty_after_clip"] == 1
    assert reader.check.dropped == {"box_empty_after_clip": ["line 1: box [7, 7, 8, 8]"]}
    assert reader.image_path(0) == tmp_path / "cc" / "1.jpg"

    everything = CaptionReader(path, score_threshold=0.0, min_boxes=0, box_convention="exact")
    assert len(everything) == 3 and everything[2].num_boxes == 0
    assert everything[2].metadata["entities_tokens_positive"] == [[[2, 6]]]


def test_caption_record_round_trips_boxes(tmp_path):
    rec = caption_record("x.jpg", 50, 40, "two red circles",
                         [{"phrase": "red circles", "tokens_positive": [[4, 15]],
                           "boxes": [[1, 2, 10, 12], [20, 5, 30, 9]], "scores": [0.9, 0.7]}],
                         box_convention="official", image_id=5)
    assert rec["entities"][0]["boxes"] == [[1, 2, 11, 13], [20, 5, 31, 10]]  # stored continuous
    reader = CaptionReader(write_jsonl(tmp_path / "c.jsonl", [rec]))
    assert reader[0].boxes.tolist() == [[1, 2, 10, 12], [20, 5, 30, 9]]
    assert reader[0].metadata["image_id"] == 5
    with pytest.raises(ReaderError, match="outside the caption"):
        caption_record("x.jpg", 5, 5, "ab", [{"tokens_positive": [[0, 3]]}])


def test_crowd_boxes_are_not_training_boxes_in_grounding_readers(tmp_path):
    """As in COCO: crowd boxes are flagged in metadata, not counted as boxes, and do not make a record non-empty."""
    annotations = [
        {"id": 0, "image_id": 0, "category_id": 1, "bbox": [100, 40, 80, 200], "area": 16000, "iscrowd": 0,
         "tokens_positive": [[0, 5]]},
        {"id": 1, "image_id": 0, "category_id": 1, "bbox": [10, 10, 60, 60], "area": 3600, "iscrowd": 1,
         "tokens_positive": [[25, 30]]},
    ]
    reader = MDETRGrounding(mdetr_file(tmp_path, annotations))
    assert reader.num_boxes == 1 and reader[0].num_boxes == 1
    assert reader[0].metadata["crowd_boxes"] == [[10, 10, 69, 69]]
    only_crowd = MDETRGrounding(mdetr_file(tmp_path, annotations[1:]), skip_empty=True)
    assert len(only_crowd) == 0 and only_crowd.stats["image_without_boxes"] == 1

    line = {"filename": "a.jpg", "height": 100, "width": 100,
            "grounding": {"caption": "a dog", "regions": [{"bbox": [0, 0, 10, 10], "phrase": "a dog",
                                                           "tokens_positive": [[0, 5]], "iscrowd": 1}]}}
    odvg = ODVGReader(write_jsonl(tmp_path / "g.jsonl", [line]), skip_empty=True)
    assert len(odvg) == 0 and odvg.num_boxes == 0
