"""Backward Triton kernels of the fused bi-directional attention (deterministic, no atomics).

Math per (b, h), natural-log units, ``Z_v``/``Z_l`` the dropout keep masks scaled by ``1/(1-p)``::

    P_v  = exp(S - LSE_v[:, None])            (row softmax over M, padded text -> 0)
    P_l  = exp(S - LSE_l[None, :])            (column softmax over N, padded image -> 0)
    D_v  = rowsum(dO_v * O_v)   D_l = rowsum(dO_l * O_l)
    dP_v = (dO_v @ V_l^T) * Z_v             dP_l = (V_v @ dO_l^T) * Z_l
    dS   = P_v * (dP_v - D_v[:, None]) + P_l * (dP_l - D_l[None, :])     (one dS: S is shared)
    dS   = dS * [|S_raw| <= clamp]            (torch.clamp's gradient)
    dQ   = scale * dS @ K        dK   = scale * dS^T @ Q
    dV_v = (P_l * Z_l) @ dO_l    dV_l = (P_v * Z_v)^T @ dO_v

* ``_bwd_pre_kernel`` computes ``D = rowsum(dO * O)`` for either direction;
* ``_bwd_rows_kernel`` owns an image tile and produces dQ or, with ``VALUES``, dV_v (reductions over M stay in
  registers);
* ``_bwd_cols_kernel`` owns a (text tile, image split) and produces dK or, with ``VALUES``, dV_l; with several splits
  it writes fp32 partials that the caller sums over splits in a fixed order (``torch.sum``, deterministic).

Each launch produces one gradient (one ``[BLOCK, head dim]`` fp32 accumulator): at head dim 256 a program holding
two accumulators (dQ and dV_v, or dK and dV_l) spilled registers at every tile size in the sm_90 compile survey.
The value passes recompute S (one dot) but need neither dP nor dS: 12 dot units per backward instead of 10.

Both kernels hold the tokens of one side (image: q, V_v, dO_v, LSE_v, D_v; text: k, V_l, dO_l, LSE_l, D_l) resident
and stream the other side's tokens, each read by ``_load_side``; the logits come from ``_score_tile``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _config
from ._fwd import _dropout_uniforms, _elementwise_max, _load_tile, _program_tile, _sum_combine


@triton.jit
def _score_tile(a, b_t, qk_scale, clamp2, HAS_CLAMP: tl.constexpr, PRECISION: tl.constexpr):
    """Logits ``s = qk_scale * a @ b_t`` in base-2 units (fp32 accumulation), clamped to ``[-clamp2, clamp2]``.

    ``a`` ``[R, BLOCK_D]`` and ``b_t`` ``[BLOCK_D, C]``: ``q`` and ``k^T`` give an S tile, ``k`` and ``q^T`` an S^T
    tile.  Returns ``(s, inside)``: ``s`` ``[R, C]`` fp32 and ``inside`` ``[R, C]`` bool, True where the unclamped
    logit lay within the bounds (``torch.clamp`` passes the gradient there).  Without ``HAS_CLAMP`` nothing is
    clamped and ``inside`` is the scalar True (unused).
    """
    s = tl.dot(a, b_t, input_precision=PRECISION) * qk_scale
    inside = True
    if HAS_CLAMP:
        inside = (s >= -clamp2) & (s <= clamp2)
        s = tl.minimum(tl.maximum(s, -clamp2), clamp2)
    return s, inside


@triton.jit
def _load_side(
    X, V, G, stride_xl, stride_xd, stride_vl, stride_vd, stride_gl, stride_gd,
    LSE, DELTA, TOKEN_MASK, bh, L, idx, idx_ok, offs_d, d_ok,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr,
):
    """What the backward needs about the tokens ``idx`` ``[I]`` of one side of (b, h).

    ``X``, ``V``, ``G``: the (b, h) slices of the side's attention operand (q or k), values (v_v or v_l) and output
    gradient (dO_v or dO_l), ``(L, D)`` strided; ``LSE``, ``DELTA``: the side's fp32 ``(B*H, L)`` base-2 log-sum-exp
    and ``rowsum(dO * O)``; ``TOKEN_MASK``: row b of the side's uint8 padding mask (read with ``HAS_MASK``).

    Returns ``x, v, g`` ``[I, BLOCK_D]`` (0 outside ``idx_ok``; fp32 with ``UPCAST``), ``lse2`` ``[I]`` (+inf
    outside: probability 0), ``delta`` ``[I]`` (0 outside) and ``tok_ok`` ``[I]`` (in range and a real token).
    """
    tile_ok = idx_ok[:, None] & d_ok[None, :]
    # three loads written out rather than three _load_tile calls: each helper call costs ~0.5 ms under the
    # interpreter, more than this whole function's work on a small tile
    x = tl.load(X + idx[:, None] * stride_xl + offs_d[None, :] * stride_xd, mask=tile_ok, other=0.0)
    v = tl.load(V + idx[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=tile_ok, other=0.0)
    g = tl.load(G + idx[:, None] * stride_gl + offs_d[None, :] * stride_gd, mask=tile_ok, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
        v = v.to(tl.float32)
        g = g.to(tl.float32)
    row = bh.to(tl.int64) * L + idx
    lse2 = tl.load(LSE + row, mask=idx_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=idx_ok, other=0.0)
    tok_ok = idx_ok
    if HAS_MASK:
        tok_ok = tok_ok & (tl.load(TOKEN_MASK + idx, mask=idx_ok, other=0) != 0)
    return x, v, g, lse2, delta, tok_ok


@triton.jit
def _bwd_pre_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    H, L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``DELTA[bh, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]`` in fp32.  Grid ``(cdiv(L, BLOCK_L), B*H)``."""
    bh = tl.program_id(1)
    b, h, offs_l, offs_d, l_ok, _d_ok, ok = _program_tile(tl.program_id(0), bh, H, L, D, BLOCK_L, BLOCK_D)
    o = _load_tile(O + b * stride_ob + h * stride_oh, offs_l, offs_d, stride_ol, stride_od, ok, True)
    g = _load_tile(DO + b * stride_gb + h * stride_gh, offs_l, offs_d, stride_gl, stride_gd, ok, True)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_l, tl.reduce(o * g, 1, _sum_combine), mask=l_ok)


