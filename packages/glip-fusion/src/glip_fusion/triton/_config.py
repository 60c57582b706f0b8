"""Launch configuration of the fused bi-attention kernels.

Three sources of a launch configuration, in order of precedence:

1. :func:`block_override` (a context manager for tests and experiments): fixed tile sizes for every kernel;
2. under the Triton interpreter (``TRITON_INTERPRET=1``): one fixed configuration per shape
   (:func:`interpreter_blocks`), because ``triton.autotune`` needs a GPU to benchmark;
3. on CUDA: a small ``triton.autotune`` set per kernel (:data:`AUTOTUNE_CONFIGS`), keyed on the text length, the
   padded head dim and whether dropout is on; configurations that do not fit the device are skipped by the
   autotuner (``OutOfResources``) or pruned beforehand by a shared-memory estimate.

This module imports ``triton`` at import time; it is only imported by the kernel modules, never by
``import glip_fusion``.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import triton

from ._envelope import MAX_HEAD_DIM, MAX_TEXT_LEN, MIN_HEAD_DIM  # noqa: F401  (the kernels' limits, defined there)

#: On the autotuned path the text-direction kernels split the image axis into chunks whose length is a multiple of
#: this granule (every candidate BLOCK_N divides it), so the split layout never depends on the autotuner's choice.
SPLIT_GRANULE = 256
#: Upper bound on the number of image-axis splits of the text-direction kernels.
MAX_SPLITS = 64

# Kernel names used as keys below.
FWD_ROWS, FWD_COLS = "fwd_rows", "fwd_cols"
#: The backward passes: each launch of ``_bwd_rows_kernel`` / ``_bwd_cols_kernel`` produces one gradient.
BWD_ROWS_DQ, BWD_ROWS_DV, BWD_COLS_DK, BWD_COLS_DV = "bwd_rows_dq", "bwd_rows_dv", "bwd_cols_dk", "bwd_cols_dv"
_KERNELS = (FWD_ROWS, FWD_COLS, BWD_ROWS_DQ, BWD_ROWS_DV, BWD_COLS_DK, BWD_COLS_DV)
#: The tiled kernels that sweep the image axis per text tile (their BLOCK_T tiles text, their grid splits N).
COLUMN_KERNELS = (FWD_COLS, BWD_COLS_DK, BWD_COLS_DV)
#: Image-axis tile under the interpreter: every program and every tile operation costs milliseconds of Python there,
#: while numpy handles a [512, 256] tile quickly, so fewer, larger programs are much faster.
INTERPRETER_BLOCK_N = 256

_override: dict | None = None


# ``@triton.jit`` reads TRITON_INTERPRET when the kernels are defined, i.e. when the kernel modules (which import this
# one first) are imported; freeze the same value so that later changes of the variable cannot desynchronise us.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were defined)."""
    return _INTERPRET


@contextlib.contextmanager
def interpreter_threads() -> Iterator[None]:
    """Under the interpreter, run numpy's BLAS single-threaded while kernels execute.

    The interpreter evaluates ``tl.dot`` with ``numpy.matmul``; numpy's OpenBLAS thread pool and torch's OpenMP pool
    then compete for the same cores and a [256, 256] matmul becomes ~20x slower.  Uses ``threadpoolctl`` when it is
    installed (it is optional); otherwise this is a no-op (set ``OPENBLAS_NUM_THREADS=1`` by hand).
    """
    if not interpreting():
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def block_d(head_dim: int) -> int:
    """Padded head dim: the next power of two, at least 32 (``tl.dot`` needs K >= 16)."""
    return max(32, next_pow2(head_dim))


@contextlib.contextmanager
def block_override(block_n: int, block_t: int, num_warps: int = 4, num_stages: int = 1) -> Iterator[None]:
    """Force one tile configuration on every kernel (bypasses autotuning on CUDA).

    ``block_n`` tiles the image axis N, ``block_t`` the text axis M; both must be powers of two >= 16.
    Used by the tests to exercise multi-tile loops and ragged edges with small shapes.
    """
    global _override
    for name, value in (("block_n", block_n), ("block_t", block_t)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"block_override: {name}={value} must be a power of two >= 16")
    if block_n > SPLIT_GRANULE:
        raise ValueError(f"block_override: block_n={block_n} must be <= SPLIT_GRANULE={SPLIT_GRANULE}")
    previous = _override
    _override = dict(BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps, num_stages=num_stages)
    try:
        yield
    finally:
        _override = previous


