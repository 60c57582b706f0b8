"""End-to-end GLIP-T detection on the CPU: eager PyTorch / onnxruntime / OpenVINO x fp32 / int8, 4 and 80 classes.

Run:  python benchmarks/export/bench_export_cpu.py [--repeats 3] [--threads N] [--prompts 4,80]
          [--paths eager,onnx,onnx-int8,openvino,openvino-int8] [--export-dir DIR] [--max-other-load 0.1]
          [--retries 4] [--out PATH]

GLIP-T with the synthetic weights of the recipe in assets/ (timings do not depend on the values) on the street
picture resized to 1333x800 (network input 800x1333, padded to 800x1344), ``detect`` with one prompt per image (the
official COCO protocol: no 40-class chunking), threshold 0. The exported models are written once into
``--export-dir`` (default ``bench-results/export_glip_t``; reused when present, the int8 and OpenVINO models are
converted from the float32 ONNX export). Paths are alternated image by image inside one process; samples taken
while other processes loaded the machine are retried (``benchmarks/other_load.py``).

In the same run: the machine's float32 GEMM rate (a 2048x2048x2048 ``torch.mm`` on the same threads) and the FLOPs
of one GLIP-T network pass with a 4-phrase prompt (``torch.utils.flop_counter.FlopCounterMode`` on the eager model,
its default CPU path), so that every path's rate is given as a share of the GEMM rate. The official code's time is
the committed measurement quoted in ``benchmarks/detect/README.md``. Writes ``export_cpu_<date>.json`` and ``.md`` to
``benchmarks/results/`` (or ``--out``). A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from glip_data.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "benchmarks" / "detect"))
from bench_detect_cpu import COCO_CLASSES  # noqa: E402
from glip_t_cpu import add_common_arguments, flop_mapping, load_model_and_street  # noqa: E402
from other_load import clean_median, sample  # noqa: E402

PROMPTS = {"4": ["person", "car", "red umbrella", "traffic light"], "80": COCO_CLASSES}
PATHS = ("eager", "onnx", "onnx-int8", "openvino", "openvino-int8")
#: the official code's time per 800x1333 GLIP-T image on 2 CPU cores, from benchmarks/detect/README.md (2026-12)
OFFICIAL_SECONDS = 17.5
OFFICIAL_SOURCE = "benchmarks/detect/README.md: last side-by-side run of the official GLIP code on 2 cores (2026-12)"


def gemm_rate(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``-cubed float32 matmul (best of ``repeats``) on the current torch threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def network_gflop(model, image) -> float:
    """GFLOP of one network pass (image encoder, text, tower, head) with the 4-phrase prompt, counted on eager."""
    from torch.utils.flop_counter import FlopCounterMode

    processor = model.processor
    batch = processor.preprocess([image])
    ids, mask = processor.tokenize([". ".join(PROMPTS["4"]) + "."])
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        model(batch.pixel_values, ids, mask, batch.image_sizes)
    return counter.get_total_flops() / 1e9


def exported_models(model, folder: Path, paths, threads: int | None) -> dict:
    """Load (writing them first when absent) the exported models the ``paths`` need."""
    from glip_train.export import ExportedGLIP, export_model

    fp32 = folder / "onnx"
    variants = {"onnx": (fp32, "onnx", None), "onnx-int8": (folder / "onnx-int8", "onnx", "int8"),
                "openvino": (folder / "openvino", "openvino", None),
                "openvino-int8": (folder / "openvino-int8", "openvino", "int8")}
    needed = [p for p in paths if p != "eager"]
    if needed and not (fp32 / "export.json").is_file():
        print(f"exporting GLIP-T to {fp32} (minutes)", flush=True)
        # optimize=False: the exporter's graph optimizer adds minutes for GLIP-T; the runtimes optimize on load
        export_model(model, fp32, "onnx", optimize=False, source="assets/glip_t_synthetic_weights.json")
    out = {}
    for path in needed:
        target, fmt, quantize = variants[path]
        if not (target / "export.json").is_file():
            print(f"converting to {path} in {target}", flush=True)
            export_model(ExportedGLIP.from_pretrained(fp32), target, fmt, quantize=quantize)
        out[path] = ExportedGLIP.from_pretrained(target, threads=threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and prompt (after a warm-up)")
    parser.add_argument("--prompts", default="4,80", help="comma list of prompt sizes: 4, 80")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {PATHS}")
    parser.add_argument("--export-dir", default="bench-results/export_glip_t",
                        help="where the exported models are written once and reused")
    parser.add_argument("--max-other-load", type=float, default=0.1,
                        help="retry a sample when other processes took more than this share of the machine's CPU "
                             "(benchmarks/other_load.py); negative: never retry")
    parser.add_argument("--retries", type=int, default=4, help="retries per sample under load")
    args = parser.parse_args()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"--paths: unknown {unknown}; choose from {PATHS}")

    model, image = load_model_and_street(args)
    threads = torch.get_num_threads()
    models = {"eager": model, **exported_models(model, Path(args.export_dir), paths, threads)}
    gemm = gemm_rate(threads)
    gflop = network_gflop(model, image)
    print(f"fp32 GEMM rate {gemm:.1f} GFLOP/s on {threads} threads; GLIP-T network pass {gflop:.1f} GFLOP "
          "(4-phrase prompt)", flush=True)
    limit = None if args.max_other_load < 0 else args.max_other_load
    load_before = os.getloadavg()
    rows = []
    for prompt in args.prompts.split(","):
        classes = PROMPTS[prompt.strip()]
        kwargs = dict(classes=classes, threshold=0.0, classes_per_prompt=len(classes))
        for path in paths:
            models[path].detect(image, **kwargs)  # warm-up
        samples = {path: [] for path in paths}
        for _ in range(args.repeats):
            for path in paths:
                def run(p=path):
                    start = time.perf_counter()
                    models[p].detect(image, **kwargs)
                    return time.perf_counter() - start
                seconds, share, attempts = sample(run, limit, args.retries)
                samples[path].append((seconds, share, attempts))
        for path in paths:
            times = [s[0] for s in samples[path]]
            shares = [s[1] for s in samples[path]]
            median, used = clean_median(times, shares, limit)
            rows.append({"classes": len(classes), "path": path, "median_s": median, "runs_in_median": used,
                         "runs_s": times, "runs_other_load": shares, "runs_attempts": [s[2] for s in samples[path]],
                         "gflop_per_s": gflop / median, "share_of_gemm_rate": gflop / median / gemm,
                         "speedup_vs_eager": None, "speedup_vs_official": OFFICIAL_SECONDS / median})
        eager = next((r for r in rows[-len(paths):] if r["path"] == "eager"), None)
        for r in rows[-len(paths):]:
            r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if eager else None

    meta = {
        "date": dt.date.today().isoformat(),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads",
        "torch": torch.__version__,
        "runtimes": _versions(),
        "input": "1 image, 800x1333 (padded 800x1344), GLIP-T (synthetic weights), one prompt per image",
        "gemm_gflop_per_s": gemm,
        "network_gflop_4_classes": gflop,
        "official_seconds": OFFICIAL_SECONDS,
        "official_source": OFFICIAL_SOURCE,
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "command": "python benchmarks/export/bench_export_cpu.py " + " ".join(sys.argv[1:]),
        "note": "share_of_gemm_rate: the 4-class network FLOPs (also used for the 80-class rows, whose text side is "
                "larger) over the median time, divided by the fp32 GEMM rate. Medians over the runs within "
                "--max-other-load.",
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"export_cpu_{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"meta": meta, "rows": rows})
    table = markdown(meta, rows)
    atomic_write_text(out.with_suffix(".md"), table)
    print("\n" + table + f"\nwrote {out} and {out.with_suffix('.md')}")


def _versions() -> dict:
    versions = {}
    for name in ("onnxruntime", "openvino", "onnx", "onnxscript", "nncf"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"GLIP-T detection, 800x1333, {meta['device']}, torch {meta['torch']}, {meta['date']}",
             f"fp32 GEMM rate {meta['gemm_gflop_per_s']:.1f} GFLOP/s; network pass {meta['network_gflop_4_classes']:.1f} "
             f"GFLOP (4 classes); official code {meta['official_seconds']} s ({meta['official_source']})", "",
             "| path | classes | seconds | GFLOP/s | share of GEMM rate | vs eager | vs official |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_eager = "–" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
        lines.append(f"| {r['path']} | {r['classes']} | {r['median_s']:.2f} | {r['gflop_per_s']:.1f} | "
                     f"{100 * r['share_of_gemm_rate']:.0f}% | {vs_eager} | {r['speedup_vs_official']:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
