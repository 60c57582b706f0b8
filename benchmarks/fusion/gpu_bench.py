"""GPU benchmark of GLIP's bi-directional attention core: eager GLIP vs two SDPA calls vs the fused Triton kernel.

One process, one device:

1. **Correctness gate.**  The fused kernel (fp32 and bf16 by default, ``--gate-dtypes``; text padding, odd N,
   M in {32, 256}, d = 256), forward and all four gradients against a float64 reference (low precision: within 2x
   the error of the eager formulation in the same dtype, plus a floor); dropout against a reference built from the
   kernel's own keep-masks; bitwise run-to-run determinism.  The baselines (eager, every SDPA backend) are checked
   the same way.  If the fused kernel fails it is not timed; a failing baseline is flagged in the JSON.
2. **Timing** at GLIP-T shapes: H = 8, d = 256, B in {1, 2, 8}, N in {6500, 22400}, M in {32, 256}
   (M = 256: 200 real tokens + padding, as a COCO 80-class prompt; M = 32: a short prompt, no padding),
   bf16 and fp32, modes ``fwd`` (inference: no grad, no dropout) and ``fwdbwd`` (training: dropout 0.1,
   forward + backward).  Providers: ``eager`` (the official GLIP op sequence), ``sdpa`` (default dispatch) and
   ``sdpa-<backend>`` for each of flash / efficient / cudnn / math forced with ``torch.nn.attention.sdpa_kernel``
   (recorded as unsupported when PyTorch rejects the inputs), and ``triton`` (autotuned; first-call time incl.
   compile + autotune reported separately).  Reported: median ms (p20/p80), useful TFLOP/s (3U forward, 10U
   forward+backward, U = 2*B*H*N*M*d, for every provider), % of the roofline bound, peak extra memory.
   Providers run in a shuffled order per cell.

The roofline bound (formulas copied from the design notes' ``roofline.py``, nominal datasheet peaks):
``t_fwd = max(3U / F, (3 ND + small) / BW)``, ``t_bwd = max(7U / F, (6 ND + small) / BW)`` with
``ND = B*H*N*d*bytes``, ``small = B*H*(8*M*d*bytes + 4*(N+M))``, F the dense bf16 tensor-core peak (fp32: the
non-tensor FMA peak, since the kernel and eager fp32 run in IEEE fp32) and BW the HBM bandwidth.

Writes ``benchmarks/results/fusion_<device>_<date>.json`` (after every cell, so a timeout keeps what was measured;
also copied to ``$OUT`` when that is set) and prints a short table last.  Configurations that run out of memory
are recorded as ``oom``; cells beyond ``--budget-s`` are skipped with a line saying so (default budget 420 s, so
the whole run stays under 8 minutes on one H100).

Usage::

    python benchmarks/fusion/gpu_bench.py                  # full protocol (CUDA)
    python benchmarks/fusion/gpu_bench.py --batches 1 --ns 6500 --dtypes bf16
    TRITON_INTERPRET=1 python benchmarks/fusion/gpu_bench.py --smoke   # tiny shapes on CPU: checks the script
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import shutil
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


def log(msg: str) -> None:
    print(msg, flush=True)


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
# providers
# ------------------------------------------------------------------------------------------------------------------
def eager_glip(q, k, v_v, v_l, text_mask, scale, dropout_p, training):
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
    p_v = F.dropout(p_v, p=dropout_p, training=training)
    p_l = F.dropout(p_l, p=dropout_p, training=training)
    o_v = torch.bmm(p_v, v_l.reshape(B * H, M, D))
    o_l = torch.bmm(p_l, v_v.reshape(B * H, N, D))
    return o_v.view(B, H, N, D), o_l.view(B, H, M, D)


def sdpa_pair(q, k, v_v, v_l, text_mask, scale, dropout_p, backend=None):
    """Two SDPA calls sharing q and k: image queries over text keys (bool key mask), text queries over image keys."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ctx = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else _null()
    with ctx:
        o_v = F.scaled_dot_product_attention(q, k, v_l, attn_mask=text_mask[:, None, None, :], dropout_p=dropout_p,
                                             scale=scale)
        o_l = F.scaled_dot_product_attention(k, q, v_v, dropout_p=dropout_p, scale=scale)
    return o_v, o_l


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def triton_pair(q, k, v_v, v_l, text_mask, scale, dropout_p, seed=1234, **kw):
    from glip_fusion.triton import bi_attention_triton

    return bi_attention_triton(q, k, v_v, v_l, text_mask, None, scale=scale, dropout_p=dropout_p, clamp=CLAMP,
                               seed=seed, **kw)


SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
SDPA_SHORT = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient", "CUDNN_ATTENTION": "cudnn",
              "MATH": "math"}


def providers():
    out = {"eager": lambda *a, training=False: eager_glip(*a, training=training)}
    out["sdpa"] = lambda *a, training=False: sdpa_pair(*a)
    for b in SDPA_BACKENDS:
        out[f"sdpa-{SDPA_SHORT[b]}"] = lambda *a, training=False, b=b: sdpa_pair(*a, backend=b)
    out["triton"] = lambda *a, training=False: triton_pair(*a)
    return out


# ------------------------------------------------------------------------------------------------------------------
# references and inputs
# ------------------------------------------------------------------------------------------------------------------
def reference64(q, k, v_v, v_l, text_mask, scale, keep_v=None, keep_l=None, p=0.0):
    """float64 ground truth (clamp, padded text -> -inf in the image direction, no image mask)."""
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


def _run_with_grads(fn, inputs, text_mask, scale, p, seed_out=7):
    x = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*x, text_mask, scale, p)
    g = torch.Generator(device="cpu").manual_seed(seed_out)
    gos = [torch.randn(o.shape, generator=g).to(o) for o in outs]
    torch.autograd.backward(outs, gos)
    return outs, x, gos


# ------------------------------------------------------------------------------------------------------------------
# correctness gate
# ------------------------------------------------------------------------------------------------------------------
def gate(device, D, gate_shapes, dtypes, det_shape):
    """Returns {provider: {"ok": bool, "detail": [...]}}."""
    from glip_fusion.triton import dropout_keep_masks

    results = {}

    def record(provider, ok, detail):
        entry = results.setdefault(provider, {"ok": True, "detail": []})
        entry["ok"] = entry["ok"] and ok
        entry["detail"].append(detail)
        log(f"  gate {provider:16s} {'ok  ' if ok else 'FAIL'} {detail}")

    # floors: absolute for outputs (unit-scale values), relative-to-max for gradients
    floors = {"fp32": (1e-4, 1e-3), "fp16": (3e-3, 2e-2), "bf16": (3e-2, 6e-2)}
    for (B, H, N, M, valid) in gate_shapes:
        scale = D ** -0.5
        for dn in dtypes:
            dtype = DTYPES[dn]
            q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, dtype, device, valid, seed=N + M)
            inputs = [q, k, v_v, v_l]
            x64 = [t.detach().double().requires_grad_() for t in inputs]
            r_outs = reference64(*x64, tm, scale)
            g = torch.Generator(device="cpu").manual_seed(7)
            r_gos = [torch.randn(o.shape, generator=g).to(o.device, torch.float64) for o in r_outs]
            torch.autograd.backward(r_outs, r_gos)
            # the eager formulation in the same dtype calibrates what "low precision" costs
            try:
                e_outs, e_x, _ = _run_with_grads(lambda *a: eager_glip(*a, training=False), inputs, tm, scale, 0.0)
                eager_err = _errors(e_outs, e_x, r_outs, x64)
            except Exception as exc:  # no calibration: fall back to the fixed floors
                log(f"  gate eager calibration failed ({exc!r}); using fixed tolerances")
                eager_err = {n: (0.0, 0.0) for n in ("o_v", "o_l", "dq", "dk", "dv_v", "dv_l")}
            tag = f"B={B} H={H} N={N} M={M} valid={valid} d={D} {dn}"
            for prov, fn in [("triton", lambda *a: triton_pair(*a)), ("eager", None)] + [
                    (f"sdpa-{SDPA_SHORT[b]}", (lambda *a, b=b: sdpa_pair(*a, backend=b))) for b in SDPA_BACKENDS]:
                try:
                    if prov == "eager":
                        errs = eager_err
                    else:
                        outs, xs, _ = _run_with_grads(fn, inputs, tm, scale, 0.0)
                        errs = _errors(outs, xs, r_outs, x64)
                except RuntimeError as exc:  # SDPA backend rejecting these inputs
                    if prov.startswith("sdpa"):
                        log(f"  gate {prov:16s} n/a  {tag}: {str(exc).splitlines()[0][:100]}")
                        continue
                    raise
                bad = []
                for name, (err, mag) in errs.items():
                    floor = floors[dn][0] if name.startswith("o_") else floors[dn][1] * max(mag, 1e-6)
                    limit = max(floor, 2.0 * eager_err[name][0] if dn != "fp32" else floor)
                    if not err <= limit:
                        bad.append(f"{name} {err:.3g}>{limit:.3g}")
                worst = max(errs[n][0] for n in ("o_v", "o_l"))
                record(prov, not bad, f"{tag}: max out err {worst:.2e}" + (f" [{', '.join(bad)}]" if bad else ""))

    # dropout: the kernel against a reference that applies the kernel's own masks (fp32)
    B, H, N, M, valid = gate_shapes[0]
    p, seed, scale = TRAIN_DROPOUT, 4321, D ** -0.5
    q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, torch.float32, device, valid, seed=5)
    keep_v, keep_l = dropout_keep_masks(seed, B, H, N, M, p, device=device)
    x64 = [t.detach().double().requires_grad_() for t in (q, k, v_v, v_l)]
    r_outs = reference64(*x64, tm, scale, keep_v, keep_l, p)
    g = torch.Generator(device="cpu").manual_seed(7)
    r_gos = [torch.randn(o.shape, generator=g).to(o.device, torch.float64) for o in r_outs]
    torch.autograd.backward(r_outs, r_gos)
    outs, xs, _ = _run_with_grads(lambda *a: triton_pair(*a, seed=seed), [q, k, v_v, v_l], tm, scale, p)
    errs = _errors(outs, xs, r_outs, x64)
    bad = [f"{n} {e:.3g}" for n, (e, mag) in errs.items() if e > (1e-4 if n.startswith("o_") else 1e-3 * max(mag, 1))]
    record("triton", not bad, f"dropout p={p} vs keep-mask reference" + (f" [{', '.join(bad)}]" if bad else ""))

    # determinism: two identical training steps are bitwise equal
    B, H, N, M, valid = det_shape
    q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, torch.bfloat16, device, valid, seed=6)
    runs = []
    for _ in range(2):
        outs, xs, _ = _run_with_grads(lambda *a: triton_pair(*a, seed=99), [q, k, v_v, v_l], tm, D ** -0.5,
                                      TRAIN_DROPOUT)
        runs.append([o.detach() for o in outs] + [x.grad for x in xs])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    record("triton", same, "bitwise determinism (bf16, dropout, 2 runs)")
    return results


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


