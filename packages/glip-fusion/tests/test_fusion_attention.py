"""bi_attention: every backend against an independent float64 formulation, plus the official literal formulation."""

import math

import pytest
import torch

import glip_fusion
from glip_fusion import attention as attn_mod
from glip_fusion import available_backends, bi_attention, bi_attention_reference

# "triton" joins automatically where the fused kernel can run (CUDA + triton); CPU runs check reference and sdpa.
BACKENDS = [b for b in ("reference", "sdpa", "triton") if b in available_backends()]


def _device_for(backend):
    # the fused kernel runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# independent formulations (written for the tests, float64)


def naive_bi_attention(q, k, v_v, v_l, text_mask=None, image_mask=None, scale=None, clamp=50000.0,
                       second_clamp=True):
    """Per-(b, h) loops with explicit exp-normalisation weights (no torch.softmax, no -inf masking).

    The text direction clamps ``S^T - colmax`` (the max over the valid image tokens) to ``[-clamp, clamp]`` again,
    as GLIP does; ``second_clamp=False`` leaves that out (what SDPA or an online softmax computes)."""
    q, k, v_v, v_l = (t.double().cpu() for t in (q, k, v_v, v_l))
    B, H, N, D = q.shape
    M = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    tm = torch.ones(B, M, dtype=torch.bool) if text_mask is None else text_mask.cpu()
    im = torch.ones(B, N, dtype=torch.bool) if image_mask is None else image_mask.cpu()
    o_v = torch.zeros(B, H, N, v_l.shape[-1], dtype=torch.float64)
    o_l = torch.zeros(B, H, M, v_v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = scale * (q[b, h] @ k[b, h].T)  # (N, M)
            if clamp is not None:
                s = s.clamp(-clamp, clamp)
            if tm[b].any():
                row_max = torch.where(tm[b], s, torch.full_like(s, -1e300)).max(dim=1, keepdim=True).values
                w = torch.where(tm[b], torch.exp(s - row_max), torch.zeros_like(s))
                o_v[b, h] = (w / w.sum(dim=1, keepdim=True)) @ v_l[b, h]
            if im[b].any():
                st = s.T  # (M, N)
                col_max = torch.where(im[b], st, torch.full_like(st, -1e300)).max(dim=1, keepdim=True).values
                shifted = st - col_max
                if clamp is not None and second_clamp:
                    shifted = shifted.clamp(-clamp, clamp)
                w = torch.where(im[b], torch.exp(shifted), torch.zeros_like(st))
                o_l[b, h] = (w / w.sum(dim=1, keepdim=True)) @ v_v[b, h]
    return o_v, o_l


def official_literal(q_scaled, k, v_v, v_l, int_mask, clamp=50000.0):
    """The official steps literally: S = Q K^T, clamp (min then max), text direction = S^T - rowmax, clamp again,
    softmax over N without any mask; vision direction = softmax(S + M) with M = 1 for real tokens and -9e15 for pads."""
    B, H, N, D = q_scaled.shape
    M = k.shape[2]
    s = torch.matmul(q_scaled, k.transpose(-1, -2))
    s = torch.clamp(s, min=-clamp)
    s = torch.clamp(s, max=clamp)
    s_t = s.transpose(-1, -2)
    s_t = s_t - torch.max(s_t, dim=-1, keepdim=True)[0]
    s_t = torch.clamp(s_t, min=-clamp)
    s_t = torch.clamp(s_t, max=clamp)
    p_l = s_t.softmax(dim=-1)
    add = int_mask[:, None, None, :].expand(B, 1, N, M).to(s.dtype)
    add = add.masked_fill(add == 0, -9e15)
    p_v = torch.softmax(s + add, dim=-1)
    return p_v @ v_l, p_l @ v_v


def _inputs(B=2, H=3, N=11, M=7, D=8, dtype=torch.float32, device="cpu", seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return mk(B, H, N, D) * q_scale, mk(B, H, M, D), mk(B, H, N, D), mk(B, H, M, D)


def _close(a, b, tol):
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), f"max abs diff {(a - b).abs().max().item():.3g} > {tol}"


# ----------------------------------------------------------------------------------------------------------------
# agreement with the independent formulation


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_naive_without_masks(backend):
    dev = _device_for(backend)
    q, k, vv, vl = _inputs(device=dev)
    o_v, o_l = bi_attention(q, k, vv, vl, backend=backend)
    r_v, r_l = naive_bi_attention(q, k, vv, vl)
    assert o_v.shape == (2, 3, 11, 8) and o_l.shape == (2, 3, 7, 8)
    _close(o_v, r_v, 2e-5)
    _close(o_l, r_l, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_naive_with_text_and_image_masks(backend):
    dev = _device_for(backend)
    q, k, vv, vl = _inputs(device=dev)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=dev)
    image_mask = torch.ones(2, 11, dtype=torch.bool, device=dev)
    image_mask[0, 8:] = False
    for im in (None, image_mask):
        o_v, o_l = bi_attention(q, k, vv, vl, text_mask, im, backend=backend)
        r_v, r_l = naive_bi_attention(q, k, vv, vl, text_mask, im)
        _close(o_v, r_v, 2e-5)
        _close(o_l, r_l, 2e-5)
    # the image mask changes the text direction (it is not silently ignored)
    _, o_l_masked = bi_attention(q, k, vv, vl, text_mask, image_mask, backend=backend)
    _, o_l_plain = bi_attention(q, k, vv, vl, text_mask, None, backend=backend)
    assert (o_l_masked[0] - o_l_plain[0]).abs().max() > 1e-3
    _close(o_l_masked[1], o_l_plain[1], 1e-6)  # element 1 has no padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_default_scale_and_value_widths(backend):
    dev = _device_for(backend)
    q, k, _, _ = _inputs(device=dev)
    g = torch.Generator().manual_seed(3)
    vv = torch.randn(2, 3, 11, 5, generator=g).to(dev)  # value widths differ from D and from each other
    vl = torch.randn(2, 3, 7, 6, generator=g).to(dev)
    if backend == "triton":
        vv, vl = torch.randn(2, 3, 11, 8, device=dev), torch.randn(2, 3, 7, 8, device=dev)
    o_v, o_l = bi_attention(q, k, vv, vl, scale=0.37, backend=backend)
    r_v, r_l = naive_bi_attention(q, k, vv, vl, scale=0.37)
    _close(o_v, r_v, 2e-5)
    _close(o_l, r_l, 2e-5)
    o_v_default, _ = bi_attention(q, k, vv, vl, backend=backend)
    assert (o_v_default - o_v).abs().max() > 1e-3  # scale is really used


@pytest.mark.parametrize("backend", BACKENDS)
def test_clamp_active_with_huge_logits(backend):
    dev = _device_for(backend)
    q, k, vv, vl = _inputs(device=dev, q_scale=3e4)  # |S| ~ 1e5 > clamp
    text_mask = torch.ones(2, 7, dtype=torch.bool, device=dev)
    text_mask[1, 5:] = False
    o_v, o_l = bi_attention(q, k, vv, vl, text_mask, clamp=50000.0, backend=backend)
    r_v, r_l = naive_bi_attention(q, k, vv, vl, text_mask, clamp=50000.0)
    _close(o_v, r_v, 1e-4)
    _close(o_l, r_l, 1e-4)
    # the clamp is really active: without it the result differs (ties at +clamp are averaged when clamped)
    n_v, _ = naive_bi_attention(q, k, vv, vl, text_mask, clamp=None)
    assert (r_v - n_v).abs().max() > 1e-2
    u_v, _ = bi_attention(q, k, vv, vl, text_mask, clamp=None, backend=backend)
    _close(u_v, n_v, 1e-4)


def test_sdpa_clamp_precheck_is_sound():
    q, k, _, _ = _inputs()
    # bound = |scale| * max||q|| * max||k|| ; S never exceeds it
    scale = q.shape[-1] ** -0.5
    s_max = (scale * q @ k.transpose(-1, -2)).abs().max().item()
    bound = scale * q.norm(dim=-1).max().item() * k.norm(dim=-1).max().item()
    assert s_max <= bound
    assert not attn_mod._clamp_may_bite(q, k, scale, bound * 2)
    assert attn_mod._clamp_may_bite(q, k, scale, s_max * 0.5)
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = float("nan")
    assert attn_mod._clamp_may_bite(nan_q, k, scale, 1e30)


# ----------------------------------------------------------------------------------------------------------------
# official semantics


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_reference_equals_official_literal_formulation(dtype, tol):
    q, k, vv, vl = _inputs(B=2, H=2, N=13, M=9, D=16, dtype=dtype)
    q_scaled = q * 16 ** -0.5  # official: Q = v_proj(v) * scale, then S = Q K^T
    int_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5], dtype=torch.int64)
    lit_v, lit_l = official_literal(q_scaled, k, vv, vl, int_mask)
    o_v, o_l = bi_attention_reference(q_scaled, k, vv, vl, int_mask.bool(), scale=1.0)
    assert o_v.dtype == dtype
    _close(o_v, lit_v, tol)
    _close(o_l, lit_l, tol)  # padded text rows of o_l included: GLIP computes them


