"""Modulated deformable 3x3 convolution on CPU: glip_fusion's gather + GEMM op vs torchvision.ops.deform_conv2d.

Run:  python benchmarks/dcn/bench_dcn_cpu.py [--repeats 5] [--threads N] [--quick] [--out PATH]

Shapes: the DyConv convolutions of GLIP-T at 800x1333 (256 channels, batch 1; stride 1 at every level, stride 2 from
each level to the next coarser one) and of the small training model (batch 4 at 256x256). For each shape, forward
(no grad) and forward + backward (gradients of input, offset, mask, weight and bias) are timed with the two
implementations alternating inside one process; medians over ``--repeats``. Offsets: N(0, 2^2) pixels, mask
uniform in [0, 1]. Before timing, every shape checks that both give the same output and gradients (max abs
difference printed; float32). Writes benchmarks/results/dcn_cpu_<date>.json. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torchvision.ops import deform_conv2d as tv_deform_conv2d

from glip_fusion import deform_conv2d

REPO = Path(__file__).resolve().parents[2]
GLIP_T_LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]  # P3..P7 of an 800x1333 (800x1344) input
SMALL_LEVELS = [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]  # P3..P7 of 256x256


def shapes(quick: bool):
    out = []
    for name, batch, levels in (("GLIP-T 800x1333", 1, GLIP_T_LEVELS), ("small 4x256x256", 4, SMALL_LEVELS)):
        for i, hw in enumerate(levels):
            out.append((name, f"P{i + 3} s1", batch, hw, 1))
            if i > 0:
                out.append((name, f"P{i + 2}->P{i + 3} s2", batch, levels[i - 1], 2))
    if quick:
        out = [s for s in out if s[1] in ("P3 s1", "P4 s1", "P3->P4 s2")]
    return out


def make_inputs(batch, hw, stride, channels=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = hw
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    x = torch.randn(batch, channels, H, W, generator=g)
    offset = 2.0 * torch.randn(batch, 18, Ho, Wo, generator=g)
    mask = torch.rand(batch, 9, Ho, Wo, generator=g)
    weight = torch.randn(channels, channels, 3, 3, generator=g) / (channels * 9) ** 0.5
    bias = torch.randn(channels, generator=g)
    return x, offset, mask, weight, bias


def run_op(impl, inputs, stride, backward):
    x, offset, mask, weight, bias = inputs
    fn = tv_deform_conv2d if impl == "torchvision" else deform_conv2d
    if not backward:
        with torch.no_grad():
            return fn(x, offset, weight, bias, stride=stride, padding=1, mask=mask), None
    leaves = [t.detach().requires_grad_() for t in (x, offset, mask, weight, bias)]
    out = fn(leaves[0], leaves[1], leaves[3], leaves[4], stride=stride, padding=1, mask=leaves[2])
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return out.detach(), grads


def max_diffs(inputs, stride):
    out_tv, g_tv = run_op("torchvision", inputs, stride, True)
    out_g, g_g = run_op("gather", inputs, stride, True)
    names = ("output", "d_input", "d_offset", "d_mask", "d_weight", "d_bias")
    pairs = zip(names, (out_tv, *g_tv), (out_g, *g_g))
    return {n: {"max_abs": float((a - b).abs().max()), "max_ref": float(a.abs().max())} for n, a, b in pairs}


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="only the GLIP-T P3/P4 shapes")
    parser.add_argument("--no-backward-tv", action="store_true",
                        help="skip torchvision's forward+backward at the GLIP-T shapes (about 5 s per P3 call)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for model, label, batch, hw, stride in shapes(args.quick):
        inputs = make_inputs(batch, hw, stride)
        diffs = max_diffs(inputs, stride)
        row = {"model": model, "conv": label, "batch": batch, "input_hw": list(hw), "stride": stride,
               "max_abs_diff": {k: v["max_abs"] for k, v in diffs.items()}}
        for backward in (False, True):
            impls = ["torchvision", "gather"]
            if backward and args.no_backward_tv and model.startswith("GLIP-T"):
                impls = ["gather"]
            for impl in impls:
                run_op(impl, inputs, stride, backward)  # warm-up
            times = {impl: [] for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:
                    times[impl].append(timed(lambda: run_op(impl, inputs, stride, backward)))
            key = "fwd_bwd" if backward else "fwd"
            for impl in impls:
                row[f"{key}_{impl}_s"] = statistics.median(times[impl])
            if len(impls) == 2:
                row[f"{key}_speedup"] = row[f"{key}_torchvision_s"] / row[f"{key}_gather_s"]
        rows.append(row)
        print(f"{model:16s} {label:12s} fwd tv {row['fwd_torchvision_s'] * 1e3:8.1f} ms  ours "
              f"{row['fwd_gather_s'] * 1e3:7.1f} ms  x{row['fwd_speedup']:5.1f} | fwd+bwd "
              f"tv {row.get('fwd_bwd_torchvision_s', float('nan')) * 1e3:8.1f} ms  ours "
              f"{row['fwd_bwd_gather_s'] * 1e3:7.1f} ms  x{row.get('fwd_bwd_speedup', float('nan')):5.1f} | "
              f"max|diff| out {diffs['output']['max_abs']:.1e} d_off {diffs['d_offset']['max_abs']:.1e}",
              flush=True)

    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "command": "python benchmarks/dcn/bench_dcn_cpu.py " + " ".join(
            a for a in (f"--repeats {args.repeats}", f"--threads {args.threads}" if args.threads else "",
                        "--quick" if args.quick else "", "--no-backward-tv" if args.no_backward_tv else "") if a),
        "note": "medians of interleaved runs; other processes shared the cores (see load_average_at_end)",
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"dcn_cpu_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
