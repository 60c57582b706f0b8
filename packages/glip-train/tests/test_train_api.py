"""The user API on a small model (resnet18 + MiniLM, two fusion blocks): detect, ground, weights round trip, the
processor composed by hand (processor -> network -> processor) and saved, and clear errors on bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from glip_data import ImageLoadError
from glip_train import GLIP, GLIPConfig, GLIPProcessor, PostProcessConfig
from glip_train.official_checkpoint import CheckpointError


@pytest.fixture(scope="module")
def small_model(minilm_dir):
    torch.manual_seed(0)
    model = GLIP(GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=2)).eval()
    # make the untrained head produce candidates: lower the alignment temperature and bias
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    return model


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (96, 200, 3), dtype=np.uint8)),
    ]


KW = dict(threshold=0.0, min_size=128, max_size=224)


def _check_result(res, names, image):
    k = len(res["scores"])
    assert res["boxes"].shape == (k, 4) and res["labels"].dtype == torch.int64
    assert res["text_labels"] == [names[i] for i in res["labels"].tolist()]
    assert torch.all(res["scores"][:-1] >= res["scores"][1:]), "sorted by score"
    w, h = image.size
    assert torch.all(res["boxes"][:, 0::2] >= 0) and torch.all(res["boxes"][:, 0::2] <= w)
    assert torch.all(res["boxes"][:, 1::2] >= 0) and torch.all(res["boxes"][:, 1::2] <= h)


def test_detect_result_shape_and_invariants(small_model, images):
    names = ["cat", "traffic light", "a red umbrella"]
    results = small_model.detect(images, classes=names, max_detections=50, **KW)
    assert len(results) == 2
    for res, image in zip(results, images):
        assert 0 < len(res["scores"]) <= 60
        _check_result(res, names, image)
    high = small_model.detect(images[0], classes=names, max_detections=50, min_size=128, max_size=224,
                              threshold=float(results[0]["scores"].median()))[0]
    assert len(high["scores"]) < len(results[0]["scores"])
    assert torch.all(high["scores"] >= results[0]["scores"].median())


def test_batched_detection_equals_single_images_without_padding(small_model):
    """Two images of the same size need no padding: batching must not change anything."""
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)) for _ in range(2)]
    batched = small_model.detect(imgs, classes=["dog", "cat"], batch_size=2, **KW)
    for image, res in zip(imgs, batched):
        single = small_model.detect(image, classes=["dog", "cat"], **KW)[0]
        assert torch.allclose(single["scores"], res["scores"], atol=1e-5)
        assert torch.allclose(single["boxes"], res["boxes"], atol=1e-3)


def test_long_vocabularies_are_chunked_and_merged(small_model, images):
    """With one class per prompt, the merged result equals the union of the per-class runs (then the cap)."""
    names = ["dog", "cat", "person", "red car"]
    merged = small_model.detect(images[0], classes=names, classes_per_prompt=1, max_detections=1000, **KW)[0]
    parts = [small_model.detect(images[0], classes=[n], max_detections=1000, **KW)[0] for n in names]
    expected = torch.cat([p["scores"] for p in parts]).sort(descending=True).values
    assert torch.allclose(merged["scores"], expected)
    for i, part in enumerate(parts):
        assert torch.allclose(merged["scores"][merged["labels"] == i].sort().values, part["scores"].sort().values)
    capped = small_model.detect(images[0], classes=names, classes_per_prompt=1, max_detections=10, **KW)[0]
    assert torch.allclose(capped["scores"], merged["scores"][: len(capped["scores"])])
    assert len(capped["scores"]) >= 10


def test_prompt_mode_and_per_image_classes(small_model, images):
    res = small_model.detect(images, prompt="a dog. the red car.", **KW)
    for r, image in zip(res, images):
        _check_result(r, ["a dog", "the red car"], image)
    # a prompt written as detection_prompt writes it finds the same phrase spans: the class mode's results exactly
    same = small_model.detect(images, prompt="a dog. the red car", **KW)
    as_classes = small_model.detect(images, classes=["a dog", "the red car"], **KW)
    for p, c in zip(same, as_classes):
        assert p["text_labels"] == c["text_labels"] and torch.equal(p["scores"], c["scores"])
        assert torch.equal(p["boxes"], c["boxes"])
    # per-image class lists: each image's result is its own single-image run
    per_image = small_model.detect(images, classes=[["dog"], ["cat", "bird"]], **KW)
    for names, image, result in zip([["dog"], ["cat", "bird"]], images, per_image):
        _check_result(result, names, image)
        alone = small_model.detect(image, classes=names, **KW)[0]
        assert result["text_labels"] == alone["text_labels"] and torch.equal(result["scores"], alone["scores"])


def test_ground_with_given_and_extracted_phrases(small_model, images):
    caption = "a man holding a red umbrella next to a small dog"
    res = small_model.ground(images[0], caption, [["a red umbrella", "small dog"]], **KW)[0]
    _check_result(res, ["a red umbrella", "small dog"], images[0])
    # a flat phrase list is shared by every image, not read as one list per image
    flat = small_model.ground(images[0], caption, ["a red umbrella", "small dog"], **KW)[0]
    assert flat["text_labels"] == res["text_labels"] and torch.equal(flat["scores"], res["scores"])
    both = small_model.ground(images, [caption, caption], ["small dog"], **KW)
    assert all(set(r["text_labels"]) <= {"small dog"} for r in both)
    assert all(len(r["scores"]) > 0 for r in both)
    auto = small_model.ground(images[0], caption, **KW)[0]
    assert len(auto["scores"]) > 0 and set(auto["text_labels"]) == {"a man", "a red umbrella", "a small dog"}


def test_image_inputs_of_every_kind(small_model, images, tmp_path):
    path = tmp_path / "img.png"
    images[0].save(path)
    arr = np.asarray(images[0])
    ref = small_model.detect(images[0], classes=["dog"], **KW)[0]
    for variant in (path, str(path), arr):
        out = small_model.detect(variant, classes=["dog"], **KW)[0]
        assert torch.allclose(out["scores"], ref["scores"])
    rgba = small_model.detect(images[0].convert("RGBA"), classes=["dog"], **KW)[0]
    assert torch.allclose(rgba["scores"], ref["scores"])
    # a grayscale array is read as the official loader reads a grayscale file: convert("RGB") (R = G = B)
    gray_pil = images[0].convert("L")
    gray = small_model.detect(np.asarray(gray_pil), classes=["dog"], **KW)[0]
    gray_ref = small_model.detect(gray_pil.convert("RGB"), classes=["dog"], **KW)[0]
    assert len(gray["scores"]) > 0 and torch.equal(gray["scores"], gray_ref["scores"])
    assert torch.equal(gray["boxes"], gray_ref["boxes"])
    assert not torch.allclose(gray["scores"][:5], ref["scores"][:5])  # and it is not the colour image


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt=""), "no phrases"),
        (dict(prompt=" . .. "), "no phrases"),
        (dict(classes=[]), "empty"),
        (dict(classes="dog, cat"), "list of names"),
        (dict(classes=["dog", "  "]), "non-empty"),
        (dict(classes=["dog", ". . ."]), "non-empty"),
        (dict(classes=["dog"], prompt="dog."), "exactly one"),
        (dict(classes=["\u0301"]), "no tokens"),
        (dict(classes=[["dog"]] * 3), "class lists"),
    ],
)
@pytest.mark.filterwarnings("ignore:spans_to_tokens")  # the unmappable name is also reported as a warning
def test_bad_detect_inputs_raise_clear_errors(small_model, images, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_model.detect(images, **kwargs, **KW)


def test_bad_ground_and_image_inputs(small_model, images, tmp_path):
    with pytest.raises(ValueError, match="zebra"):
        small_model.ground(images[0], "a dog on the grass", [["zebra"]], **KW)
    with pytest.raises(ValueError, match="empty"):
        small_model.ground(images[0], "   ", **KW)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(OSError, match="broken.jpg"):
        small_model.detect(broken, classes=["dog"], **KW)
    with pytest.raises(ImageLoadError, match="nothere.png"):
        small_model.detect(tmp_path / "nothere.png", classes=["dog"], **KW)
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        small_model.detect(np.full((10, 10, 3), 7.0, dtype=np.float32), classes=["dog"], **KW)
    with pytest.raises(ImageLoadError, match="4000x1"):  # beyond any aspect ratio a model could use
        small_model.detect(np.zeros((1, 4000, 3), dtype=np.uint8), classes=["dog"], **KW)
    with pytest.raises(ImageLoadError, match="600x1"):  # its shorter side would become 0 at max_size=224
        small_model.detect(np.zeros((1, 600, 3), dtype=np.uint8), classes=["dog"], **KW)


def test_save_pretrained_round_trip(small_model, images, tmp_path):
    small_model.save_pretrained(tmp_path / "model")
    loaded = GLIP.from_pretrained(tmp_path / "model").eval()
    a = small_model.detect(images[0], classes=["dog", "cat"], **KW)[0]
    b = loaded.detect(images[0], classes=["dog", "cat"], **KW)[0]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["boxes"], b["boxes"])
    # a damaged directory is named, not half-loaded
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GLIP.from_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GLIP.from_pretrained(tmp_path)


def test_loading_weights_of_another_architecture_fails_loudly(small_model, tmp_path, minilm_dir):
    small_model.save_pretrained(tmp_path / "model")
    other = GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=1).to_dict()
    other["tokenizer"] = None
    (tmp_path / "model" / "config.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointError, match="unexpected"):
        GLIP.from_pretrained(tmp_path / "model")


def test_text_padding_to_max_changes_nothing(small_model, images):
    a = small_model.detect(images[0], classes=["dog", "cat"], **KW)[0]
    b = small_model.detect(images[0], classes=["dog", "cat"], pad_text_to_max=True, **KW)[0]
    assert torch.allclose(a["scores"], b["scores"], atol=1e-5)


def test_bfloat16_autocast_detections_match_fp32(small_model, images):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 per value); through two fusion blocks the scores move
    by a few 1e-3. The detections must be the same set: boxes within 2 px, scores within 0.02, same labels."""
    from glip_train.testing import match_detections

    fp32 = small_model.detect(images[0], classes=["dog", "cat"], max_detections=20, **KW)[0]
    bf16 = small_model.detect(images[0], classes=["dog", "cat"], max_detections=20, dtype=torch.bfloat16, **KW)[0]
    assert bf16["scores"].dtype == torch.float32 and len(fp32["scores"]) == 20
    top = slice(0, 10)  # the lower ranks may swap places with candidates just outside the cap
    m = match_detections(bf16["boxes"], bf16["scores"], bf16["labels"], fp32["boxes"][top], fp32["scores"][top],
                         fp32["labels"][top], iou_threshold=0.9, score_tolerance=0.02)
    assert m.matched == 10, f"only {m.matched} of the 10 best fp32 detections found in bf16"


