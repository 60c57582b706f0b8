"""GPU benchmark of GLIP's bi-directional attention core: eager GLIP vs two SDPA calls vs the fused Triton kernel.

Made for a lent GPU machine with a few minutes of device time: every phase has a **hard** time budget that includes
Triton's compile and autotune time (a SIGALRM interrupts a phase that overruns, even inside a compile), results are
written to JSON after every measurement, and the table is printed however the run ends (budget, SIGTERM from an
outer ``timeout``, error).  Phases, in order:

1. **bf16 gate** (``--gate-budget-s``).  The fused kernel against a float64 reference on two small shapes at the
   timed head dim (text padding, odd N, M = 256 and 32): forward and all four gradients within 2x the error of the
   eager formulation in bf16 (plus a floor); dropout against a reference built from the kernel's own keep-masks;
   bitwise run-to-run determinism.  The baselines (eager, every SDPA backend) are checked the same way.  A kernel
   that fails is not timed; an incomplete gate (budget) is recorded and the kernel is timed anyway, each
   forward-only timing cell also checking the fused output against float32 SDPA at the timed shape.
2. **bf16 timing** (``--time-budget-s``) at GLIP-T shapes: H = 8, d = 256, N = 22400 (800x1333), B in {1, 4},
   M in {256 (200 real tokens + padding, a COCO 80-class prompt), 16 (a short prompt)}, modes ``fwd`` (forward
   under ``no_grad``) and ``fwdbwd`` (forward + backward), dropout 0 and 0.1.  Cells run in priority order (the GLIP
   training cell first: fwdbwd, dropout 0.1, M = 256, B = 1), so a cut-short run still has the important rows.
3. **fp32 row** (``--fp32-budget-s``): one forward cell in float32 (IEEE dots; TF32 off in PyTorch too) after a
   forward-only fp32 gate, on the kernel's first autotune candidate only.

Providers (shuffled per cell): ``eager`` (the official GLIP op sequence), ``sdpa`` (default dispatch) and
``sdpa-<flash|efficient|cudnn>`` forced with ``torch.nn.attention.sdpa_kernel`` (recorded as unsupported when PyTorch
rejects the inputs); for every SDPA provider the backend PyTorch actually ran is read from the profiler (the aten op
of each of the two calls), and ``triton`` (autotuned; the first call, compile and autotune included, is reported
separately as ``first_call_s``).  Autotuning is limited to the first ``--tune-configs`` candidates of each kernel
(the package's candidate lists are in order of preference) to bound compile time.

Reported per row: median ms (p20/p80), useful TFLOP/s (3U forward, 10U forward+backward, U = 2*B*H*N*M*d, for every
provider), % of the roofline bound, ``peak_extra_mb`` (peak allocation of one step above the inputs) and, for
``fwdbwd``, ``saved_mb`` (memory held between forward and backward, outputs excluded: the attention core's training
memory).  Targets, checked in the table for the GLIP-T training cells (fwdbwd, M = 256): fused fwd+bwd >= 1.5x the
best two-SDPA and >= 8x eager; fused ``saved_mb`` <= 1/20 of eager's.

The roofline bound (formulas of the design notes' roofline model, nominal datasheet peaks):
``t_fwd = max(3U / F, (3 ND + small) / BW)``, ``t_bwd = max(7U / F, (6 ND + small) / BW)`` with
``ND = B*H*N*d*bytes``, ``small = B*H*(8*M*d*bytes + 4*(N+M))``, F the dense bf16 tensor-core peak (fp32: the
non-tensor FMA peak) and BW the HBM bandwidth.

Writes ``fusion_<device>_<date>.json`` to ``--out`` (default ``benchmarks/results``) and prints the table last.

Usage::

    python benchmarks/fusion/gpu_bench.py                       # the protocol above (CUDA), about 7 minutes
    python benchmarks/fusion/gpu_bench.py --batches 1 --ms 256 --time-budget-s 120
    TRITON_INTERPRET=1 python benchmarks/fusion/gpu_bench.py --smoke   # tiny shapes on CPU: checks the script
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
CLAMP = 50000.0
TRAIN_DROPOUT = 0.1
TARGET_X_SDPA, TARGET_X_EAGER, TARGET_MEM_FRACTION = 1.5, 8.0, 1 / 20

# (substring of the device name, dense bf16 tensor FLOP/s, fp32 non-tensor FLOP/s, HBM bytes/s); first match wins
GPU_PEAKS = [
    ("H200", 989.4e12, 66.9e12, 4.8e12),
    ("H100 PCIe", 756.0e12, 51.2e12, 2.0e12),
    ("H100 NVL", 835.0e12, 60.0e12, 3.9e12),
    ("H100", 989.4e12, 66.9e12, 3.35e12),
    ("A100", 312.0e12, 19.5e12, 2.0e12),
    ("L40S", 362.0e12, 91.6e12, 0.864e12),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "math": "MATH"}
# aten op of each SDPA implementation (profiler event names), most specific first
SDPA_OPS = [("flash_attention_for_cpu", "flash-cpu"), ("_flash_attention", "flash"),
            ("_efficient_attention", "efficient"), ("_cudnn_attention", "cudnn"), ("_attention_math", "math")]


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# hard phase budgets
# ------------------------------------------------------------------------------------------------------------------
class PhaseTimeout(BaseException):
    """A phase ran past its budget (BaseException: provider-level ``except Exception`` must not swallow it)."""


class Terminated(BaseException):
    """SIGTERM (the outer ``timeout``): stop, write and print what was measured."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def phase_deadline(seconds: float):
    """Raise :class:`PhaseTimeout` in the main thread once ``seconds`` have passed (SIGALRM, wall clock).

    Python runs the handler as soon as control returns to the interpreter: between bytecodes, or when a blocking
    call such as waiting for ``ptxas`` is interrupted, so compile and autotune time count against the budget.
    """
    if seconds <= 0:
        raise PhaseTimeout()

    def handler(signum, frame):
        raise PhaseTimeout()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------------------------
