"""Swin backbone: official layout, key mapping and the official forward semantics.

The reference below is an independent plain-torch statement of the official GLIP Swin forward (docs/official_model.md#image-encoder), written
with explicit loops over windows and explicit index formulas. It consumes weights in the *official* layout
(``layers.{s}.downsample`` at the end of stage s), so comparing it with our module after
``checkpoint_filter_fn`` checks the key mapping and every padding / window / shift / merging quirk at once.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from glip_encoders import build_image_encoder, image_checkpoint_filter_fn, image_to_official_state_dict
from glip_encoders.swin import (
    PatchMerging,
    SwinBackbone,
    SwinBlock,
    SwinConfig,
    checkpoint_filter_fn,
    shifted_window_mask,
    to_official_state_dict,
    window_plan,
)
from torch import nn

TINY = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0)


# ------------------------------------------------------------------------------------------------ the reference
def ref_relative_index(w: int) -> torch.Tensor:
    """index[a, b] for tokens a=(ya, xa), b=(yb, xb) of a w x w window, by the definition."""
    idx = torch.empty(w * w, w * w, dtype=torch.int64)
    for a in range(w * w):
        for b in range(w * w):
            ya, xa, yb, xb = a // w, a % w, b // w, b % w
            idx[a, b] = (ya - yb + w - 1) * (2 * w - 1) + (xa - xb + w - 1)
    return idx


def ref_region(coord: int, size: int, w: int, s: int) -> int:
    """Region label along one axis of a padded, rolled map: [0, size-w), [size-w, size-s), [size-s, size)."""
    return 0 if coord < size - w else (1 if coord < size - s else 2)


def ref_block(x, sd, p, heads, w, s):
    """Official block on (B, H, W, C): x + W-MSA(pad(LN1(x)) rolled), then x + MLP(LN2(x))."""
    B, H, W, C = x.shape
    d = C // heads
    h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
    Hp, Wp = math.ceil(H / w) * w, math.ceil(W / w) * w
    padded = x.new_zeros(B, Hp, Wp, C)
    padded[:, :H, :W] = h  # zero padding after LN1
    if s:
        padded = torch.roll(padded, shifts=(-s, -s), dims=(1, 2))
    table, index = sd[p + "attn.relative_position_bias_table"], ref_relative_index(w)
    bias = table[index.reshape(-1)].reshape(w * w, w * w, heads).permute(2, 0, 1)  # (heads, N, N)
    out = torch.zeros_like(padded)
    for wy in range(Hp // w):
        for wx in range(Wp // w):
            tok = padded[:, wy * w:(wy + 1) * w, wx * w:(wx + 1) * w].reshape(B, w * w, C)
            qkv = tok @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
            q, k, v = qkv.reshape(B, w * w, 3, heads, d).permute(2, 0, 3, 1, 4)
            logits = (q * d**-0.5) @ k.transpose(-1, -2) + bias
            if s:
                regions = torch.tensor([
                    3 * ref_region(wy * w + i // w, Hp, w, s) + ref_region(wx * w + i % w, Wp, w, s)
                    for i in range(w * w)
                ])
                logits = logits + (regions[:, None] != regions[None, :]).float() * -100.0
            o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, w * w, C)
            o = o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
            out[:, wy * w:(wy + 1) * w, wx * w:(wx + 1) * w] = o.reshape(B, w, w, C)
    if s:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    x = x + out[:, :H, :W]
    h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
    h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def ref_merge(x, sd, p):
    """Official patch merging: pad to even, cat (even,even), (odd,even), (even,odd), (odd,odd), LN, Linear."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    x = F.layer_norm(x, (4 * C,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5)
    return x @ sd[p + "reduction.weight"].T


def ref_swin(sd, images, cfg: SwinConfig):
    """Official GLIP Swin forward -> [C3, C4, C5] NCHW (after norm1..norm3)."""
    H, W = images.shape[-2:]
    x = F.pad(images, (0, (-W) % 4, 0, (-H) % 4))
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4).permute(0, 2, 3, 1)
    x = F.layer_norm(x, (cfg.embed_dim,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], eps=1e-5)
    outs = []
    for s, depth in enumerate(cfg.depths):
        for j in range(depth):
            shift = cfg.window_size // 2 if j % 2 else 0
            x = ref_block(x, sd, f"layers.{s}.blocks.{j}.", cfg.num_heads[s], cfg.window_size, shift)
        if s > 0:
            y = F.layer_norm(x, (x.shape[-1],), sd[f"norm{s}.weight"], sd[f"norm{s}.bias"], eps=1e-5)
            outs.append(y.permute(0, 3, 1, 2))
        if s < len(cfg.depths) - 1:
            x = ref_merge(x, sd, f"layers.{s}.downsample.")
    return outs


