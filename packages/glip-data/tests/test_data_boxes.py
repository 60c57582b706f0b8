"""glip_data.boxes: hand-computed values in both conventions, numpy/torch parity, NMS against a brute-force greedy
restatement in float64 with +1 areas."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from glip_data.boxes import (
    LEGACY_PIXEL,
    batched_nms,
    box_area,
    box_iou,
    clip_boxes,
    convert_xyxy,
    hflip_boxes,
    nonempty_boxes,
    xywh_to_xyxy,
    xyxy_to_xywh,
)


def test_legacy_pixel_is_one():
    assert LEGACY_PIXEL == 1.0


# --- conversions ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("legacy, xyxy", [(True, [12.0, 40.5, 111.0, 119.75]), (False, [12.0, 40.5, 112.0, 120.75])])
def test_xywh_xyxy_hand_computed(legacy, xyxy):
    # COCO [12, 40.5, 100, 80.25]: legacy x2 = 12 + 100 - 1 = 111, y2 = 40.5 + 80.25 - 1 = 119.75
    xywh = [12.0, 40.5, 100.0, 80.25]
    assert xywh_to_xyxy(torch.tensor([xywh], dtype=torch.float64), legacy=legacy).tolist() == [xyxy]
    assert xywh_to_xyxy(np.array([xywh]), legacy=legacy).tolist() == [xyxy]
    assert xywh_to_xyxy(xywh, legacy=legacy) == xyxy
    assert xyxy_to_xywh(torch.tensor([xyxy], dtype=torch.float64), legacy=legacy).tolist() == [xywh]
    assert xyxy_to_xywh(np.array([xyxy]), legacy=legacy).tolist() == [xywh]
    assert xyxy_to_xywh([xyxy], legacy=legacy) == [xywh]


def test_list_conversions_keep_integers_in_the_continuous_convention():
    # files (ODVG <-> COCO) keep their ints: [12, 40, 112, 120] -> [12, 40, 100, 80], not 100.0
    out = xyxy_to_xywh([[12, 40, 112, 120], (0, 0, 5, 5)], legacy=False)
    assert out == [[12, 40, 100, 80], [0, 0, 5, 5]]
    assert all(type(v) is int for box in out for v in box)
    assert xywh_to_xyxy([], legacy=False) == []
    with pytest.raises(ValueError, match="four numbers"):
        xywh_to_xyxy([[1, 2, 3]], legacy=False)


def test_conversions_keep_type_shape_and_batch_dims():
    boxes = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    out = xywh_to_xyxy(boxes, legacy=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 4) and out.dtype == torch.float32
    assert out[1, 2].tolist() == [20.0, 21.0, 20.0 + 22.0 - 1, 21.0 + 23.0 - 1]
    arr = boxes.numpy()
    assert isinstance(xyxy_to_xywh(arr, legacy=False), np.ndarray)


def test_convert_xyxy_moves_the_far_corner():
    continuous = np.array([[10.0, 20.0, 30.0, 40.0]])
    legacy = convert_xyxy(continuous, from_legacy=False, to_legacy=True)
    assert legacy.tolist() == [[10.0, 20.0, 29.0, 39.0]]
    assert convert_xyxy(torch.from_numpy(legacy), from_legacy=True, to_legacy=False).tolist() == continuous.tolist()
    same = convert_xyxy(continuous, from_legacy=True, to_legacy=True)
    assert same.tolist() == continuous.tolist() and same is not continuous


# --- clipping, emptiness, areas ---------------------------------------------------------------------------------------


def test_clip_boxes_hand_computed():
    boxes = torch.tensor([[-5.0, -1.0, 700.0, 30.0], [10.0, 5.0, 20.0, 8.0]])
    # legacy: [0, W-1] x [0, H-1] = [0, 639] x [0, 19]; continuous: [0, 640] x [0, 20]
    assert clip_boxes(boxes, height=20, width=640).tolist() == [[0, 0, 639, 19], [10, 5, 20, 8]]
    assert clip_boxes(boxes, height=20, width=640, legacy=False).tolist() == [[0, 0, 640, 20], [10, 5, 20, 8]]
    assert clip_boxes(boxes.numpy(), height=20, width=640).tolist() == [[0, 0, 639, 19], [10, 5, 20, 8]]


def test_clip_boxes_per_box_sizes_and_nan():
    boxes = np.array([[-5.0, -1.0, 700.0, 30.0], [1.0, 2.0, 30.0, 40.0], [np.nan, 0.0, 5.0, 5.0]])
    width, height = np.array([640, 10, 50]), np.array([20, 15, 50])
    out = clip_boxes(boxes, height=height, width=width)
    np.testing.assert_array_equal(out, [[0, 0, 639, 19], [1, 2, 9, 14], [np.nan, 0, 5, 5]])
    out_t = clip_boxes(torch.from_numpy(boxes), height=torch.from_numpy(height), width=torch.from_numpy(width))
    np.testing.assert_array_equal(out_t.numpy(), out)
    with pytest.raises(ValueError, match="one value per box"):
        clip_boxes(boxes, height=height[:2], width=640)
    with pytest.raises(ValueError, match="height must be positive"):
        clip_boxes(boxes, height=0, width=640)


def test_nonempty_boxes():
    boxes = torch.tensor([[0, 0, 1, 1], [3, 0, 3, 5], [0, 4, 5, 4], [5, 5, 2, 9], [0, 0, float("inf"), 1],
                          [0, float("nan"), 2, 2]])
    assert nonempty_boxes(boxes).tolist() == [True, False, False, False, False, False]
    assert nonempty_boxes(boxes.numpy()).tolist() == [True, False, False, False, False, False]


def test_box_area_hand_computed():
    boxes = np.array([[0.0, 0.0, 9.0, 19.0], [2.0, 3.0, 2.0, 3.0], [1.5, 0.0, 4.0, 1.0]])
    # legacy: 10 * 20 = 200, a single pixel 1 * 1 = 1, 3.5 * 2 = 7; continuous: 9 * 19 = 171, 0, 2.5 * 1 = 2.5
    assert box_area(boxes, legacy=True).tolist() == [200.0, 1.0, 7.0]
    assert box_area(boxes, legacy=False).tolist() == [171.0, 0.0, 2.5]
    assert box_area(torch.from_numpy(boxes), legacy=True).tolist() == [200.0, 1.0, 7.0]


def test_legacy_must_be_a_bool():
    with pytest.raises(TypeError, match="legacy must be True"):
        box_area(np.zeros((1, 4)), legacy="official")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        box_area(np.zeros((2, 3)), legacy=True)


# --- IoU --------------------------------------------------------------------------------------------------------------


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 9.0, 9.0]])
    b = torch.tensor([[1.0, 1.0, 2.0, 2.0], [5.0, 0.0, 14.0, 9.0]])
    # legacy: a0 and b0 are 2x2 pixel squares sharing pixel (1, 1): 1 / (4 + 4 - 1) = 1/7; b0 lies inside a1
    # (10x10): 4 / 100; a1 and b1 (10x10 each) share columns 5..9: 50 / (100 + 100 - 50) = 1/3
    legacy = box_iou(a, b, legacy=True)
    torch.testing.assert_close(legacy, torch.tensor([[1 / 7, 0.0], [1 / 25, 1 / 3]]))
    # continuous: a0, b0 touch at a corner: 0; a1 (9x9 = 81), b1 (81) overlap 4 x 9 = 36: 36 / 126
    cont = box_iou(a.numpy(), b.numpy(), legacy=False)
    np.testing.assert_allclose(cont, [[0.0, 0.0], [1 / 81, 36 / 126]], rtol=1e-6)
    assert isinstance(cont, np.ndarray)


def test_box_iou_matches_a_float64_restatement():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 50, (30, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0, 20, (30, 2))], axis=1)
    for legacy in (True, False):
        off = 1.0 if legacy else 0.0
        ref = np.zeros((30, 30))
        for i, j in itertools.product(range(30), range(30)):
            p, q = boxes[i], boxes[j]
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]) + off)
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]) + off)
            area = lambda b: (b[2] - b[0] + off) * (b[3] - b[1] + off)  # noqa: E731
            ref[i, j] = iw * ih / (area(p) + area(q) - iw * ih)
        np.testing.assert_allclose(box_iou(boxes, boxes, legacy=legacy), ref, rtol=1e-12)


def test_box_iou_of_an_empty_union_is_zero():
    # two empty continuous boxes (a point and a line) and two legacy boxes of width 0 (x2 = x1 - 1): union 0
    cont = np.array([[3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    assert box_iou(cont, cont, legacy=False).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    legacy = torch.tensor([[3.0, 3.0, 2.0, 5.0]])
    assert box_iou(legacy, legacy, legacy=True).tolist() == [[0.0]]
    # an empty box against a real one: 0 as well, and the real pair keeps its IoU
    mixed = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    assert box_iou(mixed, mixed, legacy=False).tolist() == [[0.0, 0.0], [0.0, 1.0]]


# --- NMS --------------------------------------------------------------------------------------------------------------


def _greedy_nms(boxes, scores, labels, threshold):
    """Brute force: per label, visit by decreasing score (ties: lower index first), drop IoU > threshold with any
    kept box; +1 areas; float64. Returns the kept indices sorted."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        suppressed = False
        for j in kept:
            if labels[i] != labels[j]:
                continue
            p, q = boxes[i], boxes[j]
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]) + 1)
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]) + 1)
            union = (p[2] - p[0] + 1) * (p[3] - p[1] + 1) + (q[2] - q[0] + 1) * (q[3] - q[1] + 1) - iw * ih
            if iw * ih / union > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return sorted(kept)


