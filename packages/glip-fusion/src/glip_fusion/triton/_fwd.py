"""Forward Triton kernels of the fused bi-directional attention (one kernel per direction).

Per (batch b, head h), with ``S = scale * q @ k^T`` (N x M):

* ``_fwd_rows_kernel`` (image direction): one program per tile of ``BLOCK_N`` image tokens, looping over text tiles
  with an online softmax over M.  Writes ``o_v`` and the row log-sum-exp ``lse_v``.
* ``_fwd_cols_kernel`` (text direction): one program per (text tile, image-axis split), looping over the image tiles
  of its split with an online softmax over N (Flash-Decoding).  With one split it writes ``o_l`` and ``lse_l``
  directly; otherwise it writes fp32 partials ``(m, l, acc)`` that ``_fwd_combine_kernel`` merges in a fixed split
  order (deterministic, no atomics).

Conventions shared with the backward kernels:

* logits are kept in base-2 units, ``s2 = S * log2(e)``, so that ``exp2`` can be used; the stored LSEs are base-2
  too (``lse2 = LSE * log2(e)``).  ``clamp`` is applied to ``s2`` at ``clamp * log2(e)``;
* a row/column with no admissible key stores ``lse2 = +inf`` and a zero output, so every later ``exp2(s2 - lse2)``
  is exactly 0 (never NaN);
* dropout keeps an element when its Philox uniform ``u >= p``; the uniforms of element (n, m) of (b, h) are a pure
  function of ``(seed, n, m, b*H + h)``: tile sizes, split counts and the forward/backward pass do not change them.
  One Philox4x32-10 call (counter ``(n, m // 4, b*H + h, 0)``) serves 4 logits, one 32-bit word each; the image
  direction uses the word's low 16 bits, the text direction its high 16 bits (independent masks, ``p`` resolved to
  ``2**-16``; ``_dropout_uniforms``);
* ``N_BUCKET`` (``bit_length(N - 1)``) is not read by the kernels: it only keys the autotuner on CUDA.

Both directions run the same online-softmax loop, ``_attend``, with the roles of image and text tokens swapped.

The ``@triton.jit`` helpers (``_program_tile``, ``_load_tile`` and the Philox ones are also used by ``_bwd``) are
inlined when compiled.  They are defined like the kernels and, like them, use ``triton.language`` builtins only (see
``_philox4x32``).  Under the interpreter each helper call costs about 0.5 ms (it re-patches ``triton.language``),
as much as several tile operations, so the helpers are coarse: a few calls per program, none inside the forward's
key loop (except Philox with dropout), two per step of the backward's loops.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.standard import _elementwise_max, _sum_combine

from . import _config

LOG2E = 1.4426950408889634


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 blocks: counter (c0..c3), key (k0, k1) -> 4 random words.

    Written with builtins only (no ``tl.philox``): the standard-library ``@jit`` helpers are bound to interpreter or
    compiler mode when ``triton`` is first imported, which may happen before ``TRITON_INTERPRET`` is set (e.g. by
    torchvision); builtins are patched per launch and work either way.
    """
    for _ in tl.static_range(10):
        hi0 = tl.math.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.math.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _dropout_uniforms(seed_lo, seed_hi, offs_n, m_start, bh,
                      BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, TEXT_ROWS: tl.constexpr):
    """Both directions' dropout uniforms of the logits ``(offs_n[i], m_start + j)`` of batch-head ``bh``, drawn with
    one Philox4x32-10 call per 4 logits.

    Logit ``(n, m)`` takes word ``m % 4`` of ``Philox(counter=(n, m // 4, bh, 0), key=(seed_lo, seed_hi))``: its low
    16 bits are the image direction's uniform, its high 16 bits the text direction's (disjoint bits of one draw, so
    the two masks are independent).  ``offs_n`` ``[BLOCK_N]`` are image positions, ``m_start`` (a multiple of 4, as
    every text tile start is) the first text position.  Returns ``(u_v, u_l)``, fp32 multiples of ``2**-16`` in
    ``[0, 1)``, shaped ``[BLOCK_N, BLOCK_T]`` (rows = image tokens) or, with ``TEXT_ROWS``, ``[BLOCK_T, BLOCK_N]``.
    """
    g = m_start // 4 + tl.arange(0, BLOCK_T // 4)  # groups of 4 text positions
    zero = (offs_n[:, None] * 0 + g[None, :] * 0).to(tl.uint32)
    c0 = offs_n[:, None].to(tl.uint32) + zero
    c1 = g[None, :].to(tl.uint32) + zero
    c2 = zero + bh.to(tl.uint32)
    k0 = zero + seed_lo.to(tl.uint32)
    k1 = zero + seed_hi.to(tl.uint32)
    r0, r1, r2, r3 = _philox4x32(c0, c1, c2, zero, k0, k1)  # [BLOCK_N, BLOCK_T // 4] each
    # interleave: position 4 g + i of a row takes r_i (join adds a minor dim: [..., 2, 2] holds r0 r1 / r2 r3)
    w = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_N, BLOCK_T])
    if TEXT_ROWS:
        w = tl.trans(w)
    inv = 1.0 / 65536.0
    return (w & 0xFFFF).to(tl.float32) * inv, (w >> 16).to(tl.float32) * inv