@pytest.mark.parametrize("clamp", [2.0, 5.0])
def test_reference_reproduces_the_second_clamp_at_small_clamps(clamp):
    """At small clamps GLIP's second clamp (text direction, after the max subtraction) changes the output a lot; the
    reference reproduces the literal official steps, forward and gradients, in float64."""
    q, k, vv, vl = _inputs(B=2, H=2, N=13, M=9, D=16, dtype=torch.float64, seed=21, q_scale=3.0)
    q_scaled = q * 16 ** -0.5
    int_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5], dtype=torch.int64)
    xs = [t.clone().requires_grad_() for t in (q_scaled, k, vv, vl)]
    lit = official_literal(*xs, int_mask, clamp=clamp)
    ys = [t.clone().requires_grad_() for t in (q_scaled, k, vv, vl)]
    got = bi_attention_reference(*ys, int_mask.bool(), scale=1.0, clamp=clamp)
    for a, b in zip(got, lit):
        _close(a, b, 1e-12)
    g = torch.Generator().manual_seed(3)
    gos = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in lit]
    torch.autograd.backward(lit, gos)
    torch.autograd.backward(got, gos)
    for a, b in zip(ys, xs):
        _close(a.grad, b.grad, 1e-10)
    # the second clamp really matters here: without it o_l differs by far more than rounding
    _, no_second = naive_bi_attention(q_scaled, k, vv, vl, int_mask.bool(), scale=1.0, clamp=clamp,
                                      second_clamp=False)
    assert (no_second - lit[1]).abs().max() > 0.05
    # and the vision direction has no second clamp: o_v is the plain clamped softmax
    o_v_plain, _ = naive_bi_attention(q_scaled, k, vv, vl, int_mask.bool(), scale=1.0, clamp=clamp)
    _close(got[0], o_v_plain, 1e-12)