def test_batched_nms_equals_brute_force_with_ties_and_labels():
    rng = np.random.default_rng(0)
    # integer coordinates and scores on a coarse grid: every IoU is a ratio of integers (exact in float64 and in
    # the restatement), scores tie often, and several IoUs sit exactly on the threshold 0.5
    for trial in range(20):
        n = int(rng.integers(1, 60))
        xy = rng.integers(0, 30, (n, 2))
        wh = rng.integers(0, 12, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)
        scores = rng.integers(0, 5, n).astype(np.float64) / 4
        labels = rng.integers(0, 3, n)
        for threshold in (0.5, 0.3):
            keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), threshold)
            assert keep.dtype == torch.int64
            assert keep.tolist() == _greedy_nms(boxes.tolist(), scores.tolist(), labels.tolist(), threshold), trial


def test_batched_nms_threshold_is_strict_and_labels_are_independent():
    # two legacy 10x10 boxes overlapping on 10x5 pixels: IoU = 50 / 150 = 1/3 (float64: the same double as 1 / 3)
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 5.0, 9.0, 14.0], [0.0, 5.0, 9.0, 14.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    same = torch.tensor([1, 1, 1])
    assert batched_nms(boxes, scores, same, 1 / 3).tolist() == [0, 1]  # IoU == threshold: kept; 2 is 1's copy
    assert batched_nms(boxes, scores, same, 0.3).tolist() == [0]
    assert batched_nms(boxes, scores, torch.tensor([1, 2, 3]), 0.3).tolist() == [0, 1, 2]
    # the continuous IoU of the same boxes is 9*4 / (81 + 81 - 36) = 2/7 < 0.3: nothing suppressed
    assert batched_nms(boxes[:2], scores[:2], same[:2], 0.3, legacy=False).tolist() == [0, 1]
    # candidate order, not score order
    assert batched_nms(boxes.flip(0), scores, same, 0.3).tolist() == [0]
    low_first = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    assert batched_nms(boxes, low_first, torch.tensor([1, 2, 1]), 0.3).tolist() == [1, 2]
    empty = batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)
    assert empty.tolist() == [] and empty.dtype == torch.int64


