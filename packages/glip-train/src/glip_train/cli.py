"""The ``glip`` command line: ``glip detect``, ``glip ground``, ``glip convert``.

Run ``glip COMMAND --help`` for every option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128),
]

WEIGHTS_HELP = (
    "model weights: an official GLIP .pth (GLIP-T, GLIP-T(A), GLIP-L), a directory written by `glip convert` / "
    "save_pretrained, or a weights-recipe .json (synthetic weights: meaningless boxes, for trying the pipeline). "
    "Default: $GLIP_WEIGHTS."
)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=os.environ.get("GLIP_WEIGHTS"), metavar="PATH", help=WEIGHTS_HELP)
    p.add_argument("--use-ema", action="store_true", help="official .pth only: load the 'model_ema' weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files you trust)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available) [auto]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="compute precision (autocast); post-processing always runs in fp32 [fp32]")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per forward pass [1]")
    p.add_argument("--threshold", type=float, default=0.5, metavar="F",
                   help="keep detections with final score >= F; 0 keeps all post-processed ones [0.5]")
    p.add_argument("--max-detections", type=int, default=100, metavar="N", help="detections per image at most [100]")
    p.add_argument("--min-size", type=int, default=800, metavar="PX", help="test resize: shorter side [800]")
    p.add_argument("--max-size", type=int, default=1333, metavar="PX", help="test resize: longer-side cap [1333]")
    p.add_argument("--pad-text-to-max", action="store_true",
                   help="pad text to 256 tokens as the official code (slower; same results)")
    p.add_argument("-o", "--output", default="out", metavar="DIR",
                   help="output folder for <stem>.jpg (boxes drawn) and <stem>.json [out]")
    p.add_argument("--no-draw", action="store_true", help="write only the .json files")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip",
        description="GLIP: zero-shot detection and phrase grounding with the official GLIP checkpoints.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
               "  detect   detect the given classes (or a prompt's phrases) in images\n"
               "  ground   ground the phrases of a caption in an image\n"
               "  convert  convert an official .pth checkpoint into a safetensors model directory\n"
               "  train    train or fine-tune (one process, or many with torchrun)\n"
               "\nRun `glip COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    det = sub.add_parser("detect", help="zero-shot detection of classes or prompt phrases",
                         description="Detect the given classes in every image. Writes DIR/<stem>.jpg with boxes and "
                                     "labels drawn and DIR/<stem>.json with the detections. Unreadable images are "
                                     "named, skipped, and make the exit code 1.")
    det.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    what = det.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="a detection prompt; its '.'-separated phrases are the classes, "
                                                       "e.g. 'person. bicycle. a red umbrella.'")
    what.add_argument("--classes", metavar="A,B,C", help="comma-separated class names, e.g. person,bicycle,car")
    what.add_argument("--classes-file", metavar="FILE", help="a text file with one class name per line")
    det.add_argument("--classes-per-prompt", type=int, default=40, metavar="N",
                     help="long class lists are split into prompts of at most N classes (and 256 tokens); 0: only the "
                          "token limit (the official COCO protocol runs 80 classes as one prompt) [40]")
    _add_model_options(det)

    gr = sub.add_parser("ground", help="phrase grounding of a caption",
                        description="Locate the phrases of a caption in an image (each phrase at its first "
                                    "occurrence). Without --phrases, noun phrases are extracted from the caption.")
    gr.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (the caption applies to each)")
    gr.add_argument("--caption", required=True, metavar="TEXT", help="the caption")
    gr.add_argument("--phrases", metavar="A|B", help="'|'-separated phrases of the caption to ground")
    _add_model_options(gr)

    conv = sub.add_parser("convert", help="official .pth -> safetensors model directory",
                          description="Read an official GLIP checkpoint (its 'model' weights, or 'model_ema' with "
                                      "--ema), map it strictly onto glip's modules, and write DST_DIR with "
                                      "config.json, model.safetensors and the tokenizer. Reports what was dropped.")
    conv.add_argument("src", metavar="SRC.pth", help="the official checkpoint (or a weights-recipe .json)")
    conv.add_argument("dst", metavar="DST_DIR", help="the output directory")
    conv.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow arbitrary pickled objects in the .pth (only for files you trust)")
    tr = sub.add_parser(
        "train", help="train, fine-tune, prompt-tune or linear-probe a GLIP model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from a YAML/JSON config (see docs/training.md), with dotted key=value overrides:\n"
                    "  glip train configs/tiny_synth.yaml optim.lr=2e-4 schedule.max_iter=500\n"
                    "Fine-tune on a COCO-format dataset without writing a config:\n"
                    "  glip train --coco train.json --images DIR --init glip_tiny_model_o365_goldg_cc_sbu.pth\n"
                    "Running the same command again resumes from the last checkpoint of output_dir. Several\n"
                    "processes: torchrun --nproc_per_node=N -m glip_train.cli train CONFIG (gloo on CPU, NCCL on GPU).")
    tr.add_argument("config", nargs="?", metavar="CONFIG", help="a training config (.yaml / .json)")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=4")
    tr.add_argument("--coco", metavar="FILE", help="fine-tune on this COCO-format training file (fixed class-order "
                                                   "prompt, the official COCO fine-tuning recipe)")
    tr.add_argument("--images", metavar="DIR", help="image folder of --coco (default: the file's folder)")
    tr.add_argument("--val", metavar="FILE", help="COCO-format validation file for --coco")
    tr.add_argument("--val-images", metavar="DIR", help="image folder of --val")
    tr.add_argument("--init", metavar="WEIGHTS", help="weights to start from (official .pth, model directory, recipe)")
    tr.add_argument("--mode", choices=("full", "prompt_tuning", "linear_probe"), help="what trains [full]")
    tr.add_argument("-o", "--output", metavar="DIR", help="output_dir of the run")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _collect_images(items: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    return paths


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return stems


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"glip: --device {name}: CUDA is not available on this machine")
    return device


def _load_model(args):
    import torch

    from .modeling_glip import GLIP

    if not args.weights:
        raise SystemExit("glip: no weights: pass --weights PATH or set GLIP_WEIGHTS (see `glip detect --help`)")
    model = GLIP.from_pretrained(args.weights, use_ema=getattr(args, "use_ema", False),
                                 trust_pickle=args.trust_pickle)
    return model.to(_device(args.device)).eval(), getattr(torch, DTYPES[args.dtype])


def draw_detections(image, result: dict, path: Path) -> None:
    """Save ``image`` with the result's boxes and labels drawn."""
    from PIL import ImageDraw, ImageFont

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(max(canvas.size) / 400))
    for box, score, label, text in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                       result["labels"].tolist(), result["text_labels"]):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        caption = f"{text} {score:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), caption, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        draw.rectangle((box[0], y, box[0] + right - left + 4, y + bottom - top + 2), fill=colour)
        draw.text((box[0] + 2, y), caption, fill=(255, 255, 255), font=font)
    canvas.save(path, quality=92)


