"""End-to-end parity with the official GLIP-T (golden fixture: official code, CPU, float32, recipe weights).

The model is loaded through ``GLIP.from_pretrained`` from a checkpoint file written in the official layout
(``{"model": {"module." + key: tensor}}``). Every case of the fixture's ``index.json`` is compared stage by stage:
preprocessing, Swin stages, FPN, BERT, the 18 tower modules, head outputs, the pre-NMS candidates and detections.
Tolerance: max |ours - official| / max |official| <= 1e-4 up to the fusion input, <= 1e-3 for tower and head.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from glip_train import GLIP
from glip_train.recipe import build_recipe_state_dict
from glip_train.testing import match_detections, relative_error

pytestmark = pytest.mark.parity

LEVELS = (3, 4, 5, 6, 7)
ENCODER_TOL = 1e-4
TOWER_TOL = 1e-3


@pytest.fixture(scope="module")
def official_checkpoint(parity_dir, tmp_path_factory):
    state = build_recipe_state_dict(parity_dir / "weights_recipe.json")
    path = tmp_path_factory.mktemp("official") / "glip_tiny_synthetic.pth"
    torch.save({"model": {"module." + k: v for k, v in state.items()}, "iteration": 0}, path)
    return path


@pytest.fixture(scope="module")
def model(official_checkpoint):
    torch.manual_seed(0)
    m = GLIP.from_pretrained(official_checkpoint).eval()
    assert m.config.name == "glip_t"
    assert m.load_report.ignored_entries == ["iteration"]
    return m


def _cases(parity_index):
    return list(parity_index["cases"].items())


def _arrays(parity_dir, case):
    data = np.load(parity_dir / case["file"])
    return {k: torch.from_numpy(data[k]) for k in data.files}


def _check(name, ours, ref, tol, failures):
    err = relative_error(ours, ref)
    if not err <= tol:
        failures.append(f"{name}: relative error {err:.3g} > {tol:g}")
    return err


@pytest.fixture(scope="module")
def official_forward(model, parity_dir, parity_index):
    """Our forward pass on every case's recorded inputs (text padded to 256 as the official model)."""
    outputs = {}
    with torch.no_grad():
        for name, case in _cases(parity_index):
            arr = _arrays(parity_dir, case)
            out = model(arr["input/image_tensor"], arr["input/input_ids"], arr["input/attention_mask"],
                        [tuple(s) for s in arr["input/image_sizes_hw"].tolist()],
                        output_intermediates=True, return_backbone_features=True)
            outputs[name] = (arr, out)
    return outputs


def test_preprocessing_equals_official(model, parity_dir, parity_index):
    failures = []
    for name, case in _cases(parity_index):
        arr = _arrays(parity_dir, case)
        batch = model.processor.preprocess([parity_dir / f for f in case["images"]], min_size=320, max_size=480)
        assert batch.image_sizes == [tuple(s) for s in arr["input/image_sizes_hw"].tolist()], name
        assert batch.original_sizes == [tuple(s) for s in arr["input/orig_sizes_hw"].tolist()], name
        _check(f"{name} image tensor", batch.pixel_values, arr["input/image_tensor"], ENCODER_TOL, failures)
    assert not failures, "\n".join(failures)


def test_encoders_equal_official(official_forward):
    failures = []
    for name, (arr, out) in official_forward.items():
        for level, feat in zip((3, 4, 5), out.backbone_features):
            _check(f"{name} swin stage{level}", feat[:, :32], arr[f"backbone/swin_stage{level}_c32"], ENCODER_TOL, failures)
        for level, feat in zip(LEVELS, out.fpn_features):
            _check(f"{name} fpn p{level}", feat, arr[f"fpn/p{level}"], ENCODER_TOL, failures)
        _check(f"{name} bert hidden", out.text_hidden[:, :64], arr["lang/hidden_t64"], ENCODER_TOL, failures)
        _check(f"{name} bert embedded", out.text_embedded[:, :64], arr["lang/embedded_t64"], ENCODER_TOL, failures)
        assert torch.equal(out.text_mask.long(), arr["lang/masks"]), name
    assert not failures, "\n".join(failures)


def test_every_tower_module_equals_official(official_forward, parity_index):
    modules = parity_index["tower_modules"]
    failures = []
    for name, (arr, out) in official_forward.items():
        inter = out.head.intermediates
        assert len(inter) == len(modules), (len(inter), len(modules))
        for (features, lang), module in zip(inter, modules):
            changes = parity_index["tower_module_changes"][module]
            if changes["visual"]:
                for level, feat in zip(LEVELS, features):
                    _check(f"{name} {module} p{level}", feat[:, :32], arr[f"tower/{module}/visual_p{level}_c32"],
                           TOWER_TOL, failures)
            if changes["lang"]:
                _check(f"{name} {module} lang", lang[:, :32], arr[f"tower/{module}/lang_hidden_t32"], TOWER_TOL,
                       failures)
    assert not failures, "\n".join(failures)


