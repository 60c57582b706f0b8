"""The evaluation runner with a scripted detector: protocol parameters reach the model, files and metrics, sharded
runs equal single-process runs, and bad input gives named errors or counted skips."""
from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest

from glip_train.evaluation import EvaluationError, evaluate, get_protocol, load_detection_dataset, shard_indices
from glip_train.evaluation.detections import collect_results
from glip_train.evaluation.runner import predict_detections, score_detections

CATS = [(7, "traffic_light"), (2, "person"), (5, "bow_(weapon)")]
BOXES = [(0, 2, [10, 20, 30, 40]), (0, 7, [100, 10, 20, 50]), (1, 5, [5, 5, 60, 30]), (2, 2, [40, 40, 80, 60]),
         (3, 7, [0, 0, 50, 50]), (4, 2, [20, 30, 10, 10])]
SIZES = [(160, 120), (200, 100), (150, 150), (120, 160), (100, 100)]
NAMES = {7: "traffic_light", 2: "person", 5: "bow_(weapon)"}


def inclusive(xywh):
    x, y, w, h = xywh
    return [x, y, x + w - 1, y + h - 1]


def perfect(boxes=BOXES, score=0.9):
    out = {}
    for i, c, b in boxes:
        out.setdefault(i, []).append((NAMES[c], inclusive(b), score))
    return out


@pytest.fixture
def coco(tmp_path, detection_dataset_writer):
    return detection_dataset_writer(tmp_path, SIZES, CATS, BOXES)


