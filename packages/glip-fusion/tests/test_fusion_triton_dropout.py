"""Dropout of the fused Triton bi-attention: Philox masks, reproducibility, statistics, forward/backward consistency."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")
np = pytest.importorskip("numpy")

from glip_fusion.triton import _config, bi_attention_triton, dropout_keep_masks  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _inputs(B, H, N, M, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(DEV) for L in (N, M, N, M)]


def _ref_with_masks(q, k, v_v, v_l, text_mask, image_mask, keep_v, keep_l, p, scale):
    """float64 reference that applies the kernel's own keep-masks (exported by dropout_keep_masks)."""
    q, k, v_v, v_l = (t.double() for t in (q, k, v_v, v_l))
    s = scale * q @ k.transpose(-1, -2)
    s_v = s.masked_fill(~text_mask[:, None, None, :], float("-inf"))
    s_l = s.transpose(-1, -2).masked_fill(~image_mask[:, None, None, :], float("-inf"))
    p_v = torch.softmax(s_v, -1) * keep_v / (1 - p)
    p_l = torch.softmax(s_l, -1) * keep_l.transpose(-1, -2) / (1 - p)
    return p_v @ v_l, p_l @ v_v


# ----------------------------------------------------------------------------------------------------------------
# Philox4x32-10 in numpy (Salmon et al., SC'11), written for the test from the paper's description


def _philox4x32_10(ctr, key):
    """``ctr``: 4 uint64 arrays holding 32-bit words, ``key``: 2 of them. Returns the 4 output words."""
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & mask for c in ctr)
    k0, k1 = (np.asarray(k, dtype=np.uint64) & mask for k in key)
    for _ in range(10):
        p0 = c0 * np.uint64(0xD2511F53)  # 32 x 32 -> 64 bit products, exact in uint64
        p1 = c2 * np.uint64(0xCD9E8D57)
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & mask, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & mask)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
    return c0, c1, c2, c3


def test_numpy_philox_matches_the_published_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (counter, key -> output)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, want in cases:
        assert tuple(int(w) for w in _philox4x32_10(ctr, key)) == want


