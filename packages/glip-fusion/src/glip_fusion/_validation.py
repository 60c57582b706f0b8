"""The input checks shared across glip_fusion: one home, imported by the modules that validate.

A leaf module: it imports nothing else from glip_fusion (and never triton), so :mod:`glip_fusion.attention`, the
Triton package (:mod:`glip_fusion.triton`, whose kernels must validate exactly like every other backend), the
fusion modules and :class:`~glip_fusion.FusionConfig` all import from here without an import circle.

* :func:`validate_bi_attention`: every input of :func:`glip_fusion.bi_attention` (tensors, shapes, masks, options),
  built from :func:`check_tensors`, :func:`check_shapes` and :func:`check_mask`; ``caller`` prefixes the messages;
* :func:`second_clamp_threshold` and :func:`check_second_clamp`: where GLIP's second clamp of the text direction
  matters, and the refusal of the backends that cannot apply it;
* :func:`as_bool_mask`: a module's bool or 0/1 mask argument, checked and made bool;
* :func:`check_positive_int`, :func:`check_probability`: config fields, named in the message.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

__all__ = ["validate_bi_attention", "check_tensors", "check_shapes", "check_mask", "is_real_number",
           "second_clamp_threshold", "second_clamp_matters", "check_second_clamp", "as_bool_mask",
           "check_positive_int", "check_probability"]


# ----------------------------------------------------------------------------------------------------------------
# the second clamp of the text direction


def second_clamp_threshold(n_image: int, dtype: torch.dtype) -> float:
    """The smallest ``clamp`` for which GLIP's second clamp (text direction) cannot change the result in ``dtype``.

    The text direction computes ``softmax_N(clamp(S^T - rowmax, -clamp, clamp))``. Values after the max
    subtraction are <= 0, so the clamp raises those below ``-clamp`` to ``-clamp``: each weight grows by at most
    ``exp(-clamp)`` and the normaliser is at least 1 (the max entry has weight 1), so the probability row moves by
    at most ``2 * n_image * exp(-clamp)`` in L1 norm, and ``o_l`` by that times ``max|v_v|``. Below half a unit of
    rounding (``eps / 2``) that is invisible: ``clamp >= ln(4 * n_image / eps)``. For ``n_image = 22400`` (GLIP-T
    at 800x1333): 27.3 in float32, 16.3 in bfloat16, 18.3 in float16, 47.5 in float64.
    """
    return math.log(4.0 * max(1, int(n_image)) / torch.finfo(dtype).eps)


def second_clamp_matters(clamp: Optional[float], n_image: int, dtype: torch.dtype) -> bool:
    """Whether GLIP's second clamp can change the text direction's result (``clamp`` below the threshold)."""
    return clamp is not None and clamp < second_clamp_threshold(n_image, dtype)


def check_second_clamp(backend: str, clamp: Optional[float], n_image: int, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` when ``backend`` (one without the second clamp: "sdpa", "triton") would be inexact."""
    if second_clamp_matters(clamp, n_image, dtype):
        limit = second_clamp_threshold(n_image, dtype)
        raise ValueError(
            f"bi_attention backend {backend!r} cannot reproduce GLIP's second clamp of the text direction for "
            f"clamp={clamp:g}: with N={n_image} image tokens in {str(dtype).replace('torch.', '')} it changes the "
            f"result whenever clamp < ln(4 N / eps) = {limit:.2f}. Use backend='reference' (exact for any clamp), "
            f"clamp >= {limit:.2f} or clamp=None")


# ----------------------------------------------------------------------------------------------------------------
# bi_attention's inputs: one validation for every backend. The fused kernel's entry point
# (glip_fusion.triton.function) calls it too, then adds only its envelope; ``caller`` prefixes the messages
# ("bi_attention_triton: ...").