@pytest.mark.parametrize("clamp", [2.0, 5.0])
def test_reference_second_clamp_with_image_mask_uses_the_valid_max(clamp):
    """With an image mask the max is over the valid image tokens and padded ones keep weight 0 after the clamp."""
    q, k, vv, vl = _inputs(B=2, H=2, N=11, M=7, D=8, dtype=torch.float64, seed=22, q_scale=3.0)
    image_mask = torch.ones(2, 11, dtype=torch.bool)
    image_mask[0, 6:] = False
    image_mask[1, ::3] = False
    o_v, o_l = bi_attention_reference(q, k, vv, vl, None, image_mask, clamp=clamp)
    r_v, r_l = naive_bi_attention(q, k, vv, vl, None, image_mask, clamp=clamp)
    _close(o_v, r_v, 1e-12)
    _close(o_l, r_l, 1e-12)
    _, plain_l = naive_bi_attention(q, k, vv, vl, None, image_mask, clamp=clamp, second_clamp=False)
    assert (plain_l - r_l).abs().max() > 0.05


def test_second_clamp_threshold_bounds_its_effect():
    """The worst case of the second clamp: per text token one logit at +c and N-1 at -c, so N-1 entries lie 2c below
    the max. At c = second_clamp_threshold(N, float32) the text output moves by at most eps/2 (float32's half ulp,
    relative to max|v_v|); 2 below the threshold it moves by more: the threshold is the derived bound, not loose."""
    N, M = 1000, 3
    eps = torch.finfo(torch.float32).eps
    threshold = attn_mod.second_clamp_threshold(N, torch.float32)
    assert threshold == pytest.approx(math.log(4 * N / eps))
    assert 27.0 < attn_mod.second_clamp_threshold(22400, torch.float32) < 28.0  # GLIP-T: N = 22400
    q = torch.full((1, 1, N, 1), -1e3, dtype=torch.float64)
    q[0, 0, 0, 0] = 1e3  # S = q k: +1e3 for image token 0, -1e3 for the others; both clamps bite
    k = torch.ones(1, 1, M, 1, dtype=torch.float64)
    v_v = -torch.ones(1, 1, N, 1, dtype=torch.float64)
    v_v[0, 0, 0, 0] = 1.0
    v_l = torch.ones(1, 1, M, 1, dtype=torch.float64)
    for clamp, within in ((threshold, True), (threshold - 2.0, False)):
        _, exact = bi_attention_reference(q, k, v_v, v_l, scale=1.0, clamp=clamp)
        _, without = naive_bi_attention(q, k, v_v, v_l, scale=1.0, clamp=clamp, second_clamp=False)
        moved = (exact - without).abs().max().item()
        assert (moved <= eps / 2) == within, (clamp, moved, eps / 2)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backends_without_the_second_clamp_refuse_small_clamps(backend, monkeypatch):
    q, k, vv, vl = _inputs()  # N = 11 image tokens, float32: threshold ln(44 / eps) = 19.7
    threshold = attn_mod.second_clamp_threshold(11, torch.float32)
    if backend == "triton" and backend not in available_backends():
        pytest.skip("triton backend not available here")
    dev = _device_for(backend)
    q, k, vv, vl = (t.to(dev) for t in (q, k, vv, vl))
    for clamp in (2.0, threshold - 0.01):
        with pytest.raises(ValueError, match=rf"backend '{backend}' cannot reproduce GLIP's second clamp.*"
                                             rf"clamp={clamp:g}.*N=11.*float32.*{threshold:.2f}"):
            bi_attention(q, k, vv, vl, clamp=clamp, backend=backend)
    # at the threshold, and without a clamp, the backend runs and matches the official formulation
    for clamp in (threshold, None):
        o_v, o_l = bi_attention(q, k, vv, vl, clamp=clamp, backend=backend)
        r_v, r_l = naive_bi_attention(q, k, vv, vl, clamp=clamp)
        _close(o_v, r_v, 2e-5)
        _close(o_l, r_l, 2e-5)
    # "auto" picks the reference where only it is exact (also on CUDA, where it would otherwise pick a kernel)
    monkeypatch.delenv("GLIP_FUSION_BACKEND", raising=False)
    assert attn_mod._resolve_backend("auto", q, k, vv, vl, 2.0) == "reference"
    assert attn_mod._resolve_backend("auto", q, k, vv, vl, threshold) != "reference"
    o_v, o_l = bi_attention(q, k, vv, vl, clamp=2.0)
    r_v, r_l = naive_bi_attention(q, k, vv, vl, clamp=2.0)
    _close(o_v, r_v, 2e-5)
    _close(o_l, r_l, 2e-5)


