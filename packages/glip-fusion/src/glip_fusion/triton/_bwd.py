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
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _config
from ._fwd import _elementwise_max, _philox_uniforms, _sum_combine


@triton.jit
def _bwd_pre_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_gb, stride_gh, stride_gl, stride_gd,
    H, L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``DELTA[bh, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]`` in fp32.  Grid ``(cdiv(L, BLOCK_L), B*H)``."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_l[:, None] < L) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    g = tl.load(DO + b * stride_gb + h * stride_gh + offs_l[:, None] * stride_gl + offs_d[None, :] * stride_gd,
                mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_l, tl.reduce(o * g, 1, _sum_combine), mask=offs_l < L)


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
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    n_ok = offs_n < N
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=nd_ok, other=0.0)
    vv = tl.load(VV + b * stride_vvb + h * stride_vvh + offs_n[:, None] * stride_vvn + offs_d[None, :] * stride_vvd,
                 mask=nd_ok, other=0.0)
    dov = tl.load(DOV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                  mask=nd_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        vv = vv.to(tl.float32)
        dov = dov.to(tl.float32)
    row = bh.to(tl.int64) * N + offs_n
    lse_v = tl.load(LSEV + row, mask=n_ok, other=float("inf"))
    delta_v = tl.load(DELTAV + row, mask=n_ok, other=0.0)
    img_ok = n_ok
    if HAS_IMASK:
        img_ok = img_ok & (tl.load(IMASK + b * N + offs_n, mask=n_ok, other=0) != 0)

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
        td_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + t[:, None] * stride_km + offs_d[None, :] * stride_kd, mask=td_ok, other=0.0)
        vl = tl.load(vl_base + t[:, None] * stride_vlm + offs_d[None, :] * stride_vld, mask=td_ok, other=0.0)
        dol = tl.load(dol_base + t[:, None] * stride_dlm + offs_d[None, :] * stride_dld, mask=td_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            vl = vl.to(tl.float32)
            dol = dol.to(tl.float32)
        col = bh.to(tl.int64) * M + t
        lse_l = tl.load(LSEL + col, mask=t_ok, other=float("inf"))
        delta_l = tl.load(DELTAL + col, mask=t_ok, other=0.0)
        txt_ok = t_ok
        if HAS_TMASK:
            txt_ok = txt_ok & (tl.load(TMASK + b * M + t, mask=t_ok, other=0) != 0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_T], base-2 units
        if HAS_CLAMP:
            inside = (s >= -clamp2) & (s <= clamp2)
            s = tl.minimum(tl.maximum(s, -clamp2), clamp2)
        p_v = tl.exp2(tl.where(txt_ok[None, :], s - lse_v[:, None], float("-inf")))
        p_l = tl.exp2(tl.where(img_ok[:, None] & t_ok[None, :], s - lse_l[None, :], float("-inf")))
        dp_v = tl.dot(dov, tl.trans(vl), input_precision=PRECISION)
        dp_l = tl.dot(vv, tl.trans(dol), input_precision=PRECISION)
        if HAS_DROPOUT:
            u_v, u_l = _philox_uniforms(seed_lo, seed_hi, offs_n[:, None], t[None, :], bh)
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
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    t_ok = offs_t < M
    d_ok = offs_d < D
    td_ok = t_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_km + offs_d[None, :] * stride_kd,
                mask=td_ok, other=0.0)
    vl = tl.load(VL + b * stride_vlb + h * stride_vlh + offs_t[:, None] * stride_vlm + offs_d[None, :] * stride_vld,
                 mask=td_ok, other=0.0)
    dol = tl.load(DOL + b * stride_dlb + h * stride_dlh + offs_t[:, None] * stride_dlm + offs_d[None, :] * stride_dld,
                  mask=td_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        vl = vl.to(tl.float32)
        dol = dol.to(tl.float32)
    col = bh.to(tl.int64) * M + offs_t
    lse_l = tl.load(LSEL + col, mask=t_ok, other=float("inf"))
    delta_l = tl.load(DELTAL + col, mask=t_ok, other=0.0)
    txt_ok = t_ok
    if HAS_TMASK:
        txt_ok = txt_ok & (tl.load(TMASK + b * M + offs_t, mask=t_ok, other=0) != 0)

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
        nd_ok = n_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + n[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=nd_ok, other=0.0)
        vv = tl.load(vv_base + n[:, None] * stride_vvn + offs_d[None, :] * stride_vvd, mask=nd_ok, other=0.0)
        dov = tl.load(dov_base + n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, mask=nd_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            vv = vv.to(tl.float32)
            dov = dov.to(tl.float32)
        row = bh.to(tl.int64) * N + n
        lse_v = tl.load(LSEV + row, mask=n_ok, other=float("inf"))
        delta_v = tl.load(DELTAV + row, mask=n_ok, other=0.0)
        img_ok = n_ok
        if HAS_IMASK:
            img_ok = img_ok & (tl.load(IMASK + b * N + n, mask=n_ok, other=0) != 0)

        s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_T, BLOCK_N] = S^T tile
        if HAS_CLAMP:
            inside = (s >= -clamp2) & (s <= clamp2)
            s = tl.minimum(tl.maximum(s, -clamp2), clamp2)
        p_v = tl.exp2(tl.where(txt_ok[:, None] & n_ok[None, :], s - lse_v[None, :], float("-inf")))
        p_l = tl.exp2(tl.where(img_ok[None, :] & t_ok[:, None], s - lse_l[:, None], float("-inf")))
        dp_v = tl.dot(vl, tl.trans(dov), input_precision=PRECISION)
        dp_l = tl.dot(dol, tl.trans(vv), input_precision=PRECISION)
        if HAS_DROPOUT:
            u_v, u_l = _philox_uniforms(seed_lo, seed_hi, n[None, :], offs_t[:, None], bh)
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


if _config.interpreting():
    bwd_rows_tuned = bwd_cols_tuned = None
else:
    bwd_rows_tuned = triton.autotune(
        _config.AUTOTUNE_CONFIGS[_config.BWD_ROWS], key=_config.AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _config.make_pruner(_config.BWD_ROWS)},
    )(_bwd_rows_kernel)
    bwd_cols_tuned = triton.autotune(
        _config.AUTOTUNE_CONFIGS[_config.BWD_COLS], key=_config.AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _config.make_pruner(_config.BWD_COLS)},
    )(_bwd_cols_kernel)