def _result_json(path: Path, image, prompt, classes, result, params) -> dict:
    return {
        "image": str(path),
        "width": image.width,
        "height": image.height,
        "prompt": prompt,
        "classes": classes,
        "detections": [
            {"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label, "text_label": text}
            for box, score, label, text in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                               result["labels"].tolist(), result["text_labels"])
        ],
        "params": params,
    }


def _run_images(args, run_batch, prompt_for, classes_for) -> int:
    """Shared loop of detect/ground: batches, unreadable images skipped and counted, outputs written."""
    from tqdm import tqdm

    from glip_data import load_image

    paths = _collect_images(args.images)
    if not paths:
        print("glip: no images found", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, dtype = _load_model(args)
    params = {k: getattr(args, k) for k in ("weights", "threshold", "max_detections", "min_size", "max_size",
                                            "dtype", "device", "batch_size", "pad_text_to_max")}
    failed: list[tuple[Path, str]] = []
    stems = _unique_stems(paths)
    bar = tqdm(total=len(paths), unit="img", disable=args.quiet or len(paths) < 2)
    written = 0
    for start in range(0, len(paths), max(1, args.batch_size)):
        batch = []
        for path, stem in zip(paths[start:start + args.batch_size], stems[start:start + args.batch_size]):
            try:
                batch.append((path, stem, load_image(path)))
            except (OSError, ValueError) as exc:
                failed.append((path, str(exc)))
                bar.update(1)
        if not batch:
            continue
        results = run_batch(model, [b[2] for b in batch], dtype)
        for (path, stem, image), result in zip(batch, results):
            record = _result_json(path, image, prompt_for(model), classes_for(), result, params)
            (out_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            if not args.no_draw:
                draw_detections(image, result, out_dir / f"{stem}.jpg")
            written += 1
            bar.update(1)
    bar.close()
    if not args.quiet:
        print(f"glip: wrote {written} result(s) to {out_dir}/")
    for path, why in failed:
        print(f"glip: skipped unreadable image {path}: {why}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_detect(args) -> int:
    from glip_data import detection_prompt

    if args.classes_file:
        file = Path(args.classes_file)
        if not file.is_file():
            raise SystemExit(f"glip: --classes-file {file} does not exist")
        classes = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    elif args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    else:
        classes = None
    if classes is not None and not classes:
        raise SystemExit("glip: no class names given")
    if args.prompt is not None and not any(s.strip() for s in args.prompt.split(".")):
        raise SystemExit(f"glip: --prompt {args.prompt!r} has no phrases (empty or only separators)")

    def run_batch(model, images, dtype):
        return model.detect(images, classes=classes, prompt=args.prompt, threshold=args.threshold,
                            max_detections=args.max_detections, min_size=args.min_size, max_size=args.max_size,
                            batch_size=args.batch_size, classes_per_prompt=args.classes_per_prompt,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    def prompt_for(model):
        return args.prompt if args.prompt is not None else detection_prompt(classes)[0]

    def classes_for():
        return classes if classes is not None else [s.strip() for s in args.prompt.split(".") if s.strip()]

    return _run_images(args, run_batch, prompt_for, classes_for)


def _cmd_ground(args) -> int:
    from glip_data import find_noun_phrases

    phrases = [p.strip() for p in args.phrases.split("|") if p.strip()] if args.phrases else None
    if phrases is None:
        phrases = find_noun_phrases(args.caption)
        if not phrases:
            raise SystemExit(f"glip: found no noun phrases in {args.caption!r}; pass --phrases")

    def run_batch(model, images, dtype):
        return model.ground(images, [args.caption] * len(images), [phrases] * len(images),
                            threshold=args.threshold, max_detections=args.max_detections, min_size=args.min_size,
                            max_size=args.max_size, batch_size=args.batch_size,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    return _run_images(args, run_batch, lambda model: args.caption, lambda: phrases)


def _cmd_convert(args) -> int:
    from .modeling_glip import GLIP

    model = GLIP.from_pretrained(args.src, use_ema=args.ema, trust_pickle=args.trust_pickle)
    out = model.save_pretrained(args.dst)
    report = getattr(model, "load_report", None)
    if report is not None:
        print(report.summary())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"glip: wrote {out}/ ({model.config.name}, {n_params:,} parameters)")
    return 0


def _cmd_train(args) -> int:
    from .training import Trainer, load_train_config
    from .training.finetune import coco_finetune_config

    base = None
    if args.coco:
        if not args.init:
            raise ValueError("--coco needs --init WEIGHTS (the model to fine-tune)")
        base = coco_finetune_config(args.coco, images=args.images, val=args.val, val_images=args.val_images,
                                    init=args.init)
    elif args.config is None:
        raise ValueError("pass a training config (glip train CONFIG.yaml) or --coco FILE --init WEIGHTS")
    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config:  # only overrides given after --coco
        overrides.insert(0, args.config)
        args.config = None
    for flag, key in ((args.init, "init"), (args.mode, "mode"), (args.output, "output_dir")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    config = load_train_config(args.config, overrides, base=base)
    result = Trainer(config, progress=not args.quiet).train()
    if not args.quiet:
        where = result.model_dir or result.adapter
        print(f"glip train: {result.steps} steps; wrote {where} (skipped batches: {result.skipped_batches}, "
              f"non-finite steps: {result.bad_steps})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError

    try:
        return {"detect": _cmd_detect, "ground": _cmd_ground, "convert": _cmd_convert,
                "train": _cmd_train}[args.command](args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"glip {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
