"""X-MHA modules, VLFuse and the FusionEncoder: official formulation, key layout, options."""

import json

import pytest
import torch
import torch.nn.functional as F

from glip_fusion import (BertEncoderLayer, BiAttentionBlock, BiMultiHeadAttention, DyConv, FusionEncoder,
                         FusionEncoderOutput, VLFuse, flatten_levels, level_image_masks, split_levels)


def _randomize(module, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            base = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def block_literal(sd, v, l, int_mask, heads):
    """BiAttentionBlockForCheckpoint restated from spec §2.5(a)/§3 (float64): LN both inputs, project, Q scaled after
    the bias, S = QK^T clamped, text direction = softmax over N of (S^T - rowmax, clamped again) with no mask,
    vision direction = softmax over M of S + {1 | -9e15}, out projections, residual on the layer-normed inputs."""
    B, N, _ = v.shape
    M = l.shape[1]
    lin = lambda x, n: x @ sd[n + ".weight"].T + sd[n + ".bias"]
    vn = F.layer_norm(v, v.shape[-1:], sd["layer_norm_v.weight"], sd["layer_norm_v.bias"], eps=1e-5)
    ln = F.layer_norm(l, l.shape[-1:], sd["layer_norm_l.weight"], sd["layer_norm_l.bias"], eps=1e-5)
    E = sd["attn.v_proj.weight"].shape[0]
    d = E // heads
    q = lin(vn, "attn.v_proj") * d ** -0.5
    k, vv, vl = lin(ln, "attn.l_proj"), lin(vn, "attn.values_v_proj"), lin(ln, "attn.values_l_proj")
    shape = lambda x, L: x.view(B, L, heads, d).transpose(1, 2).reshape(B * heads, L, d)
    q, k, vv, vl = shape(q, N), shape(k, M), shape(vv, N), shape(vl, M)
    s = torch.bmm(q, k.transpose(1, 2)).clamp(min=-50000).clamp(max=50000)
    st = s.transpose(1, 2)
    st = (st - st.max(dim=-1, keepdim=True)[0]).clamp(min=-50000).clamp(max=50000)
    p_l = st.softmax(-1)
    add = int_mask[:, None, None, :].expand(B, 1, N, M).to(s.dtype)
    add = add.masked_fill(add == 0, -9e15)
    s = (s.view(B, heads, N, M) + add).view(B * heads, N, M)
    p_v = s.softmax(-1)
    o_v = torch.bmm(p_v, vl).view(B, heads, N, d).transpose(1, 2).reshape(B, N, E)
    o_l = torch.bmm(p_l, vv).view(B, heads, M, d).transpose(1, 2).reshape(B, M, E)
    return vn + sd["gamma_v"] * lin(o_v, "attn.out_v_proj"), ln + sd["gamma_l"] * lin(o_l, "attn.out_l_proj")


# ----------------------------------------------------------------------------------------------------------------
# BiMultiHeadAttention / BiAttentionBlock


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_block_matches_official_literal(backend):
    block = _randomize(BiAttentionBlock(12, 20, 32, 4, backend=backend).double().eval())
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, 15, 12, generator=g, dtype=torch.float64)
    l = torch.randn(2, 6, 20, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    sd = {k: t.detach() for k, t in block.state_dict().items()}
    with torch.no_grad():
        got_v, got_l = block(v, l, mask)
    want_v, want_l = block_literal(sd, v, l, mask, heads=4)
    assert torch.allclose(got_v, want_v, atol=1e-12) and torch.allclose(got_l, want_l, atol=1e-12)


def test_residual_is_added_to_the_layer_normed_input():
    block = _randomize(BiAttentionBlock(12, 20, 32, 4)).eval()
    with torch.no_grad():
        block.gamma_v.zero_()
        block.gamma_l.zero_()
    v, l = torch.randn(1, 7, 12) * 5 + 3, torch.randn(1, 4, 20) * 5 - 2
    out_v, out_l = block(v, l, torch.ones(1, 4))
    assert torch.allclose(out_v, block.layer_norm_v(v)) and torch.allclose(out_l, block.layer_norm_l(l))
    assert not torch.allclose(out_v, v, atol=1e-2)


def test_official_init_and_names():
    block = BiAttentionBlock(256, 768, 2048, 8, init_values=1 / 6)
    assert torch.all(block.gamma_v == 1 / 6) and block.gamma_l.shape == (768,) and torch.all(block.gamma_l == 1 / 6)
    attn = block.attn
    for name in ("v_proj", "l_proj", "values_v_proj", "values_l_proj", "out_v_proj", "out_l_proj"):
        lin = getattr(attn, name)
        bound = (6.0 / (lin.in_features + lin.out_features)) ** 0.5  # xavier-uniform
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
        assert torch.all(lin.bias == 0)
    assert attn.scale == 256 ** -0.5
    with pytest.raises(ValueError, match="divisible"):
        BiMultiHeadAttention(8, 8, 30, 4)
    with pytest.raises(ValueError, match=r"v must have shape \(B, N, v_dim=256\)"):
        attn(torch.randn(1, 5, 255), torch.randn(1, 3, 768))


def test_dropout_in_training_only():
    mha = _randomize(BiMultiHeadAttention(8, 8, 16, 2, dropout=0.5))
    v, l = torch.randn(1, 9, 8), torch.randn(1, 4, 8)
    mha.eval()
    assert torch.equal(mha(v, l)[0], mha(v, l)[0])
    mha.train()
    torch.manual_seed(0)
    assert not torch.equal(mha(v, l)[0], mha(v, l)[0])


# ----------------------------------------------------------------------------------------------------------------
# VLFuse


def test_flatten_split_round_trip_and_row_major_order():
    feats = [torch.randn(2, 5, h, w) for h, w in [(4, 6), (2, 3), (1, 2)]]
    tokens, sizes = flatten_levels(feats)
    assert tokens.shape == (2, 24 + 6 + 2, 5) and sizes == [(4, 6), (2, 3), (1, 2)]
    assert torch.equal(tokens[1, 1 * 6 + 4], feats[0][1, :, 1, 4])  # level 0, y=1, x=4
    assert torch.equal(tokens[0, 24 + 1 * 3 + 2], feats[1][0, :, 1, 2])  # level 1, y=1, x=2
    assert torch.equal(tokens[0, 30 + 1], feats[2][0, :, 0, 1])
    back = split_levels(tokens, sizes)
    assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(feats, back))
    with pytest.raises(ValueError, match="tokens must have shape"):
        split_levels(tokens[:, :-1], sizes)


