"""``torch.autograd.Function`` around the fused Triton kernels, input validation and kernel launchers."""
from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.runtime.errors

from .._validation import check_second_clamp, validate_bi_attention
from . import _bwd, _config, _fwd
from ._envelope import envelope_violation

_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_CALLER = "bi_attention_triton"  # prefix of every validation message


# --------------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    """Shapes and static options of one call."""

    B: int
    H: int
    N: int
    M: int
    D: int
    scale: float
    clamp: float | None
    dropout_p: float
    seed: int
    skip_masked_text: bool
    precision: str
    num_splits: int
    split_len: int
    upcast: bool


def _validate(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, fp32_precision):
    """:func:`glip_fusion.bi_attention`'s validation (the shared function, messages prefixed with the caller), then
    the kernels' envelope (:mod:`._envelope`), the second-clamp limit and ``fp32_precision``.

    Returns ``(scale, dropout_p, clamp, seed)`` as Python numbers (``scale`` defaulting to ``D ** -0.5``).
    """
    scale, dropout_p, clamp, seed = validate_bi_attention(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p,
                                                          clamp, seed, caller=_CALLER)
    problem = envelope_violation(q, k, v_v, v_l, _config.interpreting())
    if problem is not None:
        exc, message = problem
        raise exc(f"{_CALLER}: {message}")
    check_second_clamp("triton", clamp, q.shape[2], q.dtype)
    if fp32_precision not in _FP32_PRECISIONS:
        raise ValueError(f"{_CALLER}: fp32_precision must be one of {_FP32_PRECISIONS}, got {fp32_precision!r}")
    return scale, dropout_p, clamp, seed


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Strided views are used as they are, except a non-unit stride on the head dim (no vectorised loads)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------------------------------
_RESOURCE_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(triton.runtime.errors, "OutOfResources", None), getattr(triton.runtime.errors, "PTXASError", None))
    if e is not None)
# (kernel, dtype, BLOCK_D, constexpr flags) whose whole autotune set failed to compile: use the safe config directly.
_FALLBACK_KEYS: set = set()


def _launch(kernel_name: str, raw, tuned, grid_fn, n: int, m: int, *args, **kwargs):
    """Launch ``raw`` with a fixed configuration (interpreter / override) or the autotuned ``tuned`` kernel.

    If every autotune candidate runs out of shared memory or registers on this GPU (the shared-memory estimate of
    the pruner is only an estimate), fall back to :data:`_config.SAFE_CONFIG` with a warning.
    """
    cfg = _config.forced_blocks()
    if cfg is None and tuned is not None:
        key = (kernel_name, args[0].dtype, tuple(sorted(kwargs.items())))
        if key not in _FALLBACK_KEYS:
            try:
                tuned[lambda meta: grid_fn(meta["BLOCK_N"], meta["BLOCK_T"])](*args, **kwargs)
                return
            except _RESOURCE_ERRORS as exc:
                _FALLBACK_KEYS.add(key)
                warnings.warn(f"glip_fusion.triton: no autotune config of {kernel_name} fits this GPU ({exc}); "
                              f"using {_config.SAFE_CONFIG}", RuntimeWarning, stacklevel=3)
        cfg = dict(_config.SAFE_CONFIG)
    if cfg is None:
        cfg = _config.interpreter_blocks(kernel_name, n, m)
    raw[grid_fn(cfg["BLOCK_N"], cfg["BLOCK_T"])](*args, **kwargs, **cfg)


def _mask_u8(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, L) bool -> contiguous uint8 view (a 1-element dummy when absent: the kernel never reads it)."""
    if mask is None:
        return torch.zeros(1, dtype=torch.uint8, device=like.device)
    return mask.contiguous().view(torch.uint8)


def _last_true(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B,) int32: one past the last True of each row (0 for an all-False row); computed on device, no sync."""
    if mask is None:
        return torch.zeros(1, dtype=torch.int32, device=like.device)
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=torch.int32)
    return torch.where(mask, pos, torch.zeros_like(pos)).amax(dim=1).to(torch.int32).contiguous()