def peak_extra_bytes(fn, inputs, device):
    if device.type != "cuda":
        return None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated() - before)


def time_cell(cell, provs, device, args, peaks, triton_ok):
    B, H, N, M, D, dn, mode = (cell[k] for k in ("B", "H", "N", "M", "D", "dtype", "mode"))
    dtype = DTYPES[dn]
    training = mode == "fwdbwd"
    valid = min(M, 200) if M > 32 else M
    scale = D ** -0.5
    p = TRAIN_DROPOUT if training else 0.0
    rows = []
    try:
        q, k, v_v, v_l, tm = make_inputs(B, H, N, M, D, dtype, device, valid, seed=1, grad=training)
    except torch.cuda.OutOfMemoryError:
        log(f"  skip {cell}: inputs do not fit in memory")
        return [dict(cell, provider="*", status="oom")]
    inputs = [q, k, v_v, v_l]
    grads = None
    if training:
        grads = [torch.randn(B, H, N, D, device=device, dtype=dtype), torch.randn(B, H, M, D, device=device,
                                                                                   dtype=dtype)]
    names = list(provs)
    random.Random(hash((B, N, M, dn, mode)) & 0xFFFF).shuffle(names)
    elem = torch.finfo(dtype).bits // 8
    bound = roofline_s(B, H, N, M, D, elem, mode, peaks, dn)
    flops = useful_flops(B, H, N, M, D, mode)
    for name in names:
        row = dict(cell, provider=name)
        if name == "triton" and not triton_ok:
            rows.append(dict(row, status="failed correctness gate"))
            continue
        f = provs[name]

        def step(f=f):
            if training:
                outs = f(q, k, v_v, v_l, tm, scale, p, training=True)
                torch.autograd.backward(outs, grads)
            else:
                with torch.no_grad():
                    f(q, k, v_v, v_l, tm, scale, p, training=False)

        try:
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms, p20, p80 = bench_ms(step, inputs if training else None, device, args.warmup_ms, args.rep_ms)
            mem = peak_extra_bytes(step, inputs, device)
            row.update(status="ok", ms_p50=ms, ms_p20=p20, ms_p80=p80, first_call_s=round(first, 3),
                       tflops_useful=flops / (ms * 1e-3) / 1e12,
                       pct_roofline=(100.0 * bound / (ms * 1e-3)) if bound else None,
                       peak_extra_mb=None if mem is None else mem / 2 ** 20)
            if name == "triton":
                row["triton_configs"] = triton_configs()
        except torch.cuda.OutOfMemoryError:
            row.update(status="oom")
            log(f"  {name}: out of memory at {cell}")
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            row.update(status="unsupported" if name.startswith("sdpa") else "error", reason=msg)
            if not name.startswith("sdpa"):
                log(f"  {name}: error at {cell}: {msg}")
        finally:
            for t in inputs:
                t.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def triton_configs():
    try:
        from glip_fusion.triton import _bwd, _fwd
    except Exception:  # pragma: no cover
        return None
    out = {}
    for name, tuned in (("fwd_rows", _fwd.fwd_rows_tuned), ("fwd_cols", _fwd.fwd_cols_tuned),
                        ("bwd_rows", _bwd.bwd_rows_tuned), ("bwd_cols", _bwd.bwd_cols_tuned)):
        cfg = getattr(tuned, "best_config", None) if tuned is not None else None
        if cfg is not None:
            out[name] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


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
           "timestamp": _dt.datetime.now().isoformat(timespec="seconds")}
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


