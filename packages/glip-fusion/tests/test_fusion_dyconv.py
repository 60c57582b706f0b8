"""DyConv against an independent float64 restatement: a naive DCNv2 sampler (emulating the official kernel's raw
offset reads for the coarser level), hand-written GroupNorm, align_corners=True upsampling, scale-aware attention and
DyReLU."""

import math

import pytest
import torch

from glip_fusion import DyConv
from glip_fusion.dyconv import DyReLU

SIZES = [(6, 8), (3, 4), (2, 2)]  # each level is the stride-2 (ceil) size of the previous one
C = 16


# ----------------------------------------------------------------------------------------------------------------
# independent restatement


def bilinear_zero_outside(img, y, x):
    """Sample ``img (C, H, W)`` at real (y, x): DCN rule — nothing unless -1 < y < H and -1 < x < W, and corners
    outside the map count as 0."""
    Cc, H, W = img.shape
    if not (-1 < y < H and -1 < x < W):
        return torch.zeros(Cc, dtype=img.dtype)
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    out = torch.zeros(Cc, dtype=img.dtype)
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                out = out + wy * wx * img[:, yy, xx]
    return out


def naive_mdcn(x, weight, bias, stride, out_hw, offset_at, mask_at):
    """Modulated deformable 3x3 conv, padding 1, by explicit loops. ``offset_at(b, channel, oy, ox)`` and
    ``mask_at(b, tap, oy, ox)`` read the offset / mask the way the kernel does."""
    B = x.shape[0]
    Ho, Wo = out_hw
    out = torch.zeros(B, weight.shape[0], Ho, Wo, dtype=x.dtype)
    for b in range(B):
        for oy in range(Ho):
            for ox in range(Wo):
                acc = bias.clone()
                for i in range(3):
                    for j in range(3):
                        t = 3 * i + j
                        py = oy * stride - 1 + i + float(offset_at(b, 2 * t, oy, ox))
                        px = ox * stride - 1 + j + float(offset_at(b, 2 * t + 1, oy, ox))
                        val = bilinear_zero_outside(x[b], py, px) * mask_at(b, t, oy, ox)
                        acc = acc + weight[:, :, i, j] @ val
                out[b, :, oy, ox] = acc
    return out


def group_norm(x, groups, w, b, eps=1e-5):
    B, Cc, H, W = x.shape
    g = x.reshape(B, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean) ** 2).mean(-1, keepdim=True)
    return ((g - mean) / torch.sqrt(var + eps)).reshape(B, Cc, H, W) * w[:, None, None] + b[:, None, None]


