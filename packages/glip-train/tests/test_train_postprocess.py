"""Anchors, box coding, NMS and post-processing: hand-computed values, independent restatements, and the official
post-processor's recorded outputs (computed from the recorded head outputs of the parity fixture)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glip_data.boxes import batched_nms, box_iou, clip_boxes
from glip_train.box_ops import AnchorGenerator, BoxCoder
from glip_train.postprocess import ATSSPostProcessor, PostProcessConfig, aggregate_token_scores
from glip_train.testing import match_detections, relative_error

LEVELS = (3, 4, 5, 6, 7)


def test_cell_anchors_match_official_templates():
    # docs/official_model.md#anchors: P3 [-28,-28,35,35] ... P7 [-448,-448,575,575]
    expected = {8: 28, 16: 56, 32: 112, 64: 224, 128: 448}
    gen = AnchorGenerator()
    for (stride, lo), cell in zip(expected.items(), gen.cell_anchors()):
        hi = lo + stride - 1  # centre (s-1)/2, width S with +1 convention
        assert cell.tolist() == [[-lo, -lo, hi, hi]]


def test_anchor_grid_is_row_major_shifted_cells():
    gen = AnchorGenerator(sizes=(32,), strides=(8,))
    (anchors,) = gen([(2, 3)])
    cell = AnchorGenerator.cell_anchor(32, 8)[0]
    for y in range(2):
        for x in range(3):
            assert torch.equal(anchors[y * 3 + x], cell + torch.tensor([8.0 * x, 8.0 * y, 8.0 * x, 8.0 * y]))


def test_box_coder_hand_computed_and_round_trip():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 9.0, 19.0]])  # w = 10, h = 20, centre (4.5, 9.5)
    deltas = torch.tensor([[10.0, -10.0, 5.0 * math.log(2.0), 0.0]])  # dx = 1, dy = -1, w x2, h x1
    box = coder.decode(deltas, anchor)[0]
    # centre (4.5 + 10, 9.5 - 20) = (14.5, -10.5); w 20, h 20; corners c ± (w-1)/2
    assert torch.allclose(box, torch.tensor([14.5 - 9.5, -10.5 - 9.5, 14.5 + 9.5, -10.5 + 9.5]))
    gen = torch.Generator().manual_seed(0)
    anchors = torch.rand(50, 2, generator=gen) * 100
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(50, 2, generator=gen) * 50], 1)
    gts = anchors + torch.randn(50, 4, generator=gen) * 3
    gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
    assert torch.allclose(coder.decode(coder.encode(gts, anchors), anchors), gts, atol=1e-4)


def test_box_coder_clamps_large_log_scales():
    coder = BoxCoder()
    box = coder.decode(torch.tensor([[0.0, 0.0, 1e4, 1e4]]), torch.tensor([[0.0, 0.0, 15.0, 15.0]]))[0]
    assert torch.allclose(box[2] - box[0] + 1, torch.tensor(1000.0))


def test_clip_uses_inclusive_pixel_grid():
    boxes = torch.tensor([[-5.0, -1.0, 700.0, 30.0]])
    assert clip_boxes(boxes, height=20, width=640).tolist() == [[0.0, 0.0, 639.0, 19.0]]


def _naive_nms_plus1(boxes, scores, labels, thr):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep = []
    for i in order:
        ok = True
        for j in keep:
            if labels[i] != labels[j]:
                continue
            x1 = max(boxes[i][0], boxes[j][0]); y1 = max(boxes[i][1], boxes[j][1])
            x2 = min(boxes[i][2], boxes[j][2]); y2 = min(boxes[i][3], boxes[j][3])
            inter = max(0.0, x2 - x1 + 1) * max(0.0, y2 - y1 + 1)
            area = lambda b: (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return sorted(keep)


def test_nms_plus1_matches_naive_and_keeps_candidate_order():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(80, 2, generator=gen) * 40
    boxes = torch.cat([xy, xy + 2 + torch.rand(80, 2, generator=gen) * 10], 1)
    scores = torch.rand(80, generator=gen)
    labels = torch.randint(0, 3, (80,), generator=gen)
    keep = batched_nms(boxes, scores, labels, 0.5)
    assert keep.tolist() == _naive_nms_plus1(boxes.tolist(), scores.tolist(), labels.tolist(), 0.5)
    # small boxes: the +1 convention changes the IoU noticeably
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    assert box_iou(a, b, legacy=True).item() == pytest.approx(1 / 7)


def test_token_mean_aggregation():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.6], [0.5, 0.5, 0.5, 0.0]])
    out = aggregate_token_scores(probs, [[1], [2, 3], [0, 1, 2]])
    assert torch.allclose(out, torch.tensor([[0.2, 0.45, 0.2], [0.5, 0.25, 0.5]]))
    with pytest.raises(ValueError, match="no tokens"):
        aggregate_token_scores(probs, [[]])
    with pytest.raises(ValueError, match="only 4 tokens"):
        aggregate_token_scores(probs, [[7]])


def test_max_detections_rule_keeps_ties():
    post = ATSSPostProcessor(PostProcessConfig(detections_per_image=2))
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]])
    dets = post._select(boxes, torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.zeros(4, dtype=torch.long), False)
    assert dets.scores.tolist() == pytest.approx([0.9, 0.5, 0.5])  # the 2nd-largest score ties: official kthvalue rule keeps 3


# --------------------------------------------------------------------------------------------- official outputs
def _case_arrays(parity_dir, case):
    return np.load(parity_dir / case["file"])


@pytest.mark.parity
def test_anchors_equal_fixture(parity_dir, parity_index):
    for name, case in parity_index["cases"].items():
        d = _case_arrays(parity_dir, case)
        sizes = [tuple(d[f"fpn/p{l}"].shape[-2:]) for l in LEVELS]
        for level, anchors in zip(LEVELS, AnchorGenerator()(sizes)):
            assert torch.equal(anchors, torch.from_numpy(d[f"anchors/p{level}"])), (name, level)


@pytest.mark.parity
def test_postprocess_equals_official_on_recorded_head_outputs(parity_dir, parity_index):
    """Feeding the official head outputs to our post-processor reproduces the official candidates and detections."""
    for name, case in parity_index["cases"].items():
        d = _case_arrays(parity_dir, case)
        t = lambda k: torch.from_numpy(d[k])  # noqa: E731
        sizes = [tuple(d[f"fpn/p{l}"].shape[-2:]) for l in LEVELS]
        class_tokens = [[m[k] for k in sorted(m, key=int)] for m in case["label_to_token"]]
        results = ATSSPostProcessor()(
            [t(f"head/bbox_reg_p{l}") for l in LEVELS],
            [t(f"head/centerness_p{l}") for l in LEVELS],
            [t(f"head/dot_product_logits_p{l}_t32") for l in LEVELS],
            AnchorGenerator()(sizes),
            [tuple(s) for s in d["input/image_sizes_hw"].tolist()],
            class_tokens,
            keep_pre_nms=True,
        )
        for i, det in enumerate(results):
            pre_b, pre_s, pre_l = det.pre_nms
            ref = [t(f"post/img{i}/pre_nms_{k}") for k in ("boxes", "scores", "labels")]
            m = match_detections(pre_b, pre_s, pre_l + 1, *ref, iou_threshold=0.9999, score_tolerance=1e-6)
            assert m.matched == m.num_reference == m.num_ours, (name, i, m)
            ref = [t(f"post/img{i}/det_{k}") for k in ("boxes_input", "scores", "labels")]
            m = match_detections(det.boxes, det.scores, det.labels + 1, *ref, iou_threshold=0.9999, score_tolerance=1e-6)
            assert m.matched == m.num_reference == m.num_ours, (name, i, m)
            # sorted by score, boxes agree to float rounding
            order = det.scores.argsort(descending=True)
            ref_order = ref[1].argsort(descending=True)
            assert relative_error(det.boxes[order], ref[0][ref_order]) < 1e-6
