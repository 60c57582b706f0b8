"""Fused Triton bi-attention: forward outputs and all four input gradients against a float64 reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before the kernel modules
are imported, hence the first lines).  Small shapes; ``block_override`` forces small tiles so that the multi-tile
loops, ragged edges and the split-N combine run even at these sizes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")

import glip_fusion.triton as gft  # noqa: E402
from glip_fusion.triton import _config, bi_attention_triton  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------------------
# an independent float64 formulation (explicit exp-normalisation; differentiable, NaN-free on empty rows)


def _masked_softmax(s, valid):
    """Softmax of ``s`` over the last dim restricted to ``valid``; rows without a valid entry are all zeros."""
    m = torch.where(valid, s, torch.full_like(s, float("-inf"))).amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(valid, torch.exp(torch.where(valid, s, m) - m), torch.zeros_like(s))
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def ref_bi_attention(q, k, v_v, v_l, text_mask=None, image_mask=None, scale=None, clamp=50000.0,
                     keep_v=None, keep_l=None, dropout_p=0.0, skip_masked_text=False):
    """float64, GLIP's formula: S = clamp(scale q k^T), o_v = softmax_M(S | text) @ v_l,
    o_l = softmax_N(clamp(S^T - max_N S^T) | image) @ v_v (the second clamp: a no-op above the threshold at which
    the kernel accepts a clamp, kept so that the comparison is with the official formula)."""
    q, k, v_v, v_l = (t.double() for t in (q, k, v_v, v_l))
    B, H, N, D = q.shape
    M = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)  # (B, H, N, M)
    if clamp is not None:
        s = s.clamp(-clamp, clamp)
    tm = torch.ones(B, M, dtype=torch.bool, device=q.device) if text_mask is None else text_mask
    im = torch.ones(B, N, dtype=torch.bool, device=q.device) if image_mask is None else image_mask
    p_v = _masked_softmax(s, tm[:, None, None, :].expand(B, H, N, M))
    valid_l = im[:, None, None, :].expand(B, H, M, N)
    s_l = s.transpose(-1, -2)  # (B, H, M, N)
    if clamp is not None:
        col_max = torch.where(valid_l, s_l, torch.full_like(s_l, float("-inf"))).amax(dim=-1, keepdim=True)
        s_l = (s_l - torch.where(torch.isfinite(col_max), col_max, torch.zeros_like(col_max))).clamp(-clamp, clamp)
    p_l = _masked_softmax(s_l, valid_l)
    if keep_v is not None:
        p_v = p_v * keep_v.double() / (1 - dropout_p)
        p_l = p_l * keep_l.transpose(-1, -2).double() / (1 - dropout_p)
    o_v, o_l = p_v @ v_l, p_l @ v_v
    if skip_masked_text:
        o_l = o_l * tm[:, None, :, None]
    return o_v, o_l


def make_inputs(B, H, N, M, D, dtype=torch.float32, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda L: torch.randn(B, H, L, D, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v_v, v_l = mk(N) * q_scale, mk(M), mk(N), mk(M)
    return [t.to(dtype=dtype, device=DEV) for t in (q, k, v_v, v_l)]


def random_masks(B, N, M, seed=1, text_p=0.35, image_p=0.25):
    g = torch.Generator().manual_seed(seed)
    tm = torch.rand(B, M, generator=g) > text_p
    tm[:, 0] = True
    im = torch.rand(B, N, generator=g) > image_p
    im[:, 0] = True
    return tm.to(DEV), im.to(DEV)


def run_both(inputs, text_mask, image_mask, *, blocks=None, num_splits=None, grads=True, seed_out=5, **kw):
    """Kernel and reference (on the same rounded inputs): outputs and gradients of a random linear loss."""
    x = [t.detach().clone().requires_grad_(grads) for t in inputs]
    cm = lambda: _config.block_override(*blocks) if blocks else contextlib.nullcontext()  # noqa: E731
    with cm():
        o_v, o_l = bi_attention_triton(*x, text_mask, image_mask, num_splits=num_splits, **kw)
    ref_kw = {key: kw[key] for key in ("scale", "clamp", "skip_masked_text") if key in kw}
    x64 = [t.detach().double().requires_grad_(grads) for t in inputs]
    r_v, r_l = ref_bi_attention(*x64, text_mask, image_mask, **ref_kw)
    out = dict(o_v=(o_v, r_v), o_l=(o_l, r_l))
    if grads:
        g = torch.Generator().manual_seed(seed_out)
        gv = torch.randn(o_v.shape, generator=g, dtype=torch.float64).to(DEV)
        gl = torch.randn(o_l.shape, generator=g, dtype=torch.float64).to(DEV)
        with cm():
            torch.autograd.backward((o_v, o_l), (gv.to(o_v.dtype), gl.to(o_l.dtype)))
        torch.autograd.backward((r_v, r_l), (gv, gl))
        for name, a, b in zip(("dq", "dk", "dv_v", "dv_l"), x, x64):
            out[name] = (a.grad, b.grad)
    return out


def assert_close(pairs, atol, rtol=0.0, grad_atol=None):
    for name, (got, want) in pairs.items():
        tol = atol if name.startswith("o_") else (grad_atol if grad_atol is not None else atol * 10)
        got, want = got.double(), want.double()
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got - want).abs().max().item()
        bound = tol + rtol * want.abs().max().item()
        assert err <= bound, f"{name}: max abs err {err:.3g} > {bound:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# fp32 numerics: forward and all four gradients


CASES = {
    # name: (B, H, N, M, D, blocks, num_splits, kwargs)
    "odd_shapes_small_tiles_splits": (2, 2, 37, 13, 32, (16, 16), 3, {}),
    "multi_text_tiles": (1, 2, 45, 40, 32, (16, 16), 1, {"scale": 0.31}),
    "default_tiles_non_pow2_d": (2, 1, 70, 19, 40, None, None, {}),
    "d256": (1, 1, 33, 9, 256, None, 2, {}),
    "small_d": (2, 1, 21, 5, 8, (16, 16), 2, {}),
    "single_text_token": (1, 2, 29, 1, 32, (16, 16), 2, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_fp64_reference(case):
    B, H, N, M, D, blocks, splits, kw = CASES[case]
    inputs = make_inputs(B, H, N, M, D, seed=list(CASES).index(case) + 100)
    tm, im = random_masks(B, N, M)
    if case == "odd_shapes_small_tiles_splits":
        tm[1] = False
        tm[1, 4] = True  # a batch element with exactly one real text token
    pairs = run_both(inputs, tm, im, blocks=blocks, num_splits=splits, **kw)
    assert_close(pairs, atol=2e-5, rtol=1e-5, grad_atol=2e-4)


def test_without_masks_and_default_scale():
    inputs = make_inputs(2, 2, 50, 11, 32, seed=3)
    pairs = run_both(inputs, None, None, blocks=(16, 16), num_splits=2)
    assert_close(pairs, atol=2e-5, rtol=1e-5, grad_atol=2e-4)


def test_matches_glip_fusion_reference_backend():
    """The dispatcher's eager reference (official GLIP numerics) agrees with the kernel; both via bi_attention."""
    import glip_fusion

    q, k, v_v, v_l = make_inputs(2, 2, 30, 12, 32, seed=4)
    tm, _ = random_masks(2, 30, 12)
    ref = glip_fusion.bi_attention_reference(q, k, v_v, v_l, tm, scale=0.2)
    got = glip_fusion.bi_attention(q, k, v_v, v_l, tm, scale=0.2, backend="triton")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_env_var_forces_triton_backend(monkeypatch):
    import glip_fusion

    q, k, v_v, v_l = make_inputs(1, 1, 20, 6, 32, seed=5)
    monkeypatch.setenv("GLIP_FUSION_BACKEND", "triton")
    calls = []
    real = gft.bi_attention_triton
    monkeypatch.setattr(gft, "bi_attention_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    o_v, _ = glip_fusion.bi_attention(q, k, v_v, v_l)
    assert calls, "GLIP_FUSION_BACKEND=triton did not reach the triton backend"
    r_v, _ = ref_bi_attention(q, k, v_v, v_l)
    torch.testing.assert_close(o_v.double(), r_v, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# low precision


@pytest.mark.parametrize("dtype,atol,grad_rel", [(torch.float16, 3e-3, 2e-2), (torch.bfloat16, 3e-2, 6e-2)])
def test_low_precision_inputs(dtype, atol, grad_rel):
    inputs = make_inputs(2, 2, 40, 17, 64, dtype=dtype, seed=6)
    tm, im = random_masks(2, 40, 17, seed=2)
    pairs = run_both(inputs, tm, im, blocks=(16, 16), num_splits=2)
    for name, (got, want) in pairs.items():
        assert got.dtype == dtype, name
        scale = 1.0 if name.startswith("o_") else want.abs().max().item() * grad_rel
        err = (got.double() - want).abs().max().item()
        limit = atol if name.startswith("o_") else scale
        assert err <= limit, f"{dtype} {name}: max abs err {err:.3g} > {limit:.3g}"


# ----------------------------------------------------------------------------------------------------------------
# clamp semantics


def test_clamp_active_with_saturated_logits():
    """Logits of std ~30 and clamp=24 (above the second-clamp threshold, 20.8 at N=33 in float32): about 40% of S is
    clamped, rows tie at +clamp; the forward sees the clamped S and the clamped entries get no gradient."""
    inputs = make_inputs(2, 2, 33, 10, 32, seed=7, q_scale=30.0)
    tm, im = random_masks(2, 33, 10, seed=3)
    s = (inputs[0].double() @ inputs[1].double().transpose(-1, -2)) * 32 ** -0.5
    assert (s.abs() > 24.0).float().mean() > 0.2  # the clamp is really active
    pairs = run_both(inputs, tm, im, blocks=(16, 16), num_splits=2, clamp=24.0)
    # |S| ~ 100 carries fp32 rounding of ~1e-5 into the exponent
    assert_close(pairs, atol=5e-5, rtol=1e-5, grad_atol=5e-4)
    no_clamp = run_both(inputs, tm, im, grads=False, clamp=None)
    assert (no_clamp["o_v"][0] - pairs["o_v"][0]).abs().max() > 1e-2  # clamp changes the result


def test_clamp_below_the_second_clamp_threshold_is_refused():
    """The kernels do not apply GLIP's second clamp (text direction), so a clamp where it matters is refused."""
    x = make_inputs(1, 2, 33, 10, 32, seed=7)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot reproduce GLIP's second clamp.*clamp=0\.8.*"
                                         r"N=33.*float32"):
        bi_attention_triton(*x, clamp=0.8)
    # the threshold follows the dtype: ln(4 N / eps) = 20.8 in float32, 9.7 in bfloat16 at N = 33
    with pytest.raises(ValueError, match=r"clamp=12.*N=33.*float32.*20\.83"):
        bi_attention_triton(*x, clamp=12.0)
    with pytest.raises(ValueError, match=r"clamp=9.*N=33.*bfloat16.*9\.73"):
        bi_attention_triton(*(t.bfloat16() for t in x), clamp=9.0)
    # above the bfloat16 threshold the second clamp is invisible: the kernel agrees with the exact reference
    import glip_fusion

    x16 = [t.bfloat16() for t in x]
    with torch.no_grad():
        got = bi_attention_triton(*x16, clamp=12.0)
        want = glip_fusion.bi_attention_reference(*x16, clamp=12.0)
    for a, b in zip(got, want):  # both rounded to bfloat16 at the end (2**-8 relative), outputs of order 1
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=1e-2)


