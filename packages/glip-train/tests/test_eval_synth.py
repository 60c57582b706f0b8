"""The protocols end to end on the synthetic world (``glip_data.generate_world``): an oracle scores 1.0 through the
whole path, and a real (small, untrained) GLIP runs every protocol with the image encoder once per image."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from glip_data import SynthConfig, generate_world
from glip_train.evaluation import evaluate

TINY = dict(min_size=64, max_size=96, progress=False, verbose=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = SynthConfig(seed=3, num_detection=0, num_grounding=2, num_captions=0, num_val=3, captions_per_image=1,
                      min_size=64, max_size=96)
    return generate_world(tmp_path_factory.mktemp("world"), config=cfg)


def _digest(image: Image.Image) -> str:
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


class GroundTruthOracle:
    """Answers with the annotated boxes of the image it is shown (found by its pixels)."""

    def __init__(self, world, exact_boxes: bool):
        coco = json.loads(world.coco_val.read_text())
        files = {img["id"]: img["file_name"] for img in coco["images"]}  # LVIS uses the same images and ids
        self.by_digest: dict[str, list] = {}
        one = 0 if exact_boxes else 1  # exact: x2 = x + w; inclusive pixels: x2 = x + w - 1
        for data in (coco, json.loads(world.lvis_val.read_text())):
            names = {c["id"]: c["name"] for c in data["categories"]}
            for ann in data["annotations"]:
                with Image.open(world.root / "images" / files[ann["image_id"]]) as img:
                    key = _digest(img)
                x, y, w, h = ann["bbox"]
                self.by_digest.setdefault(key, []).append((names[ann["category_id"]],
                                                           [x, y, x + w - one, y + h - one]))

    def detect(self, images, classes, **kwargs):
        out = []
        for image in images:
            rows = [(classes.index(n), b) for n, b in self.by_digest.get(_digest(image), []) if n in classes]
            out.append({"boxes": np.asarray([b for _, b in rows], np.float32).reshape(-1, 4),
                        "scores": np.full(len(rows), 0.9, np.float32),
                        "labels": np.asarray([c for c, _ in rows], np.int64)})
        return out


def test_oracle_scores_one_on_the_synthetic_world(world, tmp_path):
    images = world.root / "images"
    coco = evaluate(GroundTruthOracle(world, exact_boxes=False), "coco", world.coco_val, images, tmp_path / "c", **TINY)
    assert coco.metrics["AP"] == pytest.approx(1.0)
    lvis = evaluate(GroundTruthOracle(world, exact_boxes=True), "lvis-minival", world.lvis_val, images, **TINY)
    assert lvis.metrics["AP"] == pytest.approx(1.0)
    # the LVIS conversion drops the +1: inclusive-pixel boxes come out one pixel smaller and lose the high IoUs
    lvis_inclusive = evaluate(GroundTruthOracle(world, exact_boxes=False), "lvis-minival", world.lvis_val, images,
                              **TINY)
    assert 0.3 < lvis_inclusive.metrics["AP"] < 1.0


@pytest.fixture(scope="module")
def small_glip(minilm_dir):
    from glip_train import GLIP, GLIPConfig

    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)  # let the untrained head produce candidates
    return model


@pytest.fixture(scope="module")
def one_image_world(tmp_path_factory):
    cfg = SynthConfig(seed=4, num_detection=0, num_grounding=0, num_captions=0, num_val=1, min_size=64, max_size=96)
    return generate_world(tmp_path_factory.mktemp("world1"), config=cfg)


def test_image_encoder_runs_once_per_image_for_a_long_vocabulary(one_image_world, small_glip):
    """64 colour_shape classes, 40 per prompt: two prompts, one image-encoder pass."""
    calls = []
    hook = small_glip.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        result = evaluate(small_glip, "lvis-minival", one_image_world.lvis_val, one_image_world.root / "images", **TINY)
    finally:
        hook.remove()
    assert result.report["prompts_per_image"] == 2 and calls == [1]
    assert result.report["detections_predicted"] > 0 and -1.0 <= result.metrics["AP"] <= 1.0


def _run_all_protocols(model, world, out):
    images = world.root / "images"
    results = {}
    for name, ann in (("coco", world.coco_val), ("lvis-minival", world.lvis_val), ("lvis-val", world.lvis_val),
                      ("flickr30k", world.grounding_train)):
        results[name] = evaluate(model, name, ann, images, out / name, **TINY)
        saved = json.loads((out / name / "metrics.json").read_text())
        assert saved["protocol"]["name"] == name and saved["protocol"]["min_size"] == 64 and saved["report"]
        assert isinstance(json.loads((out / name / "detections.json").read_text()), list)
    for name in ("coco", "lvis-minival", "lvis-val"):
        assert -1.0 <= results[name].metrics["AP"] <= 1.0
    recall = results["flickr30k"].metrics["any_box"]
    assert 0.0 <= recall["R@1"] <= recall["R@5"] <= recall["R@10"] <= recall["upper_bound"] <= 1.0
    return results


@pytest.mark.slow  # about 40 s on 2 CPU cores
def test_every_protocol_runs_a_small_glip_on_the_synthetic_world(world, small_glip, tmp_path):
    results = _run_all_protocols(small_glip, world, tmp_path)
    assert results["lvis-minival"].report["detections_predicted"] > 0


@pytest.mark.slow  # building GLIP-T from the weights recipe takes about a minute on 2 CPU cores
def test_every_protocol_runs_the_recipe_glip_t_on_the_synthetic_world(world, tmp_path):
    from pathlib import Path

    from glip_train import GLIP

    recipe = Path(__file__).resolve().parents[3] / "assets" / "glip_t_synthetic_weights.json"
    model = GLIP.from_pretrained(recipe).eval()
    _run_all_protocols(model, world, tmp_path)
