"""Run the benchmarks: ``hatch run bench`` (or ``python benchmarks/run.py``).

* CPU part, everywhere: every ``benchmarks/*/test_bench_*.py`` under pytest-benchmark; the JSON report goes to
  ``<out>/bench_cpu_<date>.json``.
* GPU part, when CUDA is present: every ``benchmarks/*/gpu_bench.py`` (each writes its own JSON into ``<out>``).

Results go to ``--out`` (default ``bench-results/`` in the current folder, never the source tree); the results the
project publishes are copied into ``benchmarks/results/`` deliberately, with the device and the date.

* The zero-shot protocol runner (``benchmarks/zero_shot/protocol.py``): the shipped model on a synthetic world it
  never saw, next to the numbers it should give (about a minute on 2 cores; ``--no-zero-shot`` skips it). Real COCO /
  LVIS with an official checkpoint: ``--zero-shot-args "--weights W.pth --coco-annotations ... --coco-images ..."``.
* With ``--detect``: ``benchmarks/detect/bench_detect_cpu.py`` (GLIP-T CPU detection time per image, text padded to
  256 vs to the longest prompt; several minutes on 2 cores).
* With ``--export``: ``benchmarks/export/bench_export_cpu.py`` (GLIP-T end to end on the CPU: eager / onnxruntime /
  OpenVINO x fp32 / int8, 4 and 80 classes, as shares of the measured GEMM rate; needs the ``onnx`` and ``openvino``
  extras; the first run exports GLIP-T, about 10 minutes on 2 cores).

Options: ``--cpu-only``, ``--gpu-only``, ``--detect``, ``--export``, ``--no-zero-shot``, ``--zero-shot-args``, ``--out DIR``;
arguments after ``--`` go to the GPU scripts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def cpu_part(out: Path) -> int:
    files = sorted(str(p.relative_to(REPO)) for p in HERE.glob("*/test_bench_*.py"))
    if not files:
        print("run.py: no CPU benchmark files found")
        return 0
    report = out / f"bench_cpu_{_dt.date.today().isoformat()}.json"
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={report}", "--benchmark-columns=min,median,max,rounds"]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=REPO)
    return 0 if rc in (0, 5) else rc  # 5: nothing collected


def gpu_part(out: Path, extra: list[str]) -> int:
    try:
        import torch
    except ImportError:
        print("run.py: torch is not installed; skipping the GPU part")
        return 0
    if not torch.cuda.is_available():
        print("run.py: no CUDA device; skipping the GPU benchmarks")
        return 0
    rc = 0
    for script in sorted(HERE.glob("*/gpu_bench.py")):
        cmd = [sys.executable, str(script), "--out", str(out), *extra]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=REPO) or rc
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description="glip benchmarks (CPU part everywhere, GPU part with CUDA)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true")
    group.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--detect", action="store_true", help="also time GLIP-T detection on the CPU (minutes)")
    ap.add_argument("--export", action="store_true",
                    help="also time GLIP-T eager / onnxruntime / OpenVINO x fp32 / int8 on the CPU (the first run "
                         "exports GLIP-T: about 10 minutes)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot protocol runner")
    ap.add_argument("--zero-shot-args", default="", metavar="ARGS",
                    help="arguments for benchmarks/zero_shot/protocol.py (e.g. real COCO / LVIS paths and --weights)")
    ap.add_argument("--out", default="bench-results", help="folder for the result files [bench-results]")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    if not args.gpu_only:
        rc = cpu_part(out) or rc
    if not args.cpu_only:
        rc = gpu_part(out, extra) or rc
    if not args.no_zero_shot and not args.gpu_only:
        cmd = [sys.executable, str(HERE / "zero_shot" / "protocol.py"), "--out", str(out),
               *shlex.split(args.zero_shot_args)]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=REPO) or rc
    if args.detect:
        cmd = [sys.executable, str(HERE / "detect" / "bench_detect_cpu.py"),
               "--out", str(out / f"detect_cpu_{_dt.date.today().isoformat()}.json")]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=REPO) or rc
    if args.export:
        cmd = [sys.executable, str(HERE / "export" / "bench_export_cpu.py"), "--export-dir", str(out / "export_glip_t"),
               "--out", str(out / f"export_cpu_{_dt.date.today().isoformat()}.json")]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=REPO) or rc
    return rc


if __name__ == "__main__":
    sys.exit(main())
