"""Ahead-of-time compilation of the fused kernels for a GPU architecture, on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python, not Triton's compiler: type errors of the compiled
frontend, illegal layouts and resource overruns only show when a kernel is lowered to PTX and assembled.  Triton's
NVIDIA backend does that for any target architecture without a driver (it bundles ``ptxas``), so this module lowers
one kernel variant to a cubin and reads back what the GPU would have to provide:

* ``registers`` per thread and ``spill_bytes`` (``cuobjdump -res-usage``: the per-thread stack, i.e. register
  spills to local memory);
* ``shared_bytes``, the dynamic shared memory per program (Triton's metadata), to compare with
  :func:`shared_memory_limit`.

The variant compiled is the one a launch on contiguous inputs compiles on a GPU: Triton's JIT specialises integer
arguments equal to 1 into constants and marks those divisible by 16 (and 16-byte aligned pointers) as such, except
the arguments in ``_config.NO_SPECIALIZE``.  So the head-dim strides are the constant 1, the other strides, the head
dim and the pointers are divisible by 16, and the token counts stay generic (:func:`launch_specialisation`).  These
facts decide whether loads are vectorised, and with it the register count.

Used by the compile test (``tests/test_fusion_triton_compile.py``) and by ``benchmarks/fusion/compile_check.py``,
which tabulates every autotune candidate.  Must be imported with ``TRITON_INTERPRET`` unset (compiled kernels).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _bwd, _config, _fwd

__all__ = ["KERNELS", "CompiledKernel", "compile_kernel", "shared_memory_limit", "launch_specialisation"]

#: Every kernel launch of the backend by name: ``(jit function, constexprs fixed by the name)``.  The tiled ones are
#: the ``_config`` names, tuned on CUDA; the backward passes are two variants of one function each.
KERNELS = {
    _config.FWD_ROWS: (_fwd._fwd_rows_kernel, {}),
    _config.FWD_COLS: (_fwd._fwd_cols_kernel, {}),
    "fwd_combine": (_fwd._fwd_combine_kernel, {}),
    "keep_mask": (_fwd._keep_mask_kernel, {}),
    "bwd_pre": (_bwd._bwd_pre_kernel, {}),
    _config.BWD_ROWS_DQ: (_bwd._bwd_rows_kernel, {"VALUES": False}),
    _config.BWD_ROWS_DV: (_bwd._bwd_rows_kernel, {"VALUES": True}),
    _config.BWD_COLS_DK: (_bwd._bwd_cols_kernel, {"VALUES": False}),
    _config.BWD_COLS_DV: (_bwd._bwd_cols_kernel, {"VALUES": True}),
}

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Scalar arguments: floats, and the upper-case sizes; every other upper-case argument is a pointer and every other
# lower-case one an int32.
_FLOAT_ARGS = frozenset({"p_drop", "keep_scale", "qk_scale", "clamp2", "scale"})
_SIZE_ARGS = frozenset({"H", "N", "M", "D", "L", "N_BUCKET"})
# Per-block opt-in shared memory by compute capability (CUDA programming guide, "Technical Specifications").
_SMEM_OPTIN = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
               90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


@dataclass(frozen=True)
class CompiledKernel:
    """Resources of one compiled kernel variant (per program / per thread)."""

    kernel: str
    arch: int
    dtype: str
    constants: dict
    num_warps: int
    num_stages: int
    maxnreg: int | None
    registers: int
    spill_bytes: int
    shared_bytes: int
    seconds: float

    @property
    def fits(self) -> bool:
        """Shared memory within the architecture's per-block limit (spills are slow, not fatal)."""
        return self.shared_bytes <= shared_memory_limit(self.arch)


def shared_memory_limit(arch: int) -> int:
    """Opt-in shared memory per block in bytes for compute capability ``arch`` (e.g. 90 for H100/H200)."""
    if arch in _SMEM_OPTIN:
        return _SMEM_OPTIN[arch]
    return _SMEM_OPTIN[max(a for a in _SMEM_OPTIN if a <= arch)]


def _pointer_type(name: str, dtype: str) -> str:
    """Element type of pointer argument ``name`` (the kernels' upper-case arguments) for input dtype ``dtype``."""
    if name.endswith("MASK") or name.startswith("KEEP_"):
        return "*u8"
    if name in ("THI", "IHI"):
        return "*i32"
    if name.startswith(("LSE", "DELTA")) or name in ("PACC", "PM", "PL", "PART"):
        return "*fp32"  # softmax statistics and split partials are fp32 whatever the inputs
    return "*" + dtype