def test_all_padded_text_row_gives_zero_not_nan():
    q, k, vv, vl = _inputs()
    text_mask = torch.ones(2, 7, dtype=torch.bool)
    text_mask[0] = False
    image_mask = torch.ones(2, 11, dtype=torch.bool)
    image_mask[1] = False
    for backend in ("reference", "sdpa"):
        o_v, o_l = bi_attention(q, k, vv, vl, text_mask, image_mask, backend=backend)
        assert torch.isfinite(o_v).all() and torch.isfinite(o_l).all()
        assert (o_v[0] == 0).all() and (o_l[1] == 0).all()
        r_v, r_l = naive_bi_attention(q, k, vv, vl, text_mask, image_mask)
        _close(o_v[1], r_v[1], 2e-5)
        _close(o_l[0], r_l[0], 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_masked_text_zeroes_padded_rows_only(backend):
    dev = _device_for(backend)
    q, k, vv, vl = _inputs(device=dev)
    text_mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool, device=dev)
    full_v, full_l = bi_attention(q, k, vv, vl, text_mask, backend=backend)
    o_v, o_l = bi_attention(q, k, vv, vl, text_mask, backend=backend, skip_masked_text=True)
    _close(o_v, full_v, 1e-6)
    keep = text_mask[:, None, :, None].expand_as(o_l)
    assert (o_l[~keep] == 0).all()
    _close(o_l[keep], full_l[keep], 1e-6)
    assert (full_l[~keep] != 0).any()  # without the flag the padded rows are computed (official)