def test_vlfuse_equals_block_on_flattened_tokens():
    fuse = _randomize(VLFuse(8, 12, 16, 2)).eval()
    feats = [torch.randn(2, 8, h, w) for h, w in [(4, 6), (2, 3), (1, 2)]]
    lang, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out_feats, out_lang = fuse(feats, lang, mask)
    tokens, sizes = flatten_levels(feats)
    v, l = fuse.b_attn(tokens, lang, mask)
    assert torch.allclose(out_lang, l)
    assert all(torch.allclose(a, b) for a, b in zip(out_feats, split_levels(v, sizes)))
    assert [f.shape for f in out_feats] == [f.shape for f in feats]


def _padded_pair(seed=0):
    """One image's 3-level features, and the same image zero/garbage-padded at the bottom/right inside a batch."""
    g = torch.Generator().manual_seed(seed)
    small = [(4, 6), (2, 3), (1, 2)]
    big = [(6, 8), (3, 4), (2, 2)]
    feats = [torch.randn(1, 8, h, w, generator=g, dtype=torch.float64) for h, w in small]
    padded, masks = [], []
    for f, (H, W) in zip(feats, big):
        p = torch.randn(1, 8, H, W, generator=g, dtype=torch.float64)  # arbitrary values in the padding
        p[:, :, : f.shape[2], : f.shape[3]] = f
        m = torch.zeros(1, H, W, dtype=torch.bool)
        m[:, : f.shape[2], : f.shape[3]] = True
        padded.append(p)
        masks.append(m)
    return feats, padded, masks