def print_table(rows):
    cells = {}
    for r in rows:
        key = (r["dtype"], r["mode"], r["B"], r["N"], r["M"])
        cells.setdefault(key, {})[r["provider"]] = r
    log("")
    log("dtype mode     B     N    M |   eager ms |  best sdpa ms (backend) |  triton ms | x eager | x sdpa |"
        " %roof | peak MB eager/sdpa/triton")
    for key in sorted(cells):
        c = cells[key]

        def ms(r):
            return r["ms_p50"] if r and r.get("status") == "ok" else None

        eager = c.get("eager")
        sdpas = [(ms(r), n) for n, r in c.items() if n.startswith("sdpa") and ms(r) is not None]
        best_sdpa = min(sdpas) if sdpas else (None, None)
        backend = "-" if best_sdpa[1] is None else (best_sdpa[1][5:] or "default")
        tri = c.get("triton")
        t_ms, e_ms = ms(tri), ms(eager)

        def fmt(x, w=10, p=3):
            return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{(x or '-'):>{w}s}"

        sp_e = e_ms / t_ms if (t_ms and e_ms) else None
        sp_s = best_sdpa[0] / t_ms if (t_ms and best_sdpa[0]) else None
        mems = []
        for r in (eager, c.get(best_sdpa[1]) if best_sdpa[1] else None, tri):
            mems.append(f"{r['peak_extra_mb']:.0f}" if r and r.get("peak_extra_mb") is not None else "-")
        status_t = t_ms if t_ms is not None else (tri or {}).get("status", "-")
        log(f"{key[0]:5s} {key[1]:6s} {key[2]:3d} {key[3]:6d} {key[4]:4d} | {fmt(e_ms)} | {fmt(best_sdpa[0])}"
            f" ({backend:9s}) | {fmt(status_t)} | {fmt(sp_e, 7, 2)} | {fmt(sp_s, 6, 2)} |"
            f" {fmt((tri or {}).get('pct_roofline'), 5, 1)} | {'/'.join(mems)}")


def write_json(payload, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)
    out_dir = os.environ.get("OUT")
    if out_dir and Path(out_dir).is_dir():
        shutil.copy(path, Path(out_dir) / path.name)


