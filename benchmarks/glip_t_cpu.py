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
