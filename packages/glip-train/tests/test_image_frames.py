"""One image frame from the file to the boxes, with the shipped model: a copy of an image stored rotated with an EXIF
orientation gives the upright image's detections, and ``glip eval`` scores EXIF-rotated copies exactly as the upright
ones (annotations in the displayed frame) or as the stored pixels (annotations in the stored frame)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from glip_train import GLIP
from glip_train.evaluation import evaluate
from glip_train.shipped import default_model_dir

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "ring"]
# the stored pixels of an upright image for an EXIF orientation: the inverse of the turn a viewer applies
# (6: the viewer turns the stored image 90 degrees clockwise; 8: counter-clockwise; 3: 180 degrees)
TO_STORED = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}


@pytest.fixture(scope="module")
def shipped():
    if default_model_dir() is None:
        pytest.fail("this checkout has no shipped model (packages/glip-train/src/glip_train/assets/default_model)")
    return GLIP.from_pretrained().eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from glip_data import SynthConfig, generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, config=SynthConfig(seed=29, num_detection=0, num_grounding=0, num_captions=0, num_val=3,
                                            min_size=96, max_size=160))
    return root


def _save(image: Image.Image, path, orientation: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, format="PNG", exif=exif)  # PNG whatever the name says: the pixels are kept exactly


def _stored_box(box: list[float], orientation: int, width: int, height: int) -> list[float]:
    """A COCO ``[x, y, w, h]`` box of the upright ``width x height`` image in the stored frame (continuous
    coordinates: the pixel column ``c`` of the upright image is the stored row ``width - 1 - c`` for orientation 6)."""
    x, y, w, h = box
    if orientation == 6:
        return [y, width - x - w, h, w]
    if orientation == 8:
        return [height - y - h, x, h, w]
    return [width - x - w, height - y - h, w, h]


def _ap(model, annotations, images, **overrides):
    result = evaluate(model, "coco", annotations, images, progress=False, verbose=False, **overrides)
    return result.metrics["AP"], result.report


def test_exif_rotated_copies_give_the_upright_images_detections(shipped, tmp_path):
    upright = Image.open(_asset()).convert("RGB")
    expected = shipped.detect(upright, classes=SHAPES, threshold=0.0, max_detections=50)[0]
    assert len(expected["scores"]) > 0
    for orientation, turn in TO_STORED.items():
        path = tmp_path / f"tagged_{orientation}.png"
        _save(upright.transpose(turn), path, orientation)
        got = shipped.detect(str(path), classes=SHAPES, threshold=0.0, max_detections=50)[0]
        assert got["labels"].tolist() == expected["labels"].tolist(), orientation
        # the same pixels reach the network: equal up to float rounding of the same computation
        torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-6)


def _asset():
    from pathlib import Path

    for parent in Path(__file__).resolve().parents:
        if (parent / "assets" / "shapes.jpg").is_file():
            return parent / "assets" / "shapes.jpg"
    pytest.fail("assets/shapes.jpg not found above the tests")


def test_eval_scores_exif_rotated_copies_in_the_frame_of_their_annotations(shipped, world, tmp_path):
    data = json.loads((world / "coco_val.json").read_text())
    images = sorted(data["images"], key=lambda i: i["id"])
    orientations = dict(zip([i["id"] for i in images], TO_STORED))  # one image per orientation 6, 8, 3
    for image in images:
        pixels = Image.open(world / "images" / image["file_name"]).convert("RGB")
        turned = pixels.transpose(TO_STORED[orientations[image["id"]]])
        _save(pixels, tmp_path / "upright" / image["file_name"], None)
        _save(turned, tmp_path / "displayed" / image["file_name"], orientations[image["id"]])
        _save(turned, tmp_path / "stored_untagged" / image["file_name"], None)
    reference, _ = _ap(shipped, world / "coco_val.json", tmp_path / "upright")
    assert reference > 0.2  # the model finds the shapes: a comparison of two zeros would prove nothing

    # annotations in the displayed frame: 6 and 8 are read upright because their annotated size is the displayed
    # one; 3 (upside down) keeps its size, so the protocol's image_frame decides
    ap, report = _ap(shipped, world / "coco_val.json", tmp_path / "displayed", image_frame="upright")
    assert ap == reference
    assert report["images_exif_read_upright_by_size"] == 2 and report["images_exif_read_upright_by_default"] == 1
    assert "images_size_differs_from_annotation" not in report

    # annotations in the stored frame (as the official loader sees every image): the tag changes nothing
    stored = dict(data, images=[], annotations=[])
    for image in images:
        o = orientations[image["id"]]
        swap = o in (6, 8)
        stored["images"].append(dict(image, width=image["height"] if swap else image["width"],
                                     height=image["width"] if swap else image["height"]))
    for ann in data["annotations"]:
        image = next(i for i in images if i["id"] == ann["image_id"])
        stored["annotations"].append(dict(ann, bbox=_stored_box(ann["bbox"], orientations[image["id"]],
                                                                image["width"], image["height"])))
    stored_file = tmp_path / "coco_stored.json"
    stored_file.write_text(json.dumps(stored))
    untagged, _ = _ap(shipped, stored_file, tmp_path / "stored_untagged")
    assert untagged > 0.2
    ap, report = _ap(shipped, stored_file, tmp_path / "displayed")
    assert ap == untagged
    assert report["images_exif_read_as_stored_by_size"] == 2 and report["images_exif_read_as_stored_by_default"] == 1
