"""Bi-directional image <-> text attention: the core op of GLIP's X-MHA fusion block.

One logits matrix ``S = scale * q @ k^T`` of shape ``(B, H, N, M)`` feeds two softmaxes:

* **vision direction** (image queries read text): softmax over the M text tokens, padded tokens masked,
  ``o_v = P_v @ v_l`` -> ``(B, H, N, D)``;
* **text direction** (text queries read the image): softmax over the N image tokens of ``S^T``, optionally
  with padded image positions masked, ``o_l = P_l @ v_v`` -> ``(B, H, M, D)``.

Backends (``backend=``):

``"reference"``
    Eager float math with the official GLIP numerics (``utils/fuse_helper.py``): clamp S to ``[-clamp, clamp]``,
    row-max-subtracted softmaxes, independent dropout on both probability maps. Materialises ``(B, H, N, M)``.
``"sdpa"``
    Two :func:`torch.nn.functional.scaled_dot_product_attention` calls sharing the projections. SDPA cannot clamp,
    so the wrapper proves beforehand that the clamp cannot change anything (Cauchy-Schwarz:
    ``|S| <= |scale| * max||q|| * max||k||``); when that bound reaches ``clamp`` it runs the reference math instead.
    The check costs one small reduction and, on CUDA, one host sync; pass ``clamp=None`` to skip it.
``"triton"``
    The fused kernel of :mod:`glip_fusion.triton` (optional extra, imported lazily).
``"auto"``
    ``$GLIP_FUSION_BACKEND`` if set, else ``"triton"`` for CUDA tensors when the kernel is available and supports
    the inputs (dtype, M <= 256, D <= 256), else ``"sdpa"`` (memory-efficient, exact whenever the clamp is inactive,
    falls back to the reference otherwise). An explicit ``backend=`` argument wins over the environment variable.

Deliberate differences from the official eager code (both documented in the README):

* a batch element whose text is entirely padding gets ``o_v = 0`` (the official fp32 code averages all padded
  tokens uniformly, its fp16 path gives NaN); likewise an all-padded ``image_mask`` row gives ``o_l = 0``;
* padded text tokens are masked with ``-inf`` instead of GLIP's ``+1 / -9e15`` additive mask: identical after the
  softmax (a constant shift per row), up to float rounding.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from types import ModuleType
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ["bi_attention", "bi_attention_reference", "available_backends", "BACKENDS", "BACKEND_ENV_VAR"]

#: every backend name ``bi_attention`` knows (``"auto"`` picks one of them)
BACKENDS = ("reference", "sdpa", "triton")
#: environment variable that forces the backend chosen by ``backend="auto"``
BACKEND_ENV_VAR = "GLIP_FUSION_BACKEND"

# Result of the lazy import of glip_fusion.triton: (module or None, reason it is unusable or None).
_TRITON_IMPORT: Optional[tuple[Optional[ModuleType], Optional[str]]] = None


# ----------------------------------------------------------------------------------------------------------------
# backend discovery


def _triton_module() -> tuple[Optional[ModuleType], Optional[str]]:
    """Import ``glip_fusion.triton`` once; return ``(module, None)`` or ``(None, why_not)``."""
    global _TRITON_IMPORT
    if _TRITON_IMPORT is None:
        try:
            module = importlib.import_module("glip_fusion.triton")
        except ImportError as exc:  # the subpackage or triton itself is missing
            _TRITON_IMPORT = (None, f"glip_fusion.triton could not be imported ({exc})")
        else:
            if not hasattr(module, "bi_attention_triton") or not hasattr(module, "is_available"):
                _TRITON_IMPORT = (None, "glip_fusion.triton lacks bi_attention_triton / is_available")
            else:
                _TRITON_IMPORT = (module, None)
    return _TRITON_IMPORT


def _triton_status() -> tuple[Optional[ModuleType], Optional[str]]:
    """``(module, None)`` when the fused kernel can run here, else ``(None, reason)``."""
    module, reason = _triton_module()
    if module is None:
        return None, reason
    try:
        ok = bool(module.is_available())
    except Exception as exc:  # a broken probe must not break the other backends
        return None, f"glip_fusion.triton.is_available() raised {exc!r}"
    if not ok:
        return None, "glip_fusion.triton.is_available() is False (needs triton and a CUDA device)"
    return module, None


def available_backends() -> list[str]:
    """The backends that can run in this process, a subset of ``["reference", "sdpa", "triton"]``.

    ``"reference"`` and ``"sdpa"`` need only torch; ``"triton"`` appears when :mod:`glip_fusion.triton` imports and
    its ``is_available()`` says the kernel can run (triton installed, a CUDA device present).
    """
    names = ["reference", "sdpa"]
    if _triton_status()[0] is not None:
        names.append("triton")
    return names


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v_v: torch.Tensor, v_l: torch.Tensor) -> bool:
    """Whether the fused kernel handles these inputs (so ``"auto"`` never picks it for inputs it would reject).

    Uses ``glip_fusion.triton.supports(q, k, v_v, v_l)`` when the kernel module provides it, else the kernel's
    documented envelope: float16/bfloat16/float32, value widths equal to D, M <= 256, D <= 256.
    """
    module = _triton_status()[0]
    probe = getattr(module, "supports", None)
    if callable(probe):
        return bool(probe(q, k, v_v, v_l))
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and v_v.shape == q.shape
            and v_l.shape == k.shape and k.shape[2] <= 256 and q.shape[3] <= 256)


def _resolve_backend(backend: str, *inputs: torch.Tensor) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend name; raise on unknown or unusable ones.

    ``inputs`` are ``(q, k, v_v, v_l)``, already validated.
    """
    q = inputs[0]
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    name = backend.strip().lower()
    source = "backend argument"
    if name == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
        if forced and forced != "auto":
            name, source = forced, f"environment variable {BACKEND_ENV_VAR}"
        elif q.is_cuda and _triton_status()[0] is not None and _triton_supports(*inputs):
            return "triton"
        else:
            return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"unknown bi_attention backend {name!r} (from the {source}); expected one of "
                         f"{('auto',) + BACKENDS}")
    if name == "triton":
        module, reason = _triton_status()
        if module is None:
            raise RuntimeError(f"bi_attention backend 'triton' was requested (by the {source}) but is not available: "
                               f"{reason}. Available here: {available_backends()}. Install the extra with "
                               "`pip install glip-fusion[triton]` and run on a CUDA device, or use 'sdpa'.")
    return name