def forced_blocks() -> dict | None:
    """The configuration set by :func:`block_override`, or None."""
    return None if _override is None else dict(_override)


def interpreter_blocks(kernel: str, n: int, m: int) -> dict:
    """The fixed configuration used under the interpreter.

    Large tiles: the interpreter pays a fixed Python cost per operation and per program, while numpy does the
    arithmetic of a large tile almost as fast as a small one. The text axis is covered by one tile (M <= 256).
    """
    if kernel not in _KERNELS:
        raise KeyError(kernel)
    block_t = min(MAX_TEXT_LEN, max(16, next_pow2(m)))
    block_n = min(INTERPRETER_BLOCK_N, max(16, next_pow2(n)))
    return dict(BLOCK_N=block_n, BLOCK_T=block_t, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------------------------------
# CUDA autotuning
# --------------------------------------------------------------------------------------------------------------------
def _cfg(block_n: int, block_t: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_T": block_t}, num_warps=warps, num_stages=stages)


#: Candidate tiles per kernel, in order of preference (``gpu_bench.py --tune-configs K`` keeps the first K that the
#: pruner leaves).  Chosen from the sm_90 compile surveys (``benchmarks/fusion/compile_check.py``) for Triton 3.6
#: (the lent GPU machine's) and 3.8: 8-warp tiles of 32 rows; at head dim 256 the fp32 accumulator of a 64-row tile
#: alone takes 64 registers per thread at 8 warps.  ``BLOCK_T = 16`` tiles with wide image tiles serve short prompts
#: (M <= 16); the forward column kernel has a ``BLOCK_T = 128`` candidate.  Every backward tile the pruner keeps
#: compiles for sm_90 without register spills in fp16 and bf16, at the padded head dims 32-256, with and without
#: dropout, given the register budgets of :data:`REGISTER_BUDGET_HEAD_DIMS`
#: (``benchmarks/results/triton_compile_sm90_backward_bf16_fp16_pruned_triton3.{6,8}_2026-12-07.md``; checked by
#: ``tests/test_fusion_triton_compile.py``).  The two that still spilled at head dim 256 were dropped: dQ 64x16
#: (32x16 serves short prompts) and dV_l 32x128 (32x64 and 64x32 remain).  Not yet timed on a GPU.  If none of them
#: compiles on a GPU, :data:`SAFE_CONFIG` is used.
AUTOTUNE_CONFIGS: dict[str, list[triton.Config]] = {
    FWD_ROWS: [_cfg(32, 32, 8, 1), _cfg(64, 32, 8, 2), _cfg(32, 64, 8, 1), _cfg(64, 64, 8, 2), _cfg(128, 16, 8, 1),
               _cfg(16, 16, 4, 1)],
    FWD_COLS: [_cfg(32, 32, 8, 1), _cfg(64, 32, 8, 2), _cfg(32, 64, 8, 1), _cfg(64, 64, 8, 2), _cfg(32, 128, 8, 1),
               _cfg(128, 16, 8, 1), _cfg(16, 16, 4, 1)],
    BWD_ROWS_DQ: [_cfg(32, 32, 8, 1), _cfg(32, 16, 8, 1), _cfg(16, 32, 8, 1), _cfg(16, 16, 4, 1)],
    BWD_ROWS_DV: [_cfg(32, 32, 8, 1), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 1), _cfg(128, 16, 8, 1), _cfg(32, 16, 8, 1),
                  _cfg(16, 16, 4, 1)],
    BWD_COLS_DK: [_cfg(32, 32, 8, 1), _cfg(16, 32, 8, 1), _cfg(64, 16, 8, 1), _cfg(16, 16, 4, 1)],
    BWD_COLS_DV: [_cfg(32, 32, 8, 1), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 1), _cfg(16, 16, 4, 1)],
}

#: Last resort when every autotune candidate fails with OutOfResources: 16x16 tiles fit at d = 256 in fp32
#: (operands ~96 KB of shared memory).
SAFE_CONFIG = dict(BLOCK_N=16, BLOCK_T=16, num_warps=4, num_stages=1)

