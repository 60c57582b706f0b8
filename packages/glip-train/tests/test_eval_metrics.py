"""Metrics on constructed detections whose scores are known by hand, and equality with pycocotools / lvis called
directly on the same files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glip_train.evaluation import evaluate_detections, grounding_recall, load_detection_dataset, numpy_float_alias
from glip_train.evaluation.detections import ImagePredictions, collect_results, top_k_per_group

CATS = [(1, "cat"), (3, "dog")]


def _dets(records):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": s} for i, c, b, s in records]


# ------------------------------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco_file(tmp_path, detection_dataset_writer):
    boxes = [(0, 1, [10, 20, 30, 40]), (1, 1, [0, 0, 100, 100]), (2, 1, [5, 5, 50, 20]),
             (0, 3, [60, 10, 20, 20]), (2, 3, [100, 80, 40, 60])]
    return detection_dataset_writer(tmp_path, [(200, 150)] * 3, CATS, boxes)


def test_perfect_predictions_score_one(coco_file):
    gt = json.loads(coco_file.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    m = evaluate_detections("coco", coco_file, dets).metrics
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
    assert m["per_category"] == {1: pytest.approx(1.0), 3: pytest.approx(1.0)}


def test_ranked_false_positive_gives_hand_computed_ap(coco_file):
    """Category 1 (3 ground-truth boxes): TP 0.9, FP 0.8, TP 0.7, the third box missed.
    Recall [1/3, 1/3, 2/3], precision [1, 1/2, 2/3] -> interpolated [1, 2/3, 2/3]: recall thresholds 0.00..0.33
    (34 of COCO's 101) score 1, 0.34..0.66 (33) score 2/3, the rest 0: AP = (34 + 22) / 101 at every IoU."""
    dets = _dets([(1, 1, [10, 20, 30, 40], 0.9), (1, 1, [150, 100, 20, 20], 0.8), (2, 1, [0, 0, 100, 100], 0.7)])
    m = evaluate_detections("coco", coco_file, dets).metrics
    assert m["per_category"][1] == pytest.approx(56 / 101, abs=1e-12)
    assert m["per_category"][3] == pytest.approx(0.0)  # its two boxes are missed
    assert m["AP"] == pytest.approx((56 / 101 + 0.0) / 2, abs=1e-12)


def test_shifted_box_is_matched_up_to_its_iou(tmp_path, detection_dataset_writer):
    """A 100x100 box predicted 20 px to the right: IoU 80*100 / (120*100) = 2/3, a match at the IoU thresholds
    0.50..0.65 (4 of 10): AP = 0.4, AP50 = 1, AP75 = 0."""
    ann = detection_dataset_writer(tmp_path, [(300, 300)], CATS[:1], [(0, 1, [50, 50, 100, 100])])
    m = evaluate_detections("coco", ann, _dets([(1, 1, [70, 50, 100, 100], 0.5)])).metrics
    assert (m["AP"], m["AP50"], m["AP75"]) == (pytest.approx(0.4), pytest.approx(1.0), pytest.approx(0.0))


def test_box_conventions(tmp_path, detection_dataset_writer):
    """Inclusive pixel boxes: columns 10..19 are 10 wide (+1); exact boxes: x2 - x1; float32 as the official
    conversion (0.1 is not exact in float32: 19.1 - 10.1 + 1 rounds in float32, not float64)."""
    ann = detection_dataset_writer(tmp_path, [(100, 100)], CATS[:1], [(0, 1, [1, 1, 5, 5])])
    dataset = load_detection_dataset(ann, None, kind="coco")
    preds = [ImagePredictions(np.array([[10, 20, 19, 59], [10.1, 20, 19.1, 59]], np.float32), np.ones(2, np.float32),
                              np.zeros(2, np.int64))]
    inclusive = collect_results(dataset, preds, "inclusive").bbox
    assert inclusive[0].tolist() == [10, 20, 10, 40] and inclusive.dtype == np.float32
    assert inclusive[1, 2] == np.float32(19.1) - np.float32(10.1) + np.float32(1)
    assert collect_results(dataset, preds, "exact").bbox[0].tolist() == [10, 20, 9, 39]
    with pytest.raises(ValueError, match="inclusive"):
        collect_results(dataset, preds, "official")


def test_our_coco_numbers_equal_pycocotools_called_directly(tmp_path, coco_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    gt = json.loads(coco_file.read_text())
    dets = []
    for a in gt["annotations"]:  # jittered true boxes plus random false positives
        for _ in range(3):
            b = np.asarray(a["bbox"], float) + rng.normal(0, 4, 4)
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": b.tolist(),
                         "score": float(rng.random())})
    for _ in range(20):
        dets.append({"image_id": int(rng.integers(1, 4)), "category_id": int(rng.choice([1, 3])),
                     "bbox": (rng.random(4) * 80 + 1).tolist(), "score": float(rng.random())})
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    ours = evaluate_detections("coco", coco_file, path, out_dir=tmp_path / "out").metrics

    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_file))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "out" / "detections.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert [ours[n] for n in names] == [float(v) for v in ev.stats]
    assert 0.0 < ours["AP"] < 1.0
    # the written detections are the input, untouched
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == dets