def test_glip_clamp_rows_below_threshold_become_uniform():
    """|S| > 5e4: with GLIP's clamp a row lying wholly below -5e4 attends uniformly, as in the official code."""
    q, k, v_v, v_l = make_inputs(1, 1, 24, 6, 32, seed=8)
    q = q * 0.0
    q[..., 0] = torch.linspace(-3e4, 3e4, 24, device=DEV).view(1, 1, 24)  # S = q0 * k0 / sqrt(32)
    k[..., 0] = 40.0 + 10.0 * k[..., 0].abs()
    pairs = run_both([q, k, v_v, v_l], None, None, blocks=(16, 16), num_splits=2)
    # |S| ~ 1e5 has an fp32 ulp of ~1e-2: softmax weights carry that rounding in any fp32 implementation
    assert_close(pairs, atol=1e-4, rtol=1e-3, grad_atol=1e-3)
    o_v = pairs["o_v"][0]
    assert torch.allclose(o_v[0, 0, 0].double(), v_l[0, 0].double().mean(0), atol=1e-5)  # uniform over M


# ----------------------------------------------------------------------------------------------------------------
# masks: empty rows, skip_masked_text


def test_all_padded_text_row_gives_zero_image_output_and_finite_grads():
    inputs = make_inputs(2, 2, 26, 9, 32, seed=9)
    tm = torch.ones(2, 9, dtype=torch.bool, device=DEV)
    tm[0] = False
    pairs = run_both(inputs, tm, None, blocks=(16, 16), num_splits=2)
    assert_close(pairs, atol=2e-5, rtol=1e-5, grad_atol=2e-4)
    assert (pairs["o_v"][0][0] == 0).all()
    assert pairs["o_v"][0][1].abs().sum() > 0