# ----------------------------------------------------------------------------------------------------------------
# input validation (the tensor and mask checks are shared with the Triton entry point, glip_fusion.triton.function,
# which adds the kernel's envelope on top; ``caller`` prefixes its messages there: "bi_attention_triton: ...")


def _check_tensors(q, k, v_v, v_l, caller: str = "") -> None:
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


def _check_shapes(q, k, v_v, v_l, caller: str = "") -> tuple[int, int, int, int, int]:
    """``q (B, H, N, D)``, ``k (B, H, M, D)``, ``v_v (B, H, N, Dv)``, ``v_l (B, H, M, Dl)``, none of them empty.

    Call after :func:`_check_tensors`. Returns ``(B, H, N, M, D)``.
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
    if min(B, H, N, M, D) == 0 or v_v.shape[3] == 0 or v_l.shape[3] == 0:
        raise ValueError(f"{pre}empty input: q {tuple(q.shape)}, k {tuple(k.shape)}, v_v {tuple(v_v.shape)}, "
                         f"v_l {tuple(v_l.shape)}")
    return B, H, N, M, D


def _check_mask(mask: Optional[torch.Tensor], name: str, shape: tuple[int, int], device: torch.device,
                caller: str = "") -> None:
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


def _validate(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed=None) -> None:
    """Raise a clear error for any malformed input of :func:`bi_attention`."""
    _check_tensors(q, k, v_v, v_l)
    B, H, N, M, D = _check_shapes(q, k, v_v, v_l)
    _check_mask(text_mask, "text_mask", (B, M), q.device)
    _check_mask(image_mask, "image_mask", (B, N), q.device)
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None; got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if clamp is not None and not (isinstance(clamp, (int, float)) and clamp > 0 and not math.isnan(clamp)):
        raise ValueError(f"clamp must be a positive number or None; got {clamp!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise ValueError(f"seed must be an int in [0, 2**63) or None; got {seed!r}")


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def _safe_key_mask(mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Key mask with fully-masked rows re-opened (so no softmax sees only -inf) and the per-row "has a key" flag.

    Returns ``(keep (B, L) bool, has_any (B,) bool)`` or ``(None, None)``; rows with ``has_any = False`` must have
    their outputs zeroed by the caller.
    """
    if mask is None:
        return None, None
    has_any = mask.any(dim=-1)
    return mask | ~has_any[:, None], has_any


