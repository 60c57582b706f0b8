"""Compile every autotune candidate of the fused kernels for a GPU architecture, without a GPU, and tabulate the
resources each one needs: registers and spills per thread, shared memory per program.

Triton lowers a kernel to PTX and assembles it with its bundled ``ptxas`` for any target, so this runs on a CPU-only
machine (``TRITON_INTERPRET`` must be unset).  It answers, before any GPU time is spent, which candidates of
``glip_fusion.triton._config.AUTOTUNE_CONFIGS`` cannot launch (shared memory over the architecture's limit) and which
spill registers to local memory (slow) at GLIP-T's head dim 256.  It does not time anything: speed needs the GPU
(``gpu_bench.py``).  Every feature is on (masks, clamp, dropout, skipped padded text, split partials): the largest
variant of each kernel, the training one; ``--dropout off`` compiles the inference variants, ``--dropout both`` both.
Each variant is specialised like a launch on contiguous inputs (``_aot.launch_specialisation``).

Usage::

    python benchmarks/fusion/compile_check.py                       # sm_90 (H100/H200), bf16 and fp32
    python benchmarks/fusion/compile_check.py --arch 80 --dtypes bf16 --extra
    python benchmarks/fusion/compile_check.py --dtypes fp32 --pruned    # what a first fp32 call compiles
    python benchmarks/fusion/compile_check.py --dtypes bf16 --pruned --backward --head-dims 32,64,128,256 \
        --dropout both --markdown                                   # the backward tiles a first call may compile

Writes ``benchmarks/results/triton_compile_sm<arch>[_nodropout][_<dtypes>_pruned]_triton<version>_<date>.json``
(with ``--markdown`` also a ``.md`` table) and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DTYPES = ("bf16", "fp16", "fp32")


#: Tiles surveyed with ``--survey`` besides the autotune set (BLOCK_N, BLOCK_T, warps, stages): larger text tiles for
#: the column kernels (BLOCK_T = 128), wide image tiles with narrow text tiles for short prompts (M <= 32), and
#: neighbours of the autotune candidates.
SURVEY_EXTRA = {
    "fwd_rows": [(64, 16, 4, 1), (128, 16, 8, 1), (128, 32, 8, 1), (64, 32, 4, 1), (32, 64, 8, 1)],
    "fwd_cols": [(64, 16, 4, 1), (128, 16, 8, 1), (128, 32, 8, 1), (32, 128, 8, 1), (64, 128, 8, 1),
                 (16, 128, 8, 1), (32, 64, 8, 1)],
    "bwd_rows_dq": [(64, 16, 4, 1), (64, 16, 8, 1), (32, 16, 8, 1), (16, 32, 8, 1)],
    "bwd_rows_dv": [(64, 16, 4, 1), (128, 16, 8, 1), (128, 32, 8, 1), (32, 16, 8, 1)],
    "bwd_cols_dk": [(64, 16, 8, 1), (32, 128, 8, 1), (16, 128, 8, 1), (16, 32, 8, 1)],
    "bwd_cols_dv": [(64, 16, 4, 1), (32, 128, 8, 1), (64, 128, 8, 1), (16, 128, 8, 1)],
}


def candidates(kernel: str, extra: bool, pruned_for=None, survey: bool = False
               ) -> list[tuple[int, int, int, int, int | None, str]]:
    """``(BLOCK_N, BLOCK_T, num_warps, num_stages, maxnreg, source)`` to compile for ``kernel``: the autotune set, the
    fallback configuration, with ``extra`` the same tiles at the other warp count, with ``survey`` the tiles of
    :data:`SURVEY_EXTRA`.

    ``pruned_for=(dtype, head_dim, smem_limit)``: only the autotune candidates that the autotuner's pruner keeps for
    that input dtype at GLIP-T's image size for a long or a short prompt (``_config.kept_configs``, register budgets
    included), i.e. what a first call may compile.
    """
    from glip_fusion.triton import _config

    configs = _config.AUTOTUNE_CONFIGS[kernel]
    if pruned_for is not None:
        configs = _config.kept_configs(kernel, *pruned_for)
    seen, out = set(), []

    def add(bn, bt, warps, stages, maxnreg, source):
        if (bn, bt, warps, stages, maxnreg) not in seen:
            seen.add((bn, bt, warps, stages, maxnreg))
            out.append((bn, bt, warps, stages, maxnreg, source))

    for cfg in configs:
        add(cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_T"], cfg.num_warps, cfg.num_stages, cfg.maxnreg, "autotune")
    safe = _config.SAFE_CONFIG
    add(safe["BLOCK_N"], safe["BLOCK_T"], safe["num_warps"], safe["num_stages"], None, "safe")
    if extra:
        for cfg in configs:
            add(cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_T"], 12 - cfg.num_warps, cfg.num_stages, cfg.maxnreg,
                "extra")
    if survey:
        for bn, bt, warps, stages in SURVEY_EXTRA.get(kernel, []):
            add(bn, bt, warps, stages, None, "survey")
    return out


def markdown_document(payload: dict) -> str:
    """The survey (``payload`` as written to the JSON file) as markdown: what, how, a summary and the table."""
    rows = payload["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    spilling = [r for r in ok if r["spill_bytes"] > 0]
    return (f"# Triton kernels compiled for sm_{payload['arch']}, {payload['date']}\n\n"
            f"Compiled offline for sm_{payload['arch']}, no GPU (Triton {payload['triton']}, torch {payload['torch']}), "
            "each variant specialised like a launch on contiguous inputs: registers and spill bytes per thread, "
            "shared memory per program.\n\n"
            f"```\n{payload['command']}\n```\n\n"
            f"{len(rows)} variants: {len(ok)} compiled, {len(spilling)} spill registers"
            + (f", up to {max(r['spill_bytes'] for r in spilling)} bytes per thread" if spilling else "")
            + (f"; at most {max(r['registers'] for r in ok)} registers per thread" if ok else "") + ".\n\n"
            + markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    """The survey as a markdown table, one line per compiled variant."""
    lines = ["| kernel | dtype | head dim | dropout | BLOCK_N x BLOCK_T | warps | maxnreg | registers | spill bytes "
             "| shared KB | source |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['kernel']} | {r['dtype']} | {r['head_dim']} | {'on' if r['dropout'] else 'off'} | "
                f"{r['BLOCK_N']} x {r['BLOCK_T']} | {r['num_warps']} | {r['maxnreg'] or '-'} |")
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | {r['source']} |")
        else:
            lines.append(f"{head} {r['registers']} | {r['spill_bytes']} | {r['shared_kb']} | {r['source']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    ap.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--head-dims", default="256", help="comma list of head dims, e.g. 32,64,128,256")
    ap.add_argument("--kernels", default=None, help="comma list (default: the six tiled kernels)")
    ap.add_argument("--backward", action="store_true", help="only the four backward passes")
    ap.add_argument("--extra", action="store_true", help="also each autotune tile at the other warp count (4 <-> 8)")
    ap.add_argument("--dropout", choices=("on", "off", "both"), default="on",
                    help="compile the training variants (on), the inference ones (off) or both")
    ap.add_argument("--markdown", action="store_true", help="also write the table as markdown next to the JSON")
    ap.add_argument("--pruned", action="store_true", help="only the candidates the autotuner's pruner keeps for each "
                    "dtype at GLIP-T's image size, long or short prompt (what a first call may compile), instead of "
                    "the whole set")
    ap.add_argument("--survey", action="store_true", help="also the tiles of SURVEY_EXTRA (BLOCK_T = 128 column "
                    "tiles, short-prompt tiles, neighbours)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile kernels)")
        return 2

    import torch
    import triton

    from glip_fusion.triton import _aot, _config

    dtype_of = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in dtype_of]
    if unknown:
        ap.error(f"unknown dtype(s) {unknown}; choose from {DTYPES}")
    head_dims = [int(h) for h in args.head_dims.split(",") if h]
    kernels = args.kernels.split(",") if args.kernels else list(_config.AUTOTUNE_CONFIGS)
    if args.backward:
        kernels = [k for k in kernels if k.startswith("bwd_")]
    dropouts = {"on": [True], "off": [False], "both": [True, False]}[args.dropout]
    limit = _aot.shared_memory_limit(args.arch)
    rows = []
    jobs = [(d, hd, drop, k, c) for d in dtypes for hd in head_dims for drop in dropouts for k in kernels
            for c in candidates(k, args.extra, (dtype_of[d], hd, limit) if args.pruned else None, args.survey)]
    print(f"compile_check: {len(jobs)} variants for sm_{args.arch} (triton {triton.__version__}, head dims "
          f"{head_dims}, shared-memory limit {limit // 1024} KB)", flush=True)
    for i, (dname, head_dim, dropout, kernel, (bn, bt, warps, stages, maxnreg, source)) in enumerate(jobs, 1):
        row = dict(kernel=kernel, dtype=dname, head_dim=head_dim, dropout=dropout, BLOCK_N=bn, BLOCK_T=bt,
                   num_warps=warps, num_stages=stages, maxnreg=maxnreg, source=source)
        try:
            res = _aot.compile_kernel(kernel, dtype_of[dname], arch=args.arch, head_dim=head_dim, num_warps=warps,
                                      num_stages=stages, maxnreg=maxnreg, BLOCK_N=bn, BLOCK_T=bt,
                                      HAS_DROPOUT=dropout)
            est = _config.shared_memory_estimate(kernel, bn, bt, warps, stages, _config.block_d(head_dim),
                                                 dtype_of[dname].itemsize)
            row.update(status="ok", registers=res.registers, spill_bytes=res.spill_bytes,
                       shared_kb=round(res.shared_bytes / 1024, 1), est_shared_kb=round(est / 1024, 1),
                       est_ratio=round(est / max(1, res.shared_bytes), 3), fits=res.fits,
                       compile_s=round(res.seconds, 1))
        except Exception as exc:  # a variant that does not compile is a result, not a crash of the survey
            row.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[-1][:200]}")
        rows.append(row)
        print(f"[{i}/{len(jobs)}] {json.dumps(row)}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = ("_backward" if args.backward else "") + ("_nodropout" if args.dropout == "off" else "")
    variant += ("_" + "_".join(dtypes) + "_pruned" if args.pruned else "")
    variant += "_triton" + ".".join(triton.__version__.split(".")[:2])
    path = out / f"triton_compile_sm{args.arch}{variant}_{_dt.date.today().isoformat()}.json"
    command = " ".join(["python benchmarks/fusion/compile_check.py", *(argv if argv is not None else sys.argv[1:])])
    payload = dict(command=command, date=_dt.date.today().isoformat(), arch=args.arch, triton=triton.__version__,
                   torch=torch.__version__, head_dims=head_dims, dropout=args.dropout, pruned=args.pruned,
                   shared_memory_limit_kb=limit // 1024, rows=rows)
    path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {path}")
    if args.markdown:
        md = path.with_suffix(".md")
        md.write_text(markdown_document(payload))
        print(f"wrote {md}")
    print(f"\n{'kernel':11s} {'dtype':5s} {'D':>3s} {'drop':>4s} {'BN':>4s} {'BT':>4s} {'warps':>5s} {'stg':>3s} "
          f"{'maxnreg':>7s} {'regs':>4s} {'spill B':>7s} {'smem KB':>7s} {'est KB':>7s} {'est/smem':>8s} {'fits':>4s}"
          "  source")
    for r in rows:
        head = (f"{r['kernel']:11s} {r['dtype']:5s} {r['head_dim']:3d} {'on' if r['dropout'] else 'off':>4s} "
                f"{r['BLOCK_N']:4d} {r['BLOCK_T']:4d} {r['num_warps']:5d} {r['num_stages']:3d} "
                f"{str(r['maxnreg'] or '-'):>7s}")
        if r["status"] != "ok":
            print(f"{head}  {r['status']}")
            continue
        print(f"{head} {r['registers']:4d} {r['spill_bytes']:7d} {r['shared_kb']:7.1f} {r['est_shared_kb']:7.1f} "
              f"{r['est_ratio']:8.3f} {'yes' if r['fits'] else 'NO':>4s}  {r['source']}")
    ratios = [r["est_ratio"] for r in rows if r["status"] == "ok"]
    if ratios:
        print(f"\nshared-memory estimate / compiled: min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} "
              "variants")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