def test_all_padded_image_row_gives_zero_text_output():
    inputs = make_inputs(2, 1, 30, 7, 32, seed=10)
    im = torch.ones(2, 30, dtype=torch.bool, device=DEV)
    im[1] = False
    pairs = run_both(inputs, None, im, blocks=(16, 16), num_splits=3)
    assert_close(pairs, atol=2e-5, rtol=1e-5, grad_atol=2e-4)
    assert (pairs["o_l"][0][1] == 0).all()


def test_image_mask_changes_only_text_direction():
    inputs = make_inputs(1, 2, 40, 8, 32, seed=11)
    im = torch.ones(1, 40, dtype=torch.bool, device=DEV)
    im[0, 25:] = False
    with torch.no_grad():
        a_v, a_l = bi_attention_triton(*inputs, None, im)
        b_v, b_l = bi_attention_triton(*inputs, None, None)
    assert torch.equal(a_v, b_v)
    assert (a_l - b_l).abs().max() > 1e-3


def test_skip_masked_text_zeroes_padded_rows_and_keeps_the_rest():
    inputs = make_inputs(2, 2, 35, 24, 32, seed=12)
    tm = torch.zeros(2, 24, dtype=torch.bool, device=DEV)
    tm[0, :5] = True
    tm[1, [0, 3, 17]] = True  # padding inside the valid range and whole padded text tiles
    for splits in (1, 3):
        pairs = run_both(inputs, tm, None, blocks=(16, 16), num_splits=splits, skip_masked_text=True)
        assert_close(pairs, atol=2e-5, rtol=1e-5, grad_atol=2e-4)
        o_l = pairs["o_l"][0]
        assert (o_l[~tm[:, None, :].expand(2, 2, 24)] == 0).all()
        with torch.no_grad(), _config.block_override(16, 16):
            full_v, full_l = bi_attention_triton(*inputs, tm, None, num_splits=splits)
        assert torch.equal(pairs["o_v"][0], full_v)
        keep = tm[:, None, :, None].expand_as(full_l)
        torch.testing.assert_close(o_l[keep], full_l[keep], atol=1e-6, rtol=1e-6)
        # the padded rows of k and v_l get no gradient at all
        assert (pairs["dk"][0][~tm[:, None, :].expand(2, 2, 24)] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# layout, determinism, configuration


def test_strided_views_are_read_in_place():
    """q/v_v as (B, N, H, D) projections viewed as (B, H, N, D), k with a non-unit head-dim stride."""
    B, H, N, M, D = 2, 2, 27, 10, 32
    g = torch.Generator().manual_seed(13)
    proj_v = torch.randn(B, N, 2, H, D, generator=g).to(DEV)  # fused q / v_v projection output
    q, v_v = proj_v[:, :, 0].transpose(1, 2), proj_v[:, :, 1].transpose(1, 2)
    k_big = torch.randn(B, H, M, 2 * D, generator=g).to(DEV)
    k = k_big[..., ::2]  # head-dim stride 2
    v_l = torch.randn(B, M, H, D, generator=g).to(DEV).transpose(1, 2)
    tm, im = random_masks(B, N, M, seed=4)
    assert not q.is_contiguous() and not v_v.is_contiguous()
    with torch.no_grad():
        got = bi_attention_triton(q, k, v_v, v_l, tm, im)
        want = bi_attention_triton(*(t.contiguous() for t in (q, k, v_v, v_l)), tm, im)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref = ref_bi_attention(q, k, v_v, v_l, tm, im)
    torch.testing.assert_close(got[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    # outputs follow q's memory layout, so merging heads back to (B, N, H*D) is free
    assert got[0].stride() == torch.empty_like(q).stride()


def test_deterministic_bitwise_with_splits():
    inputs = make_inputs(2, 2, 41, 12, 32, seed=14)
    tm, im = random_masks(2, 41, 12, seed=5)
    runs = [run_both(inputs, tm, im, blocks=(16, 16), num_splits=3) for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name][0], runs[1][name][0]), name


def test_split_count_does_not_change_results_beyond_rounding():
    inputs = make_inputs(1, 2, 64, 12, 32, seed=15)
    with torch.no_grad(), _config.block_override(16, 16):
        a = bi_attention_triton(*inputs, num_splits=1)
        b = bi_attention_triton(*inputs, num_splits=4)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-6)
    assert torch.equal(a[0], b[0])  # the image direction does not split


def test_split_length_is_granular_and_covers_n():
    for n, s, granule in [(22400, 9, 256), (37, 3, 16), (5, 4, 16), (256, 1, 256)]:
        split_len, splits = _config.split_length(n, s, granule)
        assert split_len % granule == 0 and splits * split_len >= n and (splits - 1) * split_len < n
        assert splits <= s


# ----------------------------------------------------------------------------------------------------------------
# bad input


def _small():
    return make_inputs(1, 2, 10, 6, 32, seed=16)


@pytest.mark.parametrize("mutate,err,match", [
    (lambda x: (x[0], x[1][..., :16], *x[2:]), ValueError, "k must have shape"),
    (lambda x: (x[0], x[1], x[2][:, :, :5], x[3]), ValueError, "v_v must have shape"),
    (lambda x: (x[0], x[1], x[2], x[3][:, :1]), ValueError, "v_l must have shape"),
    (lambda x: (x[0], x[1], x[2][..., :16], x[3]), ValueError, "v_v must have the shape of q"),
    (lambda x: (x[0], x[1], x[2], x[3][..., :16]), ValueError, "v_l must have the shape of k"),
    (lambda x: (x[0], x[1].half(), x[2], x[3]), TypeError, "k has dtype"),
    (lambda x: (*(t.double() for t in x),), TypeError, "supported: float16, bfloat16, float32"),
    (lambda x: (x[0][0], *x[1:]), ValueError, "q must be 4-D"),
])
def test_bad_tensors_raise(mutate, err, match):
    with pytest.raises(err, match=match):
        bi_attention_triton(*mutate(_small()))


def test_bad_masks_and_options_raise():
    x = _small()
    with pytest.raises(TypeError, match="text_mask must be a bool tensor"):
        bi_attention_triton(*x, torch.ones(1, 6, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match=r"text_mask must have shape \(1, 6\)"):
        bi_attention_triton(*x, torch.ones(1, 7, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match=r"image_mask must have shape \(1, 10\)"):
        bi_attention_triton(*x, None, torch.ones(10, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="dropout_p"):
        bi_attention_triton(*x, dropout_p=1.0)
    with pytest.raises(TypeError, match="seed"):
        bi_attention_triton(*x, dropout_p=0.1, seed=1.5)
    with pytest.raises(ValueError, match="clamp"):
        bi_attention_triton(*x, clamp=0.0)


@pytest.mark.parametrize("bad", [dict(seed=1.5), dict(dropout_p=1.0), dict(clamp=0.0), dict(scale=float("nan")),
                                 dict(text_mask="int"), dict(image_mask="short")])
def test_validation_is_the_shared_one(bad):
    """The kernel's entry point runs bi_attention's validation: same error type and message after the prefix."""
    import glip_fusion

    x = _small()
    kw = dict(bad)
    if kw.get("text_mask") == "int":
        kw["text_mask"] = torch.ones(1, 6, dtype=torch.int64, device=DEV)
    if kw.get("image_mask") == "short":
        kw["image_mask"] = torch.ones(1, 9, dtype=torch.bool, device=DEV)
    with pytest.raises((TypeError, ValueError)) as ours:
        bi_attention_triton(*x, **kw)
    with pytest.raises((TypeError, ValueError)) as shared:
        glip_fusion.bi_attention(*x, **kw, backend="reference")
    assert type(ours.value) is type(shared.value)
    assert str(ours.value).startswith("bi_attention_triton: ") and str(shared.value).startswith("bi_attention: ")
    assert str(ours.value).split(": ", 1)[1] == str(shared.value).split(": ", 1)[1]


def test_limits_raise_clearly():
    big_m = make_inputs(1, 1, 4, 257, 32)
    with pytest.raises(ValueError, match="M = 257 > 256"):
        bi_attention_triton(*big_m)
    big_d = make_inputs(1, 1, 4, 3, 264)
    with pytest.raises(ValueError, match="head dim D = 264"):
        bi_attention_triton(*big_d)


def test_cpu_tensors_rejected_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(_config, "interpreting", lambda: False)
    x = [t.cpu() for t in _small()]
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        bi_attention_triton(*x)


def test_is_available_follows_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gft.is_available()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gft.is_available() == torch.cuda.is_available()


def test_glip_fusion_imports_without_triton():
    """glip_fusion (and the lazy triton subpackage) import and work without triton installed."""
    code = ("import sys; sys.modules['triton'] = None; "  # any `import triton` now raises ImportError
            "import glip_fusion, glip_fusion.triton; "
            "assert not glip_fusion.triton.is_available(); "
            "assert 'triton' not in glip_fusion.available_backends()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only property")
def test_interpreter_works_when_triton_was_imported_first():
    """torchvision imports triton before a test can set TRITON_INTERPRET; the kernels must not depend on the
    interpreter mode of triton's own standard-library @jit helpers (only on the mode at kernel definition)."""
    code = (
        "import os, torch, triton\n"  # triton imported while TRITON_INTERPRET is unset
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from glip_fusion.triton import bi_attention_triton\n"
        "x = [torch.randn(1, 1, L, 32) for L in (20, 5, 20, 5)]\n"
        "o_v, o_l = bi_attention_triton(*x, dropout_p=0.2, seed=3)\n"
        "assert torch.isfinite(o_v).all() and torch.isfinite(o_l).all()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, env=env)


def _tiles(configs):
    """The tiles of autotune configurations, whatever register budget the pruner gave them."""
    return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages) for c in configs]


def test_autotune_pruner_keeps_fitting_problem_sized_configs(monkeypatch):
    """The CUDA autotune sets are pruned to tiles no larger than the problem and within shared memory."""
    fp16 = torch.empty(1, dtype=torch.float16)
    for limit in (227 * 1024, 99 * 1024):  # H100 opt-in limit; a consumer part
        monkeypatch.setattr(_config, "_smem_limit", lambda limit=limit: limit)
        for kernel, configs in _config.AUTOTUNE_CONFIGS.items():
            prune = _config.make_pruner(kernel)
            for m, n, bd in [(32, 22400, 256), (256, 22400, 256), (256, 22400, 64), (256, 20, 64)]:
                kept = prune(configs, {"Q": fp16}, M=m, N=n, BLOCK_D=bd)
                assert kept, (kernel, m, n, bd)
                need = [_config._operand_bytes(kernel, c, bd, 2) for c in kept]
                if any(_config._operand_bytes(kernel, c, bd, 2) <= limit for c in configs):
                    assert max(need) <= limit, (kernel, m, n, bd)
                if len(kept) > 1:
                    cap_m, cap_n = max(16, _config.next_pow2(m)), max(16, _config.next_pow2(n))
                    assert all(c.kwargs["BLOCK_T"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n for c in kept)
                assert _tiles(kept) == [t for t in _tiles(configs) if t in _tiles(kept)]  # order of preference
            # at d = 64 and GLIP shapes every candidate but 16x16 fits and none is oversized
            large = [c for c in configs if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"]) >= 32]
            assert _tiles(prune(configs, {"Q": fp16}, M=256, N=22400, BLOCK_D=64)) == _tiles(large), kernel
            # a 16-token prompt keeps only the tiles no wider than it, a short-prompt tile among them
            short = prune(configs, {"Q": fp16}, M=16, N=22400, BLOCK_D=64)
            assert all(c.kwargs["BLOCK_T"] == 16 for c in short)
            if kernel != _config.BWD_COLS_DV:  # (its 16-row tiles spill heavily at head dim 256)
                assert any(c.kwargs["BLOCK_N"] >= 32 for c in short), kernel
    assert _config.n_bucket(6500) == _config.n_bucket(8000) != _config.n_bucket(22400)


def test_autotune_pruner_keeps_only_small_fp32_tiles_at_large_head_dims(monkeypatch):
    """float32 inputs (no tensor cores) keep the tiles within FP32_MAX_TILE_VOLUME, smallest (16x16, the only
    spill-free fp32 tile at head dim 256) first; half inputs keep more."""
    monkeypatch.setattr(_config, "_smem_limit", lambda: 227 * 1024)
    fp32, bf16 = torch.empty(1), torch.empty(1, dtype=torch.bfloat16)
    for kernel, configs in _config.AUTOTUNE_CONFIGS.items():
        prune = _config.make_pruner(kernel)
        kept = prune(configs, {"Q": fp32}, M=256, N=22400, BLOCK_D=256)
        volumes = [c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_T"] * 256 for c in kept]
        assert kept and max(volumes) <= _config.FP32_MAX_TILE_VOLUME, kernel
        assert volumes == sorted(volumes) and (kept[0].kwargs["BLOCK_N"], kept[0].kwargs["BLOCK_T"]) == (16, 16)
        # a smaller head dim leaves room for larger fp32 tiles; bf16 is not restricted
        assert len(prune(configs, {"Q": fp32}, M=256, N=22400, BLOCK_D=64)) >= len(kept), kernel
        half = _tiles(prune(configs, {"Q": bf16}, M=256, N=22400, BLOCK_D=256))
        assert all(t in half for t in _tiles(kept) if t[0] * t[1] > 256), kernel


def test_autotune_pruner_gives_the_register_budget_where_ptxas_would_spill(monkeypatch):
    """Half inputs: the 8-warp tiles of the dQ / dK passes at padded head dims <= 128 and of the dV_v pass at 256 get
    ``maxnreg = REGISTER_BUDGET`` (without it ptxas spills them to fit two programs per SM); nothing else does."""
    monkeypatch.setattr(_config, "_smem_limit", lambda: 227 * 1024)
    budgeted = {(k, bd) for k, dims in _config.REGISTER_BUDGET_HEAD_DIMS.items() for bd in dims}
    assert budgeted == {(k, bd) for k in (_config.BWD_ROWS_DQ, _config.BWD_COLS_DK) for bd in (32, 64, 128)} | {
        (_config.BWD_ROWS_DV, 256)}
    for kernel, configs in _config.AUTOTUNE_CONFIGS.items():
        assert all(c.maxnreg is None for c in configs)  # the sets themselves carry no budget
        prune = _config.make_pruner(kernel)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for bd in (32, 64, 128, 256):
                for m in (16, 256):
                    kept = prune(configs, {"Q": torch.empty(1, dtype=dtype)}, M=m, N=22400, BLOCK_D=bd)
                    want = _config.REGISTER_BUDGET if dtype != torch.float32 and (kernel, bd) in budgeted else None
                    assert [c.maxnreg for c in kept] == [want if c.num_warps == 8 else None for c in kept], (
                        kernel, dtype, bd, m)


def test_shared_memory_estimate_matches_the_compile_survey():
    """The pruner's shared-memory model against what the compiler allocated for every tile of the committed sm_90
    survey at head dim 256 made with Triton 3.6 (the lent GPU machine's version): within 10%."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
    survey = results / "triton_compile_sm90_triton3.6_2026-12-07.json"
    if not survey.exists():
        pytest.skip(f"{survey} not in this checkout")
    data = json.loads(survey.read_text())
    rows = [r for r in data["rows"] if r["status"] == "ok" and r["head_dim"] == 256]
    assert len(rows) >= 40 and {r["kernel"] for r in rows} == set(_config.AUTOTUNE_CONFIGS)
    for r in rows:
        est = _config.shared_memory_estimate(r["kernel"], r["BLOCK_N"], r["BLOCK_T"], r["num_warps"],
                                             r["num_stages"], _config.block_d(r["head_dim"]), 2)
        compiled = r["shared_kb"] * 1024
        assert abs(est / compiled - 1) <= 0.10, (r["kernel"], r["BLOCK_N"], r["BLOCK_T"], est, compiled)


def test_launch_falls_back_to_safe_config_when_no_autotune_config_fits(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from glip_fusion.triton import function as fn

    monkeypatch.setattr(fn, "_FALLBACK_KEYS", set())
    calls = {"tuned": 0, "raw": []}

    class Tuned:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls["tuned"] += 1
                raise OutOfResources(300000, 232448, "shared memory")
            return launch

    class Raw:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls["raw"].append((grid, kwargs))

    x = torch.empty(4, dtype=torch.float32)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="no autotune config") if calls["tuned"] == 0 else \
                contextlib.nullcontext():
            fn._launch("fwd_rows", Raw(), Tuned(), lambda bn, bt: (bn, bt), 100, 20, x, FLAG=True)
    assert calls["tuned"] == 1  # the failing key is remembered
    assert len(calls["raw"]) == 2
    grid, kwargs = calls["raw"][0]
    assert grid == (_config.SAFE_CONFIG["BLOCK_N"], _config.SAFE_CONFIG["BLOCK_T"])
    assert kwargs["FLAG"] is True and kwargs["BLOCK_N"] == 16 and kwargs["num_warps"] == 4


def test_backward_from_sum_of_outputs_expanded_grads():
    """``.sum().backward()`` hands the kernel stride-0 (expanded) output gradients."""
    inputs = make_inputs(1, 2, 30, 9, 32, seed=17)
    tm, _ = random_masks(1, 30, 9, seed=6)
    x = [t.clone().requires_grad_() for t in inputs]
    o_v, o_l = bi_attention_triton(*x, tm)
    (o_v.sum() + 2.0 * o_l.sum()).backward()
    x64 = [t.double().requires_grad_() for t in inputs]
    r_v, r_l = ref_bi_attention(*x64, tm)
    (r_v.sum() + 2.0 * r_l.sum()).backward()
    for a, b in zip(x, x64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,atol,grad_rel", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 3e-2, 6e-2)])
def test_gpu_autotuned_path_at_glip_head_dim(dtype, atol, grad_rel):
    """The autotuned CUDA path (no block override) at d = 256, M = 256 with padding, split heuristic on."""
    inputs = make_inputs(2, 4, 2001, 256, 256, dtype=dtype, seed=18)
    tm = torch.zeros(2, 256, dtype=torch.bool, device=DEV)
    tm[0, :200], tm[1, :37] = True, True
    runs = [run_both(inputs, tm, None, dropout_p=0.0) for _ in range(2)]
    for name, (got, want) in runs[0].items():
        limit = atol if name.startswith("o_") else grad_rel * want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= limit, f"{dtype} {name}: {err:.3g} > {limit:.3g}"
        assert torch.equal(got, runs[1][name][0]), f"{name} not bitwise reproducible"


def test_supports_matches_the_validation_envelope():
    ok = make_inputs(1, 2, 10, 6, 32)
    assert gft.supports(*ok)
    from glip_fusion.triton import _envelope

    # the limits are defined once (_envelope) and imported everywhere else
    assert _config.MAX_TEXT_LEN is gft.MAX_TEXT_LEN is _envelope.MAX_TEXT_LEN
    assert _config.MAX_HEAD_DIM is gft.MAX_HEAD_DIM is _envelope.MAX_HEAD_DIM
    cases = [
        make_inputs(1, 1, 4, 257, 32),                      # M > 256
        make_inputs(1, 1, 4, 3, 264),                       # D > 256
        [t.double() for t in ok],                           # dtype
        [ok[0], ok[1].half(), ok[2], ok[3]],                # mixed dtypes
        [ok[0], ok[1], ok[2][..., :16], ok[3]],             # value width differs
    ]
    for bad in cases:
        assert not gft.supports(*bad)
        with pytest.raises((ValueError, TypeError)):
            bi_attention_triton(*bad)
