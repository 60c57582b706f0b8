"""Detection readers: COCO, Objects365, LVIS. Every test writes its own tiny files in tmp_path."""
from __future__ import annotations

import gzip
import json
import pickle

import pytest
import torch
from PIL import Image

from glip_data import ImageLoadError
from glip_data.readers import COCODetection, LVISDetection, Objects365Detection, ReaderError


def write_json(path, obj, gz=False):
    data = json.dumps(obj).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def coco_file(tmp_path, **overrides):
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 100, "height": 50},
            {"id": 9, "file_name": "b.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 12, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [90.5, 40, 20, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 3]},  # non-positive width
            {"id": 4, "image_id": 7, "category_id": 0, "bbox": [5, 5, 3, 3]},  # background box
            {"id": 5, "image_id": 9, "category_id": 12, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
            {"id": 6, "image_id": 9, "category_id": 3, "bbox": [45, 1, 5, 5]},  # entirely right of the image
            {"id": 7, "image_id": 9, "category_id": 3, "bbox": [2, 2, 8, 4]},
        ],
        # unordered, non-contiguous ids, and a Roboflow-style background category
        "categories": [{"id": 12, "name": "mug"}, {"id": 3, "name": "traffic_light"},
                       {"id": 0, "name": "__background__"}],
    }
    data.update(overrides)
    return write_json(tmp_path / "coco.json", data)


def test_coco_contiguous_ids_background_crowd_and_drops(tmp_path):
    reader = COCODetection(coco_file(tmp_path))
    # labels 1..K in category-id order: id 3 -> 1, id 12 -> 2; background gone
    assert reader.categories == {1: "traffic_light", 2: "mug"}
    assert reader.cat_id_to_label == {3: 1, 12: 2} and reader.label_to_cat_id == {1: 3, 2: 12}
    # caption = the detection prompt of all categories (names cleaned as the official code does)
    assert reader.prompt == "traffic light. mug"
    assert len(reader) == 2

    first = reader[0]
    assert first.caption == "traffic light. mug"
    assert first.labels.tolist() == [2, 1]
    # official convention: x2 = x + w - 1, clipped to W - 1 = 99 / H - 1 = 49
    assert first.boxes.tolist() == [[10, 5, 29, 14], [90.5, 40, 99, 49]]
    assert first.phrases() == ["mug", "traffic light"]
    assert first.metadata["annotation_ids"] == [1, 2]
    assert first.metadata["image_id"] == 7 and first.metadata["task"] == "detection"

    second = reader[1]
    assert second.labels.tolist() == [1]  # the crowd box is not a training box ...
    assert second.metadata["crowd_boxes"] == [[1, 1, 5, 5]]  # ... but kept, flagged
    assert second.metadata["crowd_labels"] == [2]

    assert reader.stats == {"background_category_removed": 1, "background_box_dropped": 1,
                            "box_nonpositive_size": 1, "box_clipped": 1, "box_empty_after_clip": 1,
                            "crowd_flagged": 1}
    report = reader.report()
    assert "box_empty_after_clip: 1" in report and "images=2" in report and "boxes=3" in report


def test_coco_exact_convention_and_include_crowd(tmp_path):
    reader = COCODetection(coco_file(tmp_path), box_convention="exact", include_crowd=True)
    assert reader[0].boxes.tolist() == [[10, 5, 30, 15], [90.5, 40, 100, 50]]
    assert reader[1].boxes.tolist() == [[1, 1, 6, 6], [2, 2, 10, 6]]
    assert reader[1].metadata["crowd_boxes"] == []


def test_coco_one_pixel_box_is_empty_in_official_convention(tmp_path):
    path = coco_file(tmp_path, annotations=[{"id": 1, "image_id": 7, "category_id": 3, "bbox": [3, 3, 1, 5]}])
    assert COCODetection(path).stats["box_empty_after_clip"] == 1
    assert COCODetection(path, box_convention="exact")[0].boxes.tolist() == [[3, 3, 4, 8]]


@pytest.mark.parametrize(
    "patch, reason, needle",
    [
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 99, "bbox": [0, 0, 2, 2]}]},
         "unknown_category_id", "category_id 99"),
        ({"annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [0, 0, 2, 2]}]},
         "unknown_image_id", "image_id=5"),
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 2, 2]},
                          {"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 3, 3]}]},
         "duplicate_annotation_id", "duplicate annotation id"),
        ({"images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 10},
                     {"id": 7, "file_name": "b.jpg", "width": 10, "height": 10}], "annotations": []},
         "duplicate_image_id", "duplicate image id"),
        ({"annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [0, 0, 2]}]}, "bad_bbox", "bbox"),
    ],
)
def test_coco_structural_problems_raise_or_are_counted(tmp_path, patch, reason, needle):
    path = coco_file(tmp_path, **patch)
    with pytest.raises(ReaderError) as err:
        COCODetection(path)
    assert "coco.json" in str(err.value) and needle in str(err.value)
    dropped = COCODetection(path, errors="drop")
    assert dropped.stats[reason] == 1


