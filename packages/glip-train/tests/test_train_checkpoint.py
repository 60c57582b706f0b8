"""Official checkpoints in: reading, variant recognition, strict mapping and its error messages."""
from __future__ import annotations

import json

import pytest
import torch

from glip_train import GLIP, GLIPConfig
from glip_train.checkpoint import (
    CheckpointError,
    infer_official_config,
    map_official_state_dict,
    read_official_checkpoint,
    to_official_state_dict,
)


def _meta_model(config: GLIPConfig) -> GLIP:
    with torch.device("meta"):
        return GLIP(config)


@pytest.fixture(scope="module")
def glip_t():
    torch.manual_seed(0)
    return GLIP(GLIPConfig.glip_t()).eval()


@pytest.fixture(scope="module")
def official_t(glip_t):
    return to_official_state_dict(glip_t)


@pytest.mark.parity
def test_official_key_set_and_shapes_equal_the_official_model(official_t, parity_dir):
    keys = json.loads((parity_dir / "keys_glip_t.json").read_text())
    assert set(official_t) == set(keys)
    for key, info in keys.items():
        assert list(official_t[key].shape) == info["shape"], key


def test_glip_t_parameter_count_matches_spec(glip_t):
    assert sum(p.numel() for p in glip_t.parameters()) == 231_780_222  # spec §1.3


@pytest.mark.parametrize(
    "preset,name,params",
    [(GLIPConfig.glip_t_a, "glip_t_a", 151_430_526), (GLIPConfig.glip_l, "glip_l", 430_422_384)],
)
def test_variants_are_recognised_from_keys_and_shapes(preset, name, params):
    model = _meta_model(preset())
    assert sum(p.numel() for p in model.parameters()) == params  # spec §1.3
    state = to_official_state_dict(model)
    config = infer_official_config(state)
    assert config.name == name
    assert config.to_dict() == preset().to_dict()
    mapped, _ = map_official_state_dict(state, _meta_model(config))
    assert set(mapped) == set(model.state_dict())


def test_round_trip_mapping_is_identity(glip_t, official_t):
    assert infer_official_config(official_t).to_dict() == GLIPConfig.glip_t().to_dict()
    mapped, dropped = map_official_state_dict(official_t, glip_t)
    ours = glip_t.state_dict()
    assert set(mapped) == set(ours)
    assert all(torch.equal(mapped[k], ours[k]) for k in ours)
    assert dropped == [f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)]


def test_known_extras_are_dropped_and_reported(glip_t, official_t):
    state = dict(official_t)
    state["language_backbone.body.model.pooler.dense.weight"] = torch.zeros(768, 768)
    state["language_backbone.body.model.pooler.dense.bias"] = torch.zeros(768)
    state["language_backbone.body.model.embeddings.position_ids"] = torch.arange(512)[None]
    _, dropped = map_official_state_dict(state, glip_t)
    assert "language_backbone.body.model.pooler.dense.weight" in dropped
    assert "language_backbone.body.model.embeddings.position_ids" in dropped


def test_strict_mapping_names_missing_unexpected_and_misshaped_keys(glip_t, official_t):
    state = dict(official_t)
    del state["rpn.head.bias0"]
    del state["backbone.fpn.fpn_layer3.weight"]
    state["rpn.head.not_a_weight"] = torch.zeros(3)
    state["rpn.head.dot_product_projection_text.weight"] = torch.zeros(256, 512)
    state["rpn.anchor_generator.cell_anchors.0"] = torch.tensor([[0.0, 0.0, 7.0, 7.0]])
    with pytest.raises(CheckpointError) as info:
        map_official_state_dict(state, glip_t)
    msg = str(info.value)
    for fragment in ("head.bias0", "fpn_layer3.weight", "not_a_weight", "dot_product_projection_text.weight",
                     "(256, 512)", "cell_anchors.0"):
        assert fragment in msg, fragment


def test_unknown_layout_lists_what_was_found():
    with pytest.raises(CheckpointError, match=r"unknown checkpoint layout.*detector\.conv\.\* \(2\)"):
        infer_official_config({"detector.conv.weight": torch.zeros(1), "detector.conv.bias": torch.zeros(1)})


def test_read_checkpoint_entries_prefix_and_ema(tmp_path):
    weights = {"module.a.weight": torch.ones(2), "module.b.bias": torch.zeros(1)}
    ema = {"module.a.weight": torch.full((2,), 3.0), "module.b.bias": torch.zeros(1)}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": weights, "model_ema": ema, "optimizer": {"state": {}}, "iteration": 5}, path)
    state, report = read_official_checkpoint(path)
    assert set(state) == {"a.weight", "b.bias"} and report.used_entry == "model"
    assert report.ignored_entries == ["iteration", "model_ema", "optimizer"]
    state, report = read_official_checkpoint(path, use_ema=True)
    assert torch.equal(state["a.weight"], torch.full((2,), 3.0)) and report.used_entry == "model_ema"

    bare = tmp_path / "bare.pth"
    torch.save({"module.a.weight": torch.ones(2), "c": torch.ones(1)}, bare)  # not all keys prefixed: keep as is
    state, report = read_official_checkpoint(bare)
    assert set(state) == {"module.a.weight", "c"} and report.used_entry == "<state dict>"
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        read_official_checkpoint(bare, use_ema=True)

    junk = tmp_path / "junk.pth"
    torch.save([1, 2, 3], junk)
    with pytest.raises(CheckpointError, match="not a GLIP checkpoint"):
        read_official_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_official_checkpoint(tmp_path / "missing.pth")