# ------------------------------------------------------------------------------------------------------------- LVIS

LVIS_CATS = [(1, "aerosol_can"), (2, "bow_(weapon)"), (3, "zebra")]
LVIS_META = {"frequency": {1: "f", 2: "c", 3: "r"}, "neg": {0: [3], 1: [2]}, "not_exhaustive": {}}


@pytest.fixture
def lvis_file(tmp_path, detection_dataset_writer):
    # image 0: cat 1 and cat 2; image 1: cat 1 (cat 2 verified absent); cat 3 has no box (negative in image 0)
    boxes = [(0, 1, [10, 10, 40, 30]), (0, 2, [100, 50, 30, 30]), (1, 1, [20, 20, 50, 50])]
    return detection_dataset_writer(tmp_path, [(200, 150), (200, 150)], LVIS_CATS, boxes, lvis=LVIS_META,
                                    name="lvis.json")


def test_lvis_perfect_predictions_and_federated_rules(lvis_file):
    perfect = _dets([(1, 1, [10, 10, 40, 30], 0.9), (1, 2, [100, 50, 30, 30], 0.9), (2, 1, [20, 20, 50, 50], 0.9)])
    m = evaluate_detections("lvis-minival", lvis_file, perfect).metrics
    assert m["AP"] == pytest.approx(1.0) and m["APf"] == pytest.approx(1.0) and m["APc"] == pytest.approx(1.0)
    assert m["APr"] == -1  # the rare category has no ground truth
    # a false positive of a category neither annotated nor verified absent in the image is not penalised ...
    unknown = perfect + _dets([(2, 3, [0, 0, 30, 30], 0.99)])
    assert evaluate_detections("lvis-minival", lvis_file, unknown).metrics["AP"] == pytest.approx(1.0)
    # ... one of a verified-absent category is: cat 2 in image 2, ranked first -> cat 2: FP then TP:
    # precision [0, 1/2] -> interpolated 1/2 at every recall threshold: AP(cat 2) = 1/2, mean over cats 1, 2
    negative = perfect + _dets([(2, 2, [0, 0, 30, 30], 0.99)])
    m = evaluate_detections("lvis-minival", lvis_file, negative).metrics
    assert m["APc"] == pytest.approx(0.5) and m["AP"] == pytest.approx((1.0 + 0.5) / 2)


def test_fixed_ap_differs_from_the_per_image_cap_exactly_where_constructed(lvis_file):
    """Image 1: cat 2 TP (0.9), cat 2 FP (0.8), cat 1 TP (0.1); image 2: cat 1 TP (0.5).
    Standard AP with 2 detections per image drops image 1's cat-1 TP: cat 1 recall 1/2 at precision 1 -> AP 51/101
    (thresholds 0..0.50); cat 2: TP, FP -> AP 1. Fixed AP keeps everything: both categories AP 1.
    Fixed AP with a budget of 1 per category keeps cat 1's best (image 2) and cat 2's TP: 51/101 and 1 again."""
    dets = _dets([(1, 2, [100, 50, 30, 30], 0.9), (1, 2, [0, 100, 30, 30], 0.8), (1, 1, [10, 10, 40, 30], 0.1),
                  (2, 1, [20, 20, 50, 50], 0.5)])
    standard = evaluate_detections("lvis-val", lvis_file, dets, max_detections=2).metrics
    fixed = evaluate_detections("lvis-minival", lvis_file, dets).metrics
    budget = evaluate_detections("lvis-minival", lvis_file, dets, max_detections_per_category=1).metrics
    assert standard["APf"] == pytest.approx(51 / 101) and standard["APc"] == pytest.approx(1.0)
    assert standard["AP"] == pytest.approx((51 / 101 + 1.0) / 2)
    assert fixed["AP"] == pytest.approx(1.0)
    assert budget["APf"] == pytest.approx(51 / 101) and budget["APc"] == pytest.approx(1.0)


