"""GLIP-T detection on CPU against the machine's fp32 GEMM: how close to GEMM-bound is each stage?

Run:  python benchmarks/detect/bench_detect_gemm_bound.py [--threads 2] [--repeats 5] [--variants default,reference]
          [--clock wall|cpu] [--max-other-load 0.1] [--retries 4] [--out PATH]

In one process, interleaved sample by sample:

* the **GEMM rate**: a 2048x2048x2048 float32 ``torch.matmul`` (the median of 5) before every detection sample;
  the rate of the run is the median over all samples;
* the **FLOPs** of one detection, counted by ``torch.utils.flop_counter.FlopCounterMode`` (per stage too). The
  reference FLOP count is the one of the ``reference`` variant with torch's own formulas (458.2 GFLOP for GLIP-T
  on the street picture at 800x1216 with a 4-phrase prompt; the CPU attention kernel
  ``_scaled_dot_product_flash_attention_for_cpu`` has no formula there and counts 0). The ``default`` variant is
  also counted with that kernel's FLOPs added, to show what it computes;
* the **time** of every stage of ``GLIP.detect`` (forward hooks: Swin body, FPN, BERT, X-MHA, head BERT layers,
  DyConv, head, post-processing, other = image loading/resizing, tokenization, anchors) for each variant,
  alternated, medians over ``--repeats``.

``ratio = time / (reference FLOPs / GEMM rate)``: 1.0 is a detection as fast as its FLOPs at the GEMM's rate.

Variants: ``default`` (every default fast path), ``reference`` (the same model with this benchmark's fast paths
off: the map-wide eager Swin blocks). The detections of each variant are compared with ``official-mode`` (run
once, untimed: eager reference attention, text padded to 256, torchvision's deformable convolution, eager Swin),
by ``glip_train.testing.match_detections`` (same label, IoU > 0.99, score within 1e-3).

Model: GLIP-T with synthetic weights of the official layout (``assets/glip_t_synthetic_weights.json``; timings do
not depend on the values). Image: ``assets/street.png`` (640x427) at the official test size (800 short side ->
800x1199, padded to 800x1216). ``--clock cpu`` times with this process's CPU time, which with ``--threads 1`` is
robust to other processes on a shared machine (with more threads it counts every thread and spinning). Writes
``benchmarks/results/detect_gemm_bound_cpu_<date>.{json,md}``. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_detect_stages import PROMPTS, StageTimer, configure  # noqa: E402
from glip_t_cpu import GLIP_T_RECIPE, STREET, flop_mapping  # noqa: E402
from other_load import clean_median, sample  # noqa: E402

VARIANTS = ("default", "reference")
STAGES = ("backbone_body", "fpn", "bert", "x_mha", "head_bert", "dyconv", "head", "postprocess", "other", "total")
GEMM_N = 2048


def set_variant(model, variant: str) -> dict:
    """Switch the model to a variant; returns the ``detect`` keyword arguments."""
    kwargs = configure(model, "official-mode" if variant == "official-mode" else "ours+factored")
    if variant == "reference":
        model.backbone.body.set_fused_inference(False)
    return kwargs


def gemm_rate(clock, repeats: int = 5) -> float:
    """float32 GFLOP/s of a 2048^3 ``torch.matmul``, the median of ``repeats`` (after one warm-up)."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    a @ b
    times = []
    for _ in range(repeats):
        start = clock()
        a @ b
        times.append(clock() - start)
    return 2 * GEMM_N**3 / statistics.median(times) / 1e9


