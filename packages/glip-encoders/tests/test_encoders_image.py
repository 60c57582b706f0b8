"""ImageEncoder: timm backbones, input validation, local pretrained files, checkpoint filter errors."""
from __future__ import annotations

import pytest
import timm
import torch
from glip_encoders import (
    FPN,
    ImageEncoder,
    build_image_encoder,
    image_checkpoint_filter_fn,
    image_to_official_state_dict,
    load_swin_pretrained,
)
from glip_encoders.swin import SwinBackbone, SwinConfig, to_official_state_dict

TINY = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def resnet18_encoder() -> ImageEncoder:
    return build_image_encoder("resnet18", out_channels=32).eval()


def test_timm_backbone_levels_and_shapes(resnet18_encoder):
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        pyramid, body = resnet18_encoder(images, return_body_features=True)
    assert [tuple(p.shape) for p in pyramid] == [(2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3), (2, 32, 1, 2),
                                                 (2, 32, 1, 1)]
    assert [tuple(c.shape) for c in body] == [(2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]  # strides 8, 16, 32
    assert resnet18_encoder.fpn.in_channels_list == [128, 256, 512]
    with torch.no_grad():
        only = resnet18_encoder(images)
    assert isinstance(only, list) and len(only) == 5
    torch.testing.assert_close(only[0], pyramid[0])


def test_swin_encoder_shapes():
    encoder = ImageEncoder(SwinBackbone(TINY), FPN([32, 64, 128], 16)).eval()
    with torch.no_grad():
        pyramid, body = encoder(torch.randn(1, 3, 68, 100), return_body_features=True)
    assert [tuple(c.shape) for c in body] == [(1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4)]
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(9, 13), (5, 7), (3, 4), (2, 2), (1, 1)]


def test_input_errors(resnet18_encoder):
    with pytest.raises(ValueError, match="3-channel"):
        resnet18_encoder(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resnet18_encoder(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="smaller than the backbone stride 32"):
        resnet18_encoder(torch.randn(1, 3, 64, 31))


def test_build_errors_and_no_download():
    with pytest.raises(ValueError, match="never downloads"):
        build_image_encoder("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="unknown image encoder 'not_a_model'"):
        build_image_encoder("not_a_model")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_image_encoder("resnet18", pretrained_file="/nonexistent/missing.pth")
    with pytest.raises(ValueError, match="frozen_stages"):
        build_image_encoder("resnet18", frozen_stages=1)
    with pytest.raises(ValueError, match="strides"):
        build_image_encoder("vit_tiny_patch16_224")  # one stride-16 level only


def test_timm_pretrained_from_local_file(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    encoder = build_image_encoder("resnet18", pretrained_file=path)
    torch.testing.assert_close(encoder.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(encoder.body.conv1.weight, source.conv1.weight)


def test_swin_pretrained_from_classification_checkpoint(tmp_path):
    """An ImageNet Swin file (official layout + head + final norm + attn_mask buffers) loads into the body."""
    torch.manual_seed(0)
    source = SwinBackbone(TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    official = {k: v for k, v in to_official_state_dict(source).items() if not k.startswith("norm")}
    official.update({"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10), "norm.weight": torch.ones(128),
                     "norm.bias": torch.zeros(128), "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    path = tmp_path / "swin_in1k.pth"
    torch.save({"model": official}, path)
    body = SwinBackbone(TINY)
    report = load_swin_pretrained(body, path)
    assert set(report["ignored"]) == {"head.weight", "head.bias", "norm.weight", "norm.bias",
                                      "layers.0.blocks.1.attn_mask"}
    assert sorted(report["missing"]) == sorted(f"norm{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias"))
    torch.testing.assert_close(body.layers[2].downsample.reduction.weight, source.layers[2].downsample.reduction.weight)
    torch.testing.assert_close(body.layers[3].blocks[1].mlp.fc2.weight, source.layers[3].blocks[1].mlp.fc2.weight)

    # the same weights in timm layout (downsample at the start of the next stage) load too
    timm_path = tmp_path / "swin_timm.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("norm")}, timm_path)
    body2 = SwinBackbone(TINY)
    load_swin_pretrained(body2, timm_path)
    torch.testing.assert_close(body2.layers[1].downsample.norm.weight, source.layers[1].downsample.norm.weight)

    torch.save({"model": {**official, "layers.0.blocks.0.attn.extra": torch.zeros(1)}}, path)
    with pytest.raises(KeyError, match="layers.0.blocks.0.attn.extra"):
        load_swin_pretrained(SwinBackbone(TINY), path)


def test_image_filter_fn_round_trip_and_errors(resnet18_encoder):
    official = image_to_official_state_dict(resnet18_encoder)
    assert "body.conv1.weight" in official and "fpn.top_blocks.p7.weight" in official
    mapped = image_checkpoint_filter_fn(official, resnet18_encoder)
    assert set(mapped) == set(resnet18_encoder.state_dict())
    with pytest.raises(KeyError, match="fpn.fpn_inner5.weight"):
        image_checkpoint_filter_fn({**official, "fpn.fpn_inner5.weight": torch.zeros(1)}, resnet18_encoder)
    with pytest.raises(ValueError, match="fpn.fpn_layer2.weight"):
        image_checkpoint_filter_fn({**official, "fpn.fpn_layer2.weight": torch.zeros(3, 3)}, resnet18_encoder)
