"""Flickr30k phrase grounding (MDETR-format annotations, Sentences types) and ODinW aggregation with a scripted
detector."""
from __future__ import annotations

import json

import pytest

from glip_train.evaluation import EvaluationError, evaluate, load_flickr_dataset
from glip_train.evaluation.datasets import discover_odinw, parse_flickr_sentence

CAPTION_A = "a man with a red hat ."
CAPTION_B = "two dogs and a cat ."
CAPTION_C = "a dog near a dog ."
MAN, HAT = [10, 10, 30, 60], [15, 5, 20, 10]  # xywh; MDETR stores w = xmax - xmin, so xyxy = x + w
DOG1, DOG2 = [0, 80, 20, 20], [100, 80, 20, 20]


def xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


@pytest.fixture
def flickr(tmp_path, image_writer):
    image_writer(tmp_path / "imgs" / "555.jpg.png", 0, (160, 120))
    image_writer(tmp_path / "imgs" / "777.jpg.png", 1, (160, 120))
    images = [
        {"id": 10, "file_name": "555.jpg.png", "width": 160, "height": 120, "caption": CAPTION_A,
         "tokens_positive_eval": [[[0, 5]], [[11, 20]]], "original_img_id": 555, "sentence_id": 0},
        {"id": 11, "file_name": "555.jpg.png", "width": 160, "height": 120, "caption": CAPTION_B,
         "tokens_positive_eval": [[[0, 8]], [[13, 18]]], "original_img_id": 555, "sentence_id": 1},
        {"id": 12, "file_name": "777.jpg.png", "width": 160, "height": 120, "caption": "nothing here .",
         "tokens_positive_eval": [], "original_img_id": 777, "sentence_id": 0},
    ]
    anns = [{"id": 1, "image_id": 10, "bbox": MAN, "tokens_positive": [[0, 5]], "category_id": 1},
            {"id": 2, "image_id": 10, "bbox": HAT, "tokens_positive": [[11, 20]], "category_id": 1},
            {"id": 3, "image_id": 11, "bbox": DOG1, "tokens_positive": [[0, 8]], "category_id": 1},
            {"id": 4, "image_id": 11, "bbox": DOG2, "tokens_positive": [[0, 8]], "category_id": 1}]
    ann = tmp_path / "final_flickr_separateGT_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}))
    sentences = tmp_path / "Sentences"
    sentences.mkdir()
    (sentences / "555.txt").write_text("[/EN#1/people a man] with [/EN#2/clothing a red hat] .\n"
                                       "[/EN#3/animals two dogs] and [/EN#4/animals a cat] .\n")
    return ann, tmp_path / "imgs", sentences


def test_a_line_of_spaces_in_sentences_is_a_sentence_as_in_the_official_reader(flickr):
    ann, images, sentences = flickr
    data = json.loads(ann.read_text())
    data["images"][1]["sentence_id"] = 2  # CAPTION_B is the third sentence: an empty line does not count, " " does
    ann.write_text(json.dumps(data))
    (sentences / "555.txt").write_text("[/EN#1/people a man] with [/EN#2/clothing a red hat] .\n\n   \n"
                                       "[/EN#3/animals two dogs] and [/EN#4/animals a cat] .\n")
    ds = load_flickr_dataset(ann, images, sentences_dir=sentences)
    assert ds.entries[0].phrase_types == [["people"], ["clothing"]]
    assert ds.entries[1].phrase_types == [["animals"]] and not ds.notes["sentences_without_types"]


def test_the_pre_flight_names_unreadable_phrases_before_the_model_loads(flickr, minilm_dir):
    from glip_encoders import load_tokenizer

    ann, images, _ = flickr
    data = json.loads(ann.read_text())
    data["images"][0].update(caption="a man with a \N{GRINNING FACE} .", tokens_positive_eval=[[[0, 5]], [[13, 14]]])
    data["annotations"][1]["tokens_positive"] = [[13, 14]]
    ann.write_text(json.dumps(data))

    def never_loaded():
        raise AssertionError("the model was loaded although the pre-flight should have failed")

    with pytest.raises(EvaluationError, match="entry id 10 '\N{GRINNING FACE}': phrase is only unknown tokens"):
        evaluate(never_loaded, "flickr30k", ann, images, tokenizer=load_tokenizer(minilm_dir), progress=False,
                 verbose=False)