# roofline
# ------------------------------------------------------------------------------------------------------------------
def peaks_for(name: str):
    for key, bf16, fp32, bw in GPU_PEAKS:
        if key.lower() in name.lower():
            return {"match": key, "bf16_flops": bf16, "fp32_flops": fp32, "bw": bw}
    return None


def gemm_unit(B, H, N, M, D) -> float:
    """U: FLOPs of one (N x M x d) GEMM over all batch-heads."""
    return 2.0 * B * H * N * M * D


def useful_flops(B, H, N, M, D, mode) -> float:
    return (3 if mode == "fwd" else 10) * gemm_unit(B, H, N, M, D)


def roofline_s(B, H, N, M, D, elem, mode, peaks, dtype_name):
    """Lower bound on the time of the attention core (fused S-once forward / 1-pass backward minimum traffic)."""
    if peaks is None:
        return None
    flops = peaks["fp32_flops"] if dtype_name == "fp32" else peaks["bf16_flops"]
    U = gemm_unit(B, H, N, M, D)
    ND = B * H * N * D * elem
    small = B * H * (8 * M * D * elem + (N + M) * 4)
    t = max(3 * U / flops, (3 * ND + small) / peaks["bw"])
    if mode == "fwdbwd":
        t += max(7 * U / flops, (6 * ND + small) / peaks["bw"])
    return t


# ------------------------------------------------------------------------------------------------------------------
# providers: f(q, k, v_v, v_l, text_mask, scale, dropout_p) -> (o_v, o_l)
# ------------------------------------------------------------------------------------------------------------------
def eager_glip(q, k, v_v, v_l, text_mask, scale, dropout_p):
    """The official GLIP op sequence (``fuse_helper.BiMultiHeadAttention``, GLIP-T config: clamps on, no global max,
    int mask expanded to (B, 1, N, M) and filled with -9e15, dropout on both probability maps)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    qs = (q * scale).reshape(B * H, N, D)
    s = torch.bmm(qs, k.reshape(B * H, M, D).transpose(1, 2))  # (B*H, N, M)
    s = torch.clamp(s, min=-CLAMP)
    s = torch.clamp(s, max=CLAMP)
    s_t = s.transpose(1, 2)
    s_l = s_t - torch.max(s_t, dim=-1, keepdim=True)[0]
    s_l = torch.clamp(s_l, min=-CLAMP)
    s_l = torch.clamp(s_l, max=CLAMP)
    p_l = s_l.softmax(dim=-1)
    mask = text_mask.long()[:, None, None, :].expand(B, 1, N, M)
    mask = mask.masked_fill(mask == 0, -9e15)
    s_v = (s.view(B, H, N, M) + mask).view(B * H, N, M)
    p_v = s_v.softmax(dim=-1)
    p_v = F.dropout(p_v, p=dropout_p, training=dropout_p > 0)
    p_l = F.dropout(p_l, p=dropout_p, training=dropout_p > 0)
    o_v = torch.bmm(p_v, v_l.reshape(B * H, M, D))
    o_l = torch.bmm(p_l, v_v.reshape(B * H, N, D))
    return o_v.view(B, H, N, D), o_l.view(B, H, M, D)


def sdpa_pair(q, k, v_v, v_l, text_mask, scale, dropout_p, backend=None):
    """Two SDPA calls sharing q and k: image queries over text keys (bool key mask), text queries over image keys."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])]) if backend else contextlib.nullcontext()
    with ctx:
        o_v = F.scaled_dot_product_attention(q, k, v_l, attn_mask=text_mask[:, None, None, :], dropout_p=dropout_p,
                                             scale=scale)
        o_l = F.scaled_dot_product_attention(k, q, v_v, dropout_p=dropout_p, scale=scale)
    return o_v, o_l