def count_flops(model, image, classes, variant: str, with_cpu_attention: bool) -> dict[str, float]:
    """GFLOP of one detection per stage (and ``total``), as ``FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = flop_mapping(with_cpu_attention)
    kwargs = set_variant(model, variant)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model.detect(image, classes=classes, threshold=0.0, classes_per_prompt=len(classes), **kwargs)
    counts = {name: sum(ops.values()) / 1e9 for name, ops in counter.get_flop_counts().items()}
    stages = dict.fromkeys(STAGES, 0.0)
    stages["backbone_body"] = counts.get("ImageEncoder.body", 0.0)
    stages["fpn"] = counts.get("ImageEncoder.fpn", 0.0)
    stages["bert"] = counts.get("GLIP.language_backbone", 0.0)
    for i, module in enumerate(model.head.dyhead_tower):
        stages[StageTimer.KINDS[type(module).__name__]] += counts.get(f"GLIP.head.dyhead_tower.{i}", 0.0)
    stages["head"] = counts.get("GLIP.head", 0.0) - counts.get("GLIP.head.dyhead_tower", 0.0)
    stages["total"] = counts.get("Global", 0.0)
    stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k not in ("other", "total"))
    return stages


def run_once(model, image, classes, variant: str, clock):
    kwargs = set_variant(model, variant)
    timer = StageTimer(model, clock=clock)
    with timer.attached():
        start = clock()
        result = model.detect(image, classes=classes, threshold=0.0, classes_per_prompt=len(classes), **kwargs)
        total = clock() - start
    return timer.result(total), result[0]


def agreement(ours, official) -> dict:
    from glip_train.testing import match_detections

    m = match_detections(ours["boxes"], ours["scores"], ours["labels"],
                         official["boxes"], official["scores"], official["labels"])
    return {"official": m.num_reference, "ours": m.num_ours, "matched": m.matched, "unmatched_ours": m.unmatched_ours,
            "identical": m.matched == m.num_reference == m.num_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(GLIP_T_RECIPE))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per variant (after a warm-up)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (robust to load with --threads 1)")
    parser.add_argument("--max-other-load", type=float, default=0.1,
                        help="retry a sample when other processes took more than this share of the machine's CPU "
                             "during it (benchmarks/other_load.py); negative: never retry")
    parser.add_argument("--retries", type=int, default=4, help="retries per sample under load")
    parser.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/...)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := [v for v in variants if v not in VARIANTS]:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    from glip_data.io import atomic_write_json, atomic_write_text
    from glip_train import GLIP
    from PIL import Image

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    model = GLIP.from_pretrained(args.weights).eval()
    image = Image.open(STREET).convert("RGB")
    classes = PROMPTS["4"]
    input_hw = tuple(model.processor.preprocess([image]).pixel_values.shape[-2:])
    load_before = os.getloadavg()

    flops_reference = count_flops(model, image, classes, "reference", with_cpu_attention=False)
    flops = {v: count_flops(model, image, classes, v, with_cpu_attention=True) for v in variants}
    _, official = run_once(model, image, classes, "official-mode", clock)
    detections = {v: agreement(run_once(model, image, classes, v, clock)[1], official) for v in variants}  # warm-up

    limit = None if args.max_other_load < 0 else args.max_other_load
    samples = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            def one(v=v):
                return gemm_rate(clock), run_once(model, image, classes, v, clock)[0]
            (rate, stages), share, runs = sample(one, limit, args.retries)
            samples[v].append({**stages, "gemm_gflops": rate, "other_load": share, "attempts": runs})

    all_samples = [x for v in variants for x in samples[v]]
    rate = clean_median([x["gemm_gflops"] for x in all_samples], [x["other_load"] for x in all_samples], limit)[0]
    rows = []
    for v in variants:
        shares = [x["other_load"] for x in samples[v]]
        med = {s: clean_median([x[s] for x in samples[v]], shares, limit)[0] for s in STAGES}
        bound = {s: flops_reference[s] / rate for s in STAGES}
        rows.append({
            "variant": v,
            "median_s": med,
            "gflop_reference": flops_reference,
            "gflop_counted": flops[v],
            "gemm_bound_s": bound,
            # stages without GEMM work (post-processing, other) have no ratio
            "ratio": {s: med[s] / bound[s] if flops_reference[s] >= 0.01 else None for s in STAGES},
            "detections_vs_official_mode": detections[v],
            "runs_in_median": clean_median([x["total"] for x in samples[v]], shares, limit)[1],
            "runs": samples[v],
        })
    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "clock": args.clock,
        "input": f"assets/street.png -> {input_hw[0]}x{input_hw[1]} (padded), 1 image, GLIP-T (synthetic weights), "
                 f"fp32, prompt {classes}",
        "gemm": f"{GEMM_N}^3 float32 torch.matmul, median over samples",
        "gemm_gflops": rate,
        "gflop_reference": flops_reference["total"],
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "command": "python benchmarks/detect/bench_detect_gemm_bound.py " + " ".join(sys.argv[1:]),
        "note": "ratio = median time / (reference GFLOP / GEMM GFLOP/s); variants and GEMM interleaved in one "
                "process; runs under more than --max-other-load of other processes' CPU were retried and left "
                "out of the medians.",
    }
    report = markdown(meta, rows)
    print(report)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"detect_gemm_bound_cpu_{meta['date']}"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), report)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# GLIP-T detection vs fp32 GEMM on CPU ({meta['date']})",
        "",
        f"{meta['device']}, torch {meta['torch']}, clock: {meta['clock']}. Input: {meta['input']}.",
        f"GEMM ({meta['gemm']}): **{meta['gemm_gflops']:.1f} GFLOP/s**. Reference FLOPs: "
        f"**{meta['gflop_reference']:.1f} GFLOP** -> GEMM-bound time "
        f"**{meta['gflop_reference'] / meta['gemm_gflops']:.2f} s**.",
        "",
        "| stage | GFLOP (ref) | GEMM-bound s | " + " | ".join(f"{r['variant']} s | ratio" for r in rows) + " |",
        "|---|---|---|" + "---|---|" * len(rows),
    ]
    ref = rows[0]
    for s in STAGES:
        line = f"| {'**total**' if s == 'total' else s} | {ref['gflop_reference'][s]:.1f} | {ref['gemm_bound_s'][s]:.3f} |"
        for r in rows:
            ratio = r["ratio"][s]
            line += f" {r['median_s'][s]:.3f} | {'-' if ratio is None else f'{ratio:.2f}x'} |"
        lines.append(line)
    lines.append("")
    for r in rows:
        d = r["detections_vs_official_mode"]
        lines.append(f"* {r['variant']}: {r['gflop_counted']['total']:.1f} GFLOP computed (CPU attention counted), "
                     f"detections vs official-mode: {d['matched']}/{d['official']} matched, {d['ours']} ours "
                     f"({'identical' if d['identical'] else 'NOT identical'}); {r['runs_in_median']} runs in the "
                     "median.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
