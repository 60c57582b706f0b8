"""benchmarks/zero_shot/protocol.py: the seen / unseen split of COCO AP (hand-computed cases) and the synthetic
runner end to end on a tiny world with a tiny model."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def protocol():
    spec = importlib.util.spec_from_file_location("zero_shot_protocol", REPO / "benchmarks/zero_shot/protocol.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _annotations():
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(("circle", "square", "diamond", "ring"))]
    boxes = {1: [10, 10, 30, 30], 2: [50, 50, 20, 40], 3: [5, 60, 25, 25], 4: [60, 5, 30, 20]}
    annotations = [{"id": 10 * img + cat, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0} for img in (1, 2) for cat, box in boxes.items()]
    return {"images": images, "categories": categories, "annotations": annotations}, boxes


def test_seen_and_unseen_ap_are_averaged_over_their_own_categories(protocol):
    gt, boxes = _annotations()
    manifest = {"detection_shapes": ["circle", "square"], "unseen_shapes": ["diamond", "ring"]}
    # perfect boxes for the seen shapes and for one unseen shape (diamond), nothing for ring
    dets = [{"image_id": img, "category_id": cat, "bbox": boxes[cat], "score": 0.9}
            for img in (1, 2) for cat in (1, 2, 3)]
    got = protocol.split_coco_ap(gt, dets, manifest)
    assert got["AP_seen"] == pytest.approx(1.0) and got["AP50_seen"] == pytest.approx(1.0)
    assert got["AP_unseen"] == pytest.approx(0.5)  # diamond 1.0, ring 0.0
    assert got["AP_all"] == pytest.approx(0.75)
    # a world without unseen shapes has no unseen group
    assert "AP_unseen" not in protocol.split_coco_ap(gt, dets, {"detection_shapes": ["circle"], "unseen_shapes": []})


def test_the_synthetic_runner_writes_its_table(protocol, minilm_dir, tmp_path, capsys):
    from glip_data import SynthConfig, generate_world
    from glip_train import GLIP, GLIPConfig

    world = generate_world(tmp_path / "world", config=SynthConfig(
        seed=2, num_detection=0, num_grounding=0, num_captions=0, num_val=2, min_size=64, max_size=80))
    torch.manual_seed(0)
    GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1)).save_pretrained(tmp_path / "m")
    assert protocol.main(["--weights", str(tmp_path / "m"), "--world", str(world.root), "--out", str(tmp_path / "o")]) == 0
    result = json.loads(next((tmp_path / "o").glob("zero_shot_protocol_*.json")).read_text())
    synthetic = result["synthetic"]
    assert synthetic["images"] == 2 and result["expected"] is None  # not the shipped model: nothing to compare
    assert set(synthetic["coco"]) >= {"AP_all", "AP_seen", "AP_unseen"}
    assert {"AP", "APr", "APc", "APf"} <= set(synthetic["lvis"])
    assert "| measured |" in capsys.readouterr().out


def test_bad_paths_are_named(protocol, tmp_path):
    with pytest.raises(SystemExit):
        protocol.main(["--coco-annotations", str(tmp_path / "missing.json"), "--coco-images", str(tmp_path)])
