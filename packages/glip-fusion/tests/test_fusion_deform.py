"""glip_fusion.deform_conv2d (row gather + GEMM) against torchvision.ops.deform_conv2d, an independent
implementation (im2col/col2im loops), in float64 (forward and the five gradients) and float32 (error bounds from the
sums of absolute terms), plus finite differences (gradcheck) and the DyConv call patterns."""

import pytest
import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from glip_fusion import DyConv, deform_conv2d, set_dcn_impl
from glip_fusion.dyconv import (DCN_IMPL_ENV_VAR, ModulatedDeformConv3x3, deform_conv2d_grid_sample,
                               resolve_dcn_impl)

F64 = dict(atol=1e-12, rtol=1e-12)  # float64 sums of at most a few thousand O(1) terms: ~1e-13 apart


def _offsets(B, K, Ho, Wo, H, W, stride, generator, dtype):
    """Offsets mixing fractional values, points far outside, exact integers and exact borders (-1, 0, H-1, H)."""
    off = 1.5 * torch.randn(B, K, 2, Ho, Wo, generator=generator, dtype=dtype)
    kinds = torch.randint(0, 4, (B, K, 1, Ho, Wo), generator=generator)
    off = torch.where(kinds == 1, off.round(), off)  # integer offsets: integer sampling points
    off = torch.where(kinds == 2, 4 * off, off)  # many points outside the map
    # exact borders: move the sampling point of some taps onto y or x in {-1, 0, H-1, H} (or the W equivalents)
    oy = torch.arange(Ho, dtype=dtype).view(Ho, 1) * stride - 1
    ox = torch.arange(Wo, dtype=dtype).view(1, Wo) * stride - 1
    ti = torch.arange(K).div(3, rounding_mode="floor").to(dtype).view(1, K, 1, 1)
    tj = (torch.arange(K) % 3).to(dtype).view(1, K, 1, 1)
    targets_y = torch.tensor([-1.0, 0.0, H - 1.0, float(H)], dtype=dtype)
    targets_x = torch.tensor([-1.0, 0.0, W - 1.0, float(W)], dtype=dtype)
    pick = torch.randint(0, 4, (B, K, Ho, Wo), generator=generator)
    border = kinds[:, :, 0] == 3
    off[:, :, 0] = torch.where(border, targets_y[pick] - oy - ti, off[:, :, 0])
    off[:, :, 1] = torch.where(border & (pick % 2 == 0), targets_x[pick] - ox - tj, off[:, :, 1])
    return off.view(B, 2 * K, Ho, Wo)


