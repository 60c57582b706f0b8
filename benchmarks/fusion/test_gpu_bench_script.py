"""Unit checks of gpu_bench.py's machinery that a GPU run depends on (run: ``python -m pytest
benchmarks/fusion/test_gpu_bench_script.py``; the whole script runs end to end on CPU with
``bash benchmarks/fusion/device_run.sh --smoke``)."""
import importlib.util
import json
import time
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("gpu_bench", Path(__file__).with_name("gpu_bench.py"))
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


def test_write_json_into_out_itself_and_elsewhere(tmp_path, monkeypatch):
    """``--out "$OUT"`` (device_run.sh) used to copy the file onto itself (shutil.SameFileError)."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    gpu_bench.write_json({"a": 1}, out / "r.json")
    assert json.loads((out / "r.json").read_text()) == {"a": 1}
    gpu_bench.write_json({"a": 2}, tmp_path / "results" / "r.json")  # another folder: copied to $OUT
    assert json.loads((out / "r.json").read_text()) == {"a": 2}
    assert not list(out.glob("*.tmp"))


def test_phase_deadline_interrupts_and_restores():
    t0 = time.perf_counter()
    with pytest.raises(gpu_bench.PhaseTimeout):
        with gpu_bench.phase_deadline(0.2):
            while True:  # a busy phase (a compile) is interrupted too
                sum(range(1000))
    assert time.perf_counter() - t0 < 5
    with gpu_bench.phase_deadline(5):  # a phase that ends in time leaves no alarm behind
        pass
    time.sleep(0.05)
    with pytest.raises(gpu_bench.PhaseTimeout):  # an exhausted budget fails at once
        with gpu_bench.phase_deadline(0):
            pass
    assert not issubclass(gpu_bench.PhaseTimeout, Exception)  # `except Exception` in a provider cannot swallow it


def test_cells_start_with_the_glip_training_cell():
    cells = gpu_bench.cells_in_priority_order([1, 4], [22400], [256, 16], ["fwdbwd", "fwd"], [0.1, 0.0], "bf16", 8,
                                              256)
    assert len(cells) == 16
    first = [(c["mode"], c["p"], c["M"], c["B"]) for c in cells[:4]]
    assert first == [("fwdbwd", 0.1, 256, 1), ("fwd", 0.0, 256, 1), ("fwdbwd", 0.1, 256, 4), ("fwd", 0.0, 256, 4)]


def test_limit_autotune_on_the_compiled_kernels():
    """The GPU-only path: with compiled (not interpreted) kernels, ``limit_autotune`` wraps every tuned kernel's
    pruner (Triton's Autotuner attributes) and keeps the first candidates; fp32 gets the smallest tile only."""
    import os
    import subprocess
    import sys

    code = (
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('gpu_bench', {str(Path(__file__).with_name('gpu_bench.py'))!r})\n"
        "gb = importlib.util.module_from_spec(spec); spec.loader.exec_module(gb)\n"
        "cands = gb.limit_autotune(2, 1)\n"
        "from glip_fusion.triton import _config\n"
        "assert sorted(cands) == sorted(_config.AUTOTUNE_CONFIGS), cands\n"
        "for name, t in gb._tuned_kernels().items():\n"
        "    args = dict(M=256, N=22400, BLOCK_D=256)\n"
        "    half = t.early_config_prune(t.configs, {'Q': torch.empty(1, dtype=torch.bfloat16)}, **args)\n"
        "    single = t.early_config_prune(t.configs, {'Q': torch.empty(1)}, **args)\n"
        "    assert len(half) == 2 and len(single) == 1, (name, half, single)\n"
        "    assert (single[0].kwargs['BLOCK_N'], single[0].kwargs['BLOCK_T']) == (16, 16)\n"
        "    assert t.cache == {}\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
