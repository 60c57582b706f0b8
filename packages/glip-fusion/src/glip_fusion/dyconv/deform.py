"""Deformable convolution (DCNv1/DCNv2) as a row gather plus one GEMM, with the semantics of torchvision's op.

``deform_conv2d`` has the signature and numerics of :func:`torchvision.ops.deform_conv2d` for one offset group and
``groups=1``; on CPU it is several times faster, forward and especially backward (torchvision's CPU backward is a
single-threaded scatter loop).
``deform_conv2d_grid_sample`` is the same function as one ``grid_sample`` plus one matmul: plain ONNX operators, what
exported graphs use (slower, and it materialises every column at once).

Formulation. For output position p and kernel tap k = i * kw + j (row-major), the sampling point is
``y = p_y * stride - padding + i * dilation + offset[2k]``, ``x = ... + offset[2k + 1]``; the sample is the bilinear
interpolation of the input at (y, x) where corners outside the map read 0 (so nothing is sampled unless
-1 < y < H and -1 < x < W), multiplied by ``mask[k]``. With the input stored as channels-last rows
``table (B*H*W + 1, C)`` (the extra row is zeros and stands for every corner outside the map), one sample is the sum
of four weighted rows, which is exactly ``F.embedding_bag(corner_rows, table, per_sample_weights, mode="sum")``.
That gives the columns ``(B*Ho*Wo, K*C)``; the output is ``columns @ weight (K*C, C_out)``. On CPU in float32 the
forward GEMM is oneDNN's inner product with the bias inside (AVX-512 kernels where MKL's sgemm may not use them:
~15% faster on AMD EPYC), its ``(n, C_out)`` rows copied into the output (channels-last: contiguous rows).

The columns are built and consumed in chunks of ``chunk_elements`` (default :data:`DEFAULT_CHUNK_ELEMENTS`): the full
column matrix of a 100x168 level with 256 channels is 155 MB, and writing it into fresh memory costs more than the
gather itself (page faults); a few-MB chunk stays in cache. The backward recomputes the columns chunk by chunk
(nothing larger than the inputs is saved) and gets the gradients of the table rows and of the four per-corner
weights from ``embedding_bag``'s own backward; the offset and mask gradients follow from the bilinear weights in
closed form, with the same floor-cell convention as torchvision (a point exactly on an integer coordinate
differentiates along the cell that starts there).

Shapes: input ``(B, C, H, W)``, offset ``(B, 2*K, Ho, Wo)`` ((dy, dx) per tap), mask ``(B, K, Ho, Wo)``, weight
``(C_out, C, kh, kw)``, bias ``(C_out,)``, output ``(B, C_out, Ho, Wo)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["deform_conv2d", "deform_conv2d_grid_sample", "DEFAULT_CHUNK_ELEMENTS"]

#: column elements per chunk (4 Mi = 16 MB in float32; measured fastest on CPU between 1 Mi and 8 Mi)
DEFAULT_CHUNK_ELEMENTS = 1 << 22
#: the forward GEMM runs as oneDNN's inner product on CPU float32 where this torch build has it
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

_Pair = Union[int, tuple[int, int]]


def _pair(value: _Pair, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"deform_conv2d: {name} must be an int or a pair of ints; got {value!r}")
    return pair  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# sampling plan


def _coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sampling coordinates in at least float32 (a half-precision coordinate of ~100 has a step of 0.06)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sampling_plan(offset: torch.Tensor, mask: Optional[torch.Tensor], in_hw: tuple[int, int],
                   kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int]):
    """Corner rows and bilinear factors of every sample.

    Returns ``rows (B, Ho, Wo, K, 4)`` (int32/int64 rows of the ``(B*H*W + 1, C)`` table; corners outside the map
    point at the zero row ``B*H*W``), the factors ``hy, ly, hx, lx`` ``(B, Ho, Wo, K)`` (``ly = y - floor(y)``,
    ``hy = 1 - ly``, same for x) and the mask ``(B, Ho, Wo, K)`` (None when unmodulated), all in the coordinate
    dtype. Corner order: (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
    """
    B, _, Ho, Wo = offset.shape
    H, W = in_hw
    kh, kw = kernel
    K = kh * kw
    dtype = _coordinate_dtype(offset.dtype)
    device = offset.device
    off = offset.to(dtype).view(B, K, 2, Ho, Wo).permute(0, 3, 4, 1, 2)  # (B, Ho, Wo, K, 2)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)  # (K,)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    base_y = (torch.arange(Ho, device=device, dtype=dtype) * stride[0] - padding[0])[:, None, None] + tap_y
    base_x = (torch.arange(Wo, device=device, dtype=dtype) * stride[1] - padding[1])[None, :, None] + tap_x
    y = base_y + off[..., 0]  # (B, Ho, Wo, K): integer base + offset, one rounding (as torchvision)
    x = base_x + off[..., 1]
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    # clamping keeps far-away points outside on both corners and the integer conversion in range
    y0i = y0.clamp(-2, H).to(torch.int64)
    x0i = x0.clamp(-2, W).to(torch.int64)
    inside_y0, inside_y1 = (y0i >= 0) & (y0i < H), (y0i >= -1) & (y0i < H - 1)
    inside_x0, inside_x1 = (x0i >= 0) & (x0i < W), (x0i >= -1) & (x0i < W - 1)
    zero_row = B * H * W
    index_dtype = torch.int32 if zero_row < 2**31 - 1 else torch.int64
    r00 = torch.arange(B, device=device).view(B, 1, 1, 1) * (H * W) + y0i * W + x0i
    rows = torch.stack([
        torch.where(inside_y0 & inside_x0, r00, zero_row),
        torch.where(inside_y0 & inside_x1, r00 + 1, zero_row),
        torch.where(inside_y1 & inside_x0, r00 + W, zero_row),
        torch.where(inside_y1 & inside_x1, r00 + W + 1, zero_row),
    ], dim=-1).to(index_dtype)
    m = None if mask is None else mask.to(dtype).permute(0, 2, 3, 1)  # (B, Ho, Wo, K)
    return rows, 1 - ly, ly, 1 - lx, lx, m


def _corner_weights(hy, ly, hx, lx, m, dtype: torch.dtype) -> torch.Tensor:
    """``(..., 4)`` per-corner weights (bilinear factor times mask) in ``dtype``."""
    w = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)
    if m is not None:
        w = w * m.unsqueeze(-1)
    return w.to(dtype)


def _input_table(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B*H*W + 1, C)``: channels-last rows and one zero row for corners outside the map."""
    B, C, H, W = x.shape
    table = x.new_empty(B * H * W + 1, C)
    table[:-1].view(B, H, W, C).copy_(x.permute(0, 2, 3, 1))
    table[-1].zero_()
    return table


def _chunks(batch: int, positions: int, row_elements: int, chunk_elements: int):
    """``(b, p0, p1)``: runs of output positions of one batch element with about ``chunk_elements`` column values."""
    step = max(1, chunk_elements // max(1, row_elements))
    for b in range(batch):
        for p0 in range(0, positions, step):
            yield b, p0, min(p0 + step, positions)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _band(table: torch.Tensor, rows: torch.Tensor, zero_row: int):
    """The table rows a chunk reads: ``(band (n_band + 1, C), local rows, first row)``.

    ``band`` copies the contiguous run of table rows between the smallest and largest row the chunk reads, plus one
    zero row (its last); ``local rows`` index into it. Used in the backward so that the dense gradient of the
    gathered rows is the size of the band, not of the whole input (for moderate offsets a chunk of output rows
    reads a band of input rows around it).
    """
    inside = rows != zero_row
    if bool(inside.any()):
        lo, hi = int(rows[inside].min()), int(rows[inside].max())
    else:
        lo, hi = 0, -1
    band = torch.cat([table[lo:hi + 1], table[zero_row:zero_row + 1]])
    local = torch.where(inside, rows - lo, hi + 1 - lo)
    return band, local, lo


# ----------------------------------------------------------------------------------------------------------------
# autograd function


class _GatherDeformConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, chunk_elements):
        B, C, H, W = x.shape
        O, _, kh, kw = weight.shape
        K = kh * kw
        Ho, Wo = offset.shape[-2:]
        P = Ho * Wo
        with torch.no_grad():
            rows, hy, ly, hx, lx, m = _sampling_plan(offset, mask, (H, W), (kh, kw), stride, padding, dilation)
            rows = rows.view(-1, 4)
            corner_w = _corner_weights(hy, ly, hx, lx, m, x.dtype).view(-1, 4)
            del hy, ly, hx, lx, m
            table = _input_table(x)
            w_rows = weight.permute(0, 2, 3, 1).reshape(O, K * C)  # column order (tap, channel)
            channels_last = _is_channels_last(x)
            # channels-last: output rows (B*P, O); else NCHW (B, O, P), written through strided views
            out = x.new_empty(B * P, O) if channels_last else x.new_empty(B, O, P)
            onednn = _ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            for b, p0, p1 in _chunks(B, P, K * C, chunk_elements):
                r0, r1 = (b * P + p0) * K, (b * P + p1) * K
                cols = F.embedding_bag(rows[r0:r1], table, per_sample_weights=corner_w[r0:r1],
                                       mode="sum").view(p1 - p0, K * C)
                if onednn:  # (n, O) rows, bias inside the kernel
                    dst = out[b * P + p0:b * P + p1] if channels_last else out[b, :, p0:p1].t()
                    dst.copy_(torch.ops.mkldnn._linear_pointwise(cols, w_rows, bias, "none", [], ""))
                    continue
                if channels_last:
                    dst, a, bmat, add = out[b * P + p0:b * P + p1], cols, w_rows.t(), bias
                else:
                    dst, a, bmat, add = out[b, :, p0:p1], w_rows, cols.t(), None if bias is None else bias[:, None]
                if add is None:
                    torch.mm(a, bmat, out=dst)
                else:
                    torch.addmm(add, a, bmat, out=dst)
        ctx.save_for_backward(x, offset, mask, weight)
        ctx.conf = (stride, padding, dilation, chunk_elements, bias is not None)
        if channels_last:
            return out.view(B, Ho, Wo, O).permute(0, 3, 1, 2)
        return out.view(B, O, Ho, Wo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _GatherDeformConv._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, offset, mask, weight = ctx.saved_tensors
        stride, padding, dilation, chunk_elements, has_bias = ctx.conf
        need_x, need_offset, need_mask, need_weight, need_bias = ctx.needs_input_grad[:5]
        need_corner = need_offset or (need_mask and mask is not None)
        B, C, H, W = x.shape
        O, _, kh, kw = weight.shape
        K = kh * kw
        Ho, Wo = offset.shape[-2:]
        P = Ho * Wo
        zero_row = B * H * W

        rows, hy, ly, hx, lx, m = _sampling_plan(offset, mask, (H, W), (kh, kw), stride, padding, dilation)
        rows = rows.view(-1, 4)
        corner_w = _corner_weights(hy, ly, hx, lx, m, x.dtype).view(-1, 4)
        table = _input_table(x)
        w_rows = weight.permute(0, 2, 3, 1).reshape(O, K * C)
        grad_cl = _is_channels_last(grad_out)
        # grad_out as (B*P, O) rows (channels-last) or (B, O, P)
        g = grad_out.permute(0, 2, 3, 1).reshape(B * P, O) if grad_cl else grad_out.contiguous().view(B, O, P)

        grad_w_rows = torch.zeros_like(w_rows) if need_weight else None
        grad_table = x.new_zeros(B * H * W, C) if need_x else None
        grad_corner = corner_w.new_empty(corner_w.shape) if need_corner else None
        chunks = _chunks(B, P, K * C, chunk_elements) if (need_x or need_corner or need_weight) else ()
        for b, p0, p1 in chunks:
            r0, r1 = (b * P + p0) * K, (b * P + p1) * K
            g_rows = g[b * P + p0:b * P + p1] if grad_cl else g[b, :, p0:p1].t()  # (n, O)
            if need_x:
                band, local, lo = _band(table, rows[r0:r1], zero_row)
                band.requires_grad_(True)
            else:
                band, local, lo = table, rows[r0:r1], 0
            leaf_w = corner_w[r0:r1].detach().requires_grad_(need_corner)
            with torch.enable_grad():
                cols = F.embedding_bag(local, band, per_sample_weights=leaf_w, mode="sum")
            if grad_w_rows is not None:
                grad_w_rows.addmm_(g_rows.t(), cols.detach().view(p1 - p0, K * C))
            if need_x or need_corner:
                grad_cols = torch.mm(g_rows, w_rows).view((p1 - p0) * K, C)
                inputs = [t for t, need in ((band, need_x), (leaf_w, need_corner)) if need]
                grads = torch.autograd.grad(cols, inputs, grad_cols)
                if need_x:
                    grad_table[lo:lo + band.shape[0] - 1] += grads[0][:-1]
                if need_corner:
                    grad_corner[r0:r1] = grads[-1]
            del cols

        grad_x = grad_offset = grad_mask = grad_weight = grad_bias = None
        if need_x:
            grad_x = grad_table.view(B, H, W, C).permute(0, 3, 1, 2)
            grad_x = grad_x if _is_channels_last(x) else grad_x.contiguous()
        if need_corner:
            g00, g01, g10, g11 = grad_corner.to(hy.dtype).view(B, Ho, Wo, K, 4).unbind(-1)
            if need_offset:
                scale = 1.0 if m is None else m
                d_y = (hx * (g10 - g00) + lx * (g11 - g01)) * scale  # d/dy of hy*hx*g00 + hy*lx*g01 + ...
                d_x = (hy * (g01 - g00) + ly * (g11 - g10)) * scale
                grad_offset = torch.stack([d_y, d_x], dim=-1).view(B, Ho, Wo, 2 * K).permute(0, 3, 1, 2)
                grad_offset = grad_offset.to(offset.dtype).contiguous()
            if need_mask and mask is not None:
                d_m = hy * hx * g00 + hy * lx * g01 + ly * hx * g10 + ly * lx * g11
                grad_mask = d_m.permute(0, 3, 1, 2).to(mask.dtype).contiguous()
        if need_weight:
            grad_weight = grad_w_rows.view(O, kh, kw, C).permute(0, 3, 1, 2).contiguous()
        if need_bias and has_bias:
            grad_bias = g.sum(0) if grad_cl else g.sum((0, 2))
        return grad_x, grad_offset, grad_mask, grad_weight, grad_bias, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# public op


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, stride: _Pair = 1, padding: _Pair = 0,
                  dilation: _Pair = 1, mask: Optional[torch.Tensor] = None, *,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Deformable convolution with :func:`torchvision.ops.deform_conv2d`'s signature and semantics.

    Supported: one offset group (``offset.shape[1] == 2 * kh * kw``) and ``groups=1``
    (``weight.shape[1] == input.shape[1]``); any kernel size, stride, padding, dilation; ``mask=None`` is DCNv1.
    Differentiable in input, offset, mask, weight and bias (first order). float16/bfloat16 inputs compute their
    sampling coordinates in float32.

    Args:
        input: ``(B, C, H, W)``. offset: ``(B, 2*kh*kw, Ho, Wo)``, (dy, dx) per tap, taps row-major.
        weight: ``(C_out, C, kh, kw)``. bias: ``(C_out,)`` or None. mask: ``(B, kh*kw, Ho, Wo)`` or None.
        chunk_elements: column elements built at once (memory bound of the op besides its inputs and output).
    Returns:
        ``(B, C_out, Ho, Wo)``, channels-last in memory when ``input`` is.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check_inputs(input, offset, weight, bias, mask, stride, padding, dilation)
    if chunk_elements < 1:
        raise ValueError(f"deform_conv2d: chunk_elements must be >= 1; got {chunk_elements}")
    # the op computes in the inputs' dtype; autocast would turn its GEMMs into half precision (and clash with
    # their out= buffers)
    with torch.autocast(device_type=input.device.type, enabled=False):
        return _GatherDeformConv.apply(input, offset, mask, weight, bias, stride, padding, dilation,
                                       int(chunk_elements))


def _check_inputs(x, offset, weight, bias, mask, stride, padding, dilation) -> None:
    for name, t in (("input", x), ("offset", offset), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"deform_conv2d: {name} must be a 4-d tensor; got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"deform_conv2d: input must be floating point; got {x.dtype}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"deform_conv2d: stride/dilation must be >= 1 and padding >= 0; got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    B, C, H, W = x.shape
    O, Cw, kh, kw = weight.shape
    K = kh * kw
    if Cw != C:
        raise ValueError(f"deform_conv2d: weight {tuple(weight.shape)} must have C_in = input channels ({C}); "
                         "grouped convolution is not supported")
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"deform_conv2d: input {tuple(x.shape)} is too small for kernel {(kh, kw)} with padding "
                         f"{padding} and dilation {dilation}")
    if tuple(offset.shape) != (B, 2 * K, Ho, Wo):
        raise ValueError(f"deform_conv2d: offset must have shape (B={B}, 2*{K}={2 * K}, Ho={Ho}, Wo={Wo}) "
                         f"(one offset group); got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (B, K, Ho, Wo):
        raise ValueError(f"deform_conv2d: mask must have shape (B={B}, {K}, Ho={Ho}, Wo={Wo}); "
                         f"got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (O,):
        raise ValueError(f"deform_conv2d: bias must have shape ({O},); got {tuple(bias.shape)}")
    tensors = [t for t in (x, offset, weight, bias, mask) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"deform_conv2d: all tensors must be on one device; got {[str(t.device) for t in tensors]}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"deform_conv2d: weight/bias dtype must equal the input's ({x.dtype}); got "
                        f"{weight.dtype}{'' if bias is None else f' / {bias.dtype}'}")


def deform_conv2d_grid_sample(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor] = None, stride: _Pair = 1, padding: _Pair = 0,
                              dilation: _Pair = 1, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`deform_conv2d` (torchvision's semantics) as one bilinear ``grid_sample`` of every tap plus one matmul.

    Every op is a plain ONNX operator (``GridSample``, ``MatMul``) and no Python branch depends on a size or a value,
    so an exported graph keeps the image size dynamic and runs in any runtime (onnxruntime, OpenVINO).
    ``grid_sample``'s zero padding reads corners outside the map as 0, which is torchvision's rule. The sampling point
    goes through grid_sample's normalised coordinates (``(2x + 1) / W - 1``, ``align_corners=False``, defined for a
    one-pixel map too) and back, which moves it by float rounding (about ``1e-6`` of a pixel per unit of ``W``):
    equal to :func:`deform_conv2d` to about ``1e-5`` relative in float32, not bitwise. Materialises the sampled
    columns ``(B, C * kh * kw, Ho * Wo)`` at once (no chunking: a graph has no loop over chunks). Same arguments and
    shapes as :func:`deform_conv2d`; differentiable through autograd.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check_inputs(input, offset, weight, bias, mask, stride, padding, dilation)
    B, C, H, W = input.shape
    O, _, kh, kw = weight.shape
    K = kh * kw
    Ho, Wo = offset.shape[-2:]
    dtype = _coordinate_dtype(input.dtype)
    device = input.device
    off = offset.to(dtype).reshape(B, K, 2, Ho, Wo)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw).view(1, K, 1, 1)
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh).view(1, K, 1, 1)
    base_y = (torch.arange(Ho, device=device, dtype=dtype) * stride[0] - padding[0]).view(1, 1, Ho, 1)
    base_x = (torch.arange(Wo, device=device, dtype=dtype) * stride[1] - padding[1]).view(1, 1, 1, Wo)
    y = base_y + tap_y + off[:, :, 0]  # (B, K, Ho, Wo): integer base + offset, one rounding (as torchvision)
    x = base_x + tap_x + off[:, :, 1]
    grid = torch.stack([(2 * x + 1) / W - 1, (2 * y + 1) / H - 1], dim=-1).reshape(B, K * Ho, Wo, 2)
    sampled = F.grid_sample(input.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.reshape(B, C, K, Ho, Wo)  # (B, C, K * Ho, Wo) -> per channel and tap
    if mask is not None:
        sampled = sampled * mask.to(dtype).reshape(B, 1, K, Ho, Wo)
    # columns (B, C * K, Ho * Wo) in the weight's (channel, tap) order
    out = torch.matmul(weight.to(dtype).reshape(O, C * K), sampled.reshape(B, C * K, Ho * Wo))
    if bias is not None:
        out = out + bias.to(dtype).reshape(1, O, 1)
    return out.reshape(B, O, Ho, Wo).to(input.dtype)
