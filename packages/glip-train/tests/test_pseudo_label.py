"""Self-training: pseudo-labelling caption data with a teacher, resuming, grading, and the bad inputs of a long run."""
from __future__ import annotations

import collections
import json

import pytest
import torch

from glip_data import CaptionReader, SynthConfig, generate_world
from glip_train import GLIP, GLIPConfig
from glip_train.pseudo_label import grade_pseudo_labels, pseudo_label


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), config=SynthConfig(
        seed=4, num_detection=1, num_grounding=1, num_captions=6, num_val=1, min_size=64, max_size=96))


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)  # an untrained head that still scores around 0.5
    return model


KW = dict(min_size=64, max_size=96, progress=False)


def test_pseudo_labels_are_caption_lines_glip_data_reads(world, teacher, tmp_path):
    out = tmp_path / "pseudo.jsonl"
    report = pseudo_label(teacher, world.captions_train, out, threshold=0.0, max_detections=5, **KW)
    assert report.counts["captions_written"] == 6 and not report.failed
    source = {json.loads(l)["image"]: json.loads(l) for l in world.captions_train.read_text().splitlines()}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        original = source[record["image"]]
        assert record["caption"] == original["caption"]
        spans = [e["tokens_positive"] for e in original["entities"]]
        assert all(e["tokens_positive"] in spans for e in record["entities"])  # the entities' own spans
        for entity in record["entities"]:
            assert len(entity["boxes"]) == len(entity["scores"]) and all(s > 0 for s in entity["scores"])
            for x1, y1, x2, y2 in entity["boxes"]:
                assert 0 <= x1 <= x2 <= record["width"] and 0 <= y1 <= y2 <= record["height"]
    reader = CaptionReader(out, world.image_root, score_threshold=0.0)
    assert len(reader) == 6 and reader.num_boxes == report.counts["boxes_kept"]


def test_threshold_and_nms_and_min_boxes(world, teacher, tmp_path):
    loose = pseudo_label(teacher, world.captions_train, tmp_path / "a.jsonl", threshold=0.0, max_detections=20, **KW)
    nms = pseudo_label(teacher, world.captions_train, tmp_path / "b.jsonl", threshold=0.0, max_detections=20,
                       nms=0.3, **KW)
    assert nms.counts["boxes_kept"] < loose.counts["boxes_kept"] and nms.counts["boxes_removed_by_nms"] > 0
    with pytest.warns(UserWarning, match="wrote no caption"):
        strict = pseudo_label(teacher, world.captions_train, tmp_path / "c.jsonl", threshold=0.99, **KW)
    assert strict.counts["captions_written"] == 0 and strict.counts["skipped_too_few_boxes"] == 6


def test_an_interrupted_run_resumes_where_it_stopped(world, teacher, tmp_path):
    out = tmp_path / "pseudo.jsonl"
    pseudo_label(teacher, world.captions_train, out, threshold=0.0, max_detections=3, **KW)
    full = out.read_text().splitlines()
    # simulate a kill after the third caption, in the middle of writing the fourth line
    progress = out.with_name(out.name + ".progress")
    done = progress.read_text().splitlines()
    out.write_text("\n".join(full[:3]) + "\n" + full[3][:10])
    progress.write_text("\n".join(done[:3]) + "\n")
    report = pseudo_label(teacher, world.captions_train, out, threshold=0.0, max_detections=3, **KW)
    assert report.counts["already_done"] == 3 and report.counts["captions_written"] == 3
    assert out.read_text().splitlines() == full


def test_bad_inputs_are_counted_never_a_crash(world, teacher, tmp_path):
    lines = [json.loads(l) for l in world.captions_train.read_text().splitlines()]
    lines[0]["entities"] = []  # a caption without phrases
    lines[1]["image"] = "captions/does_not_exist.jpg"
    lines[2]["caption"] = "\N{GRINNING FACE} " + lines[2]["caption"]  # spans shift; fixed below
    shift = 2
    for entity in lines[2]["entities"]:
        entity["tokens_positive"] = [[s + shift, e + shift] for s, e in entity["tokens_positive"]]
    lines[2]["entities"].append({"tokens_positive": [[0, 1]]})  # the emoji: only the unknown token
    lines[3]["caption"] += "  "
    lines[3]["entities"].append({"tokens_positive": [[len(lines[3]["caption"]) - 1, len(lines[3]["caption"])]]})
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(l) + "\n" for l in lines))
    report = pseudo_label(teacher, captions, tmp_path / "out.jsonl", images=str(world.image_root), threshold=0.0, **KW)
    assert report.counts["skipped_no_phrases"] == 1 and report.counts["skipped_unreadable_image"] == 1
    assert "does_not_exist.jpg" in report.failed[0] and report.counts["captions_written"] == 4
    # the entities the model cannot read are skipped and named; their captions keep the readable ones
    assert dict(report.phrases.counts) == {"phrase is only unknown tokens": 1, "phrase maps to no token": 1}
    assert report.phrases.examples["phrase is only unknown tokens"] == [f"{captions}:3 '\N{GRINNING FACE}'"]
    assert "phrase maps to no token 1" in report.summary()


def test_pseudo_labels_keep_a_score_equal_to_the_threshold_as_detect_does():
    from glip_data import GroundingSample
    from glip_train import GLIPProcessor
    from glip_train.postprocess import Detections
    from glip_train.pseudo_label import _record

    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]])
    scores = torch.tensor([0.5, 0.4999, 0.75])
    labels = torch.zeros(3, dtype=torch.int64)
    sample = GroundingSample(image_path="x.jpg", width=8, height=8, caption="a dog", boxes=torch.zeros(0, 4),
                             tokens_positive=[], labels=torch.zeros(0, dtype=torch.int64),
                             metadata={"file_name": "x.jpg", "line": 1})
    image = type("Image", (), {"width": 8, "height": 8})()
    record = _record(sample, image, Detections(boxes, scores, labels),
                     [{"phrase": "a dog", "tokens_positive": [(0, 5)]}], 0.5, None, collections.Counter())
    assert record["entities"][0]["scores"] == [0.5, 0.75]  # 0.5 >= 0.5 kept, 0.4999 dropped
    result = GLIPProcessor.to_results([Detections(boxes, scores, labels)], ["a dog"], 0.5, None)
    assert sorted(result["scores"].tolist()) == [0.5, 0.75]


def test_grading_by_hand(tmp_path):
    truth = tmp_path / "gt.jsonl"
    pred = tmp_path / "pred.jsonl"
    entity = {"tokens_positive": [[0, 5]], "phrase": "a dog"}
    truth.write_text(json.dumps({"image": "x.jpg", "width": 100, "height": 100, "caption": "a dog",
                                 "entities": [{**entity, "boxes": [[0, 0, 10, 10], [50, 50, 70, 70]],
                                               "scores": [1, 1]}]}) + "\n")
    # one exact box, one shifted to IoU 0.25, one duplicate of the exact box (a second match is not allowed)
    pred.write_text(json.dumps({"image": "x.jpg", "width": 100, "height": 100, "caption": "a dog",
                                "entities": [{**entity, "boxes": [[0, 0, 10, 10], [55, 55, 75, 75], [0, 0, 10, 10]],
                                              "scores": [0.9, 0.8, 0.7]}]}) + "\n")
    grade = grade_pseudo_labels(pred, truth)
    assert (grade.predicted, grade.true, grade.matched) == (3, 2, 1)
    assert grade.precision == pytest.approx(1 / 3) and grade.recall == pytest.approx(1 / 2)
    perfect = grade_pseudo_labels(truth, truth)
    assert perfect.precision == 1.0 and perfect.recall == 1.0