@triton.jit
def _keep_mask_kernel(KEEP_V, KEEP_L, seed_lo, seed_hi, p_drop, N, M, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """Debug helper: materialise both dropout keep-masks as uint8 ``(B*H, N, M)`` (1 = kept)."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    bh = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    u_v, u_l = _dropout_uniforms(seed_lo, seed_hi, offs_n, pid_t * BLOCK_T, bh, BLOCK_N, BLOCK_T, False)
    ok = (offs_n[:, None] < N) & (offs_t[None, :] < M)
    base = bh.to(tl.int64) * N * M
    ptrs = base + offs_n[:, None].to(tl.int64) * M + offs_t[None, :]
    tl.store(KEEP_V + ptrs, (u_v >= p_drop).to(tl.uint8), mask=ok)
    tl.store(KEEP_L + ptrs, (u_l >= p_drop).to(tl.uint8), mask=ok)


@triton.jit
def _program_tile(pid, bh, H, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Prologue of a kernel whose program owns row tile ``pid`` of an ``(L, D)`` operand of batch-head ``bh``.

    Returns ``(b, h, offs, offs_d, ok, d_ok, tile_ok)``: ``b``, ``h`` of ``bh = b * H + h`` as int64 (offsets into
    large tensors), token positions ``offs`` ``[BLOCK_L]``, head-dim positions ``offs_d`` ``[BLOCK_D]``, their
    bound checks ``ok`` and ``d_ok`` and the tile mask ``tile_ok`` ``[BLOCK_L, BLOCK_D]``.
    """
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < L
    d_ok = offs_d < D
    return b, h, offs, offs_d, ok, d_ok, ok[:, None] & d_ok[None, :]


@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, mask, UPCAST: tl.constexpr):
    """The ``[R, C]`` tile ``ptr[offs_r[i] * stride_r + offs_c[j] * stride_c]``; 0 where ``mask`` ``[R, C]`` is False.

    ``ptr`` points at the (b, h) slice of a strided ``(B, H, L, D)`` tensor, ``offs_r`` ``[R]`` are token rows and
    ``offs_c`` ``[C]`` head-dim columns.  ``UPCAST`` converts the tile to fp32 (bf16 inputs under the interpreter).
    """
    x = tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend(
    a, rows, row_start, K, V, stride_kl, stride_kd, stride_vl, stride_vd, KEY_MASK, key_lo, key_hi, key_end,
    offs_d, d_ok, bh, seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2,
    HAS_KEY_MASK: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr, IMAGE_ROWS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax of one row tile over the keys ``[key_lo, key_hi)``: the loop of either direction.

    Image direction (``IMAGE_ROWS``): rows are image tokens, ``a`` the q tile, keys/values the text tokens' k / v_l.
    Text direction: rows are text tokens, ``a`` the k tile, keys/values the image tokens' q / v_v.

    ``a`` ``[BLOCK_R, BLOCK_D]`` (zero-padded), ``rows`` ``[BLOCK_R]`` its token positions starting at ``row_start``
    (dropout counters);
    ``K``, ``V`` the (b, h) slices of the key operand and the values, ``(L, D)`` strided; ``KEY_MASK`` row b of the
    keys' uint8 padding mask (read with ``HAS_KEY_MASK``); keys at positions ``>= key_end`` are excluded.  Key tiles
    of ``BLOCK_K``; dropout keeps ``p`` where the direction's Philox uniform is ``>= p_drop`` (module docstring).

    Returns the unnormalised state ``(acc, m, l)``: ``acc`` ``[BLOCK_R, BLOCK_D]``, running max ``m`` (base 2) and
    sum ``l`` ``[BLOCK_R]``, fp32; a row with no admissible key has ``m = -inf, l = 0, acc = 0``.
    """
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_R, BLOCK_D], 0.0, dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(key_lo, key_hi, BLOCK_K):
        key = k0 + offs_k
        key_ok = key < key_end
        # k^T tile [BLOCK_D, BLOCK_K] and the logits of _bwd._score_tile, written out (see the module docstring)
        kt = tl.load(K + key[None, :] * stride_kl + offs_d[:, None] * stride_kd,
                     mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(a, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_R, BLOCK_K]
        if HAS_CLAMP:
            s = tl.minimum(tl.maximum(s, -clamp2), clamp2)
        valid = key_ok
        if HAS_KEY_MASK:
            valid = valid & (tl.load(KEY_MASK + key, mask=key_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))

        # a row with no admissible key so far keeps m = -inf, so use 0 as its reference
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _elementwise_max))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        if HAS_DROPOUT:
            if IMAGE_ROWS:  # image-direction mask: rows are image tokens n, keys the text tokens from k0
                u, _u = _dropout_uniforms(seed_lo, seed_hi, rows, k0, bh, BLOCK_R, BLOCK_K, False)
            else:  # text-direction mask: rows are text tokens from row_start, keys the image tokens
                _u, u = _dropout_uniforms(seed_lo, seed_hi, key, row_start, bh, BLOCK_K, BLOCK_R, True)
            p = tl.where(u >= p_drop, p * keep_scale, 0.0)

        v = tl.load(V + key[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _softmax_finish(acc, m_i, l_i):
    """``(o, lse2)`` of an online-softmax state: ``o = acc / l`` ``[R, BLOCK_D]`` and the base-2 log-sum-exp
    ``lse2 = m + log2(l)`` ``[R]``; a row with ``l = 0`` (no admissible key) gets ``o = 0`` and ``lse2 = +inf``."""
    has_mass = l_i > 0.0
    l_safe = tl.where(has_mass, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(has_mass, m_i + tl.log2(l_safe), float("inf"))


@triton.jit(do_not_specialize=_config.NO_SPECIALIZE)
def _fwd_rows_kernel(
    Q, K, VL, OV, LSEV, TMASK, THI,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, M, D, N_BUCKET,
    HAS_TMASK: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Image direction.  Grid ``(cdiv(N, BLOCK_N), B*H)``.

    Q (B, H, N, D), K and VL (B, H, M, D), OV (B, H, N, D) strided; LSEV fp32 (B*H, N); TMASK uint8 (B, M);
    THI int32 (B,): one past the last real text token, so fully padded trailing text tiles are skipped.
    """
    bh = tl.program_id(1)
    b, h, offs_n, offs_d, n_ok, d_ok, nd_ok = _program_tile(tl.program_id(0), bh, H, N, D, BLOCK_N, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh, offs_n, offs_d, stride_qn, stride_qd, nd_ok, UPCAST)
    if HAS_TMASK:
        t_hi = tl.load(THI + b)
    else:
        t_hi = M
    # online softmax over the text tiles [0, t_hi)
    acc, m_i, l_i = _attend(
        q, offs_n, tl.program_id(0) * BLOCK_N, K + b * stride_kb + h * stride_kh, VL + b * stride_vb + h * stride_vh,
        stride_km, stride_kd, stride_vm, stride_vd, TMASK + b * M, 0, t_hi, M,
        offs_d, d_ok, bh, seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2,
        HAS_KEY_MASK=HAS_TMASK, HAS_CLAMP=HAS_CLAMP, HAS_DROPOUT=HAS_DROPOUT, IMAGE_ROWS=True,
        UPCAST=UPCAST, PRECISION=PRECISION, BLOCK_R=BLOCK_N, BLOCK_K=BLOCK_T, BLOCK_D=BLOCK_D,
    )

    o, lse2 = _softmax_finish(acc, m_i, l_i)
    tl.store(OV + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
             o.to(OV.dtype.element_ty), mask=nd_ok)
    tl.store(LSEV + bh.to(tl.int64) * N + offs_n, lse2, mask=n_ok)


@triton.jit(do_not_specialize=_config.NO_SPECIALIZE)
def _fwd_cols_kernel(
    Q, K, VV, OL, LSEL, PACC, PM, PL, IMASK, IHI, TMASK,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2, split_len, num_splits,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N, M, D, N_BUCKET,
    HAS_IMASK: tl.constexpr, SKIP_MASKED_TEXT: tl.constexpr, HAS_CLAMP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Text direction.  Grid ``(cdiv(M, BLOCK_T), num_splits, B*H)``.

    Program (j, s) owns text tokens ``[j*BLOCK_T, (j+1)*BLOCK_T)`` and image tokens ``[s*split_len, (s+1)*split_len)``.
    With ``WRITE_PARTIAL`` it stores unnormalised fp32 partials: PACC (B*H, S, M, D), PM and PL (B*H, S, M);
    otherwise the final OL (B, H, M, D) and LSEL fp32 (B*H, M).  IMASK uint8 (B, N), IHI int32 (B,) one past the
    last real image token; TMASK uint8 (B, M) is read only with ``SKIP_MASKED_TEXT``.
    """
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, offs_t, offs_d, t_ok, d_ok, td_ok = _program_tile(tl.program_id(0), bh, H, M, D, BLOCK_T, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh, offs_t, offs_d, stride_km, stride_kd, td_ok, UPCAST)

    n_lo = pid_s * split_len
    n_hi = tl.minimum(n_lo + split_len, N)
    if HAS_IMASK:
        n_hi = tl.minimum(n_hi, tl.load(IHI + b))
    t_keep = t_ok
    if SKIP_MASKED_TEXT:
        t_keep = t_ok & (tl.load(TMASK + b * M + offs_t, mask=t_ok, other=0) != 0)
        # a tile of padded text tokens only: their outputs are zeros, skip the image loop
        n_hi = tl.where(tl.reduce(t_keep.to(tl.int32), 0, _elementwise_max) > 0, n_hi, n_lo)

    # online softmax over the image tiles [n_lo, n_hi) of this split
    acc, m_i, l_i = _attend(
        k, offs_t, tl.program_id(0) * BLOCK_T, Q + b * stride_qb + h * stride_qh, VV + b * stride_vb + h * stride_vh,
        stride_qn, stride_qd, stride_vn, stride_vd, IMASK + b * N, n_lo, n_hi, n_hi,
        offs_d, d_ok, bh, seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2,
        HAS_KEY_MASK=HAS_IMASK, HAS_CLAMP=HAS_CLAMP, HAS_DROPOUT=HAS_DROPOUT, IMAGE_ROWS=False,
        UPCAST=UPCAST, PRECISION=PRECISION, BLOCK_R=BLOCK_T, BLOCK_K=BLOCK_N, BLOCK_D=BLOCK_D,
    )

    if WRITE_PARTIAL:
        row = (bh.to(tl.int64) * num_splits + pid_s) * M + offs_t  # [BLOCK_T] rows of the (B*H, S, M) layout
        tl.store(PACC + row[:, None] * D + offs_d[None, :], acc, mask=td_ok)
        tl.store(PM + row, m_i, mask=t_ok)
        tl.store(PL + row, l_i, mask=t_ok)
    else:
        o, lse2 = _softmax_finish(acc, m_i, l_i)
        if SKIP_MASKED_TEXT:
            o = tl.where(t_keep[:, None], o, 0.0)
            lse2 = tl.where(t_keep, lse2, float("inf"))
        tl.store(OL + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_om + offs_d[None, :] * stride_od,
                 o.to(OL.dtype.element_ty), mask=td_ok)
        tl.store(LSEL + bh.to(tl.int64) * M + offs_t, lse2, mask=t_ok)


@triton.jit
def _fwd_combine_kernel(
    OL, LSEL, PACC, PM, PL, TMASK,
    num_splits,
    stride_ob, stride_oh, stride_om, stride_od,
    H, M, D,
    SKIP_MASKED_TEXT: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Merge the per-split text-direction partials in split order 0, 1, ... (deterministic).  Grid
    ``(cdiv(M, BLOCK_T), B*H)``.  A split with no admissible image token has ``m = -inf, l = 0, acc = 0`` and
    contributes nothing."""
    bh = tl.program_id(1)
    b, h, offs_t, offs_d, t_ok, d_ok, td_ok = _program_tile(tl.program_id(0), bh, H, M, D, BLOCK_T, BLOCK_D)

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_T], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
    for s in range(0, num_splits):
        row = (bh.to(tl.int64) * num_splits + s) * M + offs_t
        m_s = tl.load(PM + row, mask=t_ok, other=float("-inf"))
        l_s = tl.load(PL + row, mask=t_ok, other=0.0)
        acc_s = tl.load(PACC + row[:, None] * D + offs_d[None, :], mask=td_ok, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_run = tl.exp2(m_i - m_ref)
        a_s = tl.exp2(m_s - m_ref)
        l_i = l_i * a_run + l_s * a_s
        acc = acc * a_run[:, None] + acc_s * a_s[:, None]
        m_i = m_new

    o, lse2 = _softmax_finish(acc, m_i, l_i)
    if SKIP_MASKED_TEXT:
        t_keep = t_ok & (tl.load(TMASK + b * M + offs_t, mask=t_ok, other=0) != 0)
        o = tl.where(t_keep[:, None], o, 0.0)
        lse2 = tl.where(t_keep, lse2, float("inf"))
    tl.store(OL + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(OL.dtype.element_ty), mask=td_ok)
    tl.store(LSEL + bh.to(tl.int64) * M + offs_t, lse2, mask=t_ok)


# Autotuned variants, built only when kernels are compiled for a GPU (None under the interpreter).
fwd_rows_tuned = _config.autotuned(_config.FWD_ROWS, _fwd_rows_kernel)
fwd_cols_tuned = _config.autotuned(_config.FWD_COLS, _fwd_cols_kernel)