def official_swin_keys(cfg: SwinConfig) -> dict[str, tuple]:
    """Official key -> shape (docs/official_model.md#checkpoint-layout), stated independently of our module."""
    C0, w = cfg.embed_dim, cfg.window_size
    keys = {"patch_embed.proj.weight": (C0, 3, 4, 4), "patch_embed.proj.bias": (C0,),
            "patch_embed.norm.weight": (C0,), "patch_embed.norm.bias": (C0,)}
    for s, depth in enumerate(cfg.depths):
        C, h = C0 * 2**s, cfg.num_heads[s]
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            keys.update({p + "norm1.weight": (C,), p + "norm1.bias": (C,),
                         p + "attn.relative_position_bias_table": ((2 * w - 1) ** 2, h),
                         p + "attn.relative_position_index": (w * w, w * w),
                         p + "attn.qkv.weight": (3 * C, C), p + "attn.qkv.bias": (3 * C,),
                         p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
                         p + "norm2.weight": (C,), p + "norm2.bias": (C,),
                         p + "mlp.fc1.weight": (4 * C, C), p + "mlp.fc1.bias": (4 * C,),
                         p + "mlp.fc2.weight": (C, 4 * C), p + "mlp.fc2.bias": (C,)})
        if s < len(cfg.depths) - 1:
            p = f"layers.{s}.downsample."
            keys.update({p + "reduction.weight": (2 * C, 4 * C), p + "norm.weight": (4 * C,), p + "norm.bias": (4 * C,)})
        if s > 0:
            keys.update({f"norm{s}.weight": (C,), f"norm{s}.bias": (C,)})
    return keys