def launch_specialisation(name: str, head_dim: int) -> int | None:
    """What Triton's JIT knows about integer argument ``name`` in a launch on contiguous ``(B, H, L, head_dim)``
    tensors: 1 (it becomes a constant), 16 (divisible by 16) or None (nothing: the ``NO_SPECIALIZE`` arguments,
    floats, token counts).

    The launcher passes head-dim strides of 1 (it copies inputs with another one); the other strides of contiguous
    operands, and of the ``(B*H, splits, M, D)`` partials, are multiples of the head dim.
    """
    if name in _config.NO_SPECIALIZE or name in _FLOAT_ARGS:
        return None
    if name.startswith("stride_"):
        if name.endswith("d"):
            return 1
        return 16 if head_dim % 16 == 0 else None
    if name == "D":
        return 1 if head_dim == 1 else (16 if head_dim % 16 == 0 else None)
    return None


def _default_constants(dtype: torch.dtype, head_dim: int) -> dict:
    """Every feature on (masks, clamp, dropout, skipped padded text, split partials): the largest variant."""
    return dict(
        HAS_TMASK=True, HAS_IMASK=True, HAS_CLAMP=True, HAS_DROPOUT=True, SKIP_MASKED_TEXT=True, WRITE_PARTIAL=True,
        UPCAST=False, PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_D=_config.block_d(head_dim),
        BLOCK_L=64, BLOCK_N=64, BLOCK_T=64,
    )


def _resources(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` of the single kernel in ``cubin``, from the bundled ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    if regs is None or stack is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output:\n{out}")
    return int(regs.group(1)), int(stack.group(1))


def compile_kernel(kernel: str, dtype: torch.dtype = torch.bfloat16, *, arch: int = 90, head_dim: int = 256,
                   num_warps: int = 4, num_stages: int = 1, maxnreg: int | None = None,
                   **constants) -> CompiledKernel:
    """Compile ``kernel`` (a key of :data:`KERNELS`) to a cubin for compute capability ``arch``, specialised like a
    launch on contiguous inputs of head dim ``head_dim`` (:func:`launch_specialisation`).

    ``constants`` override the kernel's ``tl.constexpr`` arguments (default: every feature on, 64-wide tiles,
    ``BLOCK_D = block_d(head_dim)``); names a kernel does not take are ignored.  ``num_warps``, ``num_stages`` and
    ``maxnreg`` (the register budget per thread given to ``ptxas``; None: its own choice) are those of a
    ``triton.Config``.  Raises what Triton raises when the kernel does not compile (``CompilationError``,
    ``PTXASError``, ...).
    """
    if _config.interpreting():
        raise RuntimeError("compile_kernel needs compiled kernels: import glip_fusion.triton with TRITON_INTERPRET unset")
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(KERNELS)}")
    if dtype not in _TRITON_DTYPE:
        raise TypeError(f"dtype must be one of {list(_TRITON_DTYPE)}, got {dtype}")
    fn, fixed = KERNELS[kernel]
    type_name = _TRITON_DTYPE[dtype]
    wanted = {**_default_constants(dtype, head_dim), **constants, **fixed}
    constexpr_names = [p.name for p in fn.params if p.is_constexpr]
    consts = {name: wanted[name] for name in constexpr_names}
    signature, unit, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        elif name.isupper() and name not in _SIZE_ARGS:
            signature[name] = _pointer_type(name, type_name)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations and head offsets are 16-byte aligned
        else:
            known = launch_specialisation(name, head_dim)
            signature[name] = "constexpr" if known == 1 else ("fp32" if name in _FLOAT_ARGS else "i32")
            if known == 1:
                unit[name] = 1
            elif known == 16:
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={**consts, **unit}, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    registers, spill = _resources(compiled.asm["cubin"])
    return CompiledKernel(kernel=kernel, arch=arch, dtype=type_name, constants=consts, num_warps=num_warps,
                          num_stages=num_stages, maxnreg=maxnreg, registers=registers, spill_bytes=spill,
                          shared_bytes=int(compiled.metadata.shared), seconds=seconds)