@triton.jit(do_not_specialize=_config.NO_SPECIALIZE)
def _bwd_rows_kernel(
    Q, K, VV, VL, DOV, DOL, OUT,
    LSEV, LSEL, DELTAV, DELTAL, TMASK, THI, IMASK,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vvb, stride_vvh, stride_vvn, stride_vvd,
    stride_vlb, stride_vlh, stride_vlm, stride_vld,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dlb, stride_dlh, stride_dlm, stride_dld,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, M, D, N_BUCKET,
    VALUES: tl.constexpr, HAS_TMASK: tl.constexpr, HAS_IMASK: tl.constexpr, SKIP_MASKED_TEXT: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One image tile's gradient, looping over the text tiles.  Grid ``(cdiv(N, BLOCK_N), B*H)``.

    ``VALUES`` False: ``OUT = dQ`` (needs dS: 4 dots per step); True: ``OUT = dV_v = (P_l Z_l) @ dO_l`` (2 dots per
    step, reads only q, k, dO_l and LSE_l).  Q, VV, DOV, OUT (B, H, N, D); K, VL, DOL (B, H, M, D); LSEV, DELTAV fp32
    (B*H, N) and LSEL, DELTAL fp32 (B*H, M) (LSEs base-2); TMASK uint8 (B, M); THI int32 (B,); IMASK uint8 (B, N).
    One accumulator per program: at head dim 256 the fused dQ + dV_v program spilled registers at every tile size.
    """
    bh = tl.program_id(1)
    b, h, offs_n, offs_d, n_ok, d_ok, nd_ok = _program_tile(tl.program_id(0), bh, H, N, D, BLOCK_N, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    vl_base = VL + b * stride_vlb + h * stride_vlh
    dol_base = DOL + b * stride_dlb + h * stride_dlh

    # image side resident
    if VALUES:
        q = _load_tile(q_base, offs_n, offs_d, stride_qn, stride_qd, nd_ok, UPCAST)
        img_ok = n_ok
        if HAS_IMASK:
            img_ok = img_ok & (tl.load(IMASK + b * N + offs_n, mask=n_ok, other=0) != 0)
    else:
        q, vv, dov, lse_v, delta_v, img_ok = _load_side(
            q_base, VV + b * stride_vvb + h * stride_vvh, DOV + b * stride_dvb + h * stride_dvh,
            stride_qn, stride_qd, stride_vvn, stride_vvd, stride_dvn, stride_dvd,
            LSEV, DELTAV, IMASK + b * N, bh, N, offs_n, n_ok, offs_d, d_ok, HAS_MASK=HAS_IMASK, UPCAST=UPCAST,
        )
    acc = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)

    # Padded text tokens still own text-direction outputs (and gradients) unless SKIP_MASKED_TEXT.
    t_end = M
    if HAS_TMASK and SKIP_MASKED_TEXT:
        t_end = tl.load(THI + b)
    for t0 in range(0, t_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < M
        if VALUES:
            td_ok = t_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + t[:, None] * stride_km + offs_d[None, :] * stride_kd, mask=td_ok, other=0.0)
            dol = tl.load(dol_base + t[:, None] * stride_dlm + offs_d[None, :] * stride_dld, mask=td_ok, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                dol = dol.to(tl.float32)
            lse_l = tl.load(LSEL + bh.to(tl.int64) * M + t, mask=t_ok, other=float("inf"))
            s, _inside = _score_tile(q, tl.trans(k), qk_scale, clamp2, HAS_CLAMP, PRECISION)  # [BLOCK_N, BLOCK_T]
            p_l = tl.exp2(tl.where(img_ok[:, None] & t_ok[None, :], s - lse_l[None, :], float("-inf")))
            if HAS_DROPOUT:
                _u_v, u_l = _dropout_uniforms(seed_lo, seed_hi, offs_n, t0, bh, BLOCK_N, BLOCK_T, False)
                p_l = tl.where(u_l >= p_drop, p_l * keep_scale, 0.0)
            acc += tl.dot(p_l.to(dol.dtype), dol, input_precision=PRECISION)
        else:
            k, vl, dol, lse_l, delta_l, txt_ok = _load_side(
                k_base, vl_base, dol_base, stride_km, stride_kd, stride_vlm, stride_vld, stride_dlm, stride_dld,
                LSEL, DELTAL, TMASK + b * M, bh, M, t, t_ok, offs_d, d_ok, HAS_MASK=HAS_TMASK, UPCAST=UPCAST,
            )
            s, inside = _score_tile(q, tl.trans(k), qk_scale, clamp2, HAS_CLAMP, PRECISION)  # [BLOCK_N, BLOCK_T]
            p_v = tl.exp2(tl.where(txt_ok[None, :], s - lse_v[:, None], float("-inf")))
            p_l = tl.exp2(tl.where(img_ok[:, None] & t_ok[None, :], s - lse_l[None, :], float("-inf")))
            dp_v = tl.dot(dov, tl.trans(vl), input_precision=PRECISION)
            dp_l = tl.dot(vv, tl.trans(dol), input_precision=PRECISION)
            if HAS_DROPOUT:
                u_v, u_l = _dropout_uniforms(seed_lo, seed_hi, offs_n, t0, bh, BLOCK_N, BLOCK_T, False)
                dp_v = tl.where(u_v >= p_drop, dp_v * keep_scale, 0.0)
                dp_l = tl.where(u_l >= p_drop, dp_l * keep_scale, 0.0)
            ds = p_v * (dp_v - delta_v[:, None]) + p_l * (dp_l - delta_l[None, :])
            if HAS_CLAMP:
                ds = tl.where(inside, ds, 0.0)
            acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    if not VALUES:
        acc = acc * scale
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=nd_ok)


@triton.jit(do_not_specialize=_config.NO_SPECIALIZE)
def _bwd_cols_kernel(
    Q, K, VV, VL, DOV, DOL, OUT, PART,
    LSEV, LSEL, DELTAV, DELTAL, TMASK, IMASK,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2, scale, split_len, num_splits,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vvb, stride_vvh, stride_vvn, stride_vvd,
    stride_vlb, stride_vlh, stride_vlm, stride_vld,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dlb, stride_dlh, stride_dlm, stride_dld,
    stride_ob, stride_oh, stride_om, stride_od,
    H, N, M, D, N_BUCKET,
    VALUES: tl.constexpr, HAS_TMASK: tl.constexpr, HAS_IMASK: tl.constexpr, SKIP_MASKED_TEXT: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (text tile, image split)'s gradient.  Grid ``(cdiv(M, BLOCK_T), num_splits, B*H)``.

    ``VALUES`` False: dK (needs dS); True: ``dV_l = (P_v Z_v)^T @ dO_v`` (reads only k, q, dO_v and LSE_v; padded
    text tokens get no image-direction weight, so tiles of padded text only are skipped).  With ``WRITE_PARTIAL`` the
    unscaled fp32 sums go to PART (B*H, S, M, D); otherwise OUT (B, H, M, D) receives the final gradient (dK scaled).
    """
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, offs_t, offs_d, t_ok, d_ok, td_ok = _program_tile(tl.program_id(0), bh, H, M, D, BLOCK_T, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    m_start = tl.program_id(0) * BLOCK_T
    k_base = K + b * stride_kb + h * stride_kh
    q_base = Q + b * stride_qb + h * stride_qh
    vv_base = VV + b * stride_vvb + h * stride_vvh
    dov_base = DOV + b * stride_dvb + h * stride_dvh

    n_lo = pid_s * split_len
    n_hi = tl.minimum(n_lo + split_len, N)
    # text side resident
    if VALUES:
        k = _load_tile(k_base, offs_t, offs_d, stride_km, stride_kd, td_ok, UPCAST)
        txt_ok = t_ok
        if HAS_TMASK:
            txt_ok = txt_ok & (tl.load(TMASK + b * M + offs_t, mask=t_ok, other=0) != 0)
            n_hi = tl.where(tl.reduce(txt_ok.to(tl.int32), 0, _elementwise_max) > 0, n_hi, n_lo)
    else:
        k, vl, dol, lse_l, delta_l, txt_ok = _load_side(
            k_base, VL + b * stride_vlb + h * stride_vlh, DOL + b * stride_dlb + h * stride_dlh,
            stride_km, stride_kd, stride_vlm, stride_vld, stride_dlm, stride_dld,
            LSEL, DELTAL, TMASK + b * M, bh, M, offs_t, t_ok, offs_d, d_ok, HAS_MASK=HAS_TMASK, UPCAST=UPCAST,
        )
        if HAS_TMASK and SKIP_MASKED_TEXT:
            # padded text tokens get neither image-direction weight nor (skipped) text outputs: zero gradients
            n_hi = tl.where(tl.reduce(txt_ok.to(tl.int32), 0, _elementwise_max) > 0, n_hi, n_lo)

    acc = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < n_hi
        if VALUES:
            nd_ok = n_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + n[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=nd_ok, other=0.0)
            dov = tl.load(dov_base + n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, mask=nd_ok, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                dov = dov.to(tl.float32)
            lse_v = tl.load(LSEV + bh.to(tl.int64) * N + n, mask=n_ok, other=float("inf"))
            s, _inside = _score_tile(k, tl.trans(q), qk_scale, clamp2, HAS_CLAMP, PRECISION)  # [BLOCK_T, BLOCK_N]
            p_v = tl.exp2(tl.where(txt_ok[:, None] & n_ok[None, :], s - lse_v[None, :], float("-inf")))
            if HAS_DROPOUT:
                u_v, _u_l = _dropout_uniforms(seed_lo, seed_hi, n, m_start, bh, BLOCK_N, BLOCK_T, True)
                p_v = tl.where(u_v >= p_drop, p_v * keep_scale, 0.0)
            acc += tl.dot(p_v.to(dov.dtype), dov, input_precision=PRECISION)
        else:
            q, vv, dov, lse_v, delta_v, img_ok = _load_side(
                q_base, vv_base, dov_base, stride_qn, stride_qd, stride_vvn, stride_vvd, stride_dvn, stride_dvd,
                LSEV, DELTAV, IMASK + b * N, bh, N, n, n_ok, offs_d, d_ok, HAS_MASK=HAS_IMASK, UPCAST=UPCAST,
            )
            s, inside = _score_tile(k, tl.trans(q), qk_scale, clamp2, HAS_CLAMP, PRECISION)  # [BLOCK_T, BLOCK_N] = S^T
            p_v = tl.exp2(tl.where(txt_ok[:, None] & n_ok[None, :], s - lse_v[None, :], float("-inf")))
            p_l = tl.exp2(tl.where(img_ok[None, :] & t_ok[:, None], s - lse_l[:, None], float("-inf")))
            dp_v = tl.dot(vl, tl.trans(dov), input_precision=PRECISION)
            dp_l = tl.dot(dol, tl.trans(vv), input_precision=PRECISION)
            if HAS_DROPOUT:
                u_v, u_l = _dropout_uniforms(seed_lo, seed_hi, n, m_start, bh, BLOCK_N, BLOCK_T, True)
                dp_v = tl.where(u_v >= p_drop, dp_v * keep_scale, 0.0)
                dp_l = tl.where(u_l >= p_drop, dp_l * keep_scale, 0.0)
            ds = p_v * (dp_v - delta_v[None, :]) + p_l * (dp_l - delta_l[:, None])
            if HAS_CLAMP:
                ds = tl.where(inside, ds, 0.0)
            acc += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)

    if WRITE_PARTIAL:
        prow = (bh.to(tl.int64) * num_splits + pid_s) * M + offs_t
        tl.store(PART + prow[:, None] * D + offs_d[None, :], acc, mask=td_ok)
    else:
        if not VALUES:
            acc = acc * scale
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_om + offs_d[None, :] * stride_od,
                 acc.to(OUT.dtype.element_ty), mask=td_ok)


bwd_rows_dq_tuned = _config.autotuned(_config.BWD_ROWS_DQ, _bwd_rows_kernel)
bwd_rows_dv_tuned = _config.autotuned(_config.BWD_ROWS_DV, _bwd_rows_kernel)
bwd_cols_dk_tuned = _config.autotuned(_config.BWD_COLS_DK, _bwd_cols_kernel)
bwd_cols_dv_tuned = _config.autotuned(_config.BWD_COLS_DV, _bwd_cols_kernel)