def test_half_precision_reference_is_computed_in_float32():
    q, k, vv, vl = _inputs()
    o_v, o_l = bi_attention(q.bfloat16(), k.bfloat16(), vv.bfloat16(), vl.bfloat16(), backend="reference")
    assert o_v.dtype == torch.bfloat16 and o_l.dtype == torch.bfloat16
    r_v, r_l = naive_bi_attention(q.bfloat16(), k.bfloat16(), vv.bfloat16(), vl.bfloat16())
    _close(o_v, r_v, 2e-2)
    _close(o_l, r_l, 2e-2)


# ----------------------------------------------------------------------------------------------------------------
# dropout


def _onehot_inputs(p_seed=0, n=32, heads=2):
    """N = M = D = n with one-hot values, so o_v == P_v (N x M) and o_l == P_l (M x N) exactly."""
    q, k, _, _ = _inputs(B=1, H=heads, N=n, M=n, D=n, seed=p_seed)
    eye = torch.eye(n).expand(1, heads, n, n)
    return q, k, eye.clone(), eye.clone()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dropout_statistics_and_independent_masks(backend):
    p = 0.3
    q, k, vv, vl = _onehot_inputs()
    p_v, p_l = naive_bi_attention(q, k, vv, vl)  # undropped probability maps
    o_v, o_l = bi_attention(q, k, vv, vl, dropout_p=p, seed=123, backend=backend)
    kept_v, kept_l = o_v != 0, o_l != 0
    for kept in (kept_v, kept_l):
        rate = kept.double().mean().item()
        assert abs(rate - (1 - p)) < 0.05, rate  # 2048 Bernoulli draws: sigma ~ 0.01
    # kept entries are P / (1 - p) (inverted dropout keeps the expectation)
    _close(o_v[kept_v], (p_v / (1 - p))[kept_v], 1e-5)
    _close(o_l[kept_l], (p_l / (1 - p))[kept_l], 1e-5)
    # the two maps use independent masks: agreement ~ p^2 + (1-p)^2 = 0.58, not 1
    agree = (kept_v == kept_l.transpose(-1, -2)).double().mean().item()
    assert agree < 0.75, agree


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dropout_seed_reproducible_and_leaves_global_rng_alone(backend):
    q, k, vv, vl = _inputs()
    state = torch.get_rng_state()
    a = bi_attention(q, k, vv, vl, dropout_p=0.5, seed=7, backend=backend)
    b = bi_attention(q, k, vv, vl, dropout_p=0.5, seed=7, backend=backend)
    c = bi_attention(q, k, vv, vl, dropout_p=0.5, seed=8, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # seed=None uses the global RNG: manual_seed reproduces it
    torch.manual_seed(5)
    d = bi_attention(q, k, vv, vl, dropout_p=0.5, backend=backend)
    torch.manual_seed(5)
    e = bi_attention(q, k, vv, vl, dropout_p=0.5, backend=backend)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


# ----------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("backend,clamp,q_scale", [
    ("reference", 50000.0, 1.0), ("reference", 0.7, 1.0), ("reference", 50.0, 40.0),
    ("sdpa", 50000.0, 1.0), ("sdpa", 50.0, 40.0),  # sdpa: the first clamp bites (reference math), the second cannot
])
def test_gradcheck(backend, clamp, q_scale):
    g = torch.Generator().manual_seed(11)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    q, k, vv, vl = mk(2, 2, 5, 3), mk(2, 2, 4, 3), mk(2, 2, 5, 3), mk(2, 2, 4, 3)
    q = (q.detach() * q_scale).requires_grad_()
    tm = torch.tensor([[True, True, True, False], [True, True, True, True]])
    im = torch.tensor([[True] * 5, [True, True, True, False, False]])
    if clamp < 1000:  # clamp active: check it is, then gradcheck (the clamped entries have zero gradient)
        assert (q.detach() @ k.detach().transpose(-1, -2) * 3 ** -0.5).abs().max() > clamp
    fn = lambda q, k, vv, vl: bi_attention(q, k, vv, vl, tm, im, clamp=clamp, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, vv, vl), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# dispatch and validation