#: Autotune key (argument names of every tuned kernel); Triton adds the dtypes of tensor arguments itself.
#: ``N_BUCKET`` is ``bit_length(N - 1)``: image lengths within a factor of two share a tuning (multi-scale training
#: changes N every step; re-tuning per exact N would stall it).
AUTOTUNE_KEY = ["M", "BLOCK_D", "HAS_DROPOUT", "N_BUCKET"]

#: Integer arguments that Triton must not specialise on (divisibility by 16, == 1): they change from call to call
#: (image size, seed) and would otherwise trigger recompiles.  Strides stay specialised, and so does the head dim
#: ``D`` (fixed for a model): its divisibility by 16 tells the compiler that the head-dim bound check ``d < D`` is
#: constant over 16 consecutive columns, so the [tile, head dim] loads and stores are vectorised (16-byte accesses;
#: unspecialised, every element was its own predicated 2-byte load, with the registers for it).
NO_SPECIALIZE = ["seed_lo", "seed_hi", "N", "M", "H", "split_len", "num_splits", "N_BUCKET"]


def autotuned(kernel: str, fn):
    """``fn`` wrapped in ``triton.autotune`` with the candidates (:data:`AUTOTUNE_CONFIGS`) and the pruner of
    ``kernel``; None under the interpreter, where the autotuner cannot benchmark (no GPU)."""
    if interpreting():
        return None
    return triton.autotune(
        AUTOTUNE_CONFIGS[kernel], key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": make_pruner(kernel)},
    )(fn)


def n_bucket(n: int) -> int:
    return max(1, int(n) - 1).bit_length()

# Per-block shared-memory budget assumed when pruning (H100/A100 opt-in limits are 227/163 KB; consumer parts ~99 KB).
_SMEM_FALLBACK = 99 * 1024


def _smem_limit() -> int:
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "shared_memory_per_block_optin", _SMEM_FALLBACK))
    except Exception:  # pragma: no cover - only reached on exotic drivers
        return _SMEM_FALLBACK


# Shared-memory model: ``(resident, streamed)`` [tile, head dim] operand tiles held in shared memory per program, for
# programs of at least 64 rows (Hopper warp-group MMA: every dot operand is staged in shared memory) and for smaller
# ones (register MMA). Read off the sm_90 compile survey of the kernels as launched (compile_check.py --survey,
# Triton 3.6 and 3.8, head dim 256, bf16: benchmarks/results/triton_compile_sm90_triton3.6_2026-12-07.json), where
# it is within 3% of the compiled size of every surveyed tile.
_SMEM_TILES = {
    #              rows >= 64       rows < 64
    FWD_ROWS:    ((1, 1),          (1, 1)),   # q resident; k and v_l streamed through one buffer
    FWD_COLS:    ((1, 1),          (1, 1)),   # k resident; q and v_v streamed through one buffer
    BWD_ROWS_DQ: ((3, 3),          (3, 2)),   # q, v_v, dO_v resident; k, v_l, dO_l streamed (two buffers < 64)
    BWD_ROWS_DV: ((1, 2),          (1, 1)),   # q resident; k, dO_l streamed
    BWD_COLS_DK: ((3, 3),          (3, 2)),   # k, v_l, dO_l resident; q, v_v, dO_v streamed (two buffers < 64)
    BWD_COLS_DV: ((1, 2),          (1, 1)),   # k resident; q, dO_v streamed
}
#: Kernels whose loops Triton pipelines at ``num_stages > 1`` (their 2-stage candidates); the backward candidates all
#: run at 1 stage, where the size does not depend on ``num_stages``.
_PIPELINED = (FWD_ROWS, FWD_COLS)