def test_coco_protocol_end_to_end_with_perfect_detections(tmp_path, coco, scripted_detector, capsys):
    model = scripted_detector(perfect())
    result = evaluate(model, "coco", coco, out_dir=tmp_path / "out", progress=False)
    assert result.metrics["AP"] == pytest.approx(1.0)
    # the official COCO protocol: every class in category-id order in one prompt, 100 detections per image
    call = model.calls[0]
    assert call["classes"] == ["person", "bow_(weapon)", "traffic_light"]
    assert (call["classes_per_prompt"], call["max_detections"], call["max_detections_per_prompt"]) == (0, 100, 100)
    # test sizes unset: a detector without a processor chooses its own
    assert (call["threshold"], call["min_size"], call["max_size"], call["batch_size"]) == (0.0, None, None, 1)
    assert sorted(c for call in model.calls for c in call["codes"]) == list(range(len(SIZES)))
    # files: COCO results with the inclusive conversion (w = x2 - x1 + 1 gives back the annotated boxes)
    dets = json.loads((tmp_path / "out" / "detections.json").read_text())
    gt = json.loads(coco.read_text())
    expected = sorted((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in gt["annotations"])
    assert sorted((d["image_id"], d["category_id"], tuple(d["bbox"])) for d in dets) == expected
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["protocol"] == {**get_protocol("coco").to_dict()}
    assert saved["metrics"]["AP"] == pytest.approx(1.0) and saved["report"]["images"] == len(SIZES)
    assert "AP" in capsys.readouterr().out


def test_unset_test_sizes_are_the_models_and_are_recorded_resolved(tmp_path, coco, scripted_detector):
    from glip_train.processing_glip import GLIPProcessor

    model = scripted_detector(perfect())
    model.processor = GLIPProcessor(None, test_size=(160, 240))  # a model trained on small images
    evaluate(model, "coco", coco, out_dir=tmp_path / "a", progress=False, verbose=False)
    evaluate(model, "coco", coco, out_dir=tmp_path / "b", progress=False, verbose=False, min_size=128)
    # a shorter side above the model's longer-side cap is allowed, as in detect: the cap wins in the resize
    evaluate(model, "coco", coco, out_dir=tmp_path / "c", progress=False, verbose=False, min_size=800)
    assert [(c["min_size"], c["max_size"]) for c in model.calls] == \
        [(160, 240)] * len(SIZES) + [(128, 240)] * len(SIZES) + [(800, 240)] * len(SIZES)
    recorded = [json.loads((tmp_path / d / "metrics.json").read_text())["protocol"] for d in "abc"]
    assert [(p["min_size"], p["max_size"]) for p in recorded] == [(160, 240), (128, 240), (800, 240)]


def test_lvis_protocol_parameters_reach_the_model(tmp_path, scripted_detector, detection_dataset_writer):
    meta = {"frequency": {7: "f", 2: "c", 5: "r"}}
    ann = detection_dataset_writer(tmp_path, SIZES, CATS, BOXES, lvis=meta, name="lvis.json")
    # the LVIS conversion has no +1: perfect predictions for it are the boxes x2 = x + w
    exact = {}
    for i, c, (x, y, w, h) in BOXES:
        exact.setdefault(i, []).append((NAMES[c], [x, y, x + w, y + h], 0.8))
    model = scripted_detector(exact)
    result = evaluate(model, "lvis-minival", ann, progress=False, verbose=False)
    call = model.calls[0]
    assert (call["classes_per_prompt"], call["max_detections_per_prompt"], call["max_detections"]) == (40, 300, None)
    assert result.metrics["AP"] == pytest.approx(1.0)
    inclusive_model = scripted_detector(perfect(score=0.8))  # one pixel smaller under the LVIS conversion
    assert evaluate(inclusive_model, "lvis-minival", ann, progress=False, verbose=False).metrics["AP"] < 1.0
    std_model = scripted_detector(exact)
    std = evaluate(std_model, "lvis-val", ann, progress=False, verbose=False)
    assert std_model.calls[0]["max_detections"] == 300 and std.metrics["AP"] == pytest.approx(1.0)


def _noisy(seed=0):
    """Per image, jittered true boxes and false positives with distinct scores (so every rank matters)."""
    rng = np.random.default_rng(seed)
    out = perfect()
    for i in range(len(SIZES)):
        rows = []
        for n, b, _ in out.get(i, []):
            rows.append((n, (np.asarray(b) + rng.normal(0, 3, 4)).tolist(), float(rng.random())))
        for _ in range(4):
            x, y = rng.random(2) * 60
            rows.append((str(rng.choice(list(NAMES.values()))), [x, y, x + 20, y + 30], float(rng.random())))
        out[i] = rows
    return out


def test_sharded_prediction_equals_one_process(tmp_path, coco, scripted_detector):
    protocol = get_protocol("coco")
    dataset = load_detection_dataset(coco)
    model = scripted_detector(_noisy())
    single, _ = predict_detections(model, protocol, dataset, range(len(dataset)))
    world = 3
    merged = {}
    for rank in range(world):
        part, _ = predict_detections(model, protocol, dataset, shard_indices(len(dataset), rank, world))
        assert set(part) == set(range(rank, len(dataset), world))
        merged.update(part)
    outs = []
    for name, preds in (("single", single), ("sharded", merged)):
        cols = collect_results(dataset, [preds[i] for i in range(len(dataset))], "inclusive")
        (tmp_path / name).mkdir()
        outs.append((score_detections(protocol, dataset, cols, tmp_path / name),
                     (tmp_path / name / "detections.json").read_text()))
    assert outs[0] == outs[1]
    assert 0.0 < outs[0][0]["AP"] < 1.0


def test_image_size_differing_from_annotation_is_rescaled(tmp_path, scripted_detector, detection_dataset_writer):
    """The files are half the annotated size: the model's boxes (in file pixels) are scaled back, as officially."""
    sizes = [(200, 100)]
    ann = detection_dataset_writer(tmp_path, sizes, CATS[:1], [(0, 7, [40, 20, 80, 40])], file_sizes=[(100, 50)])
    model = scripted_detector({0: [("traffic_light", [20, 10, 60, 30], 0.9)]})
    result = evaluate(model, "coco", ann, progress=False, verbose=False, box_convention="exact")
    assert result.metrics["AP"] == pytest.approx(1.0)
    assert result.report["images_size_differs_from_annotation"] == 1


def test_missing_and_corrupt_images(tmp_path, coco, scripted_detector, capsys):
    (tmp_path / "images" / "001.png").unlink()
    (tmp_path / "images" / "002.png").write_bytes(b"not an image")
    model = scripted_detector(perfect())
    with pytest.raises(EvaluationError, match=r"001\.png.*image id 2.*pass on_bad_image='skip'"):
        evaluate(model, "coco", coco, progress=False, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named as skips, not as warnings
        result = evaluate(model, "coco", coco, out_dir=tmp_path / "out", progress=False, verbose=False,
                          on_bad_image="skip")
    assert result.report["images_unreadable_skipped"] == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": unreadable image")[0] for line in lines] == [
        "glip eval: skipped ann.json, image id 2", "glip eval: skipped ann.json, image id 3"]
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped"]
    assert recorded["by_reason"] == {"unreadable image": 2} and result.skipped == recorded
    assert "001.png" in recorded["examples"]["unreadable image"][0]
    # the two skipped images count as images without detections: their boxes (cat 5 and one of cat 2) are missed
    assert result.metrics["per_category"][5] == 0.0 and 0.0 < result.metrics["AP"] < 1.0


