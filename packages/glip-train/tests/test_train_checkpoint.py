"""Official checkpoints in: reading, variant recognition, strict mapping and its error messages."""
from __future__ import annotations

import json

import pytest
import torch

from glip_train import GLIP, GLIPConfig
from glip_train.official_checkpoint import (
    CheckpointError,
    infer_official_config,
    map_official_state_dict,
    read_official_checkpoint,
    to_official_state_dict,
)


def _meta_model(config: GLIPConfig) -> GLIP:
    with torch.device("meta"):
        return GLIP(config)


# ---- the official key layout, written from the official configs (docs/official_model.md#checkpoint-layout) -------

OFFICIAL_VARIANTS = {
    # name: (Swin embed dim, depths, heads, window, fusion blocks, deep fusion)
    "glip_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 6, True),
    "glip_t_a": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 6, False),
    "glip_l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 8, True),
}
BERT_LAYER = {
    "attention.self.query.weight": (768, 768), "attention.self.query.bias": (768,),
    "attention.self.key.weight": (768, 768), "attention.self.key.bias": (768,),
    "attention.self.value.weight": (768, 768), "attention.self.value.bias": (768,),
    "attention.output.dense.weight": (768, 768), "attention.output.dense.bias": (768,),
    "attention.output.LayerNorm.weight": (768,), "attention.output.LayerNorm.bias": (768,),
    "intermediate.dense.weight": (3072, 768), "intermediate.dense.bias": (3072,),
    "output.dense.weight": (768, 3072), "output.dense.bias": (768,),
    "output.LayerNorm.weight": (768,), "output.LayerNorm.bias": (768,),
}
ANCHORS = [[-28, -28, 35, 35], [-56, -56, 71, 71], [-112, -112, 143, 143], [-224, -224, 287, 287],
           [-448, -448, 575, 575]]


def official_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Every key and shape of an official state dict (without ``module.``), from the official configs."""
    embed, depths, heads, window, blocks, fused = OFFICIAL_VARIANTS[variant]
    out: dict[str, tuple[int, ...]] = {}
    body = "backbone.body."
    out.update({body + "patch_embed.proj.weight": (embed, 3, 4, 4), body + "patch_embed.proj.bias": (embed,),
                body + "patch_embed.norm.weight": (embed,), body + "patch_embed.norm.bias": (embed,)})
    dims = [embed * 2 ** s for s in range(4)]
    for s, (c, depth, h) in enumerate(zip(dims, depths, heads)):
        for j in range(depth):
            p = f"{body}layers.{s}.blocks.{j}."
            out.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                        p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, h),
                        p + "attn.relative_position_index": (window * window, window * window),
                        p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                        p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                        p + "norm2.weight": (c,), p + "norm2.bias": (c,),
                        p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,),
                        p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)})
        if s < 3:
            p = f"{body}layers.{s}.downsample."
            out.update({p + "reduction.weight": (2 * c, 4 * c), p + "norm.weight": (4 * c,), p + "norm.bias": (4 * c,)})
    for n, c in zip((1, 2, 3), dims[1:]):
        out.update({f"{body}norm{n}.weight": (c,), f"{body}norm{n}.bias": (c,)})
    for n, c in zip((2, 3, 4), dims[1:]):
        out.update({f"backbone.fpn.fpn_inner{n}.weight": (256, c, 1, 1), f"backbone.fpn.fpn_inner{n}.bias": (256,),
                    f"backbone.fpn.fpn_layer{n}.weight": (256, 256, 3, 3), f"backbone.fpn.fpn_layer{n}.bias": (256,)})
    for n in ("p6", "p7"):
        out.update({f"backbone.fpn.top_blocks.{n}.weight": (256, 256, 3, 3), f"backbone.fpn.top_blocks.{n}.bias": (256,)})
    text = "language_backbone.body.model."
    out.update({text + "embeddings.word_embeddings.weight": (30522, 768),
                text + "embeddings.position_embeddings.weight": (512, 768),
                text + "embeddings.token_type_embeddings.weight": (2, 768),
                text + "embeddings.LayerNorm.weight": (768,), text + "embeddings.LayerNorm.bias": (768,)})
    for n in range(12):
        out.update({f"{text}encoder.layer.{n}.{k}": v for k, v in BERT_LAYER.items()})
    head = "rpn.head."
    out.update({head + "log_scale": (1,), head + "bias_lang": (768,), head + "bias0": (1,),
                head + "cls_logits.weight": (80, 256, 1, 1), head + "cls_logits.bias": (80,),
                head + "bbox_pred.weight": (4, 256, 1, 1), head + "bbox_pred.bias": (4,),
                head + "centerness.weight": (1, 256, 1, 1), head + "centerness.bias": (1,),
                head + "dot_product_projection_text.weight": (256, 768),
                head + "dot_product_projection_text.bias": (256,)})
    out.update({f"{head}scales.{l}.scale": (1,) for l in range(5)})
    dyconv = {f"DyConv.{i}.{k}": v for i in range(3) for k, v in (
        ("conv.weight", (256, 256, 3, 3)), ("conv.bias", (256,)), ("bn.weight", (256,)), ("bn.bias", (256,)))}
    dyconv.update({"AttnConv.1.weight": (1, 256, 1, 1), "AttnConv.1.bias": (1,), "relu.fc.0.weight": (64, 256),
                   "relu.fc.0.bias": (64,), "relu.fc.2.weight": (1024, 64), "relu.fc.2.bias": (1024,),
                   "offset.weight": (27, 256, 3, 3), "offset.bias": (27,)})
    xmha = {"b_attn.gamma_v": (256,), "b_attn.gamma_l": (768,), "b_attn.layer_norm_v.weight": (256,),
            "b_attn.layer_norm_v.bias": (256,), "b_attn.layer_norm_l.weight": (768,),
            "b_attn.layer_norm_l.bias": (768,)}
    for name, (o, i) in {"v_proj": (2048, 256), "l_proj": (2048, 768), "values_v_proj": (2048, 256),
                         "values_l_proj": (2048, 768), "out_v_proj": (256, 2048), "out_l_proj": (768, 2048)}.items():
        xmha.update({f"b_attn.attn.{name}.weight": (o, i), f"b_attn.attn.{name}.bias": (o,)})
    tower = [xmha, BERT_LAYER, dyconv] * blocks if fused else [dyconv] * blocks
    for index, module in enumerate(tower):
        out.update({f"{head}dyhead_tower.{index}.{k}": v for k, v in module.items()})
    out.update({f"rpn.anchor_generator.cell_anchors.{l}": (1, 4) for l in range(5)})
    return out


def _relative_position_index(window: int) -> torch.Tensor:
    """The Swin window's pairwise relative-position index, written out with loops."""
    cells = [(y, x) for y in range(window) for x in range(window)]
    return torch.tensor([[(y1 - y2 + window - 1) * (2 * window - 1) + (x1 - x2 + window - 1) for y2, x2 in cells]
                         for y1, x1 in cells])


