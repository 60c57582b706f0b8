"""GLIP losses and ATSS assignment: the official loss fixture (tests/fixtures/parity/loss), an independent float64
restatement in numpy (loops over images, GTs and levels) on random fractional boxes, error handling and the
distributed normalisers."""
from __future__ import annotations

import faulthandler
import math
import multiprocessing

import numpy as np
import pytest
import torch

from glip_data.collate import GroundingTarget
from glip_train.box_ops import AnchorGenerator
from glip_train.losses import GLIPLoss, atss_assign, atss_assign_details, mean_over_ranks
from glip_train.testing import relative_error

LEVELS = (3, 4, 5, 6, 7)
LOSS_KEYS = ("loss_reg", "loss_centerness", "loss_dot_product_token")
HEAD_KEYS = ("box_regression", "centerness", "dot_product_logits")  # fixture names
HEAD_ARGS = ("box_regression", "centerness", "token_logits")  # GLIPLoss argument names


# ---------------------------------------------------------------------------------------------------------------------
# the official fixture


@pytest.fixture(scope="module")
def loss_cases(parity_loss_dir, parity_loss_index):
    cases = {}
    for name, case in parity_loss_index["cases"].items():
        arrays = np.load(parity_loss_dir / case["file"])
        cases[name] = {key: torch.from_numpy(arrays[key]) for key in arrays.files}
    return cases


def _case_inputs(arrays, dtype=torch.float32):
    """Loss arguments of a fixture case (fresh leaves that require grad)."""
    batch = arrays["input/text_masks"].shape[0]
    head = {key: [arrays[f"head/{key}_p{lvl}"].to(dtype, copy=True).requires_grad_() for lvl in LEVELS]
            for key in HEAD_KEYS}
    positive_map = arrays["loss_input/positive_map"].bool()  # the collated map, rows in image then box order
    targets, row = [], 0
    for i in range(batch):
        boxes = arrays[f"targets/img{i}/boxes_xyxy"]
        targets.append({"boxes": boxes, "positive_map": positive_map[row : row + len(boxes)]})
        row += len(boxes)
    return dict(
        box_regression=head["box_regression"], centerness=head["centerness"], token_logits=head["dot_product_logits"],
        anchors=[arrays[f"anchors/p{lvl}"] for lvl in LEVELS], targets=targets, text_mask=arrays["input/text_masks"],
    )