def shared_memory_estimate(kernel: str, block_n: int, block_t: int, num_warps: int, num_stages: int, block_d_: int,
                           elem: int, write_partial: bool = True) -> int:
    """Shared memory (bytes) one program of ``kernel`` needs with these tiles, for inputs of ``elem`` bytes.

    ``rows`` is the program's own tile (``BLOCK_N`` for the row kernels, ``BLOCK_T`` for the column kernels) and
    ``keys`` the streamed one. The operand tiles of :data:`_SMEM_TILES` (``rows x head dim`` / ``keys x head dim``),
    plus, below 64 rows, a ``rows x keys`` scratch where the probabilities change layout between the two dots; the
    column kernels' fp32 split partials (``write_partial``) are stored through a ``rows x head dim`` fp32 staging
    buffer, and the program needs the larger of the two. A pipelined forward loop (``num_stages > 1``) gives each of
    its two streamed operands a buffer of its own, ``num_stages`` of them in a warp-group MMA program, plus 4 KB.
    ``num_warps`` does not enter.
    """
    column = kernel in COLUMN_KERNELS
    rows, keys = (block_t, block_n) if column else (block_n, block_t)
    wide = rows >= 64
    resident, streamed = _SMEM_TILES[kernel][0 if wide else 1]
    pipeline = 0
    if kernel in _PIPELINED and num_stages > 1:
        streamed = 2 * num_stages if wide else 2
        pipeline = 4096 if wide else 0
    operands = (resident * rows + streamed * keys) * block_d_ * elem + (0 if wide else rows * keys * elem) + pipeline
    epilogue = rows * block_d_ * 4 if (column and write_partial) else 0
    return max(operands, epilogue)


def _operand_bytes(kernel: str, cfg: triton.Config, block_d_: int, elem: int, write_partial: bool = True) -> int:
    """:func:`shared_memory_estimate` of an autotune candidate."""
    return shared_memory_estimate(kernel, cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_T"], cfg.num_warps,
                                  cfg.num_stages, block_d_, elem, write_partial)


#: float32 inputs (IEEE dots on CUDA cores, no tensor cores) keep only tiles with
#: ``BLOCK_N * BLOCK_T * BLOCK_D <= FP32_MAX_TILE_VOLUME``: in the sm_90 compile survey at head dim 256, fp32 tiles
#: of 32x32 already spill 7-8 KB per thread and larger ones 15-36 KB, and each larger tile takes 15-50 s to compile,
#: which would make the first autotuned fp32 call take minutes.
FP32_MAX_TILE_VOLUME = 32 * 32 * 256


#: Register budget per thread (``maxnreg``, passed to ``ptxas``) of the 8-warp backward tiles at the padded head dims
#: of :data:`REGISTER_BUDGET_HEAD_DIMS`, for half inputs.  Without one, ptxas caps a program of 256 threads that needs
#: a little more than 128 registers at 128, to fit two programs per SM, and spills 8-24 bytes per thread instead: the
#: dQ and dK passes at head dims <= 128, the dV_v pass at 256 (sm_90 compile survey, Triton 3.6 and 3.8).  With the
#: budget it keeps everything in registers, at one program per SM.  Where a pass needs far more registers anyway (dQ
#: and dK at 256: 170-200) no budget is given: ptxas then fills it and spilled 8 bytes in two tiles (Triton 3.6).
#: 224 compiled every listed tile spill-free on both toolchains; the budget is not a tuned performance choice.
REGISTER_BUDGET = 224
REGISTER_BUDGET_HEAD_DIMS = {BWD_ROWS_DQ: (32, 64, 128), BWD_COLS_DK: (32, 64, 128), BWD_ROWS_DV: (256,)}


def with_register_budget(kernel: str, configs: list[triton.Config], block_d_: int, elem: int) -> list[triton.Config]:
    """``configs`` with :data:`REGISTER_BUDGET` on the 8-warp ones where ``kernel`` needs it at padded head dim
    ``block_d_`` for inputs of ``elem`` bytes (copies; the others are returned as they are)."""
    if elem != 2 or block_d_ not in REGISTER_BUDGET_HEAD_DIMS.get(kernel, ()):
        return list(configs)
    return [triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages, num_ctas=c.num_ctas,
                          maxnreg=REGISTER_BUDGET) if c.num_warps == 8 and c.maxnreg is None else c for c in configs]