def upsample_align_corners(x, size):
    B, Cc, h, w = x.shape
    H, W = size
    out = torch.zeros(B, Cc, H, W, dtype=x.dtype)
    for Y in range(H):
        sy = Y * (h - 1) / (H - 1) if H > 1 else 0.0
        for X in range(W):
            sx = X * (w - 1) / (W - 1) if W > 1 else 0.0
            y0, x0 = min(int(math.floor(sy)), h - 1), min(int(math.floor(sx)), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ly, lx = sy - y0, sx - x0
            out[:, :, Y, X] = ((1 - ly) * (1 - lx) * x[:, :, y0, x0] + (1 - ly) * lx * x[:, :, y0, x1]
                               + ly * (1 - lx) * x[:, :, y1, x0] + ly * lx * x[:, :, y1, x1])
    return out


def hsig(z):
    return torch.clamp(z + 3, 0, 6) / 6


def naive_dyconv(sd, feats, mode):
    """DyConv (docs/official_model.md#dyconv) from a state_dict, float64."""
    L = len(feats)
    offs = []
    for f in feats:
        om = torch.nn.functional.conv2d(f, sd["offset.weight"], sd["offset.bias"], padding=1)
        offs.append((om[:, :18], torch.sigmoid(om[:, 18:])))

    def term(idx, src, stride, out_hw, off, msk, raw):
        if raw:  # the kernel reads the per-sample buffer with the OUTPUT's strides (h, w)
            h, w = out_hw
            flat_o, flat_m = off.reshape(off.shape[0], -1), msk.reshape(msk.shape[0], -1)
            oa = lambda b, c, y, x: flat_o[b, (c * h + y) * w + x]
            ma = lambda b, t, y, x: flat_m[b, (t * h + y) * w + x]
        else:
            oa = lambda b, c, y, x: off[b, c, y, x]
            ma = lambda b, t, y, x: msk[b, t, y, x]
        y = naive_mdcn(src, sd[f"DyConv.{idx}.conv.weight"], sd[f"DyConv.{idx}.conv.bias"], stride, out_hw, oa, ma)
        return group_norm(y, 16, sd[f"DyConv.{idx}.bn.weight"], sd[f"DyConv.{idx}.bn.bias"])

    outs = []
    for l, x in enumerate(feats):
        H, W = x.shape[-2:]
        off, msk = offs[l]
        terms = [term(1, x, 1, (H, W), off, msk, False)]
        if l > 0:
            terms.append(term(2, feats[l - 1], 2, (H, W), off, msk, False))
        if l < L - 1:
            hw = tuple(feats[l + 1].shape[-2:])
            if mode == "official":
                t = term(0, feats[l + 1], 1, hw, off, msk, True)
            else:
                t = term(0, feats[l + 1], 1, hw, *offs[l + 1], False)
            terms.append(upsample_align_corners(t, (H, W)))
        weighted = []
        for t in terms:
            g = t.mean(dim=(2, 3))  # (B, C): pooled over the whole map
            a = hsig(torch.relu(g @ sd["AttnConv.1.weight"].reshape(-1) + sd["AttnConv.1.bias"]))  # (B,)
            weighted.append(t * a[:, None, None, None])
        y = sum(weighted) / len(weighted)
        g = y.mean(dim=(2, 3))
        z = hsig(torch.relu(g @ sd["relu.fc.0.weight"].T + sd["relu.fc.0.bias"]) @ sd["relu.fc.2.weight"].T
                 + sd["relu.fc.2.bias"])
        a1, b1, a2, b2 = (z[:, i * C:(i + 1) * C, None, None] for i in range(4))
        outs.append(torch.maximum(y * (2 * (a1 - 0.5) + 1) + (b1 - 0.5), y * (2 * (a2 - 0.5)) + (b2 - 0.5)))
    return outs


# ----------------------------------------------------------------------------------------------------------------


def _model_and_inputs(mode, seed=0, dcn_impl="auto"):
    torch.manual_seed(seed)
    m = DyConv(C, C, offset_mode=mode, dcn_impl=dcn_impl).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bn.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name == "offset.weight":  # offsets of order 1-2 pixels: fractional, some outside the map
                p.copy_(0.15 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    feats = [torch.randn(2, C, h, w, generator=g, dtype=torch.float64) for h, w in SIZES]
    return m, feats


@pytest.mark.parametrize("dcn_impl", ["gather", "torchvision"])
@pytest.mark.parametrize("mode", ["official", "per_level"])
def test_dyconv_matches_naive_restatement(mode, dcn_impl):
    m, feats = _model_and_inputs(mode, dcn_impl=dcn_impl)
    with torch.no_grad():
        got = m(feats)
    want = naive_dyconv({k: v.detach() for k, v in m.state_dict().items()}, feats, mode)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-10, rtol=1e-10), (g - w).abs().max()


def test_offset_modes_differ_only_where_the_coarser_conv_is_used():
    m, feats = _model_and_inputs("official")
    per = DyConv(C, C, offset_mode="per_level").double().eval()
    per.load_state_dict(m.state_dict())
    with torch.no_grad():
        a, b = m(feats), per(feats)
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[1] - b[1]).abs().max() > 1e-3
    assert torch.equal(a[-1], b[-1])  # the coarsest level has no coarser neighbour


def test_plain_conv_variant_equals_deformable_with_zero_offsets_and_unit_mask():
    m, feats = _model_and_inputs("official")
    plain = DyConv(C, C, use_deform=False).double().eval()
    assert "offset.weight" not in plain.state_dict()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("offset.")})
    with torch.no_grad():
        m.offset.weight.zero_()
        m.offset.bias.copy_(torch.tensor([0.0] * 18 + [60.0] * 9, dtype=torch.float64))  # sigmoid(60) == 1.0
        for a, b in zip(m(feats), plain(feats)):
            assert torch.allclose(a, b, atol=1e-12)


