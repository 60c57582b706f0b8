"""What the GLIP-T CPU benchmarks share: their common options, and GLIP-T (synthetic weights from the recipe in
``assets/``) with the street picture resized to the official test size, 1333x800."""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GLIP_T_RECIPE = REPO / "assets" / "glip_t_synthetic_weights.json"
STREET = REPO / "assets" / "street.png"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--weights`` (default: the GLIP-T recipe), ``--threads`` and ``--out``."""
    parser.add_argument("--weights", default=str(GLIP_T_RECIPE))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON output path")


def load_model_and_street(args: argparse.Namespace):
    """Apply ``--threads``; return (the model of ``--weights`` in eval mode, the street picture as a 1333x800 RGB
    PIL image)."""
    import torch
    from PIL import Image

    from glip_train import GLIP

    if args.threads:
        torch.set_num_threads(args.threads)
    model = GLIP.from_pretrained(args.weights).eval()
    image = Image.open(STREET).convert("RGB").resize((1333, 800), Image.BILINEAR)
    return model, image


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of CPU SDPA ``(B, H, L, E) x (B, H, S, E) x (B, H, S, Ev)``: the two batched matmuls."""
    b, h, q_len, e = query_shape
    s, ev = key_shape[2], value_shape[-1]
    return 2 * b * h * q_len * s * e + 2 * b * h * q_len * s * ev


def _onednn_linear_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._linear_pointwise``: input ``(..., K)`` times weight ``(N, K)`` transposed."""
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


def flop_mapping(with_cpu_attention: bool = True) -> dict:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode`` so that every GLIP-T CPU benchmark counts
    the same FLOPs: oneDNN's fused linear (Swin's fused blocks, the deformable convolution's GEMM) has no formula in
    torch and would count 0 -- the count would shrink with every oneDNN path --, and with ``with_cpu_attention`` the
    CPU flash-attention kernel's two products are counted too."""
    import torch

    mapping = {}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flops
    if with_cpu_attention:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        mapping[op] = lambda q, k, v, *a, out_shape=None, **kw: _cpu_attention_flops(q, k, v)
    return mapping