def _zero_rows(out: torch.Tensor, has_any: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero ``out (B, H, L, D)`` for batch elements without a single valid key."""
    if has_any is None:
        return out
    return torch.where(has_any[:, None, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _zero_padded_text(o_l: torch.Tensor, text_mask: Optional[torch.Tensor], skip: bool) -> torch.Tensor:
    """``skip_masked_text``: rows of padded text tokens of ``o_l (B, H, M, D)`` become exact zeros."""
    if not skip or text_mask is None:
        return o_l
    return torch.where(text_mask[:, None, :, None], o_l, torch.zeros((), dtype=o_l.dtype, device=o_l.device))


def _dropout(p: torch.Tensor, rate: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Inverted dropout on a probability map with an explicit (optionally seeded) generator."""
    keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype) >= rate
    return p * keep.to(p.dtype) * (1.0 / (1.0 - rate))


@contextlib.contextmanager
def _seeded_global_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Temporarily seed the global RNG of ``device`` (restored on exit), for SDPA's internal dropout."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            torch.cuda.default_generators[index].manual_seed(seed)
            yield
    else:  # cpu
        with torch.random.fork_rng(devices=[], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            yield


def _clamp_may_bite(q: torch.Tensor, k: torch.Tensor, scale: float, clamp: float) -> bool:
    """True unless ``|scale * q.k| < clamp`` is guaranteed for every pair (Cauchy-Schwarz on the row norms).

    A 0.1% margin covers the rounding of the matmul; NaN/inf inputs answer True (the reference path then shows them).
    """
    with torch.no_grad():
        q_max = torch.linalg.vector_norm(q.float(), dim=-1).amax(dim=-1)  # (B, H)
        k_max = torch.linalg.vector_norm(k.float(), dim=-1).amax(dim=-1)  # (B, H)
        bound = (q_max * k_max).amax() * abs(scale) * 1.001
        return not bool(bound < clamp)


# ----------------------------------------------------------------------------------------------------------------
# backends


def _reference(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text):
    """Eager official numerics; see :func:`bi_attention_reference`. Inputs are already validated."""
    out_dtype = q.dtype
    # Half inputs are computed in float32: this path is the accuracy baseline (the official AMP path ran the bmm and
    # softmax in fp16 and needed the clamps to avoid overflow).
    if q.dtype in (torch.float16, torch.bfloat16):
        q, k, v_v, v_l = (t.float() for t in (q, k, v_v, v_l))

    s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, N, M)
    if scale != 1.0:
        s = s * scale
    if clamp is not None:
        s = s.clamp(min=-clamp, max=clamp)  # GLIP: CLAMP_MIN_FOR_UNDERFLOW then CLAMP_MAX_FOR_OVERFLOW

    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    text_keep, has_text = _safe_key_mask(text_mask)
    image_keep, has_image = _safe_key_mask(image_mask)

    # vision direction: every image token distributes attention over the (valid) text tokens
    s_v = s if text_keep is None else torch.where(text_keep[:, None, None, :], s, neg_inf)
    p_v = torch.softmax(s_v, dim=-1)  # softmax subtracts the row max, as GLIP does explicitly
    # text direction: every text token (padded ones too) distributes attention over the image tokens
    s_l = s.transpose(-1, -2)  # (B, H, M, N)
    if image_keep is not None:
        s_l = torch.where(image_keep[:, None, None, :], s_l, neg_inf)
    # GLIP subtracts the row max and clamps again before this softmax; after the subtraction every value is <= 0 and
    # the clamp only touches values below -clamp, whose exp underflows to 0 anyway, so it is a no-op here.
    p_l = torch.softmax(s_l, dim=-1)

    if dropout_p > 0.0:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=q.device)
            generator.manual_seed(int(seed))
        p_v = _dropout(p_v, dropout_p, generator)  # two independent masks, drawn in this order
        p_l = _dropout(p_l, dropout_p, generator)

    o_v = _zero_rows(torch.matmul(p_v, v_l), has_text)
    o_l = _zero_rows(torch.matmul(p_l, v_v), has_image)
    o_l = _zero_padded_text(o_l, text_mask, skip_masked_text)
    return o_v.to(out_dtype), o_l.to(out_dtype)