def test_flags_off_key_layout_and_relu():
    m = DyConv(C, C, use_deform=False, use_dyfuse=False, use_dyrelu=False)
    keys = set(m.state_dict())
    assert keys == {f"DyConv.{i}.{n}.{p}" for i in range(3) for n in ("conv", "bn") for p in ("weight", "bias")}
    out = m([torch.randn(1, C, 4, 4), torch.randn(1, C, 2, 2)])
    assert all((o >= 0).all() for o in out)  # plain ReLU at the end
    full = DyConv(C, C)
    assert {"AttnConv.1.weight", "AttnConv.1.bias", "relu.fc.0.weight", "relu.fc.2.weight", "offset.weight"} <= set(
        full.state_dict())
    assert full.relu.fc[2].weight.shape == (4 * C, C // 4)


def test_dyrelu_equals_its_formula():
    """``max(x * (2(a1 - .5) + 1) + (b1 - .5), x * 2(a2 - .5) + (b2 - .5))`` with ``(a1, b1, a2, b2)`` from the pooled
    input through Linear -> ReLU -> Linear -> hard sigmoid, written out in float64 (random weights: some coefficients
    saturate, some do not)."""
    g = torch.Generator().manual_seed(7)
    r = DyReLU(8).double()
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(3, 8, 5, 5, generator=g, dtype=torch.float64)
    hidden = torch.relu(x.mean(dim=(2, 3)) @ r.fc[0].weight.T + r.fc[0].bias)  # (B, C/4)
    coeffs = hsig(hidden @ r.fc[2].weight.T + r.fc[2].bias)  # (B, 4C)
    assert ((coeffs > 0) & (coeffs < 1)).any() and ((coeffs == 0) | (coeffs == 1)).any()
    a1, b1, a2, b2 = (c[:, :, None, None] for c in coeffs.split(8, dim=1))
    want = torch.maximum(x * (2 * (a1 - 0.5) + 1) + (b1 - 0.5), x * (2 * (a2 - 0.5)) + (b2 - 0.5))
    torch.testing.assert_close(r(x), want, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        r.fc[2].weight.zero_()
        r.fc[2].bias.zero_()  # hsigmoid(0) = 0.5 -> a1' = 1, a2' = 0, b = 0  ->  ReLU
    assert torch.equal(r(x), torch.relu(x))


def test_size_and_channel_errors():
    m = DyConv(C, C)
    with pytest.raises(ValueError, match="must have shape"):
        m([torch.randn(1, C + 1, 4, 4)])
    with pytest.raises(ValueError, match="levels must halve"):
        m([torch.randn(1, C, 8, 8), torch.randn(1, C, 3, 3)])
    with pytest.raises(ValueError, match="offset_mode"):
        DyConv(C, C, offset_mode="crop")
    with pytest.raises(ValueError, match="in_channels == out_channels"):
        DyConv(C, 2 * C)


@pytest.mark.parametrize("mode", ["official", "per_level"])
def test_gradients_equal_central_differences(mode):
    """The backward of every parameter and input (float64) against central differences of the forward, along one
    random direction per tensor: ``(L(t + eps u) - L(t - eps u)) / 2 eps`` vs ``<dL/dt, u>``."""
    m, feats = _model_and_inputs(mode)
    g = torch.Generator().manual_seed(11)
    cotangents = [torch.randn(f.shape, generator=g, dtype=f.dtype) for f in feats]
    named = [(f"feature{i}", f.requires_grad_()) for i, f in enumerate(feats)] + list(m.named_parameters())

    def loss():
        return sum((o * c).sum() for o, c in zip(m(feats), cotangents))

    grads = torch.autograd.grad(loss(), [t for _, t in named])
    eps = 1e-6
    with torch.no_grad():
        for (name, t), grad in zip(named, grads):
            u = torch.randn(t.shape, generator=g, dtype=t.dtype)
            t.add_(eps * u)
            up = loss()
            t.sub_(2 * eps * u)
            down = loss()
            t.add_(eps * u)
            numeric, analytic = float((up - down) / (2 * eps)), float((grad * u).sum())
            # truncation ~ eps^2 times the third derivative, rounding ~ 1e-16 * |L| / eps: about 1e-9 of the slope
            # here (the convs' biases get exactly 0: GroupNorm removes a constant)
            assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic)), (name, numeric, analytic)


def test_deformable_conv_runs_in_float32_under_autocast():
    from glip_fusion.dyconv import ModulatedDeformConv3x3

    conv = ModulatedDeformConv3x3(4, 6)
    x = torch.randn(1, 4, 5, 5).bfloat16()
    off, msk = torch.randn(1, 18, 5, 5).bfloat16(), torch.rand(1, 9, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x, off, msk)
    assert y.dtype == torch.float32  # the official op is custom_fwd(cast_inputs=float32)
    assert torch.equal(y, conv(x.float(), off.float(), msk.float()))
