"""The zero-shot protocol runner: a model evaluated on data it never trained on, next to the numbers it should give.

Synthetic (the default; about a minute on 2 cores): the model shipped with glip-train (or ``--weights``) on a fresh
synthetic world it never saw (seed 7; the pre-training world of ``run.py`` has seed 0), with the ``coco`` protocol
split into the shapes labelled for detection in pre-training (``seen``) and the shapes never labelled (``unseen``),
and the ``lvis-minival`` protocol (Fixed AP) on the fine-grained colour_shape categories:

    python benchmarks/zero_shot/protocol.py
    python benchmarks/zero_shot/protocol.py --weights runs/zero_shot/rows/C_seed0/model

Real data, for users with an official checkpoint and the datasets (hours on a GPU; the published numbers are
printed beside ours):

    python benchmarks/zero_shot/protocol.py --weights glip_tiny_model_o365_goldg_cc_sbu.pth --device cuda \\
        --coco-annotations coco/annotations/instances_val2017.json --coco-images coco/val2017 \\
        --lvis-annotations coco/annotations/lvis_v1_minival_inserted_image_name.json --lvis-images coco

Writes ``zero_shot_protocol_<date>.json`` to ``--out`` (default ``bench-results/``). ``hatch run bench`` runs the
synthetic part.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: the image sizes of the synthetic worlds of the experiment (run.py) and of this runner
WORLD_IMAGE_SIZES = dict(min_size=96, max_size=160)
#: the world the runner evaluates on: the pre-training world's image sizes and vocabulary, another seed, only a
#: validation split
PROTOCOL_WORLD = dict(seed=7, num_detection=0, num_grounding=0, num_captions=0, num_val=200, **WORLD_IMAGE_SIZES)
#: the test resize of every evaluation of the experiment (and the shipped model's test size)
EVAL_SIZES = dict(min_size=160, max_size=240)

#: published zero-shot numbers for each official file (docs/evaluation.md#reproducing-the-published-numbers): COCO
#: val2017 AP single-scale; LVIS MiniVal APr of the released file where the official README gives it, else the paper's
PUBLISHED = {
    "glip_a_tiny_o365": {"coco AP": 42.9, "lvis-minival APr (paper)": 14.2},
    "glip_tiny_model_o365": {"coco AP": 44.9, "lvis-minival APr (paper)": 13.5},
    "glip_tiny_model_o365_goldg": {"coco AP": 46.7, "lvis-minival APr (README, this file)": 14.3},
    "glip_tiny_model_o365_goldg_cc_sbu": {"coco AP": 46.6, "lvis-minival APr (README, this file)": 17.6},
    "glip_large_model": {"coco AP": 49.8, "lvis-minival APr (README, this file)": 29.3},
}


def split_coco_ap(annotations: dict, detections: list, world_manifest: dict) -> dict:
    """COCO AP and AP50 over all categories, the shapes labelled for detection and the shapes never labelled.

    Args:
        annotations: a synthetic world's ``coco_val.json`` (loaded). detections: COCO-format results.
        world_manifest: the world's ``world.json`` (its ``detection_shapes`` and ``unseen_shapes``).
    Returns:
        ``{"AP_all", "AP50_all", "AP_seen", ..., "AP50_unseen"}`` (fractions); a group without categories is left out.
    """
    from glip_train.evaluation.metrics import coco_box_metrics

    names = {c["id"]: c["name"] for c in annotations["categories"]}
    groups = {"all": list(names),
              "seen": [i for i, n in names.items() if n in world_manifest["detection_shapes"]],
              "unseen": [i for i, n in names.items() if n in world_manifest["unseen_shapes"]]}
    out = {}
    for group, ids in groups.items():
        if ids:
            metrics = coco_box_metrics(annotations, detections, category_ids=ids)
            out[f"AP_{group}"], out[f"AP50_{group}"] = metrics["AP"], metrics["AP50"]
    return out


def synthetic(model, out: Path, world_dir: Path | None) -> dict:
    from glip_data import SynthConfig, generate_world
    from glip_train.evaluation import evaluate

    if world_dir is None:
        world_dir = out / "protocol_world"
        if not (world_dir / "world.json").is_file():
            generate_world(world_dir, config=SynthConfig(**PROTOCOL_WORLD), progress=True)
    manifest = json.loads((world_dir / "world.json").read_text())
    coco = evaluate(model, "coco", world_dir / "coco_val.json", out_dir=out / "coco", verbose=False, **EVAL_SIZES)
    detections = json.loads((out / "coco" / "detections.json").read_text())
    split = split_coco_ap(json.loads((world_dir / "coco_val.json").read_text()), detections, manifest)
    lvis = evaluate(model, "lvis-minival", world_dir / "lvis_val.json", out_dir=out / "lvis", verbose=False,
                    **EVAL_SIZES)
    return {"world": str(world_dir), "images": coco.report.get("images"),
            "coco": split, "lvis": {k: lvis.metrics[k] for k in ("AP", "AP50", "APr", "APc", "APf")}}


def expected_synthetic(weights: str | None) -> dict | None:
    """What the shipped model measured on this protocol (its README's table), when it is the model evaluated."""
    from glip_train.shipped import default_model_dir

    shipped = default_model_dir()
    if shipped is None or (weights is not None and Path(weights).resolve() != shipped.resolve()):
        return None
    metrics = shipped / "metrics.json"
    return json.loads(metrics.read_text()).get("protocol") if metrics.is_file() else None


def real(model, args) -> dict:
    from glip_train.evaluation import evaluate

    out = {}
    if args.coco_annotations:
        r = evaluate(model, "coco", args.coco_annotations, args.coco_images, out_dir=Path(args.out) / "coco_real")
        out["coco"] = {k: r.metrics[k] for k in ("AP", "AP50", "AP75")}
    if args.lvis_annotations:
        r = evaluate(model, "lvis-minival", args.lvis_annotations, args.lvis_images,
                     out_dir=Path(args.out) / "lvis_real")
        out["lvis-minival"] = {k: r.metrics[k] for k in ("AP", "APr", "APc", "APf")}
    return out


def _percent(x) -> str:
    return "–" if x is None or x < 0 else f"{100 * x:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="zero-shot evaluation: synthetic by default, real COCO / LVIS by path",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--weights", help="checkpoint or model directory (default: the model shipped with glip-train)")
    ap.add_argument("--world", help="evaluate on this synthetic world instead of generating the protocol's world")
    ap.add_argument("--coco-annotations", help="COCO val2017 instances file: run the real coco protocol")
    ap.add_argument("--coco-images", help="the COCO val2017 image folder")
    ap.add_argument("--lvis-annotations", help="LVIS MiniVal file: run the real lvis-minival protocol (Fixed AP)")
    ap.add_argument("--lvis-images", help="the folder the LVIS file's image names are relative to")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench-results", help="folder for the results [bench-results]")
    args = ap.parse_args(argv)
    for flag, path in (("--coco-annotations", args.coco_annotations), ("--lvis-annotations", args.lvis_annotations),
                       ("--world", args.world), ("--weights", args.weights)):
        if path and not Path(path).exists():
            ap.error(f"{flag} {path}: no such file or directory")
    if bool(args.coco_annotations) != bool(args.coco_images) or bool(args.lvis_annotations) != bool(args.lvis_images):
        ap.error("give the annotations and the images of a real dataset together")

    from glip_train import GLIP
    from glip_train.shipped import default_model_dir

    if args.weights is None and default_model_dir() is None:
        print("protocol.py: this installation has no shipped model; pass --weights PATH", file=sys.stderr)
        return 2
    start = time.time()
    model = GLIP.from_pretrained(args.weights).to(args.device).eval()
    out = Path(args.out) / "zero_shot_protocol"
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": _dt.date.today().isoformat(), "weights": args.weights or "shipped",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, device {args.device}"}
    if args.coco_annotations or args.lvis_annotations:
        result["real"] = real(model, args)
        name = Path(args.weights or "").stem
        result["published"] = PUBLISHED.get(name)
        for dataset, metrics in result["real"].items():
            print(f"{dataset}: " + ", ".join(f"{k} {_percent(v)}" for k, v in metrics.items()))
        if result["published"]:
            print("published: " + ", ".join(f"{k} {v}" for k, v in result["published"].items()))
    else:
        result["synthetic"] = synthetic(model, out, Path(args.world) if args.world else None)
        result["expected"] = expected_synthetic(args.weights)
        s = result["synthetic"]
        print(f"\nzero-shot on a synthetic world the model never saw ({s['images']} images)")
        print("| | COCO AP | AP seen | AP unseen | AP50 unseen | LVIS AP | APr | APc | APf |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = [("measured", s)] + ([("shipped model README", result["expected"])] if result["expected"] else [])
        for label, m in rows:
            c, lv = m["coco"], m["lvis"]
            print(f"| {label} | {_percent(c.get('AP_all'))} | {_percent(c.get('AP_seen'))} | "
                  f"{_percent(c.get('AP_unseen'))} | {_percent(c.get('AP50_unseen'))} | {_percent(lv['AP'])} | "
                  f"{_percent(lv['APr'])} | {_percent(lv['APc'])} | {_percent(lv['APf'])} |")
    result["seconds"] = round(time.time() - start, 1)
    path = Path(args.out) / f"zero_shot_protocol_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
