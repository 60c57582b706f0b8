"""The accuracy cost of the int8 exports (the accuracy half of docs/deploy.md's int8 table).

Run:  python benchmarks/export/int8_accuracy.py [--export-dir DIR] [--skip-glip-t | --skip-shipped] [--out PATH]

* The shipped model: COCO AP (all / seen / unseen shapes) and LVIS AP on the synthetic validation world of
  ``benchmarks/zero_shot/protocol.py`` (a world it never saw), for eager PyTorch and the onnxruntime / OpenVINO
  exports in fp32 and int8.
* GLIP-T (the parity recipe's weights: meaningless boxes, but the same network): the detections of the int8 exports
  on the parity images against the fp32 export's, as the share of fp32 detections (score >= 0.1) matched by an int8
  detection of the same label with IoU > 0.9, and the mean |score difference| of the matched ones.

The exports are written once into ``--export-dir`` (default ``bench-results/export_int8``) and reused. Writes
``int8_accuracy_<date>.json`` to ``benchmarks/results/`` (or ``--out``); a part skipped is kept from that file when it
already holds it. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "zero_shot"))
from protocol import synthetic  # noqa: E402

PARITY = REPO / "tests" / "fixtures" / "parity"
VARIANTS = {"onnx": ("onnx", None), "onnx-int8": ("onnx", "int8"), "openvino": ("openvino", None),
            "openvino-int8": ("openvino", "int8")}


def exports(model, folder: Path, source: str) -> dict:
    """The four exported variants of ``model`` (written when absent; all converted from one fp32 ONNX trace)."""
    from glip_train.export import ExportedGLIP, export_model

    if not (folder / "onnx" / "export.json").is_file():
        export_model(model, folder / "onnx", "onnx", optimize=False, source=source)  # runtimes optimize on load
    fp32 = ExportedGLIP.from_pretrained(folder / "onnx")
    out = {}
    for name, (fmt, quantize) in VARIANTS.items():
        if not (folder / name / "export.json").is_file():
            export_model(fp32, folder / name, fmt, quantize=quantize, source=source)
        out[name] = ExportedGLIP.from_pretrained(folder / name)
    return out


def agreement(ours: list[dict], reference: list[dict], min_score: float = 0.1) -> dict:
    """Share of reference detections (score >= min_score) matched by ours (same label, IoU > 0.9), and the mean
    |score difference| of the matched ones."""
    from glip_data.boxes import box_iou

    matched, total, diffs = 0, 0, []
    for a, b in zip(ours, reference):
        keep = b["scores"] >= min_score
        boxes, scores, labels = b["boxes"][keep], b["scores"][keep], b["labels"][keep]
        total += len(scores)
        if not len(scores) or not len(a["scores"]):
            continue
        iou = box_iou(boxes.double(), a["boxes"].double(), legacy=True)
        same = (labels[:, None] == a["labels"][None, :]) & (iou > 0.9)
        for r in range(len(scores)):
            if same[r].any():
                matched += 1
                best = same[r].nonzero().flatten()
                diffs.append(float((a["scores"][best] - scores[r]).abs().min()))
    return {"matched_share": matched / total if total else 1.0, "reference_detections": total,
            "mean_abs_score_difference": sum(diffs) / len(diffs) if diffs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", default="bench-results/export_int8")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-glip-t", action="store_true", help="only the shipped model's AP")
    skip.add_argument("--skip-shipped", action="store_true", help="only GLIP-T's int8 agreement")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from glip_data.io import atomic_write_json
    from glip_train import GLIP

    folder = Path(args.export_dir)
    date = dt.date.today().isoformat()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"int8_accuracy_{date}.json"
    result = {"date": date, "shipped_model": {}, "glip_t_parity_images": {}}
    skipped = "shipped_model" if args.skip_shipped else "glip_t_parity_images" if args.skip_glip_t else None
    if skipped and out.is_file():  # the part this run skips stays as measured
        result[skipped] = json.loads(out.read_text()).get(skipped, {})
    shipped = None if args.skip_shipped else GLIP.from_pretrained().eval()
    models = {} if shipped is None else {"eager": shipped, **exports(shipped, folder / "shipped", "shipped")}
    for name, model in models.items():
        r = synthetic(model, folder / "zero_shot" / name, None if name == "eager" else folder / "zero_shot" / "eager" /
                      "protocol_world")
        result["shipped_model"][name] = {"coco": r["coco"], "lvis": r["lvis"]}
        print(name, json.dumps(result["shipped_model"][name]), flush=True)
    if not args.skip_glip_t:
        glip_t = GLIP.from_pretrained(PARITY / "weights_recipe.json").eval()
        runtimes = exports(glip_t, folder / "glip_t", "parity weights recipe")
        index = json.loads((PARITY / "index.json").read_text())
        for name in ("onnx-int8", "openvino-int8"):
            ours, ref = [], []
            for case in index["cases"].values():
                images = [PARITY / f for f in case["images"]]
                kwargs = dict(threshold=0.0, min_size=320, max_size=480, batch_size=len(images))
                ours += runtimes[name].ground(images, case["captions"], case["phrases"], **kwargs)
                ref += runtimes[name.replace("-int8", "")].ground(images, case["captions"], case["phrases"], **kwargs)
            result["glip_t_parity_images"][name] = agreement(ours, ref)
            print(name, json.dumps(result["glip_t_parity_images"][name]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
