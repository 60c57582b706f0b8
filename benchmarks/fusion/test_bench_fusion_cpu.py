"""CPU pytest-benchmark cases for the bi-attention core: reference / sdpa / triton (interpreter) at tiny shapes.

Runs anywhere (``python benchmarks/run.py`` or ``pytest benchmarks/fusion --benchmark-only``).  CPU timings compare
the eager reference with two SDPA calls; the Triton interpreter numbers are a smoke test only (interpreted kernels say
nothing about GPU speed).  Every case first checks its output against a float64 formulation.
"""
import os

import pytest
import torch

import glip_fusion  # TRITON_INTERPRET is set by the repository's conftest.py when there is no GPU

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (B, H, N, M, D, valid text tokens)
SHAPES = {
    "tiny": (1, 2, 512, 64, 32, 40),
    "small": (1, 8, 4096, 256, 32, 200),
}
# the interpreter runs programs one by one in Python: keep it to the tiny shape
BACKEND_SHAPES = [("reference", s) for s in SHAPES] + [("sdpa", s) for s in SHAPES] + [("triton", "tiny")]


def _inputs(B, H, N, M, D, valid):
    g = torch.Generator().manual_seed(0)
    q, k, v_v, v_l = (torch.randn(B, H, L, D, generator=g).to(DEV) for L in (N, M, N, M))
    text_mask = torch.zeros(B, M, dtype=torch.bool, device=DEV)
    text_mask[:, :valid] = True
    return q, k, v_v, v_l, text_mask


def _ref64(q, k, v_v, v_l, text_mask):
    q, k, v_v, v_l = (t.double() for t in (q, k, v_v, v_l))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    p_v = torch.softmax(s.masked_fill(~text_mask[:, None, None, :], float("-inf")), -1)
    p_l = torch.softmax(s.transpose(-1, -2), -1)
    return p_v @ v_l, p_l @ v_v


@pytest.mark.parametrize("backend,shape", BACKEND_SHAPES, ids=[f"{b}-{s}" for b, s in BACKEND_SHAPES])
def test_bench_bi_attention_forward(benchmark, backend, shape):
    if backend not in glip_fusion.available_backends():
        pytest.skip(f"backend {backend!r} not available here")
    torch.set_num_threads(2)
    q, k, v_v, v_l, tm = _inputs(*SHAPES[shape])

    def run():
        with torch.no_grad():
            return glip_fusion.bi_attention(q, k, v_v, v_l, tm, backend=backend)

    o_v, o_l = run()
    r_v, r_l = _ref64(q, k, v_v, v_l, tm)
    torch.testing.assert_close(o_v.double(), r_v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(o_l.double(), r_l, atol=1e-4, rtol=1e-4)
    benchmark.extra_info.update(backend=backend, shape=dict(zip("BHNMD", SHAPES[shape])), device=str(DEV),
                                interpreter=os.environ.get("TRITON_INTERPRET") == "1")
    benchmark.pedantic(run, rounds=3 if backend == "triton" else 5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_bench_bi_attention_training_step(benchmark, backend):
    """Forward + backward with dropout 0.1 (training) at the tiny shape, eager reference vs SDPA."""
    torch.set_num_threads(2)
    q, k, v_v, v_l, tm = _inputs(*SHAPES["tiny"])
    x = [t.requires_grad_() for t in (q, k, v_v, v_l)]

    def step():
        for t in x:
            t.grad = None
        o_v, o_l = glip_fusion.bi_attention(*x, tm, dropout_p=0.1, backend=backend, seed=0)
        (o_v.sum() + o_l.sum()).backward()
        return x[0].grad

    assert torch.isfinite(step()).all()
    benchmark.extra_info.update(backend=backend, mode="fwdbwd", dropout_p=0.1)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
