"""Backward Triton kernels of the fused bi-directional attention (fusion_kernel.md §3.9, deterministic, no atomics).

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
* ``_bwd_rows_kernel`` owns an image tile and produces dQ and dV_v (reductions over M stay in registers);
* ``_bwd_cols_kernel`` owns a (text tile, image split) and produces dK and dV_l; with several splits it writes fp32
  partials that the caller sums over splits in a fixed order (``torch.sum``, deterministic).

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
    Q, K, VV, VL, DOV, DOL, DQ, DVV,
    LSEV, LSEL, DELTAV, DELTAL, TMASK, THI, IMASK,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2, scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vvb, stride_vvh, stride_vvn, stride_vvd,
    stride_vlb, stride_vlh, stride_vlm, stride_vld,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dlb, stride_dlh, stride_dlm, stride_dld,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_gvb, stride_gvh, stride_gvn, stride_gvd,
    H, N, M, D, N_BUCKET,
    HAS_TMASK: tl.constexpr, HAS_IMASK: tl.constexpr, SKIP_MASKED_TEXT: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dQ and dV_v for one image tile.  Grid ``(cdiv(N, BLOCK_N), B*H)``.

    Q, VV, DOV, DQ, DVV (B, H, N, D); K, VL, DOL (B, H, M, D); LSEV, DELTAV fp32 (B*H, N) and LSEL, DELTAL fp32
    (B*H, M) (LSEs base-2); TMASK uint8 (B, M); THI int32 (B,); IMASK uint8 (B, N).
    """
    bh = tl.program_id(1)
    b, h, offs_n, offs_d, n_ok, d_ok, nd_ok = _program_tile(tl.program_id(0), bh, H, N, D, BLOCK_N, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)

    # image side resident
    q, vv, dov, lse_v, delta_v, img_ok = _load_side(
        Q + b * stride_qb + h * stride_qh, VV + b * stride_vvb + h * stride_vvh, DOV + b * stride_dvb + h * stride_dvh,
        stride_qn, stride_qd, stride_vvn, stride_vvd, stride_dvn, stride_dvd,
        LSEV, DELTAV, IMASK + b * N, bh, N, offs_n, n_ok, offs_d, d_ok, HAS_MASK=HAS_IMASK, UPCAST=UPCAST,
    )

    dq = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dvv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)

    # Padded text tokens still own text-direction outputs (and gradients) unless SKIP_MASKED_TEXT.
    t_end = M
    if HAS_TMASK and SKIP_MASKED_TEXT:
        t_end = tl.load(THI + b)
    k_base = K + b * stride_kb + h * stride_kh
    vl_base = VL + b * stride_vlb + h * stride_vlh
    dol_base = DOL + b * stride_dlb + h * stride_dlh
    for t0 in range(0, t_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < M
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
            keep_l = u_l >= p_drop
            dp_l = tl.where(keep_l, dp_l * keep_scale, 0.0)
            p_l_drop = tl.where(keep_l, p_l * keep_scale, 0.0)
        else:
            p_l_drop = p_l
        ds = p_v * (dp_v - delta_v[:, None]) + p_l * (dp_l - delta_l[None, :])
        if HAS_CLAMP:
            ds = tl.where(inside, ds, 0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dvv += tl.dot(p_l_drop.to(dol.dtype), dol, input_precision=PRECISION)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_n[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=nd_ok)
    tl.store(DVV + b * stride_gvb + h * stride_gvh + offs_n[:, None] * stride_gvn + offs_d[None, :] * stride_gvd,
             dvv.to(DVV.dtype.element_ty), mask=nd_ok)


@triton.jit(do_not_specialize=_config.NO_SPECIALIZE)
def _bwd_cols_kernel(
    Q, K, VV, VL, DOV, DOL, DK, DVL, PDK, PDVL,
    LSEV, LSEL, DELTAV, DELTAL, TMASK, IMASK,
    seed_lo, seed_hi, p_drop, keep_scale, qk_scale, clamp2, scale, split_len, num_splits,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vvb, stride_vvh, stride_vvn, stride_vvd,
    stride_vlb, stride_vlh, stride_vlm, stride_vld,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dlb, stride_dlh, stride_dlm, stride_dld,
    stride_dkb, stride_dkh, stride_dkm, stride_dkd,
    stride_glb, stride_glh, stride_glm, stride_gld,
    H, N, M, D, N_BUCKET,
    HAS_TMASK: tl.constexpr, HAS_IMASK: tl.constexpr, SKIP_MASKED_TEXT: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_DROPOUT: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dK and dV_l for one (text tile, image split).  Grid ``(cdiv(M, BLOCK_T), num_splits, B*H)``.

    With ``WRITE_PARTIAL`` the unscaled fp32 sums go to PDK / PDVL (B*H, S, M, D); otherwise the final DK (scaled)
    and DVL are written in their dtype.
    """
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b, h, offs_t, offs_d, t_ok, d_ok, td_ok = _program_tile(tl.program_id(0), bh, H, M, D, BLOCK_T, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)

    # text side resident
    k, vl, dol, lse_l, delta_l, txt_ok = _load_side(
        K + b * stride_kb + h * stride_kh, VL + b * stride_vlb + h * stride_vlh, DOL + b * stride_dlb + h * stride_dlh,
        stride_km, stride_kd, stride_vlm, stride_vld, stride_dlm, stride_dld,
        LSEL, DELTAL, TMASK + b * M, bh, M, offs_t, t_ok, offs_d, d_ok, HAS_MASK=HAS_TMASK, UPCAST=UPCAST,
    )

    n_lo = pid_s * split_len
    n_hi = tl.minimum(n_lo + split_len, N)
    if HAS_TMASK and SKIP_MASKED_TEXT:
        # padded text tokens get neither image-direction weight nor (skipped) text outputs: zero gradients
        n_hi = tl.where(tl.reduce(txt_ok.to(tl.int32), 0, _elementwise_max) > 0, n_hi, n_lo)

    dk = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
    dvl = tl.full([BLOCK_T, BLOCK_D], 0.0, dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    vv_base = VV + b * stride_vvb + h * stride_vvh
    dov_base = DOV + b * stride_dvb + h * stride_dvh
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < n_hi
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
            u_v, u_l = _dropout_uniforms(seed_lo, seed_hi, n, tl.program_id(0) * BLOCK_T, bh, BLOCK_N, BLOCK_T, True)
            keep_v = u_v >= p_drop
            dp_v = tl.where(keep_v, dp_v * keep_scale, 0.0)
            dp_l = tl.where(u_l >= p_drop, dp_l * keep_scale, 0.0)
            p_v_drop = tl.where(keep_v, p_v * keep_scale, 0.0)
        else:
            p_v_drop = p_v
        ds = p_v * (dp_v - delta_v[None, :]) + p_l * (dp_l - delta_l[:, None])
        if HAS_CLAMP:
            ds = tl.where(inside, ds, 0.0)
        dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
        dvl += tl.dot(p_v_drop.to(dov.dtype), dov, input_precision=PRECISION)

    if WRITE_PARTIAL:
        prow = (bh.to(tl.int64) * num_splits + pid_s) * M + offs_t
        pptr = prow[:, None] * D + offs_d[None, :]
        tl.store(PDK + pptr, dk, mask=td_ok)
        tl.store(PDVL + pptr, dvl, mask=td_ok)
    else:
        dk = dk * scale
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_t[:, None] * stride_dkm + offs_d[None, :] * stride_dkd,
                 dk.to(DK.dtype.element_ty), mask=td_ok)
        tl.store(DVL + b * stride_glb + h * stride_glh + offs_t[:, None] * stride_glm + offs_d[None, :] * stride_gld,
                 dvl.to(DVL.dtype.element_ty), mask=td_ok)


bwd_rows_tuned = _config.autotuned(_config.BWD_ROWS, _bwd_rows_kernel)
bwd_cols_tuned = _config.autotuned(_config.BWD_COLS, _bwd_cols_kernel)