def test_class_name_mapping_to_no_token_is_named(tmp_path, scripted_detector, detection_dataset_writer, minilm_dir):
    from glip_encoders import load_tokenizer

    ann = detection_dataset_writer(tmp_path, SIZES[:1], [(1, "cat"), (4, "\u200b")], [(0, 1, [1, 1, 9, 9])])
    model = scripted_detector({}, tokenizer=load_tokenizer(minilm_dir))
    with pytest.raises(EvaluationError, match=r"ann\.json.*id 4"):
        evaluate(model, "coco", ann, progress=False, verbose=False)
    # an override file gives the category a usable name
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"4": "dog"}))
    result = evaluate(model, "custom", ann, progress=False, verbose=False, class_names=str(names))
    assert model.calls[-1]["classes"] == ["cat", "dog"] and result.report["prompts_per_image"] == 1


def test_bad_predictions_files_are_named(tmp_path, coco):
    from glip_train.evaluation import evaluate_detections

    good = {"image_id": 1, "category_id": 2, "bbox": [10, 20, 30, 40], "score": 0.5}
    with pytest.raises(EvaluationError, match=r"detection 1 has image_id 99"):
        evaluate_detections("coco", coco, [good, {**good, "image_id": 99}])
    with pytest.raises(EvaluationError, match=r"detection 0 has category_id 3"):
        evaluate_detections("coco", coco, [{**good, "category_id": 3}])
    with pytest.raises(EvaluationError, match=r"detection 0 needs image_id"):
        evaluate_detections("coco", coco, [{"image_id": 1}])
    path = tmp_path / "bad.json"
    path.write_text("[{")
    with pytest.raises(EvaluationError, match=r"bad\.json: not valid JSON"):
        evaluate_detections("coco", coco, path)


def test_empty_model_output(tmp_path, coco, scripted_detector):
    result = evaluate(scripted_detector({}), "coco", coco, out_dir=tmp_path / "o", progress=False, verbose=False)
    assert result.metrics["AP"] == 0.0 and result.report["images_without_detections"] == len(SIZES)
    assert json.loads((tmp_path / "o" / "detections.json").read_text()) == []


def test_protocol_validation_names_the_field():
    with pytest.raises(ValueError, match="classes_per_prompt"):
        get_protocol("coco", classes_per_prompt=-1)
    with pytest.raises(ValueError, match="no parameter"):
        get_protocol("coco", chunk=3)
    with pytest.raises(ValueError, match="box_convention"):
        get_protocol("lvis-val", box_convention="official")
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("voc")
    assert Counter(get_protocol("flickr30k", recall_at=[1, 3]).recall_at) == Counter((1, 3))


def _never_loaded():
    raise AssertionError("the model was loaded although the pre-flight should have failed")


def test_the_pre_flight_names_unreadable_class_names_before_the_model_loads(tmp_path, detection_dataset_writer,
                                                                            minilm_dir):
    from glip_encoders import load_tokenizer

    # an emoji is only BERT's unknown token; a zero-width space maps to no token
    ann = detection_dataset_writer(tmp_path, SIZES[:1], [(1, "cat"), (4, "\N{GRINNING FACE}"), (6, "\u200b")],
                                   [(0, 1, [1, 1, 9, 9])])
    with pytest.raises(EvaluationError) as err:
        evaluate(_never_loaded, "coco", ann, tokenizer=load_tokenizer(minilm_dir), progress=False, verbose=False)
    message = str(err.value)
    assert "ann.json" in message and "id 4 ('\N{GRINNING FACE}'): phrase is only unknown tokens" in message
    assert f"id 6 ({chr(0x200B)!r}): phrase maps to no token" in message and "id 1" not in message
