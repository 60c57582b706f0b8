"""Bi-directional image <-> text attention: the core op of GLIP's X-MHA fusion block.

One logits matrix ``S = scale * q @ k^T`` of shape ``(B, H, N, M)`` feeds two softmaxes:

* **vision direction** (image queries read text): softmax over the M text tokens, padded tokens masked,
  ``o_v = P_v @ v_l`` -> ``(B, H, N, D)``;
* **text direction** (text queries read the image): softmax over the N image tokens of ``S^T``, optionally
  with padded image positions masked, ``o_l = P_l @ v_v`` -> ``(B, H, M, D)``.

Official numerics (GLIP ``utils/fuse_helper.py``, both clamp flags on): ``S`` is clamped to ``[-clamp, clamp]``;
the text direction then subtracts the per-row max of ``S^T`` (over the image tokens; over the valid ones when
``image_mask`` is given) and clamps the difference to ``[-clamp, clamp]`` **a second time** before its softmax.
The vision direction has no second clamp. After the max subtraction every value is <= 0, so the second clamp
raises the entries below ``-clamp`` to ``-clamp``: each such weight grows by at most ``exp(-clamp)`` while the
softmax normaliser is at least 1 (the max entry), so the output moves by at most ``2 N exp(-clamp) max|v_v|``.
That is below half a unit of rounding of the dtype (``eps / 2`` relative) once
``clamp >= second_clamp_threshold(N, dtype) = ln(4 N / eps)`` (about 27.3 for float32 at GLIP-T's N = 22400,
16.3 for bfloat16, 47.5 for float64); GLIP's 50000 is far above it, a clamp of 2 changes the output completely.

Backends (``backend=``):

``"reference"``
    Eager float math with the official GLIP numerics, both clamps included (exact for any clamp),
    row-max-subtracted softmaxes, independent dropout on both probability maps. Materialises ``(B, H, N, M)``.
``"sdpa"``
    Two :func:`torch.nn.functional.scaled_dot_product_attention` calls sharing the projections. SDPA cannot clamp,
    so the wrapper proves beforehand that the first clamp cannot change anything (Cauchy-Schwarz:
    ``|S| <= |scale| * max||q|| * max||k||``); when that bound reaches ``clamp`` it runs the reference math instead.
    The check costs one small reduction and, on CUDA, one host sync; pass ``clamp=None`` to skip it. A clamp below
    ``second_clamp_threshold(N, dtype)`` is refused (ValueError): SDPA cannot apply the second clamp.
``"triton"``
    The fused kernel of :mod:`glip_fusion.triton` (optional extra, imported lazily). It applies the first clamp in
    registers and, like ``"sdpa"``, refuses a clamp below ``second_clamp_threshold(N, dtype)``.
``"auto"``
    ``$GLIP_FUSION_BACKEND`` if set; else ``"reference"`` when the clamp is below the second-clamp threshold (the
    only exact backend there); else ``"triton"`` for float16/bfloat16 CUDA tensors when the kernel is available and
    supports the inputs (M <= 256, D <= 256), else ``"sdpa"`` (memory-efficient, exact whenever the first clamp is
    inactive, falls back to the reference otherwise). float32 goes to ``"sdpa"`` (``AUTO_KERNEL_DTYPES``): TF32-free
    and exact, while the kernel's float32 path has no tensor cores and is unmeasured on a GPU. An explicit
    ``backend=`` argument wins over the environment variable.

Deliberate differences from the official eager code (both documented in the README):

* a batch element whose text is entirely padding gets ``o_v = 0`` (the official fp32 code averages all padded
  tokens uniformly, its fp16 path gives NaN); likewise an all-padded ``image_mask`` row gives ``o_l = 0``;
* padded text tokens are masked with ``-inf`` instead of GLIP's ``+1 / -9e15`` additive mask: identical after the
  softmax (a constant shift per row), up to float rounding.

Every backend shares one input validation (:func:`glip_fusion._validation.validate_bi_attention`, also called by the
fused kernel's entry point); the fused kernel adds only its envelope (:mod:`glip_fusion.triton._envelope`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ._validation import check_second_clamp, second_clamp_matters, second_clamp_threshold, validate_bi_attention

__all__ = ["bi_attention", "bi_attention_reference", "available_backends", "second_clamp_threshold", "BACKENDS",
           "BACKEND_ENV_VAR"]

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
    """Whether the fused kernel handles these inputs (so ``"auto"`` never picks it for inputs it would reject):
    ``glip_fusion.triton.supports``, the kernel's own envelope probe."""
    module = _triton_status()[0]
    return module is not None and bool(module.supports(q, k, v_v, v_l))