def test_image_mask_gives_batch_invariant_outputs_and_official_mode_does_not():
    fuse = _randomize(VLFuse(8, 12, 16, 2)).double().eval()
    feats, padded, masks = _padded_pair()
    lang = torch.randn(1, 5, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    ref_v, ref_l = fuse(feats, lang, mask)
    clean_v, clean_l = fuse(padded, lang, mask, image_masks=masks)
    official_v, official_l = fuse(padded, lang, mask)
    assert torch.allclose(clean_l, ref_l, atol=1e-12)
    for r, c, o in zip(ref_v, clean_v, official_v):
        h, w = r.shape[-2:]
        assert torch.allclose(c[..., :h, :w], r, atol=1e-12)
        assert torch.allclose(o[..., :h, :w], r, atol=1e-12)  # the visual update never reads image padding
    assert (official_l - ref_l).abs().max() > 1e-4  # quirk §12.1: the text update does


def test_level_image_masks():
    pixel = torch.zeros(2, 48, 64, dtype=torch.bool)
    pixel[0] = True
    pixel[1, :32, :40] = True
    lv = level_image_masks(pixel, [(6, 8), (3, 4), (2, 2)])
    assert [m.shape for m in lv] == [(2, 6, 8), (2, 3, 4), (2, 2, 2)]
    assert lv[0][0].all() and lv[1][0].all()
    exp0 = torch.zeros(6, 8, dtype=torch.bool)
    exp0[:4, :5] = True  # 32/8 rows, ceil(40/8) = 5 columns
    assert torch.equal(lv[0][1], exp0)
    exp1 = torch.zeros(3, 4, dtype=torch.bool)
    exp1[:2, :3] = True  # rows [0,16),[16,32) real; columns up to 40 -> cells 0..2 (cell 2 = [32, 48))
    assert torch.equal(lv[1][1], exp1)


def test_gradient_checkpointing_recomputes_and_matches():
    def run(use_ckpt):
        fuse = _randomize(VLFuse(8, 12, 16, 2, dropout=0.3, use_checkpoint=use_ckpt), seed=4).train()
        calls = []
        inner = fuse.b_attn.attn.forward  # count the attention's runs (module hooks do not fire on recompute)
        fuse.b_attn.attn.forward = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
        g = torch.Generator().manual_seed(2)
        feats = [torch.randn(2, 8, h, w, generator=g).requires_grad_() for h, w in [(4, 6), (2, 3)]]
        lang = torch.randn(2, 5, 12, generator=g).requires_grad_()
        torch.manual_seed(123)  # the dropout masks
        out_feats, out_lang = fuse(feats, lang, torch.ones(2, 5))
        (sum(f.square().sum() for f in out_feats) + out_lang.square().sum()).backward()
        grads = [lang.grad] + [f.grad for f in feats] + [p.grad for p in fuse.parameters()]
        return out_lang, grads, len(calls)

    out_a, grads_a, calls_a = run(False)
    out_b, grads_b, calls_b = run(True)
    assert calls_a == 1 and calls_b == 2  # checkpointing re-runs the block in backward
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# FusionEncoder


def test_glip_t_key_layout_matches_official_checkpoint(parity_dir):
    keys_file = parity_dir / "keys_glip_t.json"
    official = json.loads(keys_file.read_text())
    prefix = "rpn.head.dyhead_tower."
    want = {k[len(prefix):]: tuple(v["shape"]) for k, v in official.items() if k.startswith(prefix)}
    with torch.device("meta"):
        enc = FusionEncoder.glip_t()
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(want) == 324
    assert set(got) == set(want), (sorted(set(got) - set(want))[:5], sorted(set(want) - set(got))[:5])
    assert {k: s for k, s in got.items() if want[k] != s} == {}


@pytest.mark.parametrize("preset,n_modules,n_params", [
    ("glip_t", 18, 91_853_352), ("glip_l", 24, 122_471_136), ("GLIP-T(A)", 6, 11_503_656)])
def test_presets_structure_and_parameter_counts(preset, n_modules, n_params):
    with torch.device("meta"):
        enc = FusionEncoder.from_preset(preset)
    assert len(enc) == n_modules
    assert sum(p.numel() for p in enc.parameters()) == n_params  # spec §1.3
    if n_modules == 6:
        assert all(isinstance(m, DyConv) for m in enc)
    else:
        kinds = [type(m) for m in enc]
        assert kinds == [VLFuse, BertEncoderLayer, DyConv] * (n_modules // 3)


SMALL = dict(in_channels=16, channels=16, lang_dim=24, embed_dim=16, num_heads=2, bert_num_heads=4,
             bert_intermediate_size=32)


def _small_encoder(**kw):
    return FusionEncoder(**{**SMALL, **kw})


def test_layer_scale_init_follows_block_count():
    assert torch.all(FusionEncoder.glip_l(**SMALL)[0].b_attn.gamma_v == 1 / 8)
    assert torch.all(FusionEncoder.glip_t(**SMALL)[3].b_attn.gamma_l == 1 / 6)
    assert torch.all(_small_encoder(num_blocks=2, init_values=0.5)[3].b_attn.gamma_v == 0.5)


def test_first_block_flags_rule():
    enc = _small_encoder(num_blocks=2, in_channels=8)
    first, second = enc[2], enc[5]
    assert first.offset is None and first.AttnConv is None and isinstance(first.relu, torch.nn.ReLU)
    assert second.offset is not None and second.AttnConv is not None
    assert enc[0].b_attn.attn.v_proj.in_features == 8 and enc[3].b_attn.attn.v_proj.in_features == 16


def _tiny_inputs(B=2, C=16, M=6, Cl=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, C, h, w, generator=g) for h, w in [(8, 8), (4, 4), (2, 2)]]
    return feats, torch.randn(B, M, Cl, generator=g), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])


