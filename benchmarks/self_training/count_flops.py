"""FLOPs of one GLIP-T pseudo-labelling forward at 800x1333, by part: the input of the Cap4M estimate.

Counts with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; elementwise work is not
counted) one ``predict`` call of GLIP-T (synthetic weights; the count does not depend on the values) on the street
picture resized to 1333x800 with a caption of ``--tokens`` tokens, and splits the total into the image backbone +
FPN, the text encoder, the X-MHA (bi-directional attention) of the fusion blocks and the rest of the head (DyConv,
BERT layers, predictors). The X-MHA core (the two attention products that the fused kernel replaces) is also given
from its formula, ``U = 2 B H N M d`` per product.

    python benchmarks/self_training/count_flops.py [--out FILE]

Writes ``benchmarks/results/glip_t_flops_<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from glip_t_cpu import GLIP_T_RECIPE, STREET, flop_mapping  # noqa: E402

CAPTION = "a person with a red umbrella crosses the street near a car and a traffic light."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from glip_train import GLIP

    model = GLIP.from_pretrained(str(GLIP_T_RECIPE)).eval()
    image = Image.open(STREET).convert("RGB").resize((1333, 800), Image.BILINEAR)
    counter = FlopCounterMode(display=False, depth=12, custom_mapping=flop_mapping())
    with counter, torch.no_grad():
        model.ground(image, CAPTION, min_size=800, max_size=1333)
    by_module = counter.get_flop_counts()
    total = counter.get_total_flops()

    def flops(prefix: str) -> int:
        return int(sum(by_module.get(prefix, {}).values()))

    # the image encoder runs once per batch, outside the network's forward (inference.predict)
    parts = {"image backbone + FPN": flops("ImageEncoder") or flops("GLIP.backbone"),
             "text encoder": flops("GLIP.language_backbone")}
    # every VLFuse's bi-attention block (projections and the attention core), each counted once
    x_mha = sum(int(sum(ops.values())) for name, ops in by_module.items() if name.endswith(".b_attn"))
    parts["fusion X-MHA"] = x_mha
    parts["rest of the head (DyConv, BERT layers, predictors)"] = flops("GLIP.head") - x_mha
    ids, _ = model.processor.tokenize([CAPTION])
    n_text = int(ids.shape[1])
    n_image = sum(-(-800 // s) * -(-1344 // s) for s in (8, 16, 32, 64, 128))  # P3..P7 of the padded input
    layers = len(model.head.dyhead_tower) if hasattr(model.head, "dyhead_tower") else None
    core = 2 * 2 * 8 * n_image * n_text * 256  # two products of 2*B*H*N*M*d, B = 1, H = 8, d = 256 (GLIP-T)
    result = {"meta": {"date": dt.date.today().isoformat(), "torch": torch.__version__,
                       "input": f"1 image 800x1333 (padded 800x1344), caption of {n_text} tokens (padded to the "
                                "longest), GLIP-T synthetic weights",
                       "command": "python benchmarks/self_training/count_flops.py",
                       "counted": "matrix products and convolutions (FlopCounterMode, with oneDNN's fused linear and CPU attention "
                                  "counted as the GEMM benchmarks count them); elementwise work not counted"},
              "total_flops": int(total), "parts": parts, "image_tokens_N": n_image, "text_tokens_M": n_text,
              "fusion_blocks": layers, "x_mha_core_flops_per_block_formula": core,
              "modules": {k: int(sum(v.values())) for k, v in by_module.items() if k.count(".") <= 2}}
    out = Path(args.out or REPO / "benchmarks" / "results" / f"glip_t_flops_{result['meta']['date']}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, value in parts.items():
        print(f"{name:55s} {value / 1e9:9.1f} GFLOP")
    print(f"{'total':55s} {total / 1e9:9.1f} GFLOP  (N = {n_image}, M = {n_text}); wrote {out}")


if __name__ == "__main__":
    main()
