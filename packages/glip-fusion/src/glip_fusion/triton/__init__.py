"""The ``triton`` backend of :func:`glip_fusion.bi_attention`: fused bi-directional attention kernels.

Importing this subpackage never imports ``triton`` (an optional extra, ``pip install glip-fusion[triton]``); the
kernels are compiled on the first call.  Under ``TRITON_INTERPRET=1`` (set before the first call) the kernels run on
CPU tensors in Triton's interpreter, which is how the tests run without a GPU.

Public API::

    is_available() -> bool
    supports(q, k, v_v, v_l) -> bool      # inputs inside the kernel's envelope (used by backend="auto")
    bi_attention_triton(q, k, v_v, v_l, text_mask=None, image_mask=None, *, scale=None, dropout_p=0.0,
                        clamp=50000.0, seed=None, skip_masked_text=False) -> (o_v, o_l)
    dropout_keep_masks(seed, B, H, N, M, dropout_p, device="cpu") -> (keep_v, keep_l)   # debug helper
"""
from __future__ import annotations

import importlib.util
import os

from ._envelope import MAX_HEAD_DIM, MAX_TEXT_LEN  # re-exported; defined once there (no triton import)

__all__ = ["is_available", "supports", "bi_attention_triton", "dropout_keep_masks", "MAX_TEXT_LEN", "MAX_HEAD_DIM"]


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """True when ``triton`` is importable and kernels can run: a CUDA device is present or ``TRITON_INTERPRET=1``."""
    if importlib.util.find_spec("triton") is None:
        return False
    if _interpreter_requested():
        return importlib.util.find_spec("numpy") is not None  # the interpreter runs tiles in numpy
    import torch

    return torch.cuda.is_available()


def supports(q, k, v_v, v_l) -> bool:
    """True when the four tensors are valid ``bi_attention`` inputs inside the kernel's envelope
    (:mod:`glip_fusion.triton._envelope`): one dtype among float16/bfloat16/float32, one device (CUDA, or any under
    ``TRITON_INTERPRET=1``), q/v_v ``(B, H, N, D)`` and k/v_l ``(B, H, M, D)`` with ``M <= 256`` and
    ``D <= 256``.  Used by the ``auto`` dispatcher; masks and options are not inspected."""
    from .._validation import check_shapes, check_tensors
    from ._envelope import envelope_violation

    try:
        check_tensors(q, k, v_v, v_l)
        check_shapes(q, k, v_v, v_l)
    except (TypeError, ValueError):
        return False
    return envelope_violation(q, k, v_v, v_l, _interpreter_requested()) is None


def bi_attention_triton(q, k, v_v, v_l, text_mask=None, image_mask=None, *, scale=None, dropout_p=0.0,
                        clamp=50000.0, seed=None, skip_masked_text=False, **kwargs):
    """Fused bi-directional attention (forward and backward in Triton).

    ``q``, ``v_v`` ``(B, H, N, D)``; ``k``, ``v_l`` ``(B, H, M, D)``; returns ``(o_v, o_l)`` of the same shapes.
    See :func:`glip_fusion.triton.function.bi_attention_triton` for every argument (extra keyword arguments:
    ``fp32_precision``, ``num_splits``).
    """
    from .function import bi_attention_triton as _impl

    return _impl(q, k, v_v, v_l, text_mask, image_mask, scale=scale, dropout_p=dropout_p, clamp=clamp, seed=seed,
                 skip_masked_text=skip_masked_text, **kwargs)


def dropout_keep_masks(seed, B, H, N, M, dropout_p, device="cpu"):
    """The dropout keep-masks the kernels draw for ``seed``: bool ``(B, H, N, M)`` ``(keep_v, keep_l)``."""
    from .function import dropout_keep_masks as _impl

    return _impl(seed, B, H, N, M, dropout_p, device)