def triton_pair(q, k, v_v, v_l, text_mask, scale, dropout_p, seed=1234):
    from glip_fusion.triton import bi_attention_triton

    return bi_attention_triton(q, k, v_v, v_l, text_mask, None, scale=scale, dropout_p=dropout_p, clamp=CLAMP,
                               seed=seed)


def providers(names=None):
    out = {"eager": eager_glip, "sdpa": sdpa_pair}
    for short in ("flash", "efficient", "cudnn"):
        out[f"sdpa-{short}"] = lambda *a, _b=short: sdpa_pair(*a, backend=_b)
    out["triton"] = triton_pair
    if names:
        unknown = set(names) - set(out) - {"sdpa-math"}
        if unknown:
            raise SystemExit(f"gpu_bench: unknown provider(s) {sorted(unknown)}; known: {sorted(out)} + sdpa-math")
        if "sdpa-math" in names:
            out["sdpa-math"] = lambda *a: sdpa_pair(*a, backend="math")
        out = {k: v for k, v in out.items() if k in names}
    return out


def sdpa_backends_used(fn, args, grad: bool) -> str | None:
    """Which SDPA implementation ran for each of the two calls of ``fn(*args)``, from the profiler's aten ops."""
    from torch.profiler import ProfilerActivity, profile

    try:
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with warnings.catch_warnings(), profile(activities=[ProfilerActivity.CPU]) as prof, ctx:
            warnings.simplefilter("ignore")
            fn(*args)
    except Exception as exc:  # the provider itself fails: reported by the timing
        return f"? ({type(exc).__name__})"
    used = []
    for event in prof.events():
        name = event.name
        if not name.startswith("aten::_scaled_dot_product") or "backward" in name:
            continue
        used.append(next((short for key, short in SDPA_OPS if key in name), name.split("::")[-1]))
    if not used:
        return None
    return f"image={used[0]},text={used[1]}" if len(used) == 2 else ",".join(used)


# ------------------------------------------------------------------------------------------------------------------
# the kernel's autotuning: limited to the first candidates of each kernel
# ------------------------------------------------------------------------------------------------------------------
def limit_autotune(max_half: int, max_fp32: int) -> dict | None:
    """Keep the first ``max_half`` (fp16/bf16) or ``max_fp32`` (fp32) of the candidates each kernel's pruner keeps.
    Returns the candidate lists per kernel (None under the interpreter, where nothing is tuned)."""
    from glip_fusion.triton import _config

    tuned = _tuned_kernels()
    if any(t is None or not hasattr(t, "early_config_prune") for t in tuned.values()):
        return None
    for name, t in tuned.items():
        prune = _config.make_pruner(name)

        def limited(configs, named_args, _prune=prune, **kwargs):
            kept = _prune(configs, named_args, **kwargs)
            ref = next((v for v in named_args.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
            limit = max_fp32 if ref is not None and ref.element_size() == 4 else max_half
            return kept[:max(1, limit)]

        t.early_config_prune = limited
        t.cache = {}
    return {name: [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg) for c in t.configs]
            for name, t in tuned.items()}


def _tuned_kernels() -> dict:
    """The autotuned kernels by ``_config`` name (values None under the interpreter)."""
    from glip_fusion.triton import _bwd, _config, _fwd

    return {_config.FWD_ROWS: _fwd.fwd_rows_tuned, _config.FWD_COLS: _fwd.fwd_cols_tuned,
            _config.BWD_ROWS_DQ: _bwd.bwd_rows_dq_tuned, _config.BWD_ROWS_DV: _bwd.bwd_rows_dv_tuned,
            _config.BWD_COLS_DK: _bwd.bwd_cols_dk_tuned, _config.BWD_COLS_DV: _bwd.bwd_cols_dv_tuned}


def triton_configs():
    """The configuration the autotuner chose last for each kernel."""
    try:
        tuned_kernels = _tuned_kernels()
    except Exception:  # pragma: no cover
        return None
    out = {}
    for name, tuned in tuned_kernels.items():
        cfg = getattr(tuned, "best_config", None) if tuned is not None else None
        if cfg is not None:
            out[name] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg)
    return out


# ------------------------------------------------------------------------------------------------------------------
# references and inputs
# ------------------------------------------------------------------------------------------------------------------
def reference64(q, k, v_v, v_l, text_mask, scale, keep_v=None, keep_l=None, p=0.0):
    """float64 ground truth (clamp, padded text -> -inf in the image direction, no image mask; the second clamp of
    the text direction is a no-op at CLAMP = 50000)."""
    q, k, v_v, v_l = (t.double() for t in (q, k, v_v, v_l))
    s = (scale * q @ k.transpose(-1, -2)).clamp(-CLAMP, CLAMP)
    p_v = torch.softmax(s.masked_fill(~text_mask[:, None, None, :], float("-inf")), -1)
    p_l = torch.softmax(s.transpose(-1, -2), -1)
    if keep_v is not None:
        p_v = p_v * keep_v / (1 - p)
        p_l = p_l * keep_l.transpose(-1, -2) / (1 - p)
    return p_v @ v_l, p_l @ v_v


