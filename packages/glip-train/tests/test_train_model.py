"""The network (GLIP) and its configuration: validation, old config files, weights I/O options, batch-invariant
masks, gradient checkpointing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from glip_fusion import FusionConfig, level_image_masks
from glip_train import GLIP, GLIPConfig, PostProcessConfig


@pytest.fixture(scope="module")
def small_config(minilm_dir):
    return GLIPConfig.small(minilm_dir, image_encoder="resnet18", fusion_layers=2)


@pytest.fixture(scope="module")
def small_model(small_config):
    torch.manual_seed(0)
    return GLIP(small_config).eval()


# ---- configuration -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,match", [
    (dict(fusion={"offset_mode": "per_levels"}), "offset_mode must be one of"),
    (dict(fusion={"backend": "cudnn"}), "backend must be one of"),
    (dict(anchor_strides=(8, 16, 32, 64)), "anchor_strides must hold 5"),
    (dict(anchor_sizes=(64, 128, 256, 512, -1)), "anchor_sizes must hold 5 positive"),
    (dict(fpn_channels=128), r"fusion.channels / in_channels \(256 / None\) must equal fpn_channels \(128\)"),
    (dict(fusion={"lang_dim": 384}), r"fusion.lang_dim \(384\) must equal the text encoder's"),
    (dict(fused_text_for_logits=True, fusion=FusionConfig.glip_t_a()), "needs fusion.early_fusion"),
    (dict(postprocess={"nms_threshold": 1.5}), r"nms_threshold must be in \(0, 1\]"),
    (dict(postprocess={"detections_per_image": -3}), "detections_per_image must be a positive integer or None"),
    (dict(max_text_len=1024), "max_text_len must be in"),
    (dict(test_min_size=900, test_max_size=800), "test_min_size / test_max_size must be positive integers with min"),
    (dict(text_encoder={"hidden_size": 768}), "text_encoder lacks"),
])
def test_invalid_configs_fail_when_built_naming_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        GLIPConfig.glip_t(**changes)


def test_from_dict_rejects_unknown_fields_and_round_trips(small_config):
    data = small_config.to_dict()
    assert GLIPConfig.from_dict(json.loads(json.dumps(data))) == small_config
    with pytest.raises(ValueError, match=r"unknown GLIPConfig fields \['fusion_layer'\]"):
        GLIPConfig.from_dict({**data, "fusion_layer": 3})
    with pytest.raises(ValueError, match=r"unknown FusionConfig fields \['heads'\]"):
        GLIPConfig.from_dict({**data, "fusion": {**data["fusion"], "heads": 4}})


def test_config_files_of_the_previous_format_still_load(small_config, tmp_path):
    """config.json as written before fusion/postprocess became nested dataclasses (flat keys, dict postprocess)."""
    old = {k: v for k, v in small_config.to_dict().items() if k not in ("fusion", "postprocess", "size_divisibility")}
    old.update(fusion_layers=2, early_fusion=True, fused_text_for_logits=True, fusion_embed_dim=256, fusion_heads=8,
               fusion_dropout=0.1, fusion_bert_heads=None, fusion_bert_intermediate=None,
               dyconv_offset_mode="official", fusion_backend="auto", gradient_checkpointing=False,
               postprocess={"detections_per_image": 0})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    loaded = GLIPConfig.load(path)
    assert loaded.fusion == small_config.fusion
    assert loaded.postprocess == PostProcessConfig(detections_per_image=None)  # 0 meant "no cap"
    path.write_text('{"name": "glip_t", ')
    with pytest.raises(ValueError, match=r"config.json: not a valid JSON config"):
        GLIPConfig.load(path)


def test_updated_merges_nested_overrides(small_config):
    changed = small_config.updated(fusion={"backend": "reference"}, postprocess={"nms_threshold": 0.5},
                                   batch_invariant=True)
    assert changed.fusion == small_config.fusion.replace(backend="reference")  # the text sizes are kept
    assert changed.postprocess.nms_threshold == 0.5 and changed.batch_invariant
    assert changed.updated(fusion_backend="sdpa").fusion.backend == "sdpa"  # an old flat key


# ---- weights I/O ---------------------------------------------------------------------------------------------------

def test_from_pretrained_directory_honours_map_location_and_overrides(small_model, tmp_path):
    small_model.save_pretrained(tmp_path / "m")
    on_meta = GLIP.from_pretrained(tmp_path / "m", map_location="meta")
    assert all(p.is_meta for p in on_meta.parameters())
    tuned = GLIP.from_pretrained(tmp_path / "m", batch_invariant=True, postprocess={"candidate_threshold": 0.1})
    assert tuned.config.batch_invariant and tuned.config.postprocess.candidate_threshold == 0.1
    assert tuned.config.fusion == small_model.config.fusion
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), small_model.state_dict().values()))


def test_the_models_test_size_is_the_default_resize(small_config):
    from PIL import Image

    model = GLIP(small_config.replace(test_min_size=64, test_max_size=96))
    image = Image.new("RGB", (300, 150))
    assert model.processor.preprocess([image]).image_sizes == [(48, 96)]  # 64 on the short side would exceed 96
    assert model.processor.preprocess([image], min_size=32).image_sizes == [(32, 64)]
    assert GLIP(small_config).processor.test_size == (800, 1333)  # the official default


def test_half_precision_weights_load_as_rounded_float32(small_model, tmp_path):
    import safetensors.torch

    small_model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    stored = safetensors.torch.load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    loaded = GLIP.from_pretrained(tmp_path / "half")
    original = small_model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == original[key].dtype, key  # the model keeps its float32 parameters
        if value.is_floating_point():  # each value is the original rounded to the nearest fp16
            assert torch.equal(value, original[key].to(torch.float16).to(value.dtype)), key


def test_from_pretrained_without_a_path_needs_a_shipped_model(monkeypatch, tmp_path):
    import glip_train.shipped as shipped

    monkeypatch.setattr(shipped, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no shipped model"):
        GLIP.from_pretrained()


# ---- batch-invariant masks -----------------------------------------------------------------------------------------

def test_level_masks_are_the_feature_maps_of_each_image_alone(small_model):
    """For random image sizes, the valid cells the model masks in a padded batch are exactly the cells of the
    image's own feature maps when it is encoded alone (measured by running the encoder)."""
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(40, 200, size=(4, 2))]
    divisor = small_model.config.size_divisibility
    batch_h = -(-max(h for h, _ in sizes) // divisor) * divisor
    batch_w = -(-max(w for _, w in sizes) // divisor) * divisor
    with torch.no_grad():
        batch_shapes = [tuple(f.shape[-2:]) for f in small_model.encode_images(torch.zeros(1, 3, batch_h, batch_w))]
        masks = level_image_masks(sizes, batch_shapes, small_model.config.anchor_strides, size_divisibility=divisor)
        for i, (h, w) in enumerate(sizes):
            alone = torch.zeros(1, 3, -(-h // divisor) * divisor, -(-w // divisor) * divisor)
            for level, feature in enumerate(small_model.encode_images(alone)):
                fh, fw = feature.shape[-2:]
                expected = torch.zeros(batch_shapes[level], dtype=torch.bool)
                expected[:fh, :fw] = True
                assert torch.equal(masks[level][i], expected), (i, level, (h, w))


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_batch_invariant_text_fusion_ignores_padded_cells(small_model, batch_invariant):
    """With batch_invariant=True the fused text of the first X-MHA block does not depend on what the padded cells
    of a batch hold; the official mode attends to them."""
    model = GLIP(small_model.config.replace(batch_invariant=batch_invariant)).eval()
    model.load_state_dict(small_model.state_dict())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 160, generator=g)
    sizes = [(128, 160), (70, 90)]
    ids, mask = model.processor.tokenize(["a dog. a cat.", "a red car."])
    with torch.no_grad():
        features = model.encode_images(images)
        valid = level_image_masks(sizes, [tuple(f.shape[-2:]) for f in features], model.config.anchor_strides)
        noisy = [torch.where(m[:, None], f, f + 10 * torch.randn(f.shape, generator=g)) for f, m in zip(features, valid)]
        first = model(input_ids=ids, attention_mask=mask, image_sizes=sizes, image_features=features,
                      output_intermediates=True).head.intermediates[0]
        other = model(input_ids=ids, attention_mask=mask, image_sizes=sizes, image_features=noisy,
                      output_intermediates=True).head.intermediates[0]
    real = mask.bool()
    text_change = (first[1][real] - other[1][real]).abs().max()
    if batch_invariant:
        assert text_change < 1e-5
        for a, b, m in zip(first[0], other[0], valid):  # valid image cells of the first block are unchanged too
            assert torch.allclose(a.permute(0, 2, 3, 1)[m], b.permute(0, 2, 3, 1)[m], atol=1e-5)
    else:
        assert text_change > 1e-3


# ---- gradient checkpointing ---------------------------------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_loss_and_gradients(small_config):
    """Checkpointing the X-MHA blocks recomputes them in backward (dropout masks included): identical values."""
    torch.manual_seed(0)
    model = GLIP(small_config).train()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 96, 128, generator=g)
    ids, mask = model.processor.tokenize(["a dog. a cat.", "a red car."])

    def run(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(7)  # dropout masks
        out = model(images, ids, mask)
        head = out.head
        loss = sum(x.square().mean() for x in head.box_regression + head.centerness + head.token_logits)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    assert model.gradient_checkpointing
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