def test_our_lvis_numbers_equal_the_lvis_api_called_directly(tmp_path, lvis_file):
    from lvis import LVIS, LVISEval, LVISResults

    rng = np.random.default_rng(1)
    gt = json.loads(lvis_file.read_text())
    dets = []
    for a in gt["annotations"]:
        for _ in range(4):
            b = np.asarray(a["bbox"], float) + rng.normal(0, 3, 4)
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": b.tolist(),
                         "score": float(rng.random())})
    for _ in range(30):
        dets.append({"image_id": int(rng.integers(1, 3)), "category_id": int(rng.integers(1, 4)),
                     "bbox": (rng.random(4) * 60 + 1).tolist(), "score": float(rng.random())})
    for protocol, max_dets in (("lvis-minival", -1), ("lvis-val", 300)):
        out = tmp_path / protocol
        ours = evaluate_detections(protocol, lvis_file, dets, out_dir=out).metrics
        gt_api = LVIS(str(lvis_file))
        with numpy_float_alias():
            ev = LVISEval(gt_api, LVISResults(gt_api, str(out / "detections.json"), max_dets=max_dets), "bbox")
            ev.params.max_dets = max_dets
            ev.run()
        assert ours == {k: float(v) for k, v in ev.results.items()}
        assert 0.0 < ours["AP"] < 1.0


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning")
def test_lvis_needs_the_numpy_alias_and_it_does_not_leak(lvis_file):
    from lvis import LVIS, LVISEval

    gt = LVIS(str(lvis_file))
    dets = _dets([(1, 1, [10, 10, 40, 30], 0.9)])
    assert not hasattr(np, "float")
    with pytest.raises(AttributeError, match="float"):
        LVISEval(gt, dets, "bbox").run()  # np.float is gone from numpy >= 1.24: the reason for the alias
    with numpy_float_alias():
        assert np.float is float
    assert not hasattr(np, "float")


def test_empty_predictions_score_zero(coco_file, lvis_file):
    coco = evaluate_detections("coco", coco_file, []).metrics
    assert coco["AP"] == 0.0 and coco["AR100"] == 0.0
    lvis = evaluate_detections("lvis-minival", lvis_file, []).metrics
    assert lvis["AP"] == 0.0 and lvis["APr"] == -1


# ------------------------------------------------------------------------------------------------------- selection


def test_top_k_per_group_against_brute_force():
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 5, 200)
    scores = np.round(rng.random(200), 1)  # many ties
    for k in (1, 3, 50):
        kept = set(top_k_per_group(groups, scores, k).tolist())
        expected = set()
        for g in range(5):
            rows = [i for i in range(200) if groups[i] == g]
            rows.sort(key=lambda i: (-scores[i], i))  # best first, earlier row first among ties
            expected |= set(rows[:k])
        assert kept == expected


# ------------------------------------------------------------------------------------------------------- grounding


def test_grounding_recall_uses_the_continuous_iou():
    # gt 10x10; the prediction 10x4.5 covers 45 of its 100 area units (IoU 0.45, a miss at 0.5); with the legacy
    # +1 sides it would be 11 x 5.5 of 121 = 0.5, a hit
    gt = [np.array([[0.0, 0.0, 10.0, 10.0]])]
    assert grounding_recall([np.array([[0.0, 0.0, 10.0, 4.5]])], gt, recall_at=(1,))["R@1"] == 0.0
    assert grounding_recall([np.array([[0.0, 0.0, 10.0, 5.0]])], gt, recall_at=(1,))["R@1"] == 1.0  # exactly 0.5


def test_grounding_recall_hand_built():
    gt = [np.array([[0, 0, 10, 10]]),                       # phrase 0
          np.array([[0, 0, 10, 10], [90, 90, 100, 100]]),   # phrase 1: two boxes far apart
          np.array([[0, 0, 10, 10]]),                       # phrase 2: no prediction
          np.array([[0, 0, 10, 10]])]                       # phrase 3: IoU exactly 0.5 at rank 1
    preds = [np.array([[50, 50, 60, 60], [0, 0, 10, 10]]),  # miss, then hit at rank 2
             np.array([[90, 90, 100, 100]]),                # hits the second box; vs the merged box IoU 0.01
             np.zeros((0, 4)),
             np.array([[0, 0, 10, 5]])]
    types = [["people"], ["people", "clothing"], ["clothing"], ["other"]]
    any_box = grounding_recall(preds, gt, types, recall_at=(1, 2))
    assert (any_box["R@1"], any_box["R@2"], any_box["upper_bound"]) == (0.5, 0.75, 0.75)
    assert any_box["by_type"]["people"] == {"R@1": 0.5, "R@2": 1.0, "upper_bound": 1.0, "phrases": 2}
    assert any_box["by_type"]["clothing"] == {"R@1": 0.5, "R@2": 0.5, "upper_bound": 0.5, "phrases": 2}
    merged = grounding_recall(preds, gt, types, recall_at=(1, 2), merge_gt=True)
    assert (merged["R@1"], merged["R@2"]) == (0.25, 0.5)
    # just below the threshold is a miss
    below = grounding_recall([np.array([[0, 0, 10, 4.99]])], [gt[3]], recall_at=(1,))
    assert below["R@1"] == 0.0