def test_forward_intermediates_and_eval_determinism():
    enc = _small_encoder(num_blocks=2).eval()
    feats, lang, mask = _tiny_inputs()
    out = enc(feats, lang, mask, output_intermediates=True)
    assert isinstance(out, FusionEncoderOutput) and len(out.intermediates) == 6
    assert [f.shape for f in out.features] == [f.shape for f in feats] and out.lang_hidden.shape == lang.shape
    # intermediates are the module outputs, in order: replay the modules one by one
    v, l = feats, lang
    v, l = enc[0](v, l, mask)
    assert torch.equal(out.intermediates[0][1], l)
    l = enc[1](l, mask)
    assert torch.equal(out.intermediates[1][1], l) and out.intermediates[1][0] is out.intermediates[0][0]
    v = enc[2](v)
    assert all(torch.equal(a, b) for a, b in zip(out.intermediates[2][0], v))
    assert torch.equal(out.intermediates[-1][1], out.lang_hidden)
    again = enc(feats, lang, mask)
    assert all(torch.equal(a, b) for a, b in zip(out.features, again.features)) and again.intermediates is None


def test_minilm_sized_text_tower():
    enc = FusionEncoder(num_blocks=1, in_channels=16, channels=16, lang_dim=384, embed_dim=32, num_heads=2,
                        bert_num_heads=12, bert_intermediate_size=1536).eval()
    feats, _, mask = _tiny_inputs()
    lang = torch.randn(2, 6, 384)
    out = enc(feats, lang, mask)
    assert out.lang_hidden.shape == (2, 6, 384) and torch.isfinite(out.lang_hidden).all()


def test_dyconv_only_tower_passes_text_through():
    enc = FusionEncoder(num_blocks=2, early_fusion=False, in_channels=16, channels=16).eval()
    feats, lang, _ = _tiny_inputs()
    out = enc(feats, lang, output_intermediates=True)
    assert out.lang_hidden is lang and len(out.intermediates) == 2
    assert FusionEncoder(num_blocks=1, early_fusion=False, in_channels=16, channels=16)(feats).lang_hidden is None


def test_encoder_errors():
    enc = _small_encoder(num_blocks=1)
    feats, lang, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="lang_hidden"):
        enc(feats)
    with pytest.raises(ValueError, match="unknown FusionEncoder preset"):
        FusionEncoder.from_preset("glip_xl")
    with pytest.raises(ValueError, match="image_masks has 1 levels"):
        enc(feats, lang, mask, image_masks=[torch.ones(2, 8, 8, dtype=torch.bool)])