def _seed_words(seed: int) -> tuple[int, int]:
    """The Philox key: ``seed mod 2**62`` as two 31-bit ints (always int32 for Triton: one compiled variant)."""
    seed %= 2 ** 62
    return seed & 0x7FFFFFFF, (seed >> 31) & 0x7FFFFFFF


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _precision(dtype: torch.dtype, fp32_precision: str) -> str:
    """``tl.dot`` input precision: the user's choice for float32; Triton's default ("tf32", a no-op) for halves."""
    return fp32_precision if dtype == torch.float32 else "tf32"


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, not on whatever device happens to be current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _forward(q, k, v_v, v_l, tmask_u8, thi, imask_u8, ihi, has_t, has_i, pb: _Problem):
    """Run the forward kernels.  Returns ``o_v, o_l, lse_v, lse_l`` (LSEs fp32 (B*H, L), base 2)."""
    B, H, N, M, D = pb.B, pb.H, pb.N, pb.M, pb.D
    BH = B * H
    dev = q.device
    o_v = torch.empty_like(q)
    o_l = torch.empty_like(k)
    lse_v = torch.empty(BH, N, device=dev, dtype=torch.float32)
    lse_l = torch.empty(BH, M, device=dev, dtype=torch.float32)
    bd = _config.block_d(D)
    qk_scale = pb.scale * _fwd.LOG2E
    clamp2 = (pb.clamp if pb.clamp is not None else 0.0) * _fwd.LOG2E
    keep_scale = 1.0 / (1.0 - pb.dropout_p)
    prec = _precision(q.dtype, pb.precision)
    common = dict(HAS_CLAMP=pb.clamp is not None, HAS_DROPOUT=pb.dropout_p > 0.0, UPCAST=pb.upcast,
                  PRECISION=prec, BLOCK_D=bd)

    _launch(
        _config.FWD_ROWS, _fwd._fwd_rows_kernel, _fwd.fwd_rows_tuned,
        lambda bn, bt: (triton.cdiv(N, bn), BH), N, M,
        q, k, v_l, o_v, lse_v, tmask_u8, thi,
        *_seed_words(pb.seed), pb.dropout_p, keep_scale, qk_scale, clamp2,
        *_strides(q), *_strides(k), *_strides(v_l), *_strides(o_v),
        H, N, M, D, _config.n_bucket(N),
        HAS_TMASK=has_t, **common,
    )

    ns = pb.num_splits
    write_partial = ns > 1
    if write_partial:
        pacc = torch.empty(BH, ns, M, D, device=dev, dtype=torch.float32)
        pm = torch.empty(BH, ns, M, device=dev, dtype=torch.float32)
        pl = torch.empty(BH, ns, M, device=dev, dtype=torch.float32)
    else:
        pacc = pm = pl = lse_l  # never touched by the kernel
    _launch(
        _config.FWD_COLS, _fwd._fwd_cols_kernel, _fwd.fwd_cols_tuned,
        lambda bn, bt: (triton.cdiv(M, bt), ns, BH), N, M,
        q, k, v_v, o_l, lse_l, pacc, pm, pl, imask_u8, ihi, tmask_u8,
        *_seed_words(pb.seed), pb.dropout_p, keep_scale, qk_scale, clamp2, pb.split_len, ns,
        *_strides(q), *_strides(k), *_strides(v_v), *_strides(o_l),
        H, N, M, D, _config.n_bucket(N),
        HAS_IMASK=has_i, SKIP_MASKED_TEXT=pb.skip_masked_text and has_t, WRITE_PARTIAL=write_partial, **common,
    )
    if write_partial:
        bt = min(64, max(16, _config.next_pow2(M)))
        _fwd._fwd_combine_kernel[(triton.cdiv(M, bt), BH)](
            o_l, lse_l, pacc, pm, pl, tmask_u8, ns, *_strides(o_l), H, M, D,
            SKIP_MASKED_TEXT=pb.skip_masked_text and has_t, BLOCK_D=bd, BLOCK_T=bt, num_warps=4,
        )
    return o_v, o_l, lse_v, lse_l


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """fp32 (B*H, L): rowsum(o * do)."""
    B, H, L, D = o.shape
    delta = torch.empty(B * H, L, device=o.device, dtype=torch.float32)
    bl = _config.INTERPRETER_BLOCK_N if _config.interpreting() else 64
    _bwd._bwd_pre_kernel[(triton.cdiv(L, bl), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, L, D, BLOCK_L=bl, BLOCK_D=_config.block_d(D), num_warps=4,
    )
    return delta


def _backward(q, k, v_v, v_l, o_v, o_l, lse_v, lse_l, do_v, do_l, tmask_u8, thi, imask_u8, has_t, has_i,
              pb: _Problem):
    B, H, N, M, D = pb.B, pb.H, pb.N, pb.M, pb.D
    BH = B * H
    dev = q.device
    do_v = _unit_last_dim(do_v)
    do_l = _unit_last_dim(do_l)
    delta_v = _delta(o_v, do_v)
    delta_l = _delta(o_l, do_l)
    dq = torch.empty_like(q)
    dvv = torch.empty_like(v_v)
    dk = torch.empty_like(k)
    dvl = torch.empty_like(v_l)
    bd = _config.block_d(D)
    qk_scale = pb.scale * _fwd.LOG2E
    clamp2 = (pb.clamp if pb.clamp is not None else 0.0) * _fwd.LOG2E
    keep_scale = 1.0 / (1.0 - pb.dropout_p)
    common = dict(HAS_TMASK=has_t, HAS_IMASK=has_i, SKIP_MASKED_TEXT=pb.skip_masked_text and has_t,
                  HAS_CLAMP=pb.clamp is not None, HAS_DROPOUT=pb.dropout_p > 0.0, UPCAST=pb.upcast,
                  PRECISION=_precision(q.dtype, pb.precision), BLOCK_D=bd)

    row_args = (q, k, v_v, v_l, do_v, do_l)
    row_rest = (lse_v, lse_l, delta_v, delta_l, tmask_u8, thi, imask_u8,
                *_seed_words(pb.seed), pb.dropout_p, keep_scale, qk_scale, clamp2, pb.scale,
                *_strides(q), *_strides(k), *_strides(v_v), *_strides(v_l), *_strides(do_v), *_strides(do_l))
    # one gradient per launch: dQ, then dV_v (image tiles over the text axis)
    for name, tuned, out, values in ((_config.BWD_ROWS_DQ, _bwd.bwd_rows_dq_tuned, dq, False),
                                     (_config.BWD_ROWS_DV, _bwd.bwd_rows_dv_tuned, dvv, True)):
        _launch(
            name, _bwd._bwd_rows_kernel, tuned,
            lambda bn, bt: (triton.cdiv(N, bn), BH), N, M,
            *row_args, out, *row_rest, *_strides(out),
            H, N, M, D, _config.n_bucket(N),
            VALUES=values, **common,
        )

    ns = pb.num_splits
    write_partial = ns > 1
    # fp32 per-split partials, one buffer reused by both passes
    part = torch.empty(BH, ns, M, D, device=dev, dtype=torch.float32) if write_partial else delta_l
    col_rest = (lse_v, lse_l, delta_v, delta_l, tmask_u8, imask_u8,
                *_seed_words(pb.seed), pb.dropout_p, keep_scale, qk_scale, clamp2, pb.scale, pb.split_len, ns,
                *_strides(q), *_strides(k), *_strides(v_v), *_strides(v_l), *_strides(do_v), *_strides(do_l))
    # dK, then dV_l (text tiles over a split of the image axis)
    for name, tuned, out, values in ((_config.BWD_COLS_DK, _bwd.bwd_cols_dk_tuned, dk, False),
                                     (_config.BWD_COLS_DV, _bwd.bwd_cols_dv_tuned, dvl, True)):
        _launch(
            name, _bwd._bwd_cols_kernel, tuned,
            lambda bn, bt: (triton.cdiv(M, bt), ns, BH), N, M,
            *row_args, out, part, *col_rest, *_strides(out),
            H, N, M, D, _config.n_bucket(N),
            VALUES=values, WRITE_PARTIAL=write_partial, **common,
        )
        if write_partial:
            # fixed-order reduction over the splits (torch.sum has no atomics): deterministic
            total = part.sum(dim=1)
            out.copy_((total if values else total * pb.scale).view(B, H, M, D))
    return dq, dk, dvv, dvl


# --------------------------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------------------------
class BiAttentionFunction(torch.autograd.Function):
    """Fused bi-directional attention; see :func:`bi_attention_triton` for the semantics.

    Saves q, k, v_v, v_l, both outputs and both fp32 LSE vectors (no N x M tensor); the backward regenerates the
    dropout masks from the seed.
    """

    @staticmethod
    def forward(ctx, q, k, v_v, v_l, text_mask, image_mask, pb: _Problem):
        has_t, has_i = text_mask is not None, image_mask is not None
        tmask_u8, thi = _mask_u8(text_mask, q), _last_true(text_mask, q)
        imask_u8, ihi = _mask_u8(image_mask, q), _last_true(image_mask, q)
        with _config.interpreter_threads(), _device_guard(q):
            o_v, o_l, lse_v, lse_l = _forward(q, k, v_v, v_l, tmask_u8, thi, imask_u8, ihi, has_t, has_i, pb)
        ctx.save_for_backward(q, k, v_v, v_l, o_v, o_l, lse_v, lse_l, tmask_u8, thi, imask_u8)
        ctx.pb = pb
        ctx.has_masks = (has_t, has_i)
        return o_v, o_l

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do_v, do_l):
        q, k, v_v, v_l, o_v, o_l, lse_v, lse_l, tmask_u8, thi, imask_u8 = ctx.saved_tensors
        has_t, has_i = ctx.has_masks
        with _config.interpreter_threads(), _device_guard(q):
            dq, dk, dvv, dvl = _backward(q, k, v_v, v_l, o_v, o_l, lse_v, lse_l, do_v, do_l,
                                         tmask_u8, thi, imask_u8, has_t, has_i, ctx.pb)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dvv if need[2] else None,
                dvl if need[3] else None, None, None, None)