def random_official_sd(cfg: SwinConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_swin_keys(cfg).items():
        if key.endswith("relative_position_index"):
            sd[key] = ref_relative_index(cfg.window_size)
        elif "norm" in key and key.endswith("weight"):
            sd[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith("bias") or "bias_table" in key:
            sd[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return sd


# ------------------------------------------------------------------------------------------------ forward parity
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "map-wide"])
@pytest.mark.parametrize(
    "cfg, size",
    [
        (TINY, (68, 100)),  # stages 17x25, 9x13, 5x7, 3x4: window padding everywhere, odd merges, 7 > map size
        (SwinConfig(16, (2, 2, 2, 2), (2, 2, 4, 4), window_size=3, drop_path_rate=0.0), (66, 101)),  # patch padding
    ],
)
def test_swin_matches_official_statement(cfg, size, fused):
    """Both inference forms (eval, no grad): the fused window-by-window blocks and the map-wide ones."""
    torch.manual_seed(0)
    sd = random_official_sd(cfg)
    model = SwinBackbone(cfg).eval()
    model.set_fused_inference(fused)
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(images)
        ref = ref_swin(sd, images, cfg)
    assert len(ours) == 3
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("chunk_tokens", [16, 48, 10_000])  # one window per chunk, three, all
def test_fused_block_equals_map_wide_block(shift, chunk_tokens):
    """``fused_forward`` (window chunks, SDPA, padding skipped after attention) equals the map-wide forward to float
    rounding (the attention's softmax is computed in another order: ~1e-7 relative per block) on a padded map,
    two images, with a non-zero norm1 bias so that the zeroed padding matters."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=shift).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 6, 11, 8)  # padded to 8 x 12
    with torch.no_grad():
        ref = block(x)
        ours = block.fused_forward(x, window_plan(2, 6, 11, 4, shift, x.device, chunk_tokens=chunk_tokens))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_window_plan_by_hand():
    """A 3x3 map, window 2, shift 1: padded to 4x4, rolled by -1, so window (0, 0) holds map cells (1..2, 1..2)
    (rows 4, 5, 7, 8); window (1, 1) holds padded cells (3, 3), (3, 0), (0, 3), (0, 0): only map row 0 is real,
    and it straddles all four regions."""
    plan = window_plan(1, 3, 3, 2, 1, torch.device("cpu"), chunk_tokens=4)
    first, last = plan.chunks[0], plan.chunks[-1]
    assert first.gather.tolist() == [4, 5, 7, 8] and first.padding is None and first.mask is None
    assert last.gather.tolist() == [0, 0, 0, 0]  # padding reads row 0 (zeroed after norm1)
    assert last.padding.tolist() == [0, 1, 2] and last.keep.tolist() == [3] and last.scatter.tolist() == [0]
    assert (last.mask[0, 0] == -100).sum() == 4 * 4 - 4  # four regions, one token each
    scatter = torch.cat([c.scatter for c in plan.chunks])
    assert sorted(scatter.tolist()) == list(range(9))  # every map token written exactly once


def test_block_pads_before_rolling_unlike_stock_timm():
    """On a non-window-multiple map, timm's own block order (roll, then pad) gives other results than official."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=2).eval()
    with torch.no_grad():
        block.norm1.bias.normal_()  # non-zero LN output so padding positions are distinguishable
    x = torch.randn(1, 6, 7, 8)
    with torch.no_grad():
        ours = block(x)
        stock = super(SwinBlock, block).forward(x)
    assert not torch.allclose(ours, stock, atol=1e-4)


def test_shifted_window_mask_against_definition():
    Hp, Wp, w, s = 8, 12, 4, 2
    mask = shifted_window_mask(Hp, Wp, w, s)
    assert mask.shape == ((Hp // w) * (Wp // w), w * w, w * w)
    for n in range(mask.shape[0]):
        wy, wx = divmod(n, Wp // w)
        regions = [3 * ref_region(wy * w + i // w, Hp, w, s) + ref_region(wx * w + i % w, Wp, w, s) for i in range(w * w)]
        expected = torch.tensor([[0.0 if a == b else -100.0 for b in regions] for a in regions])
        torch.testing.assert_close(mask[n], expected, rtol=0, atol=0)
    # hand facts: the top-left window is one region; the bottom-right one holds four (2x2 blocks of each)
    assert (mask[0] == 0).all()
    assert (mask[-1] == -100).sum() == 16 * 16 - 4 * 4 * 4


def test_patch_merging_subgrid_order_and_odd_padding():
    """Merging a 3x3 single-channel map: padded to 4x4, each 2x2 cell gives [x(0,0), x(1,0), x(0,1), x(1,1)]."""
    merge = PatchMerging(dim=1, out_dim=4)
    merge.norm = nn.Identity()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(4))
    grid = torch.arange(1.0, 10.0).reshape(1, 3, 3, 1)  # [[1,2,3],[4,5,6],[7,8,9]]
    out = merge(grid)
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 0, 0].tolist() == [1.0, 4.0, 2.0, 5.0]
    assert out[0, 0, 1].tolist() == [3.0, 6.0, 0.0, 0.0]
    assert out[0, 1, 0].tolist() == [7.0, 0.0, 8.0, 0.0]
    assert out[0, 1, 1].tolist() == [9.0, 0.0, 0.0, 0.0]


def test_window_never_shrinks():
    model = SwinBackbone(TINY)
    for stage in model.layers:
        for j, block in enumerate(stage.blocks):
            assert block.window_size == (7, 7)
            assert block.shift_size == ((3, 3) if j % 2 else (0, 0))


# ------------------------------------------------------------------------------------------------ key mapping
def test_filter_maps_official_tiny_layout_exactly():
    model = SwinBackbone(TINY)
    official = random_official_sd(TINY)
    mapped = checkpoint_filter_fn(official, model)
    assert set(mapped) == set(model.state_dict())
    assert "layers.1.downsample.reduction.weight" in mapped and "layers.0.downsample.reduction.weight" not in mapped
    back = to_official_state_dict(model)
    assert {k: tuple(v.shape) for k, v in back.items()} == official_swin_keys(TINY)
    assert torch.equal(back["layers.0.blocks.1.attn.relative_position_index"], ref_relative_index(7))


def test_filter_errors_name_the_keys():
    model = SwinBackbone(TINY)
    official = random_official_sd(TINY)
    with pytest.raises(KeyError, match="layers.0.blocks.0.attn.surprise"):
        checkpoint_filter_fn({**official, "layers.0.blocks.0.attn.surprise": torch.zeros(1)}, model)
    with pytest.raises(KeyError, match="layers.3.downsample.reduction.weight"):  # the last stage has no merging
        checkpoint_filter_fn({**official, "layers.3.downsample.reduction.weight": torch.zeros(1)}, model)
    bad = dict(official)
    bad["layers.1.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"layers.1.blocks.0.attn.qkv.weight"):
        checkpoint_filter_fn(bad, model)
    bad = dict(official)
    bad["layers.2.blocks.1.attn.relative_position_index"] = ref_relative_index(7).flip(0)
    with pytest.raises(ValueError, match="relative_position_index"):
        checkpoint_filter_fn(bad, model)


@pytest.mark.parity
def test_glip_t_backbone_keys_and_shapes_equal_official(parity_dir):
    official = {k: tuple(v["shape"]) for k, v in json.loads((parity_dir / "keys_glip_t.json").read_text()).items()
                if k.startswith("backbone.")}
    with torch.device("meta"):  # shapes only
        encoder = build_image_encoder("swin_tiny")
    ours = {f"backbone.{k}": tuple(v.shape) for k, v in image_to_official_state_dict(encoder).items()}
    assert ours == official
    # and the other direction: official-shaped tensors map onto exactly our keys
    sd = {k[len("backbone."):]: torch.zeros(s, dtype=torch.int64 if k.endswith("index") else torch.float32)
          for k, s in official.items()}
    sd.update({k: v for k, v in image_to_official_state_dict(encoder).items() if k.endswith("index")})
    mapped = image_checkpoint_filter_fn(sd, encoder)
    assert set(mapped) == set(encoder.state_dict())


def test_parameter_counts_match_spec():
    """docs/official_model.md#variants: backbone.body / backbone.fpn parameter counts of GLIP-T and GLIP-L."""
    with torch.device("meta"):
        tiny = build_image_encoder("swin_tiny")
    assert sum(p.numel() for p in tiny.body.parameters()) == 27_520_506
    assert sum(p.numel() for p in tiny.fpn.parameters()) == 3_295_232
    with torch.device("meta"):
        large = build_image_encoder("swin_large")
    assert sum(p.numel() for p in large.body.parameters()) == 195_200_820
    assert sum(p.numel() for p in large.fpn.parameters()) == 3_639_296


def test_swin_large_key_facts():
    """docs/official_model.md#image-encoder facts about the GLIP-L Swin layout."""
    with torch.device("meta"):
        large = build_image_encoder("swin_large")
    sd = {k: tuple(v.shape) for k, v in image_to_official_state_dict(large).items()}
    assert sd["body.patch_embed.proj.weight"] == (192, 3, 4, 4)
    assert sd["body.layers.0.blocks.0.attn.relative_position_bias_table"] == (529, 6)
    assert sd["body.layers.3.blocks.1.attn.relative_position_bias_table"] == (529, 48)
    assert sd["body.layers.2.blocks.17.attn.relative_position_index"] == (144, 144)
    assert "body.layers.2.blocks.18.norm1.weight" not in sd
    assert sd["body.layers.3.blocks.0.attn.qkv.weight"] == (4608, 1536)
    assert sd["body.layers.2.downsample.reduction.weight"] == (1536, 3072)
    assert "body.layers.3.downsample.reduction.weight" not in sd
    assert [sd[f"body.norm{i}.weight"] for i in (1, 2, 3)] == [(384,), (768,), (1536,)]
    assert "body.norm0.weight" not in sd
    assert [sd[f"fpn.fpn_inner{i}.weight"][1] for i in (2, 3, 4)] == [384, 768, 1536]
    assert all(b.window_size == (12, 12) for s in large.body.layers for b in s.blocks)


# ------------------------------------------------------------------------------------------------ freezing
def test_frozen_stages_official_semantics():
    model = SwinBackbone(TINY, frozen_stages=2)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("patch_embed.", "layers.0.blocks.", "layers.1.downsample."))}
    assert frozen == expected  # stage 0 *and* the patch merging that ends it (official layers[0])
    model.train()
    assert not model.patch_embed.training and not model.layers[0].blocks.training
    assert not model.layers[1].downsample.training
    assert model.layers[1].blocks.training and model.norm1.training

    only_embed = SwinBackbone(TINY, frozen_stages=0)
    assert {n for n, p in only_embed.named_parameters() if not p.requires_grad} == {
        n for n, _ in only_embed.named_parameters() if n.startswith("patch_embed.")}
    assert all(p.requires_grad for p in SwinBackbone(TINY).parameters())


def test_variant_default_freezing():
    with torch.device("meta"):
        large = build_image_encoder("swin_large")
    assert large.body.frozen_stages == 2
    assert not large.body.layers[0].blocks[0].attn.qkv.weight.requires_grad
    assert large.body.layers[1].blocks[0].attn.qkv.weight.requires_grad
    with torch.device("meta"):
        tiny = build_image_encoder("swin_tiny")
    assert tiny.body.frozen_stages == -1 and all(p.requires_grad for p in tiny.parameters())


def test_drop_path_rates_are_linear_over_all_blocks():
    model = SwinBackbone(SwinConfig(16, (2, 2, 2, 2), (1, 2, 2, 4), drop_path_rate=0.7))
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for s in model.layers for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.7, 8))


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    model = SwinBackbone(TINY).eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    ref = model(x)[-1].sum()
    (g_ref,) = torch.autograd.grad(ref, x)
    model.set_grad_checkpointing(True)
    out = model(x)[-1].sum()
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, g_ref)
