"""The kernels compile for real GPUs, checked without one.

The interpreter tests run the kernels' Python; Triton's compiler (typing, layouts, register allocation, ``ptxas``)
is only exercised when a kernel is lowered for a GPU.  ``glip_fusion.triton._aot`` does that for a target
architecture on this CPU machine.  Each check runs in a subprocess with ``TRITON_INTERPRET`` unset, since the
interpreter mode of a process is fixed when the kernels are defined.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _compile_in_subprocess(jobs: list[dict], timeout: int) -> list[dict]:
    """Run ``_aot.compile_kernel(**job)`` for each job in a compiled-mode process; returns the resources."""
    code = (
        "import json, sys, torch\n"
        "from glip_fusion.triton import _aot\n"
        "out = []\n"
        "for job in json.loads(sys.argv[1]):\n"
        "    job['dtype'] = getattr(torch, job['dtype'])\n"
        "    r = _aot.compile_kernel(**job)\n"
        "    out.append(dict(kernel=r.kernel, registers=r.registers, spill=r.spill_bytes, shared=r.shared_bytes,\n"
        "                    limit=_aot.shared_memory_limit(r.arch), fits=r.fits, constants=r.constants))\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_every_kernel_compiles_for_hopper_with_every_feature_on():
    """All nine kernel launches lower to a cubin for sm_90 (H100/H200) in bf16 with masks, clamp, dropout, skipped padded
    text and split partials on, and fit its shared memory; fp32 (IEEE dots) and fp16 variants of the forward too."""
    kernels = ["fwd_rows", "fwd_cols", "fwd_combine", "keep_mask", "bwd_pre", "bwd_rows_dq", "bwd_rows_dv",
               "bwd_cols_dk", "bwd_cols_dv"]
    small = dict(arch=90, head_dim=64, BLOCK_N=32, BLOCK_T=32, BLOCK_L=32)
    jobs = [dict(kernel=k, dtype="bfloat16", **small) for k in kernels]
    jobs += [dict(kernel="fwd_rows", dtype="float32", **small), dict(kernel="fwd_cols", dtype="float16", **small)]
    results = _compile_in_subprocess(jobs, timeout=600)
    assert [r["kernel"] for r in results] == [j["kernel"] for j in jobs]
    for r in results:
        assert r["fits"], r
        assert 0 < r["registers"] <= 255, r
    # the constants reached the compiler: the fp32 variant keeps IEEE dots, the half ones use tensor cores
    assert results[-2]["constants"]["PRECISION"] == "ieee"
    assert results[0]["constants"]["HAS_DROPOUT"] and results[0]["constants"]["BLOCK_D"] == 64


BACKWARD = ("bwd_rows_dq", "bwd_rows_dv", "bwd_cols_dk", "bwd_cols_dv")


def _backward_tile_jobs(dtypes: list[str], head_dims: list[int], dropouts: list[bool]) -> list[dict]:
    """Every backward tile the pruner keeps at GLIP-T's image size for a long or a short prompt
    (``_config.kept_configs``: every candidate that fits, the 16x16 ones for short prompts), compiled as the pruner
    returns it (warps, stages, register budget)."""
    import torch

    from glip_fusion.triton import _aot, _config

    limit = _aot.shared_memory_limit(90)
    return [dict(kernel=kernel, dtype=dtype, arch=90, head_dim=head_dim, num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, BLOCK_N=cfg.kwargs["BLOCK_N"],
                 BLOCK_T=cfg.kwargs["BLOCK_T"], HAS_DROPOUT=dropout)
            for dtype in dtypes for head_dim in head_dims for kernel in BACKWARD
            for cfg in _config.kept_configs(kernel, getattr(torch, dtype), head_dim, limit)
            for dropout in dropouts]


def _assert_spill_free(jobs: list[dict], timeout: int) -> None:
    results = _compile_in_subprocess(jobs, timeout=timeout)
    spilling = [f"{j['kernel']} {j['dtype']} d={j['head_dim']} {j['BLOCK_N']}x{j['BLOCK_T']} "
                f"warps={j['num_warps']} dropout={j['HAS_DROPOUT']}: {r['spill']} B/thread ({r['registers']} regs)"
                for j, r in zip(jobs, results) if r["spill"] > 0]
    assert not spilling, "backward tiles spilling registers on sm_90:\n" + "\n".join(spilling)
    assert all(r["fits"] for r in results)


def test_backward_tiles_compile_spill_free_for_hopper_at_glip_head_dim():
    """Every backward tile the autotuner may run compiles for sm_90 without register spills for GLIP training: head
    dim 256, bf16, dropout on, specialised like a launch on contiguous tensors (18 variants, ~15-40 s cold)."""
    _assert_spill_free(_backward_tile_jobs(["bfloat16"], [256], [True]), timeout=900)


@pytest.mark.slow
def test_backward_tiles_compile_spill_free_for_hopper_everywhere():
    """The same without dropout (inference), in fp16 and at the other padded head dims the kernels take (32, 64,
    128): 270 more variants, several minutes."""
    jobs = [j for j in _backward_tile_jobs(["bfloat16", "float16"], [32, 64, 128, 256], [True, False])
            if not (j["dtype"] == "bfloat16" and j["head_dim"] == 256 and j["HAS_DROPOUT"])]  # the default test's
    _assert_spill_free(jobs, timeout=3000)


@pytest.mark.slow
def test_fallback_configuration_fits_ampere_at_glip_head_dim():
    """``_config.SAFE_CONFIG`` is the configuration used when no autotune candidate fits a GPU: it must fit the
    smallest shared memory we target (A100, sm_80) for the four tiled kernels at head dim 256 in fp32."""
    from glip_fusion.triton import _config

    safe = _config.SAFE_CONFIG
    jobs = [dict(kernel=k, dtype="float32", arch=80, head_dim=256, BLOCK_N=safe["BLOCK_N"], BLOCK_T=safe["BLOCK_T"],
                 num_warps=safe["num_warps"], num_stages=safe["num_stages"])
            for k in _config.AUTOTUNE_CONFIGS]
    for r in _compile_in_subprocess(jobs, timeout=900):
        assert r["fits"], f"{r['kernel']}: {r['shared']} bytes of shared memory > sm_80 limit {r['limit']}"