def test_dropped_records_are_named_by_reason_and_capped(tmp_path):
    from glip_data.readers.base import NAMED_DROPS

    reader = COCODetection(coco_file(tmp_path, annotations=[
        {"id": 1, "image_id": 7, "category_id": 99, "bbox": [0, 0, 2, 2]},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 2, 2]},
        {"id": 3, "image_id": 7, "category_id": 3, "bbox": [5, 5, 0, 3]},
        {"id": 4, "image_id": 9, "category_id": 3, "bbox": [45, 1, 5, 5]},
        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [90.5, 1, 20, 5]},  # clipped, kept: not a drop
        {"id": 6, "image_id": 9, "category_id": 3, "bbox": [2, 2, 8, 4]},
    ]), errors="drop")
    assert reader.check.dropped == {
        "unknown_category_id": ["annotations[0] (id=1, image_id=7): category_id 99 is not in 'categories'"],
        "unknown_image_id": ["annotations[1] (id=2, image_id=5): image_id 5 is not in 'images'"],
        "box_nonpositive_size": ["annotations[2] (id=3): bbox [5, 5, 0, 3]"],
        "box_empty_after_clip": ["annotations[3] (id=4): bbox [45, 1, 5, 5]"],
    }
    assert all(reader.stats[reason] == 1 for reason in reader.check.dropped)
    many = [{"id": i, "image_id": 7, "category_id": 42, "bbox": [0, 0, 2, 2]} for i in range(NAMED_DROPS + 5)]
    capped = COCODetection(coco_file(tmp_path, annotations=many), errors="drop")
    assert capped.stats["unknown_category_id"] == NAMED_DROPS + 5  # every drop counted, the first ones named
    assert len(capped.check.dropped["unknown_category_id"]) == NAMED_DROPS
    assert capped.image_path(0) == tmp_path / "a.jpg"