def _sdpa(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text):
    """Two SDPA calls; exact whenever the clamp cannot change S (checked), else the reference math."""
    if clamp is not None and _clamp_may_bite(q, k, scale, clamp):
        return _reference(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text)
    if dropout_p > 0.0 and seed is not None and q.device.type not in ("cpu", "cuda"):
        # no way to seed SDPA's internal RNG here: use the explicit-generator dropout of the reference math
        return _reference(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text)

    text_keep, has_text = _safe_key_mask(text_mask)
    image_keep, has_image = _safe_key_mask(image_mask)
    text_bias = None if text_keep is None else text_keep[:, None, None, :]  # (B, 1, 1, M), True = attend
    image_bias = None if image_keep is None else image_keep[:, None, None, :]  # (B, 1, 1, N)

    rng = _seeded_global_rng(q.device, int(seed)) if (dropout_p > 0.0 and seed is not None) \
        else contextlib.nullcontext()
    with rng:
        # image queries over text keys; then text queries over image keys (S^T), sharing q and k
        o_v = F.scaled_dot_product_attention(q, k, v_l, attn_mask=text_bias, dropout_p=dropout_p, scale=scale)
        o_l = F.scaled_dot_product_attention(k, q, v_v, attn_mask=image_bias, dropout_p=dropout_p, scale=scale)
    o_v = _zero_rows(o_v, has_text)
    o_l = _zero_rows(o_l, has_image)
    return o_v, _zero_padded_text(o_l, text_mask, skip_masked_text)


def _triton(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text):
    module, reason = _triton_status()
    if module is None:  # _resolve_backend already checked; kept for direct callers
        raise RuntimeError(f"bi_attention backend 'triton' is not available: {reason}")
    return module.bi_attention_triton(q, k, v_v, v_l, text_mask, image_mask, scale=scale, dropout_p=dropout_p,
                                      clamp=clamp, seed=seed, skip_masked_text=skip_masked_text)


_BACKEND_FNS = {"reference": _reference, "sdpa": _sdpa, "triton": _triton}


# ----------------------------------------------------------------------------------------------------------------
# public API


def bi_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v_v: torch.Tensor,
    v_l: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    clamp: Optional[float] = 50000.0,
    backend: str = "auto",
    seed: Optional[int] = None,
    skip_masked_text: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bi-directional attention between image tokens and text tokens (GLIP's X-MHA core).

    Args:
        q: ``(B, H, N, D)`` image queries. k: ``(B, H, M, D)`` text keys.
        v_v: ``(B, H, N, Dv)`` image values (read by text tokens). v_l: ``(B, H, M, Dl)`` text values.
        text_mask: ``(B, M)`` bool, True = real token; padded tokens are never attended to. None = all real.
        image_mask: ``(B, N)`` bool, True = real pixel; None = all real (official GLIP: padding is attended to).
        scale: multiplies ``q @ k^T``; default ``D ** -0.5``. GLIP pre-scales q and passes 1.0.
        dropout_p: dropout on both probability maps (independent masks). Pass 0.0 in eval.
        clamp: S is clamped to ``[-clamp, clamp]`` (GLIP: 50000); None = no clamp.
        backend: ``"auto" | "reference" | "sdpa" | "triton"`` (see the module docstring).
        seed: seeds the dropout masks (a ``torch.Generator`` for reference, a forked global RNG for sdpa) so equal
            seeds give equal results; None = the global torch RNG.
        skip_masked_text: the caller promises it ignores ``o_l`` rows of padded text tokens; they are returned as
            zeros (and a backend may skip their work).

    Returns:
        ``(o_v (B, H, N, Dl), o_l (B, H, M, Dv))`` in the input dtype. A batch element whose ``text_mask`` row is all
        False gets ``o_v = 0`` (never NaN); one whose ``image_mask`` row is all False gets ``o_l = 0``.
        Differentiable in every backend.
    """
    _validate(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed)
    name = _resolve_backend(backend, q, k, v_v, v_l)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    clamp = None if clamp is None else float(clamp)
    return _BACKEND_FNS[name](q, k, v_v, v_l, text_mask, image_mask, scale, float(dropout_p), clamp, seed,
                              bool(skip_masked_text))


def bi_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v_v: torch.Tensor,
    v_l: torch.Tensor,
    text_mask: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    clamp: Optional[float] = 50000.0,
    seed: Optional[int] = None,
    skip_masked_text: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference of :func:`bi_attention` (same arguments, no ``backend``), GLIP's official numerics.

    ``S = clamp(scale * q @ k^T)``; ``o_v = softmax_M(S, padded text -> -inf) @ v_l``;
    ``o_l = softmax_N(S^T, padded image -> -inf if image_mask is given) @ v_v``; dropout (if any) on both
    probability maps with independent masks. Materialises ``(B, H, N, M)`` logits; fp16/bf16 inputs are computed in
    float32 and the outputs cast back. Kernel authors compare against this function.
    """
    _validate(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    clamp = None if clamp is None else float(clamp)
    return _reference(q, k, v_v, v_l, text_mask, image_mask, scale, float(dropout_p), clamp, seed,
                      bool(skip_masked_text))