def bi_attention_triton(q, k, v_v, v_l, text_mask=None, image_mask=None, *, scale=None, dropout_p=0.0,
                        clamp=50000.0, seed=None, skip_masked_text=False, fp32_precision="ieee", num_splits=None):
    """Fused bi-directional image-text attention (Triton; forward and backward).

    Args:
        q: ``(B, H, N, D)`` image queries.  k: ``(B, H, M, D)`` text keys.
        v_v: ``(B, H, N, D)`` image values.  v_l: ``(B, H, M, D)`` text values.
            Same dtype (float16, bfloat16 or float32) and device; strided views are used in place (a non-unit
            stride on the last dim is copied once).  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
            M <= 256, D <= 256 (designed for 32..256; smaller D is zero-padded to 32).
        text_mask: ``(B, M)`` bool, True = real token; None = all real.
        image_mask: ``(B, N)`` bool, True = real pixel; None = all real (official GLIP).
        scale: logit scale, default ``D ** -0.5``; ``S = scale * q @ k^T`` (fp32 accumulation).
        dropout_p: dropout on both probability maps (independent Philox masks, scaled by ``1/(1-p)``).
        clamp: ``S`` is clamped to ``[-clamp, clamp]`` (GLIP's ±50000); None disables it.  GLIP's second clamp of
            the text direction is not applied, so a clamp below
            :func:`glip_fusion.attention.second_clamp_threshold` ``(N, dtype)`` (where it would matter) raises
            ``ValueError``.
        seed: Philox seed (any int; used modulo ``2**62``); the same seed gives the same masks.  None draws one from
            ``torch``'s default CPU generator (so ``torch.manual_seed`` makes runs reproducible).
        skip_masked_text: the caller promises that ``o_l`` rows of padded text tokens are unused: they are returned
            as zeros, their work is skipped and they get no gradient.
        fp32_precision: ``tl.dot`` precision for float32 inputs: "ieee" (default, matches ``torch.bmm``), "tf32x3" or
            "tf32" (faster, ~1e-3 relative).
        num_splits: number of image-axis chunks of the text-direction kernels (None: a heuristic for the GPU).

    Returns:
        ``(o_v, o_l)``: ``(B, H, N, D)`` and ``(B, H, M, D)`` in the input dtype, laid out like ``q`` and ``k``
        (``torch.empty_like``).  ``o_v = softmax_M(S, padded text -> -inf) @ v_l``;
        ``o_l = softmax_N(S^T, padded image -> -inf) @ v_v``.  A batch element whose text is all padding gets
        ``o_v = 0`` (never NaN); one whose image is all padding gets ``o_l = 0``.  Deterministic: run-to-run
        bitwise identical for the same inputs and seed (no atomics).
    """
    scale, dropout_p, clamp, seed = _validate(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed,
                                              fp32_precision)
    B, H, N, D = q.shape
    M = k.shape[2]
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())
    if num_splits is None:
        num_splits = _config.num_splits(B * H, M, N, q.device)
    split_len, num_splits = _config.split_length(N, int(num_splits))
    pb = _Problem(B=B, H=H, N=N, M=M, D=D, scale=scale, clamp=clamp, dropout_p=dropout_p, seed=int(seed or 0),
                  skip_masked_text=bool(skip_masked_text), precision=fp32_precision, num_splits=num_splits,
                  split_len=split_len, upcast=_config.interpreting() and q.dtype == torch.bfloat16)
    q, k, v_v, v_l = (_unit_last_dim(t) for t in (q, k, v_v, v_l))
    return BiAttentionFunction.apply(q, k, v_v, v_l, text_mask, image_mask, pb)


def dropout_keep_masks(seed: int, B: int, H: int, N: int, M: int, dropout_p: float,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Debug helper: the dropout keep-masks the kernels use for ``seed``, as bool ``(B, H, N, M)`` each.

    Returns ``(keep_v, keep_l)``: ``keep_v[b, h, n, m]`` drops the image-direction weight of token n on text token m,
    ``keep_l[b, h, n, m]`` the text-direction weight of text token m on image token n.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_keep_masks: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"dropout_keep_masks: seed must be an int, got {seed!r}")
    device = torch.device(device)
    keep_v = torch.empty(B * H, N, M, dtype=torch.uint8, device=device)
    keep_l = torch.empty_like(keep_v)
    bn, bt = (_config.INTERPRETER_BLOCK_N, 256) if _config.interpreting() else (32, 32)
    with _config.interpreter_threads(), _device_guard(keep_v):
        _fwd._keep_mask_kernel[(triton.cdiv(N, bn), triton.cdiv(M, bt), B * H)](
            keep_v, keep_l, *_seed_words(int(seed)), float(dropout_p), N, M, BLOCK_N=bn, BLOCK_T=bt)
    return keep_v.view(B, H, N, M).bool(), keep_l.view(B, H, N, M).bool()