def check_tensors(q, k, v_v, v_l, caller: str = "bi_attention") -> None:
    """Each of ``q, k, v_v, v_l`` is a 4-D floating-point ``torch.Tensor`` with ``q``'s dtype and device."""
    pre = f"{caller}: " if caller else ""
    named = {"q": q, "k": k, "v_v": v_v, "v_l": v_l}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{pre}{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{pre}{name} must be 4-D (B, H, L, D); got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{pre}{name} must be a floating-point tensor; got dtype {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{pre}{name} has dtype {t.dtype} but q has {q.dtype}; all four inputs must share a dtype")
        if t.device != q.device:
            raise ValueError(f"{pre}{name} is on {t.device} but q is on {q.device}; all inputs must share a device")


def check_shapes(q, k, v_v, v_l, caller: str = "bi_attention") -> tuple[int, int, int, int, int]:
    """``q (B, H, N, D)``, ``k (B, H, M, D)``, ``v_v (B, H, N, Dv)``, ``v_l (B, H, M, Dl)``, none of them empty.

    Call after :func:`check_tensors`. Returns ``(B, H, N, M, D)``.
    """
    pre = f"{caller}: " if caller else ""
    B, H, N, D = q.shape
    M = k.shape[2]
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != D:
        raise ValueError(f"{pre}k must have shape (B={B}, H={H}, M, D={D}) to match q {tuple(q.shape)}; "
                         f"got {tuple(k.shape)}")
    if tuple(v_v.shape[:3]) != (B, H, N):
        raise ValueError(f"{pre}v_v must have shape (B={B}, H={H}, N={N}, D) like q; got {tuple(v_v.shape)}")
    if tuple(v_l.shape[:3]) != (B, H, M):
        raise ValueError(f"{pre}v_l must have shape (B={B}, H={H}, M={M}, D) like k; got {tuple(v_l.shape)}")
    if 0 in (B, H, N, M, D, v_v.shape[3], v_l.shape[3]):  # not min(): a traced export keeps B, N, M symbolic
        raise ValueError(f"{pre}empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v_v {tuple(v_v.shape)}, "
                         f"v_l {tuple(v_l.shape)}")
    return B, H, N, M, D


def check_mask(mask: Optional[torch.Tensor], name: str, shape: tuple[int, int], device: torch.device,
                caller: str = "bi_attention") -> None:
    """``mask`` is None or a bool tensor of ``shape`` (``(B, M)`` text, ``(B, N)`` image) on ``device``."""
    if mask is None:
        return
    pre = f"{caller}: " if caller else ""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{pre}{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{pre}{name} must be a bool tensor (True = real); got dtype {mask.dtype}. "
                        f"Convert a 0/1 mask with `{name}.bool()`")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{pre}{name} must have shape {shape} (B, {'M' if name == 'text_mask' else 'N'}); "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{pre}{name} is on {mask.device} but q is on {device}")


def is_real_number(x) -> bool:
    """A real number that is not a bool (``True`` is an int in Python)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_bi_attention(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed,
                          caller: str = "bi_attention") -> tuple[float, float, Optional[float], Optional[int]]:
    """Raise a clear error for any malformed input of :func:`glip_fusion.bi_attention` (every backend).

    Returns the options as plain Python numbers: ``(scale, dropout_p, clamp, seed)``, ``scale`` defaulting to
    ``D ** -0.5``.
    """
    pre = f"{caller}: " if caller else ""
    check_tensors(q, k, v_v, v_l, caller)
    B, H, N, M, D = check_shapes(q, k, v_v, v_l, caller)
    check_mask(text_mask, "text_mask", (B, M), q.device, caller)
    check_mask(image_mask, "image_mask", (B, N), q.device, caller)
    if scale is not None and not (is_real_number(scale) and math.isfinite(scale)):
        raise ValueError(f"{pre}scale must be a finite number or None; got {scale!r}")
    if not (is_real_number(dropout_p) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{pre}dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if clamp is not None and not (is_real_number(clamp) and clamp > 0):  # also rejects NaN
        raise ValueError(f"{pre}clamp must be a positive number or None; got {clamp!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"{pre}seed must be an int or None; got {seed!r}")
    return (D ** -0.5 if scale is None else float(scale), float(dropout_p), None if clamp is None else float(clamp),
            None if seed is None else int(seed))


# ----------------------------------------------------------------------------------------------------------------
# module arguments and config fields


def as_bool_mask(mask: Optional[torch.Tensor], name: str, shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """Accept a bool mask or GLIP's 0/1 integer mask (True/1 = real); check its shape."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_positive_int(field: str, value: Any) -> None:
    """``value`` is an int >= 1 (not a bool); ``field`` names it in the message (``"FusionConfig.num_blocks"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive integer; got {value!r}")


def check_probability(field: str, value: Any) -> None:
    """``value`` is a number in [0, 1) (not a bool), e.g. a dropout rate; ``field`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{field} must be a number in [0, 1); got {value!r}")