def test_available_backends_and_exports():
    names = available_backends()
    assert names[:2] == ["reference", "sdpa"] and set(names) <= {"reference", "sdpa", "triton"}
    assert glip_fusion.bi_attention is bi_attention


def test_forcing_unavailable_triton_raises_clearly(monkeypatch):
    monkeypatch.setattr(attn_mod, "_triton_status", lambda: (None, "no kernel here (test)"))
    assert "triton" not in available_backends()
    q, k, vv, vl = _inputs()
    with pytest.raises(RuntimeError, match="triton.*not available.*no kernel here"):
        bi_attention(q, k, vv, vl, backend="triton")
    monkeypatch.setenv("GLIP_FUSION_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="GLIP_FUSION_BACKEND"):
        bi_attention(q, k, vv, vl)


def test_triton_dispatch_contract_with_a_fake_kernel(monkeypatch):
    """Forced 'triton' calls glip_fusion.triton.bi_attention_triton with the documented keywords; 'auto' only
    considers it for CUDA inputs inside the kernel's envelope."""
    seen = {}

    from glip_fusion.triton import supports as real_supports  # importable without triton

    class FakeKernel:
        supports = staticmethod(real_supports)

        @staticmethod
        def bi_attention_triton(q, k, v_v, v_l, text_mask, image_mask, **kw):
            seen.update(kw, text_mask=text_mask)
            return bi_attention_reference(q, k, v_v, v_l, text_mask, image_mask, **kw)

    monkeypatch.setattr(attn_mod, "_triton_status", lambda: (FakeKernel, None))
    monkeypatch.delenv("GLIP_FUSION_BACKEND", raising=False)
    assert available_backends() == ["reference", "sdpa", "triton"]
    q, k, vv, vl = _inputs()
    tm = torch.ones(2, 7, dtype=torch.bool)
    o = bi_attention(q, k, vv, vl, tm, backend="triton", dropout_p=0.2, seed=4, skip_masked_text=True)
    assert seen == dict(scale=8 ** -0.5, dropout_p=0.2, clamp=50000.0, seed=4, skip_masked_text=True, text_mask=tm)
    assert torch.equal(o[0], bi_attention_reference(q, k, vv, vl, tm, dropout_p=0.2, seed=4)[0])
    assert attn_mod._resolve_backend("auto", q, k, vv, vl) == "sdpa"  # CPU tensors: never the kernel
    assert attn_mod._triton_supports(q, k, vv, vl)
    assert not attn_mod._triton_supports(q.double(), k.double(), vv.double(), vl.double())
    assert not attn_mod._triton_supports(q, k, vv[..., :4], vl)
    big_k = torch.zeros(2, 3, 300, 8)
    assert not attn_mod._triton_supports(q, big_k, vv, big_k)
    FakeKernel.supports = staticmethod(lambda *a: False)  # the kernel's own probe wins when it has one
    assert not attn_mod._triton_supports(q, k, vv, vl)


def test_auto_sends_half_precision_cuda_inputs_to_the_kernel_and_float32_to_sdpa(monkeypatch):
    """On CUDA (simulated: the dispatcher is told the inputs are on a GPU), "auto" picks the fused kernel for fp16 and
    bf16 inputs it supports, SDPA for float32, and the reference below the second-clamp threshold."""
    from glip_fusion.triton import supports as real_supports

    class FakeKernel:
        supports = staticmethod(real_supports)

    monkeypatch.setattr(attn_mod, "_triton_status", lambda: (FakeKernel, None))
    q, k, vv, vl = _inputs()
    half = [t.half() for t in (q, k, vv, vl)]
    bf16 = [t.bfloat16() for t in (q, k, vv, vl)]
    assert attn_mod._auto_backend(*half, 50000.0, True) == "triton"
    assert attn_mod._auto_backend(*bf16, 50000.0, True) == "triton"
    assert attn_mod._auto_backend(q, k, vv, vl, 50000.0, True) == "sdpa"  # float32
    assert attn_mod._auto_backend(*half, 50000.0, False) == "sdpa"  # CPU tensors
    assert attn_mod._auto_backend(*bf16, 2.0, True) == "reference"
    assert torch.float32 not in attn_mod.AUTO_KERNEL_DTYPES


def test_auto_dispatch_and_env_override(monkeypatch):
    calls = []
    for name in ("reference", "sdpa"):
        real = attn_mod._BACKEND_FNS[name]
        monkeypatch.setitem(attn_mod._BACKEND_FNS, name,
                            lambda *a, _n=name, _f=real: (calls.append(_n), _f(*a))[1])
    q, k, vv, vl = _inputs()
    monkeypatch.delenv("GLIP_FUSION_BACKEND", raising=False)
    bi_attention(q, k, vv, vl)
    assert calls[-1] == "sdpa"  # CPU: the memory-efficient path
    monkeypatch.setenv("GLIP_FUSION_BACKEND", "reference")
    bi_attention(q, k, vv, vl)
    assert calls[-1] == "reference"
    bi_attention(q, k, vv, vl, backend="sdpa")  # an explicit argument wins over the variable
    assert calls[-1] == "sdpa"
    monkeypatch.setenv("GLIP_FUSION_BACKEND", "fast")
    with pytest.raises(ValueError, match="GLIP_FUSION_BACKEND"):
        bi_attention(q, k, vv, vl)
    with pytest.raises(ValueError, match="unknown bi_attention backend 'cuda'"):
        bi_attention(q, k, vv, vl, backend="cuda")


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: a.update(k=a["k"][:, :, :, :4]), ValueError, "k must have shape"),
    (lambda a: a.update(v_v=a["v_v"][:, :, :5]), ValueError, "v_v must have shape"),
    (lambda a: a.update(v_l=a["v_l"][:1]), ValueError, "v_l must have shape"),
    (lambda a: a.update(k=a["k"].double()), TypeError, "k has dtype torch.float64"),
    (lambda a: a.update(q=a["q"].long()), TypeError, "q must be a floating-point"),
    (lambda a: a.update(text_mask=torch.ones(2, 7, dtype=torch.int64)), TypeError, "text_mask must be a bool"),
    (lambda a: a.update(text_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"text_mask must have shape \(2, 7\)"),
    (lambda a: a.update(image_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, r"image_mask must have shape \(2, 11\)"),
    (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p"),
    (lambda a: a.update(clamp=-1.0), ValueError, "clamp"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale"),
    (lambda a: a.update(seed=1.5), TypeError, "seed must be an int"),
    (lambda a: a.update(seed=True), TypeError, "seed must be an int"),
    (lambda a: a.update(dropout_p="0.1"), ValueError, "dropout_p"),
    (lambda a: a.update(clamp=float("nan")), ValueError, "clamp"),
])
def test_validation_errors(mutate, exc, match):
    q, k, vv, vl = _inputs()
    args = dict(q=q, k=k, v_v=vv, v_l=vl)
    mutate(args)
    with pytest.raises(exc, match="^bi_attention: " + match):
        bi_attention(**args, backend="reference")


def test_validation_is_shared_by_every_backend_and_the_kernel_entry():
    """One validation: bi_attention (any backend) and bi_attention_reference raise the same error with their own
    prefix (the fused kernel's entry point too: test_fusion_triton_kernels.py); any int is a seed."""
    q, k, vv, vl = _inputs()
    bad = [dict(seed=1.5), dict(dropout_p=1.0), dict(clamp=-1.0), dict(scale=float("inf")),
           dict(text_mask=torch.ones(2, 7, dtype=torch.int64)), dict(image_mask=torch.ones(2, 3, dtype=torch.bool))]
    for kw in bad:
        args = dict(q=q, k=k, v_v=vv, v_l=vl)
        args.update({key: v for key, v in kw.items() if key in ("text_mask", "image_mask")})
        opts = {key: v for key, v in kw.items() if key not in ("text_mask", "image_mask")}
        errors = []
        for call, prefix in ((lambda: bi_attention(**args, **opts, backend="reference"), "bi_attention: "),
                             (lambda: bi_attention(**args, **opts, backend="sdpa"), "bi_attention: "),
                             (lambda: bi_attention_reference(**args, **opts), "bi_attention_reference: ")):
            with pytest.raises((TypeError, ValueError)) as info:
                call()
            assert str(info.value).startswith(prefix), str(info.value)
            errors.append((type(info.value), str(info.value)[len(prefix):]))
        assert len(set(errors)) == 1, errors
    for seed in (-1, 2 ** 70):
        a = bi_attention(q, k, vv, vl, dropout_p=0.5, seed=seed, backend="reference")
        b = bi_attention(q, k, vv, vl, dropout_p=0.5, seed=seed, backend="reference")
        assert torch.equal(a[0], b[0])


# ----------------------------------------------------------------------------------------------------------------
# GPU (runs only where a CUDA device is present)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_cuda_backends_match_naive(backend):
    q, k, vv, vl = _inputs(device="cuda")
    tm = torch.ones(2, 7, dtype=torch.bool, device="cuda")
    tm[0, 3:] = False
    o_v, o_l = bi_attention(q, k, vv, vl, tm, backend=backend)
    r_v, r_l = naive_bi_attention(q, k, vv, vl, tm)
    _close(o_v, r_v, 1e-4)
    _close(o_l, r_l, 1e-4)
    a = bi_attention(q, k, vv, vl, tm, dropout_p=0.5, seed=3, backend=backend)
    b = bi_attention(q, k, vv, vl, tm, dropout_p=0.5, seed=3, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