def _case(B, C, H, W, O, stride, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    off = _offsets(B, 9, Ho, Wo, H, W, stride, g, dtype)
    mask = torch.rand(B, 9, Ho, Wo, generator=g, dtype=dtype)
    weight = torch.randn(O, C, 3, 3, generator=g, dtype=dtype)
    bias = torch.randn(O, generator=g, dtype=dtype)
    grad_out = torch.randn(B, O, Ho, Wo, generator=g, dtype=dtype)
    return x, off, mask, weight, bias, grad_out


def _forward_backward(fn, x, off, mask, weight, bias, grad_out, stride, **kw):
    """Output and the gradients of (input, offset, mask, weight[, bias]) for the upstream gradient ``grad_out``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, off, mask, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[3], leaves[4], stride=stride, padding=1, mask=leaves[2], **kw)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
    return out.detach(), grads


NAMES = ("output", "d_input", "d_offset", "d_mask", "d_weight", "d_bias")


@pytest.mark.parametrize("B,C,H,W,O,stride", [
    (1, 4, 5, 7, 3, 1),
    (2, 5, 7, 9, 4, 1),  # odd sizes, batch > 1
    (2, 5, 7, 9, 4, 2),  # stride 2 (odd input: ceil)
    (3, 3, 8, 6, 5, 2),
    (1, 2, 1, 1, 2, 1),  # a 1x1 map: every tap but the centre reads outside
])
@pytest.mark.parametrize("chunk", [1, 1 << 22])  # one output position per chunk / one chunk per image
def test_float64_forward_and_all_gradients_equal_torchvision(B, C, H, W, O, stride, chunk):
    case = _case(B, C, H, W, O, stride, seed=B * 100 + H * 10 + stride)
    want = _forward_backward(tv_deform_conv2d, *case, stride)
    got = _forward_backward(deform_conv2d, *case, stride, chunk_elements=chunk)
    for name, a, b in zip(NAMES, (got[0], *got[1]), (want[0], *want[1])):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **F64, msg=lambda m: f"{name}: {m}")


def test_exact_integer_and_border_points_take_torchvision_one_sided_derivative():
    """At integer coordinates the bilinear sample is not differentiable; both ops take the cell starting there."""
    H, W = 4, 5
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 1, 1] = 1.0  # only the centre tap: the output at (0, 0) is the sample at (dy, dx)
    for dy, dx in [(-1.0, 2.0), (-1.0, 2.5), (2.0, -1.0), (0.0, 0.0), (2.0, 3.0), (3.0, 2.5), (4.0, 2.5),
                   (1.5, 5.0), (3.0, 4.0), (-1.0, -1.0), (-0.5, 4.5)]:
        off = torch.zeros(1, 18, H, W, dtype=torch.float64)
        off[0, 8, 0, 0], off[0, 9, 0, 0] = dy, dx
        mask = torch.ones(1, 9, H, W, dtype=torch.float64)
        g = torch.zeros(1, 1, H, W, dtype=torch.float64)
        g[0, 0, 0, 0] = 1.0
        want = _forward_backward(tv_deform_conv2d, x, off, mask, weight, None, g, 1)
        got = _forward_backward(deform_conv2d, x, off, mask, weight, None, g, 1)
        for name, a, b in zip(NAMES, (got[0], *got[1][:4]), (want[0], *want[1][:4])):
            torch.testing.assert_close(a, b, **F64, msg=lambda m: f"point {(dy, dx)} {name}: {m}")
    # hand-computed: on the cell [y0, y0 + 1] starting at an integer y, d sample / dy = x[y0 + 1] - x[y0]
    off = torch.zeros(1, 18, H, W, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        off[0, 8, 0, 0], off[0, 9, 0, 0] = 1.0, 2.0
    out = deform_conv2d(x, off, weight, None, padding=1, mask=torch.ones(1, 9, H, W, dtype=torch.float64))
    (d_off,) = torch.autograd.grad(out[0, 0, 0, 0], off)
    assert out[0, 0, 0, 0] == x[0, 0, 1, 2]
    assert torch.isclose(d_off[0, 8, 0, 0], x[0, 0, 2, 2] - x[0, 0, 1, 2])
    assert torch.isclose(d_off[0, 9, 0, 0], x[0, 0, 1, 3] - x[0, 0, 1, 2])


def test_float32_within_rounding_bounds_of_the_float64_result():
    """float32 errors bounded by n * eps * (sum of absolute terms), n the number of rounded operations per sum."""
    B, C, H, W, O = 2, 16, 9, 11, 8
    case64 = _case(B, C, H, W, O, 1, seed=7)
    x, off, mask, weight, bias, g = case64
    ref_out, ref_grads = _forward_backward(tv_deform_conv2d, *case64, 1)
    got_out, got_grads = _forward_backward(deform_conv2d, *(t.float() for t in case64), 1)
    # sums of absolute terms (everything nonnegative: the bilinear weights and the mask already are)
    abs_case = (x.abs(), off, mask, weight.abs(), bias.abs(), g.abs())
    abs_out, abs_grads = _forward_backward(tv_deform_conv2d, *abs_case, 1)
    eps = torch.finfo(torch.float32).eps
    # forward: 4 corners x 9 taps x C channels + bias; coordinates ~ H rounded once (weights off by eps * H)
    n_fwd = 4 * 9 * C + 1 + 2 * H
    assert ((got_out.double() - ref_out).abs() <= n_fwd * eps * abs_out).all()
    d_x, d_off, d_mask, d_w, d_b = (t.double() for t in got_grads)
    r_x, r_off, r_mask, r_w, r_b = ref_grads
    a_x, _, a_mask, a_w, a_b = abs_grads
    n_out = B * H * W  # the longest sums: over output positions (weight, bias) or over C_out x taps x corners
    assert ((d_x - r_x).abs() <= (4 * 9 * O + n_out) * eps * a_x + 1e-30).all()
    assert ((d_w - r_w).abs() <= (n_out + 2 * H) * eps * a_w).all()
    assert ((d_b - r_b).abs() <= n_out * eps * a_b).all()
    assert ((d_mask - r_mask).abs() <= (O * C + 2 * H) * eps * a_mask + 1e-30).all()
    # offsets: |d sample / dy| <= sum of the 4 corners' |x|, so sum_c |grad column| * 4 max|x| bounds the terms
    # sum_c |grad column (c, k)| <= sum_o (sum_c |weight[o, c, k]|) |grad_out[o]|
    grad_cols_abs = torch.einsum("ok,bohw->bkhw", weight.abs().sum(1).reshape(O, 9), g.abs())
    bound = 4 * x.abs().max() * mask * grad_cols_abs
    bound = torch.stack([bound, bound], dim=2).reshape_as(r_off)
    assert ((d_off - r_off).abs() <= (O * C + 2 * H) * eps * bound + 1e-30).all()


def test_gradcheck_against_finite_differences():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # fractional sampling points only (finite differences across a cell border would see the kink)
    off = (0.25 + 0.5 * torch.rand(2, 18, 2, 3, generator=g, dtype=torch.float64)
           + torch.randint(-2, 2, (2, 18, 2, 3), generator=g)).requires_grad_()
    mask = torch.rand(2, 9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: deform_conv2d(a[0], a[1], a[3], a[4], stride=2, padding=1, mask=a[2], chunk_elements=40)
    assert torch.autograd.gradcheck(fn, (x, off, mask, weight, bias), eps=1e-6, atol=1e-7, fast_mode=True)


def test_general_kernel_padding_dilation_and_unmodulated():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64)
    for stride, padding, dilation, masked in [((1, 2), (2, 0), (1, 2), True), (2, 0, 1, False), (1, 1, 3, True)]:
        Ho = (7 + 2 * (padding if isinstance(padding, int) else padding[0])
              - (dilation if isinstance(dilation, int) else dilation[0]) * 2 - 1) // (
                  stride if isinstance(stride, int) else stride[0]) + 1
        Wo = (6 + 2 * (padding if isinstance(padding, int) else padding[1])
              - (dilation if isinstance(dilation, int) else dilation[1]) - 1) // (
                  stride if isinstance(stride, int) else stride[1]) + 1
        off = 2 * torch.randn(2, 12, Ho, Wo, generator=g, dtype=torch.float64)
        mask = torch.rand(2, 6, Ho, Wo, generator=g, dtype=torch.float64) if masked else None
        leaves = [t.clone().requires_grad_() for t in (x, off, weight)]
        outs = [fn(leaves[0], leaves[1], leaves[2], None, stride=stride, padding=padding, dilation=dilation, mask=mask)
                for fn in (tv_deform_conv2d, deform_conv2d)]
        torch.testing.assert_close(outs[1], outs[0], **F64)
        gr = [torch.autograd.grad(o, leaves, torch.ones_like(o)) for o in outs]
        for a, b in zip(gr[1], gr[0]):
            torch.testing.assert_close(a, b, **F64)


def test_channels_last_input_gives_channels_last_output_and_same_values():
    x, off, mask, weight, bias, g = _case(2, 6, 6, 7, 5, 2, seed=11)
    want = _forward_backward(tv_deform_conv2d, x, off, mask, weight, bias, g, 2)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    out = deform_conv2d(x_cl, off, weight, bias, stride=2, padding=1, mask=mask)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want[0], **F64)
    (d_x,) = torch.autograd.grad(out, x_cl, g.to(memory_format=torch.channels_last))
    torch.testing.assert_close(d_x, want[1][0], **F64)


def test_bfloat16_inputs_compute_coordinates_in_float32():
    x, off, mask, weight, bias, _ = _case(1, 4, 30, 40, 3, 1, seed=2, dtype=torch.float32)
    off = off + 20.0  # sampling points around 20-60: a bfloat16 coordinate would be off by up to 0.25
    xb, wb, bb = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    got = deform_conv2d(xb, off, wb, bb, padding=1, mask=mask)
    want = tv_deform_conv2d(xb.double(), off.double(), wb.double(), bb.double(), padding=1, mask=mask.double())
    abs_terms = tv_deform_conv2d(xb.double().abs(), off.double(), wb.double().abs(), bb.double().abs(), padding=1,
                                 mask=mask.double())
    # bfloat16 products and sums: error within (n + 1) * eps_bf16 of the absolute terms, n = 4 * 9 * C
    eps = torch.finfo(torch.bfloat16).eps
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= (4 * 9 * 4 + 1) * eps * abs_terms).all()


def test_functional_op_ignores_autocast():
    """Like torchvision's CPU op, the functional computes in its inputs' dtype under autocast (forward and backward)."""
    x, off, mask, weight, bias, g = _case(1, 4, 6, 5, 3, 1, seed=4, dtype=torch.float32)
    want = _forward_backward(deform_conv2d, x, off, mask, weight, bias, g, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_backward(deform_conv2d, x, off, mask, weight, bias, g, 1)
    assert got[0].dtype == torch.float32
    for a, b in zip((got[0], *got[1]), (want[0], *want[1])):
        assert torch.equal(a, b)


def test_input_errors_name_the_argument():
    x, off, mask, weight, bias, _ = _case(1, 4, 5, 5, 3, 1, seed=0)
    with pytest.raises(ValueError, match="offset must have shape"):
        deform_conv2d(x, off[:, :, :4], weight, bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="one offset group"):
        deform_conv2d(x, torch.cat([off, off], 1), weight, bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        deform_conv2d(x, off, weight, bias, padding=1, mask=mask[:, :8])
    with pytest.raises(ValueError, match="grouped convolution"):
        deform_conv2d(x, off, weight[:, :2], bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="bias must have shape"):
        deform_conv2d(x, off, weight, bias[:2], padding=1, mask=mask)
    with pytest.raises(TypeError, match="dtype"):
        deform_conv2d(x, off, weight.float(), bias, padding=1, mask=mask)
    with pytest.raises(ValueError, match="chunk_elements"):
        deform_conv2d(x, off, weight, bias, padding=1, mask=mask, chunk_elements=0)


# ----------------------------------------------------------------------------------------------------------------
# the module and DyConv


def test_impl_option_env_variable_and_set_dcn_impl(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(DCN_IMPL_ENV_VAR, raising=False)
    assert resolve_dcn_impl("auto", cpu) == "gather"
    assert resolve_dcn_impl("auto", torch.device("cuda")) == "torchvision"
    monkeypatch.setenv(DCN_IMPL_ENV_VAR, "torchvision")
    assert resolve_dcn_impl("auto", cpu) == "torchvision"
    assert resolve_dcn_impl("gather", cpu) == "gather"  # an explicit choice wins over the variable
    monkeypatch.setenv(DCN_IMPL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=DCN_IMPL_ENV_VAR):
        resolve_dcn_impl("auto", cpu)
    with pytest.raises(ValueError, match="impl"):
        ModulatedDeformConv3x3(4, 4, impl="cuda")
    m = DyConv(16, 16, dcn_impl="torchvision")
    assert {c.conv.impl for c in m.DyConv} == {"torchvision"}
    assert set_dcn_impl(m, "gather") == 3 and {c.conv.impl for c in m.DyConv} == {"gather"}
    with pytest.raises(ValueError, match="impl"):
        set_dcn_impl(m, "fast")


@pytest.mark.parametrize("impl", ["gather", "torchvision"])
def test_module_runs_in_float32_under_autocast(impl):
    conv = ModulatedDeformConv3x3(4, 6, impl=impl)
    x = torch.randn(1, 4, 5, 5).bfloat16()
    off, msk = torch.randn(1, 18, 5, 5).bfloat16(), torch.rand(1, 9, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x, off, msk)
    assert y.dtype == torch.float32
    assert torch.equal(y, conv(x.float(), off.float(), msk.float()))


@pytest.mark.parametrize("mode", ["official", "per_level"])
def test_dyconv_forward_and_gradients_equal_between_implementations(mode):
    """DyConv's call patterns: stride 1 and 2 and, in official mode, level l's offsets reinterpreted in memory at
    level l+1's size (non-contiguous views of the offset conv's output) for the coarser-level conv."""
    C = 32
    ref = DyConv(C, C, offset_mode=mode, dcn_impl="torchvision").double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # random parameters: with zero GroupNorm biases the attention's pooled inputs sit exactly on its ReLU kink
        for name, p in ref.named_parameters():
            p.copy_((0.15 if name == "offset.weight" else 0.3) * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ours = DyConv(C, C, offset_mode=mode, dcn_impl="gather").double()
    ours.load_state_dict(ref.state_dict())
    feats = [torch.randn(2, C, h, w, generator=g, dtype=torch.float64) for h, w in [(9, 11), (5, 6), (3, 3), (2, 2)]]
    results = []
    for m in (ref, ours):
        leaves = [f.clone().requires_grad_() for f in feats]
        outs = m(leaves)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)).sum()
                   for i, o in enumerate(outs))
        params = list(m.parameters())
        grads = torch.autograd.grad(loss, leaves + params)
        results.append((outs, grads))
    for a, b in zip(results[1][0], results[0][0]):
        torch.testing.assert_close(a, b, **F64)
    names = [f"feature{i}" for i in range(len(feats))] + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,C,H,W,O,stride", [(2, 4, 6, 9, 3, 1), (1, 3, 7, 5, 2, 2), (1, 2, 1, 1, 2, 1)])
def test_grid_sample_formulation_equals_torchvision(B, C, H, W, O, stride):
    """The exportable form (GridSample + MatMul) against torchvision in float64: the sampling point's round trip
    through normalised coordinates costs ~1e-15 there, so the forward and the five gradients agree to 1e-10."""
    x, off, mask, weight, bias, grad_out = _case(B, C, H, W, O, stride, seed=3)
    ours, our_grads = _forward_backward(deform_conv2d_grid_sample, x, off, mask, weight, bias, grad_out, stride)
    ref, ref_grads = _forward_backward(tv_deform_conv2d, x, off, mask, weight, bias, grad_out, stride)
    # on an integer sampling coordinate the two take different one-sided derivatives: compare the offset gradient
    # where both coordinates of the tap are fractional (the base positions are integers, so: fractional offsets)
    fractional = (off.view(B, 9, 2, *off.shape[-2:]).frac() != 0).all(dim=2, keepdim=True).expand(-1, -1, 2, -1, -1)
    for name, a, b in zip(NAMES, (ours, *our_grads), (ref, *ref_grads)):
        if name == "d_offset":
            a, b = a.reshape(fractional.shape)[fractional], b.reshape(fractional.shape)[fractional]
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10), name
    plain = deform_conv2d_grid_sample(x, off, weight, None, stride=stride, padding=1)  # DCNv1, no bias
    assert torch.allclose(plain, tv_deform_conv2d(x, off, weight, None, stride=stride, padding=1), atol=1e-10)
    m = ModulatedDeformConv3x3(C, O, stride, impl="grid_sample").double()
    m.weight.data, m.bias.data = weight, bias
    assert torch.allclose(m(x, off, mask), ref, atol=1e-10)