def test_parse_flickr_sentence():
    sentence, phrases = parse_flickr_sentence("[/EN#12/people/other A tall man] looks at [/EN#9/scene the sea] .")
    assert sentence == "A tall man looks at the sea ."
    assert phrases == [((0, 10), ["people", "other"]), ((20, 27), ["scene"])]
    assert [sentence[s:e] for (s, e), _ in phrases] == ["A tall man", "the sea"]


def test_flickr_dataset_reading(flickr):
    ann, images, sentences = flickr
    ds = load_flickr_dataset(ann, images, sentences_dir=sentences)
    assert [e.entry_id for e in ds.entries] == [10, 11]
    assert ds.entries[0].phrases == ["a man", "a red hat"] and ds.entries[1].phrases == ["two dogs"]
    assert ds.entries[1].gt_boxes[0].tolist() == [xyxy(DOG1), xyxy(DOG2)]
    assert [e.phrase_types for e in ds.entries] == [[["people"], ["clothing"]], [["animals"]]]
    assert ds.notes == {"phrases_without_boxes": 1, "sentences_without_phrases": 1}


def test_flickr_protocol_perfect_and_hand_computed(tmp_path, flickr, scripted_detector):
    ann, images, sentences = flickr
    perfect = scripted_detector({0: [("a man", xyxy(MAN), 0.9), ("a red hat", xyxy(HAT), 0.8),
                                     ("two dogs", xyxy(DOG1), 0.7), ("two dogs", xyxy(DOG2), 0.6)]})
    result = evaluate(perfect, "flickr30k", ann, images, out_dir=tmp_path / "out", progress=False, verbose=False,
                      sentences_dir=str(sentences))
    call = perfect.calls[0]
    assert call["method"] == "ground" and call["max_detections"] == 100 and call["threshold"] == 0.0
    assert call["captions"] == [CAPTION_A] and call["phrases"] == [["a man", "a red hat"]]
    any_box = result.metrics["any_box"]
    assert (any_box["R@1"], any_box["R@5"], any_box["R@10"], any_box["phrases"]) == (1.0, 1.0, 1.0, 3)
    assert set(any_box["by_type"]) == {"people", "clothing", "animals"}
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert written[1]["boxes"] == [[xyxy(DOG1), xyxy(DOG2)]] and written[1]["scores"][0] == pytest.approx([0.7, 0.6])
    # the hat's right box only at rank 2; one box on the second dog only
    partial = scripted_detector({0: [("a man", xyxy(MAN), 0.9), ("a red hat", [100, 0, 120, 10], 0.95),
                                     ("a red hat", xyxy(HAT), 0.5), ("two dogs", xyxy(DOG2), 0.6)]})
    m = evaluate(partial, "flickr30k", ann, images, progress=False, verbose=False).metrics
    assert (m["any_box"]["R@1"], m["any_box"]["R@5"]) == (pytest.approx(2 / 3), 1.0)
    # merged box: the two dogs' enclosing box (0..120 x 80..100) vs one dog: IoU 400/2400 -> miss
    assert (m["merged_box"]["R@1"], m["merged_box"]["R@5"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_repeated_phrase_text_is_counted(tmp_path, image_writer, scripted_detector):
    image_writer(tmp_path / "1.png", 0, (100, 100))
    entry = {"id": 1, "file_name": "1.png", "width": 100, "height": 100, "caption": CAPTION_C,
             "tokens_positive_eval": [[[0, 5]], [[11, 16]]]}
    anns = [{"id": 1, "image_id": 1, "bbox": DOG1, "tokens_positive": [[0, 5]]},
            {"id": 2, "image_id": 1, "bbox": DOG2, "tokens_positive": [[11, 16]]}]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [entry], "annotations": anns}))
    result = evaluate(scripted_detector({}), "flickr30k", ann, progress=False, verbose=False)
    assert result.report["phrases_grounded_at_an_earlier_occurrence"] == 1