def _level_of(anchor_idx: int, level_sizes) -> int:
    return int(np.searchsorted(np.cumsum(level_sizes), anchor_idx, side="right"))


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_assignment_matches_official(loss_cases, case):
    arrays = loss_cases[case]
    anchors = [arrays[f"anchors/p{lvl}"] for lvl in LEVELS]
    level_sizes = [len(a) for a in anchors]
    for i in range(arrays["input/text_masks"].shape[0]):
        boxes = arrays[f"targets/img{i}/boxes_xyxy"]
        ref = {key[len(f"assign/img{i}/"):]: v for key, v in arrays.items() if key.startswith(f"assign/img{i}/")}
        got = atss_assign_details(anchors, boxes, topk=9)
        assert torch.equal(atss_assign(anchors, boxes, topk=9), ref["matched_gt"])
        assert torch.equal(got.matched_gt, ref["matched_gt"])
        positive = ref["matched_gt"] >= 0
        assert torch.equal(got.matched_iou[positive], ref["anchors_to_gt_values"][positive])
        assert (ref["anchors_to_gt_values"][~positive] == -1e8).all()
        # same float32 formulas as the official code: a few ulp at most
        for key in ("ious", "distances", "candidate_ious", "iou_mean", "iou_std", "iou_thresh"):
            if key == "candidate_ious":
                continue  # compared per candidate below (the order of equal distances is unspecified)
            torch.testing.assert_close(getattr(got, key), ref[key], rtol=1e-6, atol=1e-7, msg=f"img{i} {key}")
        # candidates as sets per level, each with its IoU and its three flags
        for g in range(boxes.shape[0]):
            def entries(idxs, ious, pos_iou, in_gts, pos):
                return {
                    (_level_of(int(a), level_sizes), int(a), round(float(u), 6), bool(p), bool(n), bool(q))
                    for a, u, p, n, q in zip(idxs[:, g], ious[:, g], pos_iou[:, g], in_gts[:, g], pos[:, g])
                }
            ours = entries(got.candidate_idxs, got.candidate_ious, got.is_pos_iou, got.is_in_gts, got.is_pos)
            official = entries(ref["candidate_idxs"], ref["candidate_ious"], ref["is_pos_iou"], ref["is_in_gts"],
                               ref["is_pos"])
            assert ours == official, f"{case} img{i} gt{g}"


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_targets_match_official(loss_cases, case):
    arrays = loss_cases[case]
    inputs = _case_inputs(arrays)
    targets = GLIPLoss().build_targets(inputs["anchors"], inputs["targets"], num_tokens=256)
    assert torch.equal(targets.pos_inds, arrays["loss_internal/pos_inds"])
    assert torch.equal((targets.matched_gt >= 0).long(), arrays["loss_input/cls_labels"])
    # every entry, including the no-object one-hot at token 255 of negatives (masked out by the text mask later)
    assert torch.equal(targets.token_targets.float(), arrays["loss_input/token_labels"])
    torch.testing.assert_close(targets.reg_targets, arrays["loss_internal/reg_targets_pos"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(targets.centerness_targets, arrays["loss_internal/centerness_targets"],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_losses_and_gradients_match_official(loss_cases, case):
    arrays = loss_cases[case]
    inputs = _case_inputs(arrays)
    out = GLIPLoss().compute(**inputs)
    assert set(out.losses) == set(LOSS_KEYS)
    # the official float32 run is within 1.2e-7 of its float64 run; an equal float32 computation lands there too
    for key in LOSS_KEYS:
        assert out.losses[key].dtype == torch.float32
        assert relative_error(out.losses[key].detach(), arrays[f"loss_f64/{key}"]) < 1e-6, key
        assert relative_error(out.losses[key].detach(), arrays[f"loss/{key}"]) < 1e-6, key
    assert out.num_pos_avg.item() == arrays["loss/num_pos_avg_per_gpu"].item()
    assert math.isclose(out.centerness_sum_avg.item(), arrays["loss/sum_centerness_targets_avg_per_gpu"].item(),
                        rel_tol=1e-6)
    total = sum(out.losses.values())
    assert relative_error(total.detach(), arrays["loss_f64/total"]) < 1e-6
    total.backward()
    names = {"box_regression": inputs["box_regression"], "centerness": inputs["centerness"],
             "dot_product_logits": inputs["token_logits"]}
    for name, leaves in names.items():
        ours = torch.cat([leaf.grad.flatten() for leaf in leaves])
        ref = torch.cat([arrays[f"grad/{name}_p{lvl}"].flatten() for lvl in LEVELS])
        assert relative_error(ours, ref) < 1e-6, name
        assert torch.equal(ours != 0, ref != 0), f"{name}: zero pattern"  # positives / text-mask entries only


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_float64_losses_match_official_float64(loss_cases, case):
    arrays = loss_cases[case]
    losses = GLIPLoss()(**_case_inputs(arrays, torch.float64))
    for key in LOSS_KEYS:
        assert losses[key].dtype == torch.float64
        assert relative_error(losses[key].detach(), arrays[f"loss_f64/{key}"]) < 1e-12, key


@pytest.mark.parametrize("case", ["case1", "case2"])
def test_text_padded_to_longest_gives_the_same_losses(loss_cases, case):
    """Text padded to the longest caption (M < 256) must give the official 256-wide losses: only real tokens count and
    the no-object token 255 is never a real token here."""
    arrays = loss_cases[case]
    full = _case_inputs(arrays)
    width = int(arrays["input/text_masks"].sum(1).max())
    short = _case_inputs(arrays)
    short["token_logits"] = [t.detach()[..., :width].clone().requires_grad_() for t in full["token_logits"]]
    short["text_mask"] = full["text_mask"][:, :width].bool()
    short["targets"] = [{"boxes": t["boxes"], "positive_map": t["positive_map"][:, :width]} for t in full["targets"]]
    losses_full, losses_short = GLIPLoss()(**full), GLIPLoss()(**short)
    for key in LOSS_KEYS:
        torch.testing.assert_close(losses_short[key], losses_full[key], rtol=1e-6, atol=0)
    sum(losses_full.values()).backward()
    sum(losses_short.values()).backward()
    for a, b in zip(short["token_logits"], full["token_logits"]):
        torch.testing.assert_close(a.grad, b.grad[..., :width], rtol=1e-6, atol=1e-9)
        assert (b.grad[..., width:] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# independent float64 restatement (numpy, loops over images / GTs / levels)


def _np_assign(anchor_levels, boxes, topk=9):
    """Matched GT per anchor (-1 negative), one GT at a time."""
    anchors = np.concatenate(anchor_levels)
    acx, acy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    area_a = (anchors[:, 2] - anchors[:, 0] + 1) * (anchors[:, 3] - anchors[:, 1] + 1)
    best_iou = np.full(len(anchors), -np.inf)
    matched = np.full(len(anchors), -1)
    for g, (x1, y1, x2, y2) in enumerate(boxes):
        iw = np.clip(np.minimum(anchors[:, 2], x2) - np.maximum(anchors[:, 0], x1) + 1, 0, None)
        ih = np.clip(np.minimum(anchors[:, 3], y2) - np.maximum(anchors[:, 1], y1) + 1, 0, None)
        iou = iw * ih / (area_a + (x2 - x1 + 1) * (y2 - y1 + 1) - iw * ih)
        dist = np.hypot(acx - (x1 + x2) / 2, acy - (y1 + y2) / 2)
        candidates, start = [], 0
        for level in anchor_levels:
            order = np.argsort(dist[start : start + len(level)], kind="stable")[:topk]
            candidates.extend(int(a) + start for a in order)
            start += len(level)
        threshold = iou[candidates].mean() + iou[candidates].std(ddof=1)
        for a in candidates:
            inside = min(acx[a] - x1, acy[a] - y1, x2 - acx[a], y2 - acy[a]) > 0.01
            if iou[a] >= threshold and inside and iou[a] > best_iou[a]:  # strict: ties keep the lower GT index
                best_iou[a], matched[a] = iou[a], g
    return matched


def _np_focal(x, y, alpha=0.25, gamma=2.0):
    p = 1 / (1 + np.exp(-x))
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    p_t = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * bce * (1 - p_t) ** gamma


def _np_losses(anchors, matched, boxes, positive_maps, reg, ctr, logits, text_mask, no_object=255):
    """Official loss values from per-image matches; reg (B, A, 4), ctr (B, A), logits (B, A, M) float64 arrays."""
    batch, _, width = logits.shape
    token_sum, reg_sum, ctr_bce, ctr_total, num_pos = 0.0, 0.0, 0.0, 0.0, 0
    for b in range(batch):
        for a, g in enumerate(matched[b]):
            target = np.zeros(width)
            if g >= 0:
                target[:] = positive_maps[b][g]
            elif no_object < width:
                target[no_object] = 1.0
            real = text_mask[b] > 0
            token_sum += _np_focal(logits[b, a, real], target[real]).sum()
            if g < 0:
                continue
            num_pos += 1
            ax1, ay1, ax2, ay2 = anchors[a]
            aw, ah, acx, acy = ax2 - ax1 + 1, ay2 - ay1 + 1, (ax1 + ax2) / 2, (ay1 + ay2) / 2
            gx1, gy1, gx2, gy2 = boxes[b][g]  # decode(encode(gt)) is the GT itself in exact arithmetic
            c = math.sqrt(min(acx - gx1, gx2 - acx) / max(acx - gx1, gx2 - acx)
                          * min(acy - gy1, gy2 - acy) / max(acy - gy1, gy2 - acy))
            dx, dy, dw, dh = reg[b, a]
            pcx, pcy = acx + dx / 10 * aw, acy + dy / 10 * ah
            pw = aw * math.exp(min(dw / 5, math.log(1000 / 16)))
            ph = ah * math.exp(min(dh / 5, math.log(1000 / 16)))
            px1, py1 = pcx - (pw - 1) / 2, pcy - (ph - 1) / 2
            px2, py2 = max(px1, pcx + (pw - 1) / 2), max(py1, pcy + (ph - 1) / 2)
            iw, ih = min(px2, gx2) - max(px1, gx1), min(py2, gy2) - max(py1, gy1)
            inter = iw * ih if iw > 0 and ih > 0 else 0.0
            union = (px2 - px1) * (py2 - py1) + (gx2 - gx1) * (gy2 - gy1) - inter + 1e-7
            hull = (max(px2, gx2) - min(px1, gx1)) * (max(py2, gy2) - min(py1, gy1)) + 1e-7
            reg_sum += c * (1 - (inter / union - (hull - union) / hull))
            x = ctr[b, a]
            ctr_bce += max(x, 0) - x * c + math.log1p(math.exp(-abs(x)))
            ctr_total += c
    norm = max(num_pos, 1)
    return {
        "loss_reg": 2.0 * reg_sum / ctr_total if num_pos else 0.0,
        "loss_centerness": ctr_bce / norm,
        "loss_dot_product_token": token_sum / norm,
    }


def _random_batch(seed, image_hw=(128, 160), boxes_per_image=(4, 0, 6), width=12, full_text=()):
    """A random batch on a small feature pyramid: fractional boxes (one tiny, one large per image), random heads."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_hw
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32, 64, 128)]
    anchors = AnchorGenerator()(sizes)
    batch = len(boxes_per_image)
    targets = []
    for n in boxes_per_image:
        centre = torch.rand(n, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])
        half = torch.rand(n, 2, generator=gen) * torch.tensor([w / 3, h / 3]) + 2
        if n >= 2:
            half[0] = torch.tensor([3.3, 2.7])  # smaller than every anchor
            centre[1], half[1] = torch.tensor([w / 2 - 0.3, h / 2 + 0.2]), torch.tensor([w / 2.1, h / 2.2])
        boxes = torch.cat([centre - half, centre + half], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
        positive_map = torch.rand(n, width, generator=gen) < 0.3
        targets.append({"boxes": boxes, "positive_map": positive_map})
    lengths = [width if i in full_text else int(torch.randint(3, width, (1,), generator=gen)) for i in range(batch)]
    text_mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    box_regression = [torch.randn(batch, 4, hh, ww, generator=gen, dtype=torch.float64) for hh, ww in sizes]
    for codes in box_regression:  # some predictions narrower than one pixel: decoded x2 < x1 (or y2 < y1)
        log_sizes = codes[:, 2:]
        log_sizes[torch.rand(log_sizes.shape, generator=gen) < 0.15] = -45.0
    head = dict(
        box_regression=box_regression,
        centerness=[torch.randn(batch, 1, hh, ww, generator=gen, dtype=torch.float64) for hh, ww in sizes],
        token_logits=[torch.randn(batch, hh * ww, width, generator=gen, dtype=torch.float64) * 3 for hh, ww in sizes],
    )
    return dict(**head, anchors=anchors, targets=targets, text_mask=text_mask)


def _np_reference(inputs, matched=None):
    anchor_levels = [a.double().numpy() for a in inputs["anchors"]]
    boxes = [t["boxes"].double().numpy() for t in inputs["targets"]]
    if matched is None:
        matched = [_np_assign(anchor_levels, b) for b in boxes]
    flat = lambda maps: np.concatenate(  # noqa: E731
        [m.detach().double().numpy().transpose(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], 1)
    logits = np.concatenate([t.detach().double().numpy() for t in inputs["token_logits"]], 1)
    losses = _np_losses(np.concatenate(anchor_levels), matched, boxes,
                        [t["positive_map"].double().numpy() for t in inputs["targets"]],
                        flat(inputs["box_regression"]), flat(inputs["centerness"])[..., 0], logits,
                        inputs["text_mask"].numpy())
    return matched, losses


@pytest.mark.parametrize("seed,width,full_text", [(0, 12, ()), (1, 7, (2,)), (2, 256, (0,)), (3, 256, ())])
def test_losses_match_independent_float64_restatement(seed, width, full_text):
    """Several images (one without boxes), fractional boxes, text widths 7/12/256; at width 256 a caption filling all
    positions makes the no-object target at token 255 live."""
    inputs = _random_batch(seed, width=width, full_text=full_text)
    matched, reference = _np_reference(inputs)
    out = GLIPLoss().compute(**inputs)
    for b, m in enumerate(matched):
        assert torch.equal(out.targets.matched_gt[b], torch.from_numpy(m)), f"image {b}"
    assert (out.targets.matched_gt[1] == -1).all()  # the image without boxes
    assert out.targets.pos_inds.numel() > 0
    for key in LOSS_KEYS:
        # both float64; the restatement uses the raw GT where the loss decodes its encoding (1e-13 apart)
        assert out.losses[key].dtype == torch.float64
        assert math.isclose(out.losses[key].item(), reference[key], rel_tol=1e-9), key
    # float32 heads: the same assignment, losses within float32 rounding of a few thousand terms
    inputs32 = {**inputs, **{k: [t.float() for t in inputs[k]] for k in HEAD_ARGS}}
    out32 = GLIPLoss().compute(**inputs32)
    assert torch.equal(out32.targets.matched_gt, out.targets.matched_gt)
    for key in LOSS_KEYS:
        assert math.isclose(out32.losses[key].item(), reference[key], rel_tol=1e-5), key


def test_no_object_token_is_live_only_for_full_captions():
    inputs = _random_batch(5, image_hw=(64, 96), width=256, full_text=(0,))
    targets = GLIPLoss().build_targets(inputs["anchors"], inputs["targets"], num_tokens=256)
    negatives = targets.matched_gt < 0
    assert targets.token_targets[..., 255][negatives].all()
    base = GLIPLoss()(**inputs)["loss_dot_product_token"]

    def with_token_255(image, value):
        logits = torch.cat(inputs["token_logits"], 1)
        logits[image, negatives[image], 255] = value
        split = list(torch.split(logits, [t.shape[1] for t in inputs["token_logits"]], dim=1))
        return GLIPLoss()(**{**inputs, "token_logits": split})["loss_dot_product_token"]

    # images 1 and 2 have shorter captions: token 255 is padding there and its logit is never read
    assert with_token_255(1, 30.0).item() == base.item() and with_token_255(2, -30.0).item() == base.item()
    # image 0 fills all 256 positions: its negatives are trained towards token 255
    assert with_token_255(0, 30.0) < base < with_token_255(0, -30.0)


def test_gradients_match_finite_differences_of_the_restatement():
    """Directional derivatives of the numpy restatement (central differences) against autograd of the loss."""
    inputs = _random_batch(7, image_hw=(96, 96), boxes_per_image=(3, 2), width=6)
    leaves = {k: [t.clone().requires_grad_() for t in inputs[k]] for k in HEAD_ARGS}
    losses = GLIPLoss()(**{**inputs, **leaves})
    matched, _ = _np_reference(inputs)
    gen = torch.Generator().manual_seed(0)
    for key in LOSS_KEYS:
        flat_leaves = [t for ts in leaves.values() for t in ts]
        grads = torch.autograd.grad(losses[key], flat_leaves, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, flat_leaves)]
        for _ in range(3):
            directions = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in grads]
            analytic = sum((g * d).sum() for g, d in zip(grads, directions))
            eps = 1e-5

            def shifted(sign):
                moved, i = {}, 0
                for name, ts in leaves.items():
                    moved[name] = [t.detach() + sign * eps * directions[i + j] for j, t in enumerate(ts)]
                    i += len(ts)
                return _np_reference({**inputs, **moved}, matched)[1][key]

            numeric = (shifted(1) - shifted(-1)) / (2 * eps)
            # central differences in float64: truncation ~eps^2 = 1e-10, rounding ~1e-16 * sqrt(terms) * |loss| / eps
            assert math.isclose(float(analytic), numeric, rel_tol=1e-6, abs_tol=1e-8), key


def test_images_without_boxes():
    inputs = _random_batch(4, boxes_per_image=(0, 0), width=5)
    leaves = {k: [t.clone().requires_grad_() for t in inputs[k]] for k in HEAD_ARGS}
    out = GLIPLoss().compute(**{**inputs, **leaves})
    assert (out.targets.matched_gt == -1).all() and out.targets.pos_inds.numel() == 0
    assert out.num_pos_avg.item() == 1.0
    assert out.losses["loss_reg"].item() == 0 and out.losses["loss_centerness"].item() == 0
    # every real token of every anchor is a negative entry, normalised by max(0, 1) = 1
    expected = sum(_np_focal(t.numpy(), 0.0)[inputs["text_mask"].numpy()[:, None, :].repeat(t.shape[1], 1)].sum()
                   for t in inputs["token_logits"])
    assert math.isclose(out.losses["loss_dot_product_token"].item(), expected, rel_tol=1e-12)
    sum(out.losses.values()).backward()
    assert all((t.grad == 0).all() for t in leaves["box_regression"] + leaves["centerness"])
    assert not torch.isnan(torch.cat([t.grad.flatten() for t in leaves["token_logits"]])).any()


def test_atss_hand_made_example():
    """One level of four 10x10 anchors in a row (centres x = 4.5, 14.5, 24.5, 34.5) and topk 3."""
    anchors = torch.tensor([[0.0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9], [30, 0, 39, 9]])
    gt = torch.tensor([[11.0, 0, 21, 9]])  # 11 x 10 px, centre x 16
    details = atss_assign_details([anchors], gt, topk=3)
    assert sorted(details.candidate_idxs[:, 0].tolist()) == [0, 1, 2]  # distances 11.5, 1.5, 8.5 (anchor 3: 18.5)
    # +1 IoUs: anchor 1 overlaps 9 x 10 -> 90 / (100 + 110 - 90); anchor 2 overlaps 2 x 10 -> 20 / 190; anchor 0: 0
    ious = torch.tensor([0.0, 0.75, 20 / 190])
    torch.testing.assert_close(details.ious[:3, 0], ious)
    torch.testing.assert_close(details.iou_thresh[0], ious.mean() + ious.std())  # 0.285 + 0.401
    assert atss_assign([anchors], gt, topk=3).tolist() == [-1, 0, -1, -1]
    # two identical GTs: exact IoU ties go to the lower index
    assert atss_assign([anchors], torch.cat([gt, gt]), topk=3).tolist() == [-1, 0, -1, -1]
    # a first GT also claiming anchor 1, with IoU 70 / 100 < 0.75: the anchor goes to the higher IoU (GT 1)
    gts = torch.tensor([[12.0, 0, 18, 9], [11.0, 0, 21, 9]])
    assert atss_assign([anchors], gts, topk=3).tolist() == [-1, 1, -1, -1]
    # the anchor centre (x 14.5) must lie inside by more than 0.01 (IoUs 0.552 / 0.5505 pass the threshold 0.50)
    assert atss_assign([anchors], torch.tensor([[14.48, 0, 19, 9]]), topk=3).tolist() == [-1, 0, -1, -1]
    assert atss_assign([anchors], torch.tensor([[14.495, 0, 19, 9]]), topk=3).tolist() == [-1, -1, -1, -1]


# ---------------------------------------------------------------------------------------------------------------------
# errors


def test_bad_boxes_name_the_image():
    inputs = _random_batch(8, boxes_per_image=(2, 2), width=5)
    for bad, message in (
        (torch.tensor([[5.0, 5, 20, 20], [float("nan"), 0, 3, 3]]), r"targets\[1\]\['boxes'\] contains non-finite"),
        (torch.tensor([[5.0, 5, 20, 20], [10.0, 0, 3, 3]]), r"targets\[1\]\['boxes'\]\[1\].*x2 < x1"),
        (torch.tensor([[5.0, 5, 20, 20, 1]]), r"targets\[1\]\['boxes'\] must have shape \(n, 4\)"),
    ):
        targets = [inputs["targets"][0], {"boxes": bad, "positive_map": torch.zeros(len(bad), 5, dtype=torch.bool)}]
        with pytest.raises(ValueError, match=message):
            GLIPLoss()(**{**inputs, "targets": targets})
    with pytest.raises(ValueError, match="gt_boxes"):
        atss_assign(inputs["anchors"], torch.tensor([[0.0, 0, float("inf"), 1]]))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda x: {"centerness": x["centerness"][:4] + [x["centerness"][4][:, :, :1, :1]]}, r"centerness\[4\]"),
        (lambda x: {"token_logits": [t[..., :4] for t in x["token_logits"]]}, r"text_mask has shape"),
        (lambda x: {"token_logits": x["token_logits"][:1] + [t[..., :4] for t in x["token_logits"][1:]]},
         r"token_logits\[1\]"),
        (lambda x: {"anchors": x["anchors"][:2] + [x["anchors"][2][:-1]] + x["anchors"][3:]}, r"anchors\[2\]"),
        (lambda x: {"anchors": x["anchors"][:4]}, r"anchors has 4 levels"),
        (lambda x: {"text_mask": x["text_mask"][:1]}, r"text_mask has shape"),
        (lambda x: {"targets": x["targets"][:1]}, r"targets must be a list with one dict per image \(2\)"),
        (lambda x: {"targets": [x["targets"][0], {**x["targets"][1], "positive_map": torch.zeros(2, 9)}]},
         r"targets\[1\]\['positive_map'\] has shape"),
        (lambda x: {"box_regression": [t[:, :3] for t in x["box_regression"]]}, r"box_regression\[0\]"),
    ],
)
def test_mismatched_shapes_name_the_argument(change, message):
    inputs = _random_batch(9, boxes_per_image=(2, 2), width=5)
    with pytest.raises(ValueError, match=message):
        GLIPLoss()(**{**inputs, **change(inputs)})


def test_grounding_target_objects_are_accepted():
    inputs = _random_batch(12, boxes_per_image=(2, 3), width=5)
    objects = [GroundingTarget(t["boxes"], torch.ones(len(t["boxes"]), dtype=torch.int64), t["positive_map"],
                               (128, 160)) for t in inputs["targets"]]
    from_dicts, from_objects = GLIPLoss()(**inputs), GLIPLoss()(**{**inputs, "targets": objects})
    assert all(torch.equal(from_dicts[k], from_objects[k]) for k in LOSS_KEYS)


def test_missing_target_key():
    inputs = _random_batch(9, boxes_per_image=(2, 2), width=5)
    with pytest.raises(KeyError, match=r"targets\[0\] has no 'positive_map'"):
        GLIPLoss()(**{**inputs, "targets": [{"boxes": inputs["targets"][0]["boxes"]}, inputs["targets"][1]]})


# ---------------------------------------------------------------------------------------------------------------------
# distributed normalisers


def _rank_worker(rank, world_size, init_file, inputs, results):
    # a forked child must not enter the parent's OpenMP pool (it deadlocks); fail instead of hanging the suite
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(120, exit=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        half = slice(2 * rank, 2 * rank + 2)
        part = {k: [t[half] for t in inputs[k]] for k in HEAD_ARGS}
        out = GLIPLoss().compute(**part, anchors=inputs["anchors"], targets=inputs["targets"][half],
                                 text_mask=inputs["text_mask"][half])
        results[rank] = {"num_pos_avg": out.num_pos_avg.item(), "centerness_sum_avg": out.centerness_sum_avg.item(),
                         **{k: v.item() for k, v in out.losses.items()}}
    finally:
        torch.distributed.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods() or not torch.distributed.is_available(),
    reason="needs the fork start method and torch.distributed (gloo)",
)
def test_normalisers_are_averaged_over_ranks(tmp_path):
    """Two gloo ranks with two images each: both ranks get the whole batch's normalisers divided by the world size
    (the official per-GPU averages), and the mean of the ranks' losses (what DDP's gradient averaging optimises) is
    the single-process loss of the whole batch."""
    inputs = _random_batch(11, boxes_per_image=(3, 1, 0, 4), width=8)
    single = GLIPLoss().compute(**inputs)
    context = torch.multiprocessing.get_context("fork")
    results = context.Manager().dict()
    torch.multiprocessing.start_processes(
        _rank_worker, args=(2, tmp_path / "rendezvous", inputs, results), nprocs=2, start_method="fork"
    )
    assert single.num_pos_avg.item() > 2  # the max(., 1) floor plays no part
    for rank in (0, 1):
        assert results[rank]["num_pos_avg"] * 2 == single.num_pos_avg.item()
        assert math.isclose(results[rank]["centerness_sum_avg"] * 2, single.centerness_sum_avg.item(), rel_tol=1e-12)
    for key in LOSS_KEYS:
        assert math.isclose((results[0][key] + results[1][key]) / 2, single.losses[key].item(), rel_tol=1e-12), key


def test_reduce_hook_sets_the_normalisers():
    """The hook receives this rank's ``[positives, sum of centerness targets]`` and returns the averages."""
    inputs = _random_batch(13, boxes_per_image=(3, 2), width=6)
    seen = []

    def fixed_averages(local):
        seen.append(local.clone())
        return torch.tensor([10.0, 5.0], dtype=torch.float64)

    plain = GLIPLoss().compute(**inputs)
    hooked = GLIPLoss(reduce_over_ranks=fixed_averages).compute(**inputs)
    num_pos, ctr_sum = plain.num_pos_avg.item(), plain.centerness_sum_avg.item()
    assert seen[0].tolist() == [num_pos, ctr_sum]
    assert hooked.num_pos_avg.item() == 10.0 and hooked.centerness_sum_avg.item() == 5.0
    scale = {"loss_reg": ctr_sum / 5.0, "loss_centerness": num_pos / 10.0, "loss_dot_product_token": num_pos / 10.0}
    for key in LOSS_KEYS:
        assert math.isclose(hooked.losses[key].item(), plain.losses[key].item() * scale[key], rel_tol=1e-12), key


def test_half_precision_heads_are_computed_in_float32():
    inputs = _random_batch(14, boxes_per_image=(3, 2), width=6)
    half = {k: [t.to(torch.bfloat16) for t in inputs[k]] for k in HEAD_ARGS}
    rounded = {k: [t.float() for t in half[k]] for k in HEAD_ARGS}
    losses_half, losses_rounded = GLIPLoss()(**{**inputs, **half}), GLIPLoss()(**{**inputs, **rounded})
    for key in LOSS_KEYS:
        assert losses_half[key].dtype == torch.float32
        assert torch.equal(losses_half[key], losses_rounded[key]), key


def test_mean_over_ranks_is_identity_outside_distributed():
    values = torch.tensor([3.0, 1.5], dtype=torch.float64)
    assert torch.equal(mean_over_ranks(values), values)