# ------------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,2,8")
    ap.add_argument("--ns", default="6500,22400")
    ap.add_argument("--ms", default="32,256")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--providers", default=None, help="comma list (default: all)")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining cells after this many seconds")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--skip-gate", action="store_true")
    ap.add_argument("--gate-dtypes", default="fp32,bf16", help="dtypes of the correctness gate (each one compiles "
                    "its own kernel variants; fp16 is covered by the CPU interpreter tests)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU under TRITON_INTERPRET=1)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains every rejected backend at length
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        log("gpu_bench: no CUDA device; use --smoke (with TRITON_INTERPRET=1) to exercise the script on CPU")
        return 2
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    batches, ns, ms_, D, H = ints(args.batches), ints(args.ns), ints(args.ms), args.head_dim, args.heads
    dtypes, modes = args.dtypes.split(","), args.modes.split(",")
    gate_dtypes = args.gate_dtypes.split(",")
    gate_shapes = [(2, 2, 1537, 256, [200, 57]), (1, 2, 1000, 32, 32)]
    det_shape = (2, 8, 3001, 256, [200, 57])
    if args.smoke:
        batches, ns, ms_, D, H = [1], [300], [32, 64], 32, 2
        gate_shapes, gate_dtypes = [(1, 2, 97, 64, [40]), (1, 1, 70, 32, 32)], ["fp32", "fp16"]
        det_shape = (1, 2, 50, 32, [20])
    torch.backends.cuda.matmul.allow_tf32 = False  # eager fp32 in IEEE fp32, like the kernel's default
    env = environment(device)
    peaks = peaks_for(env["device"]) if device.type == "cuda" else None
    date = _dt.date.today().isoformat()
    out_path = Path(args.out) / f"fusion_{device_slug(env['device'])}_{date}.json"
    payload = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "environment": env, "peaks": peaks, "clocks_start": gpu_clocks(), "gate": None, "rows": []}
    log(f"gpu_bench on {env['device']} (torch {env['torch']}, triton {env['triton']}); results -> {out_path}")

    provs = providers()
    if args.providers:
        keep = set(args.providers.split(","))
        provs = {k: v for k, v in provs.items() if k in keep}
    triton_ok = "triton" in provs
    if not args.skip_gate:
        log("correctness gate:")
        t0 = time.perf_counter()
        try:
            gate_res = gate(device, D, gate_shapes, gate_dtypes, det_shape)
        except Exception as exc:  # the gate itself crashed: the kernel is not trustworthy
            traceback.print_exc()
            gate_res = {"triton": {"ok": False, "detail": [f"gate crashed: {exc!r}"]}}
        payload["gate"] = gate_res
        payload["gate_s"] = round(time.perf_counter() - t0, 1)
        triton_ok = triton_ok and gate_res.get("triton", {}).get("ok", False)
        for name, res in gate_res.items():
            if not res["ok"] and name in provs and name != "triton":
                log(f"  {name} failed the gate: timed anyway but flagged")
        write_json(payload, out_path)

    cells = [dict(B=B, H=H, N=N, M=M, D=D, dtype=dn, mode=mode)
             for dn in dtypes for mode in modes for B in batches for N in ns for M in ms_]
    log(f"timing {len(cells)} cells x {len(provs)} providers (budget {args.budget_s:.0f} s from start)")
    for i, cell in enumerate(cells):
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            log(f"  skipped (time budget {args.budget_s:.0f} s reached after {elapsed:.0f} s): {cell}")
            payload["rows"].append(dict(cell, provider="*", status="skipped: time budget"))
            continue
        rows = time_cell(cell, provs, device, args, peaks, triton_ok)
        payload["rows"].extend(rows)
        summary = ", ".join(f"{r['provider']} {r['ms_p50']:.3f}" if r.get("status") == "ok"
                            else f"{r['provider']} {r.get('status')}" for r in rows)
        log(f"[{i + 1}/{len(cells)} {time.perf_counter() - start:5.0f}s] {cell['dtype']} {cell['mode']} "
            f"B={cell['B']} N={cell['N']} M={cell['M']}: {summary}")
        write_json(payload, out_path)
    payload["clocks_end"] = gpu_clocks()
    payload["total_s"] = round(time.perf_counter() - start, 1)
    write_json(payload, out_path)
    log(f"wrote {out_path} ({payload['total_s']} s)")
    print_table(payload["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