def test_keep_masks_follow_the_documented_philox_layout():
    """Logit (n, m) of batch-head bh: word m % 4 of Philox(counter (n, m // 4, bh, 0), key = the seed's two 31-bit
    halves); low 16 bits -> image direction, high 16 bits -> text direction; kept when bits / 2**16 >= p."""
    B, H, N, M, p = 2, 2, 37, 13, 0.3
    seed = 2 ** 40 + 12345  # both key words non-zero
    keep_v, keep_l = dropout_keep_masks(seed, B, H, N, M, p, device=DEV)
    bh, n, m = np.meshgrid(np.arange(B * H), np.arange(N), np.arange(M), indexing="ij")
    words = _philox4x32_10((n, m // 4, bh, np.zeros_like(n)), (seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF))
    word = np.choose(m % 4, words)
    want_v = (word & 0xFFFF) / 65536.0 >= p
    want_l = (word >> np.uint64(16)) / 65536.0 >= p
    assert np.array_equal(keep_v.cpu().numpy().reshape(B * H, N, M), want_v)
    assert np.array_equal(keep_l.cpu().numpy().reshape(B * H, N, M), want_l)


def test_keep_masks_rate_and_independence():
    p = 0.3
    keep_v, keep_l = dropout_keep_masks(123, 2, 2, 200, 50, p, device=DEV)
    assert keep_v.shape == keep_l.shape == (2, 2, 200, 50) and keep_v.dtype == torch.bool
    n = keep_v.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    for keep in (keep_v, keep_l):
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # the two directions are independent draws: P(agree) = p^2 + (1-p)^2
    agree = (keep_v == keep_l).float().mean().item()
    p_agree = p * p + (1 - p) ** 2
    assert abs(agree - p_agree) < 5 * math.sqrt(p_agree * (1 - p_agree) / n)
    # different batch-heads get different masks; a different seed gives a different mask
    assert (keep_v[0, 0] != keep_v[1, 1]).any()
    other_v, _ = dropout_keep_masks(124, 2, 2, 200, 50, p, device=DEV)
    assert (other_v != keep_v).float().mean() > 0.2
    again_v, again_l = dropout_keep_masks(123, 2, 2, 200, 50, p, device=DEV)
    assert torch.equal(again_v, keep_v) and torch.equal(again_l, keep_l)


def test_forward_and_grads_match_reference_using_the_kernels_masks():
    B, H, N, M, D, p, seed, scale = 2, 2, 37, 13, 32, 0.25, 2024, 0.3
    inputs = _inputs(B, H, N, M, D, seed=1)
    g = torch.Generator().manual_seed(2)
    tm = torch.rand(B, M, generator=g) > 0.3
    tm[:, 0] = True
    im = torch.rand(B, N, generator=g) > 0.2
    tm, im = tm.to(DEV), im.to(DEV)
    keep_v, keep_l = dropout_keep_masks(seed, B, H, N, M, p, device=DEV)

    x = [t.clone().requires_grad_() for t in inputs]
    with _config.block_override(16, 16):
        o_v, o_l = bi_attention_triton(*x, tm, im, scale=scale, dropout_p=p, seed=seed, num_splits=3)
    x64 = [t.double().requires_grad_() for t in inputs]
    r_v, r_l = _ref_with_masks(*x64, tm, im, keep_v, keep_l, p, scale)
    torch.testing.assert_close(o_v.double(), r_v, atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(o_l.double(), r_l, atol=3e-5, rtol=1e-5)

    gv, gl = torch.randn_like(o_v), torch.randn_like(o_l)
    with _config.block_override(16, 16):
        torch.autograd.backward((o_v, o_l), (gv, gl))
    torch.autograd.backward((r_v, r_l), (gv.double(), gl.double()))
    for name, a, b in zip(("dq", "dk", "dv_v", "dv_l"), x, x64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=3e-4, rtol=1e-5, msg=name)
    # the masks were really used: without dropout the output differs
    with torch.no_grad():
        plain_v, _ = bi_attention_triton(*inputs, tm, im, scale=scale)
    assert (plain_v - o_v.detach()).abs().max() > 1e-2


def test_same_seed_same_output_different_seed_different():
    inputs = _inputs(1, 2, 40, 10, 32, seed=3)
    with torch.no_grad():
        a = bi_attention_triton(*inputs, dropout_p=0.2, seed=7)
        b = bi_attention_triton(*inputs, dropout_p=0.2, seed=7)
        c = bi_attention_triton(*inputs, dropout_p=0.2, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0] - c[0]).abs().max() > 1e-3 and (a[1] - c[1]).abs().max() > 1e-3
    # any int is a seed (used modulo 2**62): negative and huge seeds work and are reproducible
    with torch.no_grad():
        d = bi_attention_triton(*inputs, dropout_p=0.2, seed=-7)
        e = bi_attention_triton(*inputs, dropout_p=0.2, seed=2 ** 62 - 7)
    assert torch.equal(d[0], e[0]) and not torch.equal(d[0], a[0])


def test_seed_none_follows_torch_manual_seed():
    inputs = _inputs(1, 1, 20, 6, 32, seed=4)
    with torch.no_grad():
        torch.manual_seed(11)
        a = bi_attention_triton(*inputs, dropout_p=0.5)
        torch.manual_seed(11)
        b = bi_attention_triton(*inputs, dropout_p=0.5)
        c = bi_attention_triton(*inputs, dropout_p=0.5)  # generator advanced: a new mask
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])


def test_masks_do_not_depend_on_tiling_or_splits():
    inputs = _inputs(1, 2, 50, 20, 32, seed=5)
    with torch.no_grad():
        a = bi_attention_triton(*inputs, dropout_p=0.3, seed=99, num_splits=1)
        with _config.block_override(16, 16):
            b = bi_attention_triton(*inputs, dropout_p=0.3, seed=99, num_splits=3)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-6)


def test_dropout_preserves_the_mean():
    """q = 0 gives uniform weights; with all-ones values every output is (kept count) / (L (1 - p)), mean 1."""
    B, H, N, M, D, p = 2, 2, 256, 64, 32, 0.1
    q = torch.zeros(B, H, N, D, device=DEV)
    k = torch.randn(B, H, M, D, device=DEV)
    ones_v, ones_l = torch.ones(B, H, N, D, device=DEV), torch.ones(B, H, M, D, device=DEV)
    with torch.no_grad():
        o_v, o_l = bi_attention_triton(q, k, ones_v, ones_l, dropout_p=p, seed=5)
    # o_v rows: mean of M Bernoulli(1-p)/(1-p); the B*H*N row means are independent
    sd_v = math.sqrt(p / ((1 - p) * M) / (B * H * N))
    sd_l = math.sqrt(p / ((1 - p) * N) / (B * H * M))
    assert abs(o_v[..., 0].mean().item() - 1.0) < 5 * sd_v
    assert abs(o_l[..., 0].mean().item() - 1.0) < 5 * sd_l
    # and the outputs really vary (dropout is on)
    assert o_v[..., 0].std() > 0.5 * math.sqrt(p / ((1 - p) * M))