def test_flickr_bad_annotation_is_named(tmp_path):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x", "width": 1, "height": 1, "caption": "ab",
                                           "tokens_positive_eval": [[[0, 9]]]}], "annotations": []}))
    with pytest.raises(EvaluationError, match=r"a\.json: images\[0\] \(id=1\).*outside the caption"):
        load_flickr_dataset(ann)


# ------------------------------------------------------------------------------------------------------------ ODinW


@pytest.fixture
def odinw(tmp_path, detection_dataset_writer):
    root = tmp_path / "odinw"
    a = detection_dataset_writer(root / "Aquarium" / "raw" / "valid", [(100, 100), (100, 100)],
                                 [(1, "fish"), (2, "penguin")], [(0, 1, [10, 10, 20, 20]), (1, 2, [5, 5, 50, 40])],
                                 name="annotations_without_background.json")
    b = detection_dataset_writer(root / "Pothole" / "valid", [(100, 100)], [(0, "background"), (1, "pothole")],
                                 [(0, 1, [30, 30, 20, 10])], name="annotations_without_background.json",
                                 code_offset=10)
    # a train split that the default pattern must not pick up
    detection_dataset_writer(root / "Pothole" / "train", [(100, 100)], [(1, "pothole")], [],
                             name="annotations_without_background.json", code_offset=20)
    return root, a, b


def test_odinw_discovery(odinw, tmp_path):
    root, a, b = odinw
    found = discover_odinw(root)
    assert [(e.name, e.ann_file) for e in found] == [("Aquarium/raw", a), ("Pothole", b)]
    manifest = tmp_path / "odinw.json"
    manifest.write_text(json.dumps([{"name": "pot", "annotations": str(b.relative_to(tmp_path))}]))
    assert [(e.name, e.ann_file, e.image_root) for e in discover_odinw(manifest)] == [("pot", b, b.parent)]


def test_odinw_protocol_per_dataset_and_mean(tmp_path, odinw, scripted_detector):
    root, _, _ = odinw
    # Aquarium: the fish found, the penguin missed -> AP 0.5; Pothole: found -> AP 1; mean 0.75
    model = scripted_detector({0: [("fish", [10, 10, 29, 29], 0.9)], 10: [("pothole", [30, 30, 49, 39], 0.8)]})
    result = evaluate(model, "odinw", root, out_dir=tmp_path / "out", progress=False, verbose=False)
    assert result.metrics["datasets"]["Aquarium/raw"]["AP"] == pytest.approx(0.5)
    assert result.metrics["datasets"]["Pothole"]["AP"] == pytest.approx(1.0)
    assert result.metrics["AP"] == pytest.approx(0.75)
    classes = [c["classes"] for c in model.calls]
    assert ["fish", "penguin"] in classes and ["pothole"] in classes  # the background class is dropped
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert set(written) == {"Aquarium/raw", "Pothole"} and len(written["Pothole"]) == 1
    # per-dataset class names (the official OVERRIDE_CATEGORY)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"Aquarium/raw": [{"id": 2, "name": "penguin bird"}]}))
    model2 = scripted_detector({1: [("penguin bird", [5, 5, 54, 44], 0.9)]})
    m = evaluate(model2, "odinw", root, progress=False, verbose=False, class_names=str(names)).metrics
    assert ["fish", "penguin bird"] in [c["classes"] for c in model2.calls]
    assert m["datasets"]["Aquarium/raw"]["AP"] == pytest.approx(0.5)
    names.write_text(json.dumps({"Nope": {}}))
    with pytest.raises(EvaluationError, match="unknown datasets"):
        evaluate(model2, "odinw", root, progress=False, verbose=False, class_names=str(names))


def test_model_refusal_names_the_entry(flickr, scripted_detector):
    ann, images, _ = flickr

    class Refusing(scripted_detector):
        def ground(self, *args, **kwargs):
            raise ValueError("these phrases map to no tokens")

    with pytest.raises(EvaluationError, match=r"separateGT_val\.json \(entry ids \[10\]\).*map to no tokens"):
        evaluate(Refusing({}), "flickr30k", ann, images, progress=False, verbose=False)
