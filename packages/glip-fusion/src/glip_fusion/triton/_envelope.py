"""The inputs the fused kernels accept: the one definition of their size limits and dtypes.

Imported by ``glip_fusion.triton`` (``supports``), by the kernel entry point (``function``) and by the launch
configuration (``_config``). Must not import ``triton``: ``supports`` is asked by ``bi_attention(backend="auto")``
before any kernel is compiled, possibly where triton is not installed.

The general checks of ``bi_attention`` (tensor types, matching shapes, masks, options) are not repeated here: they
live in :func:`glip_fusion._validation.validate_bi_attention`, which every backend calls first.
"""
from __future__ import annotations

from typing import Optional

import torch

#: The longest text (M) the kernels accept. The Path-B kernels would tile any M, but the design (and the tests)
#: cover GLIP's ``MAX_QUERY_LEN = 256``; longer inputs are rejected with a clear error.
MAX_TEXT_LEN = 256
#: Supported head dims (inclusive). The kernels are designed for 32..256 (GLIP: 256); smaller dims and
#: non-powers of two are zero-padded to the next power of two (at least 32) inside the kernels (masked loads, exact).
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
#: Input dtypes (fp32 accumulation always).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def envelope_violation(q: torch.Tensor, k: torch.Tensor, v_v: torch.Tensor, v_l: torch.Tensor,
                       interpreting: bool) -> Optional[tuple[type, str]]:
    """Why the kernels cannot take these inputs, as ``(exception type, message)``, or None when they can.

    The tensors must already have passed ``glip_fusion._validation.validate_bi_attention`` (4-D, one dtype and
    device, consistent ``(B, H, N, D)`` / ``(B, H, M, D)`` shapes). ``interpreting``: Triton's CPU interpreter is on
    (then CPU tensors are accepted).
    """
    if q.dtype not in DTYPES:
        return TypeError, f"q has dtype {q.dtype}; supported: float16, bfloat16, float32"
    B, H, N, D = q.shape
    M = k.shape[2]
    # one head dim for all four inputs (the other backends allow value dims of their own)
    if tuple(v_v.shape) != (B, H, N, D):
        return ValueError, f"v_v must have the shape of q {(B, H, N, D)}, got {tuple(v_v.shape)}"
    if tuple(v_l.shape) != (B, H, M, D):
        return ValueError, f"v_l must have the shape of k {(B, H, M, D)}, got {tuple(v_l.shape)}"
    if M > MAX_TEXT_LEN:
        return ValueError, (f"text length M = {M} > {MAX_TEXT_LEN} is not supported by the triton backend; use "
                            "backend='sdpa' or 'reference'")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return ValueError, f"head dim D = {D} outside the supported range [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if q.device.type != "cuda" and not interpreting:
        return ValueError, (f"inputs must be CUDA tensors, got device {q.device} (CPU tensors are only accepted "
                            "under the Triton interpreter, TRITON_INTERPRET=1)")
    return None