#: Input dtypes that ``backend="auto"`` sends to the fused kernel (on CUDA, inside its envelope). float32 goes to
#: SDPA: the kernel's float32 path uses IEEE fp32 dots on CUDA cores (no tensor cores, only its 16x16 tile compiles
#: without register spills at head dim 256), while SDPA's float32 kernels are exact (no TF32) and mature. No GPU
#: measurement shows the kernel faster in float32 yet (gpu_bench.py times one float32 row); revisit when one does.
AUTO_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def _auto_backend(q: torch.Tensor, k: torch.Tensor, v_v: torch.Tensor, v_l: torch.Tensor, clamp: Optional[float],
                  on_cuda: bool) -> str:
    """What ``"auto"`` picks: the reference where only it is exact (second clamp), the fused kernel for CUDA
    fp16/bf16 inputs it supports, else SDPA."""
    if second_clamp_matters(clamp, q.shape[2], q.dtype):
        return "reference"
    if on_cuda and q.dtype in AUTO_KERNEL_DTYPES and _triton_status()[0] is not None \
            and _triton_supports(q, k, v_v, v_l):
        return "triton"
    return "sdpa"


def _resolve_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v_v: torch.Tensor, v_l: torch.Tensor,
                     clamp: Optional[float] = None) -> str:
    """Map ``backend`` (possibly ``"auto"``) to a concrete backend name; raise on unknown or unusable ones.

    The inputs are already validated; ``clamp`` (validated) lets ``"auto"`` pick the reference when only it can
    apply the text direction's second clamp exactly.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    name = backend.strip().lower()
    source = "backend argument"
    if name == "auto":
        forced = os.environ.get(BACKEND_ENV_VAR, "").strip().lower()
        if forced and forced != "auto":
            name, source = forced, f"environment variable {BACKEND_ENV_VAR}"
        else:
            return _auto_backend(q, k, v_v, v_l, clamp, q.is_cuda)
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


def _generator_seed(seed: int) -> int:
    """Any int -> a ``torch.Generator.manual_seed`` value (used modulo ``2**63``)."""
    return int(seed) % 2 ** 63


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
    if clamp is not None:
        # GLIP subtracts the row max over the image tokens (the valid ones: masked entries are -inf) and clamps
        # again. Not a no-op: entries more than `clamp` below the max get weight exp(-clamp) instead of less (see
        # second_clamp_threshold). torch.max as in GLIP, so the gradient also flows through the max.
        s_l = s_l - torch.max(s_l, dim=-1, keepdim=True)[0]
        s_l = s_l.clamp(min=-clamp, max=clamp)
        if image_keep is not None:  # the clamp lifted the masked -inf entries to -clamp: mask them again
            s_l = torch.where(image_keep[:, None, None, :], s_l, neg_inf)
    p_l = torch.softmax(s_l, dim=-1)

    if dropout_p > 0.0:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=q.device)
            generator.manual_seed(_generator_seed(seed))
        p_v = _dropout(p_v, dropout_p, generator)  # two independent masks, drawn in this order
        p_l = _dropout(p_l, dropout_p, generator)

    o_v = _zero_rows(torch.matmul(p_v, v_l), has_text)
    o_l = _zero_rows(torch.matmul(p_l, v_v), has_image)
    o_l = _zero_padded_text(o_l, text_mask, skip_masked_text)
    return o_v.to(out_dtype), o_l.to(out_dtype)


def _sdpa(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text):
    """Two SDPA calls; exact whenever the first clamp cannot change S (checked), else the reference math. Refuses a
    clamp small enough for the text direction's second clamp to matter (SDPA cannot apply it)."""
    check_second_clamp("sdpa", clamp, q.shape[2], q.dtype)
    if clamp is not None and _clamp_may_bite(q, k, scale, clamp):
        return _reference(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text)
    if dropout_p > 0.0 and seed is not None and q.device.type not in ("cpu", "cuda"):
        # no way to seed SDPA's internal RNG here: use the explicit-generator dropout of the reference math
        return _reference(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed, skip_masked_text)

    text_keep, has_text = _safe_key_mask(text_mask)
    image_keep, has_image = _safe_key_mask(image_mask)
    text_bias = None if text_keep is None else text_keep[:, None, None, :]  # (B, 1, 1, M), True = attend
    image_bias = None if image_keep is None else image_keep[:, None, None, :]  # (B, 1, 1, N)

    rng = _seeded_global_rng(q.device, _generator_seed(seed)) if (dropout_p > 0.0 and seed is not None) \
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
        clamp: S is clamped to ``[-clamp, clamp]`` (GLIP: 50000), and the text direction clamps
            ``S^T - rowmax`` again (GLIP's second clamp); None = no clamp. "sdpa" and "triton" refuse a clamp below
            :func:`second_clamp_threshold` (where the second clamp matters), "auto" then picks "reference".
        backend: ``"auto" | "reference" | "sdpa" | "triton"`` (see the module docstring).
        seed: any int; seeds the dropout masks (a ``torch.Generator`` for reference and a forked global RNG for
            sdpa, both modulo ``2**63``; Philox for triton) so equal seeds give equal results; None = the global
            torch RNG.
        skip_masked_text: the caller promises it ignores ``o_l`` rows of padded text tokens; they are returned as
            zeros (and a backend may skip their work).

    Returns:
        ``(o_v (B, H, N, Dl), o_l (B, H, M, Dv))`` in the input dtype. A batch element whose ``text_mask`` row is all
        False gets ``o_v = 0`` (never NaN); one whose ``image_mask`` row is all False gets ``o_l = 0``.
        Differentiable in every backend.
    """
    return _dispatch("bi_attention", q, k, v_v, v_l, text_mask, image_mask, scale=scale, dropout_p=dropout_p,
                     clamp=clamp, backend=backend, seed=seed, skip_masked_text=skip_masked_text)


def _dispatch(caller: str, q, k, v_v, v_l, text_mask=None, image_mask=None, *, scale=None, dropout_p=0.0,
              clamp=50000.0, backend="auto", seed=None, skip_masked_text=False):
    """Validate (errors prefixed with ``caller``), pick the backend, run it."""
    scale, dropout_p, clamp, seed = validate_bi_attention(q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p,
                                                           clamp, seed, caller=caller)
    name = _resolve_backend(backend, q, k, v_v, v_l, clamp)
    return _BACKEND_FNS[name](q, k, v_v, v_l, text_mask, image_mask, scale, dropout_p, clamp, seed,
                              bool(skip_masked_text))


def bi_attention_reference(q: torch.Tensor, k: torch.Tensor, v_v: torch.Tensor, v_l: torch.Tensor,
                           text_mask: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None,
                           **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager reference of :func:`bi_attention` (its keyword options but ``backend``), GLIP's official numerics.

    ``S = clamp(scale * q @ k^T)``; ``o_v = softmax_M(S, padded text -> -inf) @ v_l``;
    ``o_l = softmax_N(clamp(S^T - rowmax_N(S^T)), padded image -> -inf if image_mask is given) @ v_v`` (the max over
    the valid image tokens; no second clamp when ``clamp`` is None); dropout (if any) on both
    probability maps with independent masks. Materialises ``(B, H, N, M)`` logits; fp16/bf16 inputs are computed in
    float32 and the outputs cast back. Kernel authors compare against this function.
    """
    if "backend" in options:
        raise TypeError("bi_attention_reference() takes no backend (it is the reference backend)")
    return _dispatch("bi_attention_reference", q, k, v_v, v_l, text_mask, image_mask, backend="reference", **options)