def test_coco_missing_keys_name_file_and_record(tmp_path):
    path = coco_file(tmp_path, annotations=[{"id": 4, "image_id": 7, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ReaderError, match=r"coco\.json: annotations\[0\]: missing key\(s\) \['category_id'\]"):
        COCODetection(path)
    with pytest.raises(ReaderError, match="missing top-level key 'categories'"):
        COCODetection(write_json(tmp_path / "x.json", {"images": [], "annotations": []}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [}')
    with pytest.raises(ReaderError, match=r"bad\.json: not valid JSON \(line 1"):
        COCODetection(bad)


def test_coco_gzip_skip_empty_and_pickle(tmp_path):
    data = json.loads(coco_file(tmp_path).read_text())
    data["images"].append({"id": 11, "file_name": "c.jpg", "width": 10, "height": 10})
    path = write_json(tmp_path / "coco.json.gz", data, gz=True)
    assert len(COCODetection(path)) == 3
    reader = COCODetection(path, skip_empty=True)
    assert len(reader) == 2 and reader.stats["image_without_boxes"] == 1
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone[1].boxes, reader[1].boxes) and clone.categories == reader.categories


def test_coco_lazy_image_loading_and_size_check(tmp_path):
    path = coco_file(tmp_path)
    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "a.jpg")
    Image.new("RGB", (41, 30)).save(tmp_path / "b.jpg")  # wrong size
    reader = COCODetection(path)
    sample = reader[0]
    assert sample.image is None and sample.image_path == str(tmp_path / "a.jpg")
    reader.load_image(sample)
    assert sample.image.size == (100, 50)
    assert COCODetection(path, load_image=True)[0].image.getpixel((5, 5))[0] > 200
    with pytest.raises(ReaderError, match=r"b\.jpg: decoded size 41x30 differs from the annotation's 40x30"):
        COCODetection(path, load_image=True)[1]


def test_an_exif_rotated_image_is_read_in_the_frame_of_its_annotation(tmp_path):
    """a.jpg annotated 100x50 is stored 50x100 with orientation 8 (read upright); b.jpg annotated 40x30 is stored
    40x30 with orientation 6 (read as stored, as the official loader reads it)."""
    path = coco_file(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (50, 100), (255, 0, 0)).save(tmp_path / "a.jpg", exif=exif.tobytes())
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(tmp_path / "b.jpg", exif=exif.tobytes())
    reader = COCODetection(path, load_image=True)
    a, b = reader[0], reader[1]
    assert a.image.size == (100, 50) and a.image.info["exif_applied"] is True
    assert b.image.size == (40, 30) and b.image.info["exif_applied"] is False


def test_unreadable_image_raises_or_skips(tmp_path):
    path = coco_file(tmp_path)
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    Image.new("RGB", (40, 30)).save(tmp_path / "b.jpg")
    with pytest.raises(ImageLoadError, match=r"cannot load image .*a\.jpg.*image id 7"):
        COCODetection(path, load_image=True)[0]
    reader = COCODetection(path, load_image=True, on_bad_image="skip")
    with pytest.warns(UserWarning, match="skipping"):
        sample = reader[0]
    assert sample.metadata["image_id"] == 9 and reader.stats["image_unreadable"] == 1


def test_positive_map_with_tokenizer(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    sample = COCODetection(coco_file(tmp_path), tokenizer=tok, max_text_len=16)[0]
    # "traffic light. mug" -> [CLS] traffic light . mug [SEP]: mug is token 4, traffic light tokens 1-2
    ids = tok(sample.caption)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[1:5] == ["traffic", "light", ".", "mug"]
    assert sample.positive_map.shape == (2, 16)
    assert sample.positive_map[0].nonzero().flatten().tolist() == [4]
    assert sample.positive_map[1].nonzero().flatten().tolist() == [1, 2]


# --- Objects365 ---------------------------------------------------------------------------------------------------------


def o365_file(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "images/v2/patch3/objects365_v2_00000001.jpg", "width": 20, "height": 10},
            {"id": 2, "file_name": "images/v2/patch16/objects365_v2_00908726.jpg", "width": 20, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 53, "bbox": [1, 1, 4, 4], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 38, "bbox": [2, 2, 4, 4], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 38, "bbox": [2, 2, 4, 4], "iscrowd": 0},
        ],
        "categories": [{"id": 53, "name": "Bakset"}, {"id": 38, "name": "Moniter/TV"},
                       {"id": 1, "name": "Formula 1 "}],
    }
    return write_json(tmp_path / "zhiyuan_objv2_val.json", data)


def test_objects365_names_missing_images_and_paths(tmp_path):
    reader = Objects365Detection(o365_file(tmp_path), tmp_path / "root")
    assert reader.version == "v2"
    assert reader.categories == {1: "Formula 1", 2: "Monitor/TV", 3: "Basket"}  # fixed, in id order
    assert reader.renamed == {"Formula 1 ": "Formula 1", "Moniter/TV": "Monitor/TV", "Bakset": "Basket"}
    assert reader.category_info[2]["original_name"] == "Bakset"
    assert reader.prompt == "Formula 1. Monitor/TV. Basket"
    assert len(reader) == 1 and reader.stats["known_missing_image"] == 1
    assert reader.stats["box_of_skipped_image"] == 1
    # the image sits in root/patch3/ (no images/v2 prefix): found there
    (tmp_path / "root" / "patch3").mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(tmp_path / "root" / "patch3" / "objects365_v2_00000001.jpg")
    assert reader[0].image_path == str(tmp_path / "root" / "patch3" / "objects365_v2_00000001.jpg")
    raw = Objects365Detection(o365_file(tmp_path), fix_names=False, skip_missing=False)
    assert raw.categories[3] == "Bakset" and len(raw) == 2


def test_objects365_swapped_width_height(tmp_path):
    path = o365_file(tmp_path)
    (tmp_path / "patch3").mkdir()
    Image.new("RGB", (10, 20)).save(tmp_path / "patch3" / "objects365_v2_00000001.jpg")  # transposed
    reader = Objects365Detection(path, tmp_path, load_image=True)
    with pytest.warns(UserWarning, match="transposed"):
        sample = reader[0]
    assert (sample.width, sample.height) == (10, 20) and sample.metadata["wh_swapped"]
    assert reader.stats["wh_swapped"] == 1


# --- LVIS ---------------------------------------------------------------------------------------------------------------


def lvis_file(tmp_path):
    data = {
        "images": [{"id": 424242, "coco_url": "http://images.cocodataset.org/val2017/000000424242.jpg",
                    "width": 64, "height": 48, "neg_category_ids": [17], "not_exhaustive_category_ids": [311]}],
        "annotations": [{"id": 9, "image_id": 424242, "category_id": 311, "bbox": [5, 6, 12, 9], "area": 108,
                         "segmentation": [[5, 6, 17, 6, 17, 15, 5, 15]]}],
        "categories": [{"id": 311, "name": "teapot", "frequency": "c", "synonyms": ["teapot"]},
                       {"id": 17, "name": "bow_(weapon)", "frequency": "r", "synonyms": ["bow"]}],
    }
    return write_json(tmp_path / "lvis_v1_val.json", data)


def test_lvis_paths_frequency_and_federated_metadata(tmp_path):
    reader = LVISDetection(lvis_file(tmp_path), tmp_path)
    sample = reader[0]
    assert sample.image_path == str(tmp_path / "val2017" / "000000424242.jpg")
    assert reader.categories == {1: "bow_(weapon)", 2: "teapot"}
    assert reader.frequencies == {1: "r", 2: "c"}
    assert sample.caption == "bow . teapot"  # official cleaning keeps the space left by "(weapon)"
    assert sample.metadata["neg_category_ids"] == [17] and sample.metadata["neg_labels"] == [1]
    assert sample.metadata["not_exhaustive_category_ids"] == [311]
    assert sample.metadata["not_exhaustive_labels"] == [2]
    assert sample.boxes.tolist() == [[5, 6, 16, 14]] and sample.labels.tolist() == [2]
    assert "categories_r=1" in reader.report()
