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
    """BiAttentionBlockForCheckpoint restated from docs/official_model.md (X-MHA) (float64): LN both inputs, project, Q scaled after
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
    assert all(torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last) for a, b in zip(feats, back))
    single = split_levels(tokens[:1], sizes)  # one image: views of the tokens
    assert all(b.data_ptr() == tokens[:1, start].data_ptr() for b, start in zip(single, (0, 24, 30)))
    with pytest.raises(ValueError, match="tokens must have shape"):
        split_levels(tokens[:, :-1], sizes)


def test_vlfuse_equals_the_official_block_on_row_major_tokens():
    """VLFuse against the literal float64 block on tokens gathered by explicit loops (levels in order, y then x)."""
    fuse = _randomize(VLFuse(8, 12, 16, 2)).double().eval()
    g = torch.Generator().manual_seed(3)
    sizes = [(4, 6), (2, 3), (1, 2)]
    feats = [torch.randn(2, 8, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    lang = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        out_feats, out_lang = fuse(feats, lang, mask)
    tokens = torch.stack([torch.stack([f[b, :, y, x] for f, (h, w) in zip(feats, sizes)
                                       for y in range(h) for x in range(w)]) for b in range(2)])
    sd = {k[len("b_attn."):]: t.detach() for k, t in fuse.state_dict().items()}
    want_v, want_l = block_literal(sd, tokens, lang, mask, heads=2)
    assert torch.allclose(out_lang, want_l, atol=1e-12)
    n = 0
    for f, (h, w) in zip(out_feats, sizes):
        assert f.shape == (2, 8, h, w)
        for y in range(h):
            for x in range(w):
                assert torch.allclose(f[:, :, y, x], want_v[:, n], atol=1e-12), (h, w, y, x)
                n += 1


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
    assert (official_l - ref_l).abs().max() > 1e-4  # quirk 1: the text update does


def test_level_image_masks_are_the_cells_of_the_image_alone():
    # batch padded to 96 x 128; strides 8, 16, 32, 64 (the last one a stride-2 conv of the stride-32 level)
    feature_sizes = [(12, 16), (6, 8), (3, 4), (2, 2)]
    masks = level_image_masks([(96, 128), (33, 40), (64, 1)], feature_sizes, [8, 16, 32, 64], size_divisibility=32)
    assert [tuple(m.shape) for m in masks] == [(3, h, w) for h, w in feature_sizes]
    assert all(m[0].all() for m in masks)  # the largest image fills the batch
    # 33 x 40 alone is padded to 64 x 64 -> 8x8, 4x4, 2x2, 1x1 cells
    # 64 x 1 alone is padded to 64 x 32 -> 8x4, 4x2, 2x1, 1x1 cells
    for m, (rows1, cols1), (rows2, cols2) in zip(masks, [(8, 8), (4, 4), (2, 2), (1, 1)],
                                                 [(8, 4), (4, 2), (2, 1), (1, 1)]):
        for image, (rows, cols) in ((1, (rows1, cols1)), (2, (rows2, cols2))):
            expected = torch.zeros(m.shape[1:], dtype=torch.bool)
            expected[:rows, :cols] = True
            assert torch.equal(m[image], expected), (image, m.shape)
    # without batch padding rounding, 33 x 40 keeps ceil(33 / 8) = 5 rows at stride 8
    assert masks[0][1].sum() == 64
    assert level_image_masks([(33, 40)], [(5, 5)], [8], size_divisibility=1)[0].all()
    with pytest.raises(ValueError, match="2 feature sizes but 1 strides"):
        level_image_masks([(8, 8)], [(1, 1), (1, 1)], [8])
    # a (B, 2) tensor of sizes (an exported graph's input) gives the same masks
    as_tensor = level_image_masks(torch.tensor([(96, 128), (33, 40), (64, 1)]), feature_sizes, [8, 16, 32, 64],
                                  size_divisibility=32)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, masks))


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
    ("glip_t", 18, 91_853_352), ("glip_l", 24, 122_471_136), ("glip_t_a", 6, 11_503_656)])
def test_presets_structure_and_parameter_counts(preset, n_modules, n_params):
    with torch.device("meta"):
        enc = getattr(FusionEncoder, preset)()
    assert len(enc) == n_modules
    assert sum(p.numel() for p in enc.parameters()) == n_params  # docs/official_model.md#variants
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


def test_minilm_sized_text_tower_is_invariant_to_text_padding():
    """A 384-wide, 12-head text tower (MiniLM-sized): padding the text with more tokens leaves the image features
    and every real token's output unchanged (padded keys are masked in X-MHA and the BERT layer)."""
    enc = _randomize(FusionEncoder(num_blocks=2, in_channels=16, channels=16, lang_dim=384, embed_dim=32, num_heads=2,
                                   bert_num_heads=12, bert_intermediate_size=1536), seed=5, std=0.05).double().eval()
    feats, _, _ = _tiny_inputs()
    feats = [f.double() for f in feats]
    g = torch.Generator().manual_seed(6)
    lang = torch.randn(2, 6, 384, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    longer = torch.cat([lang, torch.randn(2, 4, 384, generator=g, dtype=torch.float64)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        short, long = enc(feats, lang, mask), enc(feats, longer, longer_mask)
    for a, b in zip(short.features, long.features):
        assert torch.allclose(a, b, atol=1e-10)
    real = mask.bool()
    assert torch.allclose(short.lang_hidden[real], long.lang_hidden[:, :6][real], atol=1e-10)
    # and the text really is fused: the image features move the text
    with torch.no_grad():
        other = enc([f + torch.randn(f.shape, generator=g, dtype=f.dtype) for f in feats], lang, mask)
    assert (other.lang_hidden[real] - short.lang_hidden[real]).abs().max() > 1e-3


def test_dyconv_only_tower_passes_text_through():
    enc = FusionEncoder(num_blocks=2, early_fusion=False, in_channels=16, channels=16).eval()
    feats, lang, _ = _tiny_inputs()
    out = enc(feats, lang, output_intermediates=True)
    assert out.lang_hidden is lang and len(out.intermediates) == 2
    assert all(torch.equal(a, b) for a, b in zip(out.features, enc[1](enc[0](feats))))
    assert FusionEncoder(num_blocks=1, early_fusion=False, in_channels=16, channels=16)(feats).lang_hidden is None


def test_encoder_errors():
    enc = _small_encoder(num_blocks=1)
    feats, lang, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="lang_hidden"):
        enc(feats)
    with pytest.raises(ValueError, match="FusionConfig.offset_mode must be one of"):
        FusionEncoder(offset_mode="official_v2")
    with pytest.raises(ValueError, match="FusionConfig.backend must be one of"):
        FusionEncoder(backend="flash")
    with pytest.raises(ValueError, match="FusionConfig.num_blocks must be a positive integer"):
        FusionEncoder(num_blocks=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        FusionEncoder(fusion_dropout=0.1)
    with pytest.raises(ValueError, match="image_masks has 1 levels"):
        enc(feats, lang, mask, image_masks=[torch.ones(2, 8, 8, dtype=torch.bool)])