# --- flips ------------------------------------------------------------------------------------------------------------


def test_hflip_boxes_hand_computed_and_involution():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert hflip_boxes(boxes, width=100).tolist() == [[69, 20, 89, 40]]  # legacy: W - x - 1
    assert hflip_boxes(boxes, width=100, legacy=False).tolist() == [[70, 20, 90, 40]]
    assert hflip_boxes(boxes.numpy(), width=100).tolist() == [[69, 20, 89, 40]]
    for legacy in (True, False):
        assert torch.equal(hflip_boxes(hflip_boxes(boxes, width=100, legacy=legacy), width=100, legacy=legacy), boxes)


def test_legacy_flip_maps_inclusive_pixel_columns():
    # pixels 10..19 of a 50-wide row are pixels 30..39 after mirroring (x -> 49 - x)
    row = np.zeros(50)
    row[10:20] = 1
    cols = np.nonzero(row[::-1])[0]
    assert hflip_boxes(np.array([[10.0, 0.0, 19.0, 0.0]]), width=50).tolist() == [[cols.min(), 0, cols.max(), 0]]


def test_numpy_and_torch_agree():
    rng = np.random.default_rng(7)
    boxes = rng.uniform(-20, 120, (40, 4))
    t = torch.from_numpy(boxes)
    for legacy in (True, False):
        for fn in (lambda b: xywh_to_xyxy(b, legacy=legacy), lambda b: xyxy_to_xywh(b, legacy=legacy),
                   lambda b: clip_boxes(b, height=80, width=100, legacy=legacy), lambda b: box_area(b, legacy=legacy),
                   lambda b: hflip_boxes(b, width=100, legacy=legacy), nonempty_boxes,
                   lambda b: convert_xyxy(b, from_legacy=legacy, to_legacy=not legacy)):
            np.testing.assert_array_equal(fn(t).numpy(), fn(boxes))
        np.testing.assert_array_equal(box_iou(t, t, legacy=legacy).numpy(), box_iou(boxes, boxes, legacy=legacy))