def official_state(variant: str) -> dict[str, torch.Tensor]:
    """A meta-device official state dict of ``variant`` (real values only where loading checks them)."""
    window = OFFICIAL_VARIANTS[variant][3]
    index = _relative_position_index(window)
    state = {}
    for key, shape in official_shapes(variant).items():
        if key.endswith("relative_position_index"):
            state[key] = index
        elif key.startswith("rpn.anchor_generator.cell_anchors."):
            state[key] = torch.tensor([ANCHORS[int(key[-1])]], dtype=torch.float32)
        else:
            state[key] = torch.empty(shape, device="meta")
    return state


def test_the_written_out_layout_is_the_fixtures_glip_t_key_list(parity_dir):
    """The key generator above reproduces the official GLIP-T key list recorded in the fixture exactly."""
    keys = json.loads((parity_dir / "keys_glip_t.json").read_text())
    assert official_shapes("glip_t") == {k: tuple(v["shape"]) for k, v in keys.items()}


@pytest.mark.parametrize("variant,params,entries", [("glip_t", 231_780_222, 745), ("glip_t_a", 151_430_526, 541),
                                                     ("glip_l", 430_422_384, 1021)])
def test_official_variants_are_recognised_and_map_strictly(variant, params, entries):
    state = official_state(variant)
    assert len(state) == entries  # docs/official_model.md#checkpoint-layout (+ position_ids in some files)
    config = infer_official_config(state)
    assert config.name == variant
    assert config.to_dict() == getattr(GLIPConfig, variant)().to_dict()
    model = _meta_model(config)
    assert sum(p.numel() for p in model.parameters()) == params  # docs/official_model.md#variants
    mapped, dropped = map_official_state_dict(state, model)
    ours = model.state_dict()
    assert set(mapped) == set(ours)
    assert all(tuple(mapped[k].shape) == tuple(ours[k].shape) for k in ours)
    assert dropped == [f"rpn.anchor_generator.cell_anchors.{i}" for i in range(5)]


@pytest.fixture(scope="module")
def glip_t():
    return _meta_model(GLIPConfig.glip_t())


@pytest.fixture(scope="module")
def official_t():
    return official_state("glip_t")


def test_export_to_the_official_layout_is_the_inverse_of_loading(official_t, parity_dir):
    """to_official_state_dict of a (small, real) model gives the official key layout back."""
    torch.manual_seed(0)
    model = _meta_model(GLIPConfig.glip_t())
    exported = to_official_state_dict(model)
    assert {k: tuple(v.shape) for k, v in exported.items()} == official_shapes("glip_t")
    assert torch.equal(exported["backbone.body.layers.0.blocks.0.attn.relative_position_index"],
                       _relative_position_index(7))
    assert all(torch.equal(exported[f"rpn.anchor_generator.cell_anchors.{i}"], torch.tensor([ANCHORS[i]],
                                                                                           dtype=torch.float32))
               for i in range(5))


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