def make_inputs(B, H, N, M, D, dtype, device, valid, seed=0, grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda L: torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa
    q, k, v_v, v_l = mk(N), mk(M), mk(N), mk(M)
    text_mask = torch.zeros(B, M, dtype=torch.bool, device=device)
    for b, L in enumerate(valid if isinstance(valid, (list, tuple)) else [valid] * B):
        text_mask[b, :L] = True
    return q, k, v_v, v_l, text_mask


def _errors(outs, grads_inputs, ref_outs, ref_inputs):
    errs = {}
    for name, a, r in zip(("o_v", "o_l"), outs, ref_outs):
        errs[name] = ((a.double() - r).abs().max().item(), r.abs().max().item())
    if grads_inputs is not None:
        for name, a, r in zip(("dq", "dk", "dv_v", "dv_l"), grads_inputs, ref_inputs):
            errs[name] = ((a.grad.double() - r.grad).abs().max().item(), r.grad.abs().max().item())
    return errs


def _run_with_grads(fn, inputs, text_mask, scale, p, grads=True, seed_out=7):
    x = [t.detach().clone().requires_grad_(grads) for t in inputs]
    if not grads:
        with torch.no_grad():
            return fn(*x, text_mask, scale, p), None, None
    outs = fn(*x, text_mask, scale, p)
    g = torch.Generator(device="cpu").manual_seed(seed_out)
    gos = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    torch.autograd.backward(outs, gos)
    return outs, x, gos


# ------------------------------------------------------------------------------------------------------------------
# correctness gate
# ------------------------------------------------------------------------------------------------------------------
# floors: absolute for outputs (unit-scale values), relative-to-max for gradients
FLOORS = {"fp32": (1e-4, 1e-3), "fp16": (3e-3, 2e-2), "bf16": (3e-2, 6e-2)}


def gate(device, D, shapes, dn, provs, record, grads=True, extras=True):
    """Check every provider in ``provs`` on ``shapes`` in dtype ``dn``; ``record(provider, ok, detail)`` collects.

    ``extras``: also the fused kernel's dropout (vs its own keep-masks) and bitwise determinism, on ``shapes[0]``.
    """
    dtype = DTYPES[dn]
    floors = FLOORS[dn]
    for (B, H, N, M, valid) in shapes:
        scale = D ** -0.5
        q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, dtype, device, valid, seed=N + M)
        inputs = [q, k, v_v, v_l]
        x64 = [t.detach().double().requires_grad_(grads) for t in inputs]
        r_outs = reference64(*x64, tm, scale)
        if grads:
            g = torch.Generator(device="cpu").manual_seed(7)
            torch.autograd.backward(r_outs, [torch.randn(o.shape, generator=g).to(o.device, torch.float64)
                                             for o in r_outs])
        # the eager formulation in the same dtype calibrates what "low precision" costs
        try:
            e_outs, e_x, _ = _run_with_grads(eager_glip, inputs, tm, scale, 0.0, grads)
            eager_err = _errors(e_outs, e_x, r_outs, x64 if grads else None)
        except Exception as exc:  # no calibration: fall back to the fixed floors
            log(f"  gate eager calibration failed ({exc!r}); using fixed tolerances")
            eager_err = {n: (0.0, 0.0) for n in ("o_v", "o_l", "dq", "dk", "dv_v", "dv_l")}
        tag = f"B={B} H={H} N={N} M={M} valid={valid} d={D} {dn}" + ("" if grads else " fwd only")
        for prov, fn in provs.items():
            try:
                if prov == "eager":
                    errs = eager_err
                else:
                    outs, xs, _ = _run_with_grads(fn, inputs, tm, scale, 0.0, grads)
                    errs = _errors(outs, xs, r_outs, x64 if grads else None)
            except Exception as exc:  # an SDPA backend rejecting these inputs
                if prov.startswith("sdpa"):
                    log(f"  gate {prov:16s} n/a  {tag}: {str(exc).splitlines()[0][:100]}")
                    continue
                record(prov, False, f"{tag}: raised {exc!r}"[:300])
                continue
            bad = []
            for name, (err, mag) in errs.items():
                floor = floors[0] if name.startswith("o_") else floors[1] * max(mag, 1e-6)
                limit = max(floor, 2.0 * eager_err[name][0] if dn != "fp32" else floor)
                if not err <= limit:
                    bad.append(f"{name} {err:.3g}>{limit:.3g}")
            worst = max(errs[n][0] for n in ("o_v", "o_l"))
            record(prov, not bad, f"{tag}: max out err {worst:.2e}" + (f" [{', '.join(bad)}]" if bad else ""))

    if not extras or "triton" not in provs:
        return
    from glip_fusion.triton import dropout_keep_masks

    # dropout: the kernel against a float64 reference that applies the kernel's own masks
    B, H, N, M, valid = shapes[0]
    p, seed, scale = TRAIN_DROPOUT, 4321, D ** -0.5
    q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, dtype, device, valid, seed=5)
    keep_v, keep_l = dropout_keep_masks(seed, B, H, N, M, p, device=device)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v_v, v_l)]
    r_outs = reference64(*x64, tm, scale, keep_v, keep_l, p)
    g = torch.Generator(device="cpu").manual_seed(7)
    torch.autograd.backward(r_outs, [torch.randn(o.shape, generator=g).to(o.device, torch.float64) for o in r_outs])
    outs, xs, _ = _run_with_grads(lambda *a: triton_pair(*a, seed=seed), [q, k, v_v, v_l], tm, scale, p)
    errs = _errors(outs, xs, r_outs, x64)
    bad = [f"{n} {e:.3g}" for n, (e, mag) in errs.items()
           if e > (2 * floors[0] if n.startswith("o_") else 2 * floors[1] * max(mag, 1))]
    record("triton", not bad, f"dropout p={p} {dn} vs keep-mask reference" + (f" [{', '.join(bad)}]" if bad else ""))

    # determinism: two identical training steps are bitwise equal
    runs = []
    for _ in range(2):
        outs, xs, _ = _run_with_grads(lambda *a: triton_pair(*a, seed=99), [q, k, v_v, v_l], tm, scale, p)
        runs.append([o.detach() for o in outs] + [x.grad for x in xs])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    record("triton", same, f"bitwise determinism ({dn}, dropout, 2 runs)")


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------
def bench_ms(fn, grad_to_none, device, warmup_ms, rep_ms):
    """(p50, p20, p80) milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        r = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in r)
    times = []
    for _ in range(3):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def memory_mb(forward, backward, inputs, out_bytes, device):
    """``(peak_extra_mb, saved_mb)`` of one step: the peak allocation above the inputs, and (with ``backward``) what
    the forward leaves allocated for the backward beyond its outputs (the attention core's training memory)."""
    if device.type != "cuda":
        return None, None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outs = forward()
    torch.cuda.synchronize()
    saved = None
    if backward is not None:
        saved = (torch.cuda.memory_allocated() - before - out_bytes) / 2 ** 20
        backward(outs)
        torch.cuda.synchronize()
    del outs
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    for t in inputs:
        t.grad = None
    return peak, saved


def cell_label(cell) -> str:
    return (f"{cell['dtype']} {cell['mode']} p={cell['p']:g} B={cell['B']} N={cell['N']} M={cell['M']}")


def time_cell(cell, provs, device, args, peaks, triton_state, emit):
    """Time every provider on one cell; ``emit(row)`` after each one (so a cut-short cell keeps its rows)."""
    B, H, N, M, D, dn, mode, p = (cell[k] for k in ("B", "H", "N", "M", "D", "dtype", "mode", "p"))
    dtype = DTYPES[dn]
    training = mode == "fwdbwd"
    valid = min(M, 200) if M > 32 else M
    scale = D ** -0.5
    try:
        q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, dtype, device, valid, seed=1, grad=training)
    except torch.cuda.OutOfMemoryError:
        emit(dict(cell, provider="*", status="oom"))
        return
    inputs = [q, k, v_v, v_l]
    grads = None
    if training:
        grads = [torch.randn(B, H, N, D, device=device, dtype=dtype), torch.randn(B, H, M, D, device=device,
                                                                                   dtype=dtype)]
    out_bytes = (B * H * (N + M) * D) * (torch.finfo(dtype).bits // 8)
    names = list(provs)
    random.Random(f"{cell_label(cell)}").shuffle(names)
    elem = torch.finfo(dtype).bits // 8
    bound = roofline_s(B, H, N, M, D, elem, mode, peaks, dn)
    flops = useful_flops(B, H, N, M, D, mode)
    fp32_ref = None
    for name in names:
        row = dict(cell, provider=name)
        if name == "triton" and triton_state.get(dn) == "failed":
            emit(dict(row, status="failed correctness gate"))
            continue
        f = provs[name]

        def forward(f=f):
            if training:
                return f(q, k, v_v, v_l, tm, scale, p)
            with torch.no_grad():
                return f(q, k, v_v, v_l, tm, scale, p)

        def backward(outs):
            torch.autograd.backward(outs, grads)

        def step():
            outs = forward()
            if training:
                backward(outs)

        try:
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms, p20, p80 = bench_ms(step, inputs if training else None, device, args.warmup_ms, args.rep_ms)
            peak, saved = memory_mb(forward, backward if training else None, inputs, out_bytes, device)
            row.update(status="ok", ms_p50=ms, ms_p20=p20, ms_p80=p80, first_call_s=round(first, 3),
                       tflops_useful=flops / (ms * 1e-3) / 1e12,
                       pct_roofline=(100.0 * bound / (ms * 1e-3)) if bound else None,
                       peak_extra_mb=peak, saved_mb=saved)
            if name.startswith("sdpa"):
                row["sdpa_backends"] = sdpa_backends_used(f, (q, k, v_v, v_l, tm, scale, p), training)
            if name == "triton":
                row["triton_configs"] = triton_configs()
                row["gate"] = triton_state.get(dn, "not run")
                if mode == "fwd" and p == 0.0:  # the fused output at the timed shape vs float32 SDPA
                    if fp32_ref is None:
                        with torch.no_grad():
                            fp32_ref = sdpa_pair(*(t.detach().float() for t in inputs), tm, scale, 0.0)
                    with torch.no_grad():
                        outs = forward()
                    row["max_err_vs_fp32_sdpa"] = max((o.float() - r).abs().max().item()
                                                      for o, r in zip(outs, fp32_ref))
                    del outs
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom")
        except Exception as exc:  # (a budget or SIGTERM is a BaseException and passes through)
            msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            row.update(status="unsupported" if name.startswith("sdpa") else "error", reason=msg)
            if not name.startswith("sdpa"):
                log(f"  {name}: error at {cell_label(cell)}: {msg}")
        finally:
            for t in inputs:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        emit(row)


def cells_in_priority_order(batches, ns, ms_, modes, dropouts, dtype, H, D):
    """Every combination, the GLIP-T training cell first (see the module docstring)."""
    cells = [dict(B=B, H=H, N=N, M=M, D=D, dtype=dtype, mode=mode, p=p)
             for mode in modes for p in dropouts for B in batches for N in ns for M in ms_]

    def rank(c):
        glip_like = (c["mode"] == "fwdbwd" and c["p"] > 0) or (c["mode"] == "fwd" and c["p"] == 0)
        return (not glip_like, c["M"] != max(ms_), c["N"] != max(ns), c["B"], c["mode"] != "fwdbwd")

    return sorted(cells, key=rank)


# ------------------------------------------------------------------------------------------------------------------
# environment, output
# ------------------------------------------------------------------------------------------------------------------
def gpu_clocks():
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip()
    except Exception:
        return None


def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "timestamp": _dt.datetime.now().isoformat(timespec="seconds"),
           "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except Exception:
        env["commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["device"] = "cpu"
    return env


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _fmt(x, w=9, p=3):
    return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{str(x if x is not None else '-'):>{w}s}"


def print_table(rows):
    """One line per cell: eager, best SDPA (and the backends it ran), fused; speedups, memory, targets."""
    cells = {}
    for r in rows:
        key = (r["dtype"], r["mode"], r["p"], r["B"], r["N"], r["M"])
        cells.setdefault(key, {})[r["provider"]] = r
    target_m = max((r["M"] for r in rows), default=256)  # GLIP's padded text length (the largest one timed)
    log("")
    log("dtype mode    p    B     N    M |  eager ms |   sdpa ms (backend: image,text)         |  fused ms |"
        " x eager | x sdpa | %roof | peak MB eager/sdpa/fused | saved MB eager/fused | targets")
    for key in sorted(cells, key=lambda k: (k[0], k[1], k[2], k[5], k[3])):
        c = cells[key]

        def ms(r):
            return r["ms_p50"] if r and r.get("status") == "ok" else None

        eager, tri = c.get("eager"), c.get("triton")
        sdpas = sorted((ms(r), n) for n, r in c.items() if n.startswith("sdpa") and ms(r) is not None)
        best = c.get(sdpas[0][1]) if sdpas else None
        backend = "-"
        if best:
            used = (best.get("sdpa_backends") or "").replace("image=", "").replace("text=", "")
            backend = f"{best['provider'][5:] or 'default'}: {used or '?'}"
        t_ms, e_ms, s_ms = ms(tri), ms(eager), ms(best)
        x_e = e_ms / t_ms if (t_ms and e_ms) else None
        x_s = s_ms / t_ms if (t_ms and s_ms) else None
        peaks = "/".join(f"{r['peak_extra_mb']:.0f}" if r and r.get("peak_extra_mb") is not None else "-"
                         for r in (eager, best, tri))
        saved = "/".join(f"{r['saved_mb']:.0f}" if r and r.get("saved_mb") is not None else "-" for r in (eager, tri))
        targets = "-"
        if key[1] == "fwdbwd" and key[5] == target_m and t_ms:
            marks = []
            if x_s is not None:
                marks.append(f"sdpa {'ok' if x_s >= TARGET_X_SDPA else 'MISS'}")
            if x_e is not None:
                marks.append(f"eager {'ok' if x_e >= TARGET_X_EAGER else 'MISS'}")
            if eager and tri and eager.get("saved_mb") and tri.get("saved_mb") is not None:
                frac = tri["saved_mb"] / eager["saved_mb"]
                marks.append(f"mem {'ok' if frac <= TARGET_MEM_FRACTION else 'MISS'} ({frac:.3f})")
            targets = ", ".join(marks) or "-"
        fused = t_ms if t_ms is not None else (tri or {}).get("status", "-")
        log(f"{key[0]:5s} {key[1]:6s} {key[2]:4.2g} {key[3]:3d} {key[4]:6d} {key[5]:4d} | {_fmt(e_ms)} |"
            f" {_fmt(s_ms)} ({backend[:28]:28s}) | {_fmt(fused)} | {_fmt(x_e, 7, 2)} | {_fmt(x_s, 6, 2)} |"
            f" {_fmt((tri or {}).get('pct_roofline'), 5, 1)} | {peaks:>24s} | {saved:>19s} | {targets}")
    log(f"targets (training cells, fwdbwd M={target_m}): fused >= {TARGET_X_SDPA}x best SDPA, >= {TARGET_X_EAGER}x"
        f" eager, saved memory <= {TARGET_MEM_FRACTION:.3f} of eager's")


def write_json(payload, path: Path):
    """Write atomically; with ``$OUT`` set (the device tool's folder) also keep a copy there, unless that is where
    ``path`` already lives (``--out "$OUT"``: the file would be copied onto itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    out_dir = os.environ.get("OUT")
    if out_dir and Path(out_dir).is_dir():
        target = Path(out_dir) / path.name
        if not (target.exists() and os.path.samefile(target, path)):
            shutil.copyfile(path, target)


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=ints, default=[1, 4])
    ap.add_argument("--ns", type=ints, default=[22400])
    ap.add_argument("--ms", type=ints, default=[256, 16])
    ap.add_argument("--modes", default="fwdbwd,fwd")
    ap.add_argument("--dtypes", default="bf16", help="dtypes of the timing phase (comma list; the fp32 row is a "
                    "phase of its own, --fp32-budget-s)")
    ap.add_argument("--dropouts", type=floats, default=[TRAIN_DROPOUT, 0.0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--providers", default=None, help="comma list (default: eager, sdpa, sdpa-flash, "
                    "sdpa-efficient, sdpa-cudnn, triton; sdpa-math on request)")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--gate-budget-s", type=float, default=100.0, help="hard limit of the bf16 gate")
    ap.add_argument("--time-budget-s", type=float, default=210.0, help="hard limit of the bf16 timing phase")
    ap.add_argument("--fp32-budget-s", type=float, default=45.0, help="hard limit of the fp32 gate + row (0: skip)")
    ap.add_argument("--tune-configs", type=int, default=2, help="autotune candidates per kernel for half inputs "
                    "(the first ones of each pruned list); fp32 always uses the first one only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--skip-gate", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU under TRITON_INTERPRET=1)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains every rejected backend at length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        log("gpu_bench: no CUDA device; use --smoke (with TRITON_INTERPRET=1) to exercise the script on CPU")
        return 2
    D, H = args.head_dim, args.heads
    gate_shapes = [(2, 2, 1537, 256, [200, 57]), (1, 2, 1000, 32, 32)]
    fp32_gate_shape = (1, 2, 1000, 256, [200])
    batches, ns, ms_ = args.batches, args.ns, args.ms
    if args.smoke:
        D, H = 32, 2
        batches, ns, ms_ = [1], [300], [64, 16]
        gate_shapes = [(1, 2, 97, 64, [40]), (1, 1, 70, 32, 32)]
        fp32_gate_shape = (1, 1, 70, 64, [40])
    modes = [m for m in args.modes.split(",") if m]
    bad = [d for d in args.dtypes.split(",") if d and d not in DTYPES] + [m for m in modes if m not in ("fwd", "fwdbwd")]
    if bad:
        log(f"gpu_bench: unknown dtype/mode {bad}; dtypes {sorted(DTYPES)}, modes fwd, fwdbwd")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 in IEEE fp32, like the kernel's default
    torch.backends.cudnn.allow_tf32 = False
    env = environment(device)
    peaks = peaks_for(env["device"]) if device.type == "cuda" else None
    out_path = Path(args.out) / f"fusion_{device_slug(env['device'])}_{_dt.date.today().isoformat()}.json"
    payload = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "environment": env, "peaks": peaks, "clocks_start": gpu_clocks(), "budgets_s": {
                   "gate": args.gate_budget_s, "time": args.time_budget_s, "fp32": args.fp32_budget_s},
               "phases": {}, "gate": {}, "rows": []}
    log(f"gpu_bench on {env['device']} (torch {env['torch']}, triton {env['triton']}); results -> {out_path}")

    provs = providers(args.providers.split(",") if args.providers else None)
    triton_state = {}  # dtype -> "ok" | "failed" | "incomplete" (gate cut short by its budget: timed anyway)

    def recorder(dn):
        def record(provider, ok, detail):
            entry = payload["gate"].setdefault(f"{provider} {dn}", {"ok": True, "detail": []})
            entry["ok"] = entry["ok"] and ok
            entry["detail"].append(detail)
            log(f"  gate {provider:16s} {'ok  ' if ok else 'FAIL'} {detail}")
            write_json(payload, out_path)
        return record

    def gate_dtype(dn, shapes, gate_provs, **kw):
        """The gate in one dtype on the kernel's first autotune candidate only (one compile per kernel variant)."""
        if "triton" in gate_provs:
            limit_autotune(1, 1)
            triton_state[dn] = "incomplete"
        gate(device, D, shapes, dn, gate_provs, recorder(dn), **kw)
        if "triton" in gate_provs:
            triton_state[dn] = "ok" if payload["gate"].get(f"triton {dn}", {}).get("ok", False) else "failed"

    def run_phase(name, budget, body):
        """Run ``body()`` under a hard budget; record how it ended."""
        t0 = time.perf_counter()
        status = "done"
        log(f"== phase {name} (budget {budget:.0f} s, {t0 - start:.0f} s elapsed)")
        try:
            with phase_deadline(budget):
                body()
        except PhaseTimeout:
            status = "timed out"
            log(f"  phase {name}: budget of {budget:.0f} s reached, moving on")
        except Exception as exc:  # a crash of one phase must not lose the others
            status = f"crashed: {exc!r}"[:300]
            traceback.print_exc()
        payload["phases"][name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1)}
        write_json(payload, out_path)
        return status

    def emit(row):
        payload["rows"].append(row)
        write_json(payload, out_path)

    def timing_phase(cells):
        for i, cell in enumerate(cells):
            time_cell(cell, provs, device, args, peaks, triton_state, emit)
            mine = [r for r in payload["rows"] if all(r.get(k) == cell[k] for k in cell)]
            summary = ", ".join(f"{r['provider']} {r['ms_p50']:.3f}" if r.get("status") == "ok"
                                else f"{r['provider']} {r.get('status')}" for r in mine)
            log(f"[{i + 1}/{len(cells)} {time.perf_counter() - start:5.0f}s] {cell_label(cell)}: {summary}")

    code = 0
    try:
        if not args.skip_gate and provs:
            run_phase("gate-bf16", args.gate_budget_s, lambda: gate_dtype("bf16", gate_shapes, provs))
        if "triton" in provs:
            payload["autotune_candidates"] = limit_autotune(args.tune_configs, 1)
            payload["tune_configs"] = {"half": args.tune_configs, "fp32": 1}
        dtypes = [d for d in args.dtypes.split(",") if d]
        cells = [c for dn in dtypes for c in cells_in_priority_order(batches, ns, ms_, modes, args.dropouts, dn, H, D)]
        log(f"timing {len(cells)} {'/'.join(dtypes)} cells x {len(provs)} providers, in priority order")
        run_phase("time-" + "-".join(dtypes), args.time_budget_s, lambda: timing_phase(cells))

        if args.fp32_budget_s > 0 and "fp32" not in dtypes:
            fp32_provs = {k: v for k, v in provs.items() if k in ("eager", "sdpa", "triton")}

            def fp32_phase():
                if not args.skip_gate:  # forward only: the fp32 row is a forward
                    gate_dtype("fp32", [fp32_gate_shape], fp32_provs, grads=False, extras=False)
                timing_phase([dict(B=batches[0], H=H, N=max(ns), M=max(ms_), D=D, dtype="fp32", mode="fwd", p=0.0)])

            run_phase("fp32", args.fp32_budget_s, fp32_phase)
    except Terminated:
        log("gpu_bench: terminated (SIGTERM); writing and printing what was measured")
        payload["terminated"] = True
        code = 3
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        payload["clocks_end"] = gpu_clocks()
        payload["total_s"] = round(time.perf_counter() - start, 1)
        write_json(payload, out_path)
        log(f"wrote {out_path} ({payload['total_s']} s; phases: "
            + ", ".join(f"{k} {v['status']} {v['seconds']} s" for k, v in payload["phases"].items()) + ")")
        print_table(payload["rows"])
    return code


if __name__ == "__main__":
    sys.exit(main())