def make_pruner(kernel: str, smem_limit: int | None = None):
    """An ``early_config_prune`` hook: drop tiles larger than the problem (a tile of 128 text tokens for M = 32 only
    wastes work), configurations that cannot fit in shared memory (:func:`shared_memory_estimate`), for float32
    inputs the tiles above :data:`FP32_MAX_TILE_VOLUME` (the rest ordered smallest first), and for half inputs the
    16x16 tiles unless the problem is that small; then give the register budget where the pass needs it
    (:func:`with_register_budget`).  Keeps the candidates' order; never returns an empty list.  ``smem_limit``
    (bytes per block) defaults to the current CUDA device's."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bd = int(args.get("BLOCK_D", 256))
        m_cap = max(16, next_pow2(int(args.get("M", MAX_TEXT_LEN))))
        n_cap = max(16, next_pow2(int(args.get("N", 1 << 20))))
        ref = next((v for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
        elem = 4 if ref is None else ref.element_size()
        limit = _smem_limit() if smem_limit is None else smem_limit
        partial = bool(args.get("WRITE_PARTIAL", True))
        fitting = [c for c in configs if _operand_bytes(kernel, c, bd, elem, partial) <= limit]
        fitting = fitting or [min(configs, key=lambda c: _operand_bytes(kernel, c, bd, elem, partial))]
        if elem == 4:
            # smallest first: at head dim 256 only 16x16 compiles without spilling in fp32
            small = [c for c in fitting if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_T"] * bd <= FP32_MAX_TILE_VOLUME]
            fitting = sorted(small, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_T"]) or fitting
        elif m_cap >= 32 and n_cap >= 32:
            # half inputs use tensor cores: 16x16 tiles only pay off for problems that small
            fitting = [c for c in fitting if max(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_T"]) >= 32] or fitting
        sized = [c for c in fitting if c.kwargs["BLOCK_T"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]
        sized = sized or [min(fitting, key=lambda c: (c.kwargs["BLOCK_T"], c.kwargs["BLOCK_N"]))]
        return with_register_budget(kernel, sized, bd, elem)

    return prune


def kept_configs(kernel: str, dtype: torch.dtype, head_dim: int, smem_limit: int, n: int = 22400,
                 prompts: tuple[int, ...] = (256, 16)) -> list[triton.Config]:
    """The candidates of ``kernel`` that the pruner keeps for ``dtype`` inputs of head dim ``head_dim`` and ``n`` image
    tokens (GLIP-T's 22400 by default) for any of the prompt lengths ``prompts``: a long prompt keeps every tile that
    fits, a short one (M <= 16) the 16-wide text tiles, the 16x16 ones included.  Each as the pruner returns it (with
    its register budget), in the candidates' order.  What the compile survey and its test compile."""
    prune = make_pruner(kernel, smem_limit=smem_limit)
    kept = [c for m in prompts for c in prune(AUTOTUNE_CONFIGS[kernel], {"Q": torch.empty(1, dtype=dtype)}, M=m, N=n,
                                              BLOCK_D=block_d(head_dim))]
    out = []
    for cand in AUTOTUNE_CONFIGS[kernel]:
        same = [c for c in kept if (c.kwargs, c.num_warps, c.num_stages) == (cand.kwargs, cand.num_warps,
                                                                             cand.num_stages)]
        if same:
            out.append(same[0])
    return out


def num_splits(batch_heads: int, m_out: int, n: int, device: torch.device) -> int:
    """How many chunks the image axis is split into for the text-direction kernels (Flash-Decoding).

    The text direction has only ``B*H*cdiv(M, 64)`` natural programs (32 at B=1 for GLIP-T); splitting N fills the
    GPU. Target about two waves of programs over the streaming multiprocessors. Under the interpreter programs run
    one after another, so no split is the fastest.
    """
    max_splits = max(1, math.ceil(n / SPLIT_GRANULE))
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    base = max(1, batch_heads * math.ceil(max(1, m_out) / 64))
    return int(max(1, min(max_splits, MAX_SPLITS, math.ceil(2 * sms / base))))


def split_granule() -> int:
    """Alignment of the image-axis splits: :data:`SPLIT_GRANULE` on the autotuned GPU path (every candidate
    ``BLOCK_N`` divides it, so tiles never straddle a split); 16 with a fixed configuration, so that small test
    shapes can still be split (correctness does not depend on the alignment, the kernels mask ``n >= split end``)."""
    return 16 if (interpreting() or _override is not None) else SPLIT_GRANULE


def split_length(n: int, splits: int, granule: int | None = None) -> tuple[int, int]:
    """``(split_len, splits)``: chunk length along N (a multiple of the granule) and the resulting split count."""
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    granule = split_granule() if granule is None else granule
    split_len = math.ceil(math.ceil(n / splits) / granule) * granule
    return split_len, max(1, math.ceil(n / split_len))