# --- the processor in the Hugging Face shape ----------------------------------------------------------------------


def test_processor_network_processor_by_hand_equals_detect(small_model):
    """``processor(images=, text=)`` -> ``model(**inputs)`` -> ``processor.post_process(output, ...)`` composed by
    hand gives ``model.detect``'s results."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 150, 3), dtype=np.uint8))
    names = ["cat", "traffic light", "a red umbrella"]
    expected = small_model.detect(image, classes=names, threshold=0.0, max_detections=30, min_size=96,
                                  max_size=160)[0]
    assert len(expected["scores"]) > 0

    processor = small_model.processor
    (query,), (image_names,) = processor.detection_queries(1, names)
    inputs = processor(images=image, text=query.text, min_size=96, max_size=160)
    assert inputs.original_sizes == [(90, 150)] and inputs["image_sizes"] == [(96, 160)]
    with torch.no_grad():
        output = small_model(**inputs)  # the encoder runs inside forward here, not once per image batch
    (detections,) = processor.post_process(output, [query.class_tokens], max_detections=30)
    framed = processor.to_input_frame(detections, inputs["image_sizes"][0], inputs.original_sizes[0], query.labels)
    result = processor.to_results([framed], image_names, 0.0, 30)
    assert result["text_labels"] == expected["text_labels"]
    torch.testing.assert_close(result["boxes"], expected["boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(result["scores"], expected["scores"], rtol=0, atol=1e-6)


def test_processor_inputs_need_one_text_per_image(small_model):
    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        small_model.processor(images=[image, image], text=["cat"])
    with pytest.raises(ValueError, match="images=..., text=..."):
        small_model.processor()
    text_only = small_model.processor(text=["a cat", "two dogs and a cat"])
    assert set(text_only) == {"input_ids", "attention_mask"} and text_only["input_ids"].shape[0] == 2


def test_processor_save_and_load(small_model, tmp_path):
    processor = GLIPProcessor(small_model.tokenizer, max_text_len=128, test_size=(200, 300),
                              postprocess=PostProcessConfig(detections_per_image=None, nms_threshold=0.5))
    processor.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert saved["test_size"] == [200, 300] and saved["postprocess"]["nms_threshold"] == 0.5
    loaded = GLIPProcessor.from_pretrained(tmp_path / "proc")
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.postprocess_config.detections_per_image is None and loaded.resize_limits() == (200, 300)
    text = "a red umbrella near two cats"
    assert loaded.tokenize([text])[0].tolist() == processor.tokenize([text])[0].tolist()

    # a model directory: the settings come from its config.json
    small_model.save_pretrained(tmp_path / "model")
    from_model = GLIPProcessor.from_pretrained(tmp_path / "model")
    assert from_model.to_dict() == small_model.processor.to_dict()
    with pytest.raises(FileNotFoundError, match="processor_config.json or config.json"):
        GLIPProcessor.from_pretrained(tmp_path)