def test_head_outputs_equal_official(official_forward):
    failures = []
    for name, (arr, out) in official_forward.items():
        head = out.head
        for i, level in enumerate(LEVELS):
            _check(f"{name} bbox_reg p{level}", head.box_regression[i], arr[f"head/bbox_reg_p{level}"], TOWER_TOL, failures)
            _check(f"{name} centerness p{level}", head.centerness[i], arr[f"head/centerness_p{level}"], TOWER_TOL, failures)
            _check(f"{name} logits p{level}", head.token_logits[i][..., :32], arr[f"head/dot_product_logits_p{level}_t32"],
                   TOWER_TOL, failures)
            assert torch.equal(out.anchors[i], arr[f"anchors/p{level}"]), (name, level)
        _check(f"{name} proj tokens", head.proj_tokens[:, :32], arr["head/dot_product_proj_tokens_t32"], TOWER_TOL, failures)
    assert not failures, "\n".join(failures)


def _assert_detection_sets(ours, ref, what):
    m = match_detections(*ours, *ref, iou_threshold=0.99, score_tolerance=1e-3)
    assert m.recall >= 0.97, f"{what}: only {m.matched}/{m.num_reference} official detections matched"
    assert m.extra_fraction <= 0.03, f"{what}: {m.unmatched_ours} extra detections ({m.num_ours} vs {m.num_reference})"


def test_candidates_and_detections_equal_official(model, official_forward, parity_index):
    for name, (arr, out) in official_forward.items():
        case = parity_index["cases"][name]
        class_tokens = [[m[k] for k in sorted(m, key=int)] for m in case["label_to_token"]]
        dets = model.processor.post_process(out, class_tokens, keep_pre_nms=True)
        for i, det in enumerate(dets):
            b, s, l = det.pre_nms
            ref = [arr[f"post/img{i}/pre_nms_{k}"] for k in ("boxes", "scores", "labels")]
            _assert_detection_sets((b, s, l + 1), ref, f"{name} image {i} pre-NMS candidates")
            ref = [arr[f"post/img{i}/det_{k}"] for k in ("boxes_input", "scores", "labels")]
            _assert_detection_sets((det.boxes, det.scores, det.labels + 1), ref, f"{name} image {i} detections")


def test_text_padded_to_longest_gives_the_same_valid_outputs(model, official_forward):
    """Padding text to the longest prompt (our default) instead of 256 leaves every valid output unchanged."""
    failures = []
    with torch.no_grad():
        for name, (arr, ref_out) in official_forward.items():
            length = int(arr["input/attention_mask"].sum(1).max())
            out = model(arr["input/image_tensor"], arr["input/input_ids"][:, :length],
                        arr["input/attention_mask"][:, :length], ref_out.image_sizes, output_intermediates=True)
            mask = arr["input/attention_mask"][:, :length].bool()
            for (f_ours, l_ours), (f_ref, l_ref) in zip(out.head.intermediates, ref_out.head.intermediates):
                for level, (a, b) in enumerate(zip(f_ours, f_ref)):
                    _check(f"{name} longest-padding visual p{level + 3}", a, b, 1e-4, failures)
                _check(f"{name} longest-padding lang", l_ours[mask], l_ref[:, :length][mask], 1e-4, failures)
            for a, b in zip(out.head.token_logits, ref_out.head.token_logits):
                _check(f"{name} longest-padding logits", a, b[..., :length], 1e-4, failures)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("pad_text_to_max", [False, True])
def test_ground_api_reproduces_official_detections(model, parity_dir, parity_index, pad_text_to_max):
    """The user API end to end: PNG files in, detections in original-image pixels out (official per-image maps)."""
    for name, case in _cases(parity_index):
        arr = _arrays(parity_dir, case)
        images = [parity_dir / f for f in case["images"]]
        results = model.ground(images, case["captions"], case["phrases"], threshold=0.0, max_detections=100,
                               min_size=320, max_size=480, batch_size=len(images), pad_text_to_max=pad_text_to_max)
        for i, res in enumerate(results):
            ref = [arr[f"post/img{i}/det_{k}"] for k in ("boxes_orig", "scores", "labels")]
            _assert_detection_sets((res["boxes"], res["scores"], res["labels"] + 1), ref,
                                   f"{name} image {i} ground() pad_to_max={pad_text_to_max}")
            assert res["text_labels"] == [case["phrases"][i][j] for j in res["labels"].tolist()]
