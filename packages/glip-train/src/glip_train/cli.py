"""The ``glip`` command line: detect, ground, convert, train, eval, pseudo-label.

Run ``glip COMMAND --help`` for every option. Exit codes (also in ``glip --help``):

    0  success
    1  finished, but some inputs were skipped (unreadable or unusable images); each is named on stderr
    2  usage error: a bad option value, a missing or unusable input (weights, config, dataset, output folder), a
       prompt the model cannot read — reported before any model is loaded whenever it can be
    3  runtime failure: the work started and could not finish (training diverged, out of memory, an internal error)
  130  interrupted

Every error is one line naming the file, key or value (``GLIP_DEBUG=1`` adds the traceback). Nothing heavy is
imported until a command runs, so ``glip --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

__all__ = ["main", "build_parser", "UsageError", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE", "EXIT_FAILURE"]

EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0), (128, 128, 0), (0, 0, 128),
]
WEIGHTS_HELP = (
    "model weights: an official GLIP .pth (GLIP-T, GLIP-T(A), GLIP-L), a directory written by `glip convert` / "
    "`glip train` / save_pretrained, or a weights-recipe .json (synthetic weights: meaningless boxes). "
    "Default: $GLIP_WEIGHTS, else the shipped model"
)
EXIT_CODES_HELP = ("exit codes: 0 success, 1 some inputs skipped (named on stderr), 2 usage error (bad option, "
                   "missing or unusable input), 3 runtime failure, 130 interrupted")


class UsageError(Exception):
    """A bad option value or input, found before the work starts (exit code 2)."""


# ---------------------------------------------------------------------------------------------------------------------
# argument types (errors name the option and the value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a score in [0, 1], got {text}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# the parser


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=os.environ.get("GLIP_WEIGHTS"), metavar="PATH", help=WEIGHTS_HELP)
    p.add_argument("--adapter", metavar="FILE", help="a prompt-tuning / linear-probe adapter trained on --weights")
    p.add_argument("--use-ema", action="store_true", help="official .pth only: load the 'model_ema' weights")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files you trust)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available) [auto]")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="compute precision (autocast); post-processing always runs in fp32 [fp32]")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N", help="images per forward pass [1]")
    p.add_argument("--threshold", type=_probability, default=0.5, metavar="F",
                   help="keep detections with final score >= F (a score in [0, 1]; 0 keeps every post-processed "
                        "one) [0.5]")
    p.add_argument("--max-detections", type=_positive_int, default=100, metavar="N",
                   help="detections per image at most (>= 1) [100]")
    p.add_argument("--min-size", type=_positive_int, metavar="PX",
                   help="test resize: shorter side [the model's; 800 for official checkpoints]")
    p.add_argument("--max-size", type=_positive_int, metavar="PX",
                   help="test resize: longer-side cap [the model's; 1333 for official checkpoints]")
    p.add_argument("--pad-text-to-max", action="store_true",
                   help="pad text to 256 tokens as the official code (slower; same results)")
    p.add_argument("-o", "--output", default="out", metavar="DIR",
                   help="output folder for <stem>.jpg (boxes drawn) and <stem>.json [out]")
    p.add_argument("--overwrite", action="store_true",
                   help="redo images whose result is already in the output folder (default: skip them, so a "
                        "re-run resumes a long folder)")
    p.add_argument("--no-draw", action="store_true", help="write only the .json files")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip",
        description="GLIP: zero-shot detection and phrase grounding with the official GLIP checkpoints; training and "
                    "evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
               "  detect        detect the given classes (or a prompt's phrases) in images\n"
               "  ground        ground the phrases of a caption in images\n"
               "  convert       convert an official .pth checkpoint into a safetensors model directory\n"
               "  train         train, fine-tune, prompt-tune or linear-probe (one process, or many with torchrun)\n"
               "  eval          evaluate with an official protocol (coco, lvis-minival, flickr30k, odinw, custom)\n"
               "  pseudo-label  label caption data with a teacher model (self-training)\n"
               f"\n{EXIT_CODES_HELP}\n"
               "Run `glip COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the versions of the glip packages and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    det = sub.add_parser("detect", help="zero-shot detection of classes or prompt phrases", epilog=EXIT_CODES_HELP,
                         description="Detect the given classes in every image. Writes DIR/<stem>.jpg with boxes and "
                                     "labels drawn and DIR/<stem>.json with the detections (both atomically). "
                                     "Unreadable images are named, skipped, and make the exit code 1; images "
                                     "already done are skipped unless --overwrite.")
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

    gr = sub.add_parser("ground", help="phrase grounding of a caption", epilog=EXIT_CODES_HELP,
                        description="Locate the phrases of a caption in images (each phrase at its first "
                                    "occurrence). Without --phrases, noun phrases are extracted from the caption.")
    gr.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (the caption applies to each)")
    gr.add_argument("--caption", required=True, metavar="TEXT", help="the caption (not empty)")
    gr.add_argument("--phrases", metavar="A|B", help="'|'-separated phrases of the caption to ground")
    _add_model_options(gr)

    conv = sub.add_parser("convert", help="official .pth -> safetensors model directory", epilog=EXIT_CODES_HELP,
                          description="Read an official GLIP checkpoint (its 'model' weights, or 'model_ema' with "
                                      "--ema), map it strictly onto glip's modules, and write DST_DIR with "
                                      "config.json, model.safetensors and the tokenizer (written to a temporary "
                                      "folder, then renamed). Reports what was dropped.")
    conv.add_argument("src", metavar="SRC.pth", help="the official checkpoint (or a weights-recipe .json)")
    conv.add_argument("dst", metavar="DST_DIR", help="the output directory (must not exist, or be empty)")
    conv.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    conv.add_argument("--trust-pickle", action="store_true",
                      help="allow arbitrary pickled objects in the .pth (only for files you trust)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST_DIR")

    tr = sub.add_parser(
        "train", help="train, fine-tune, prompt-tune or linear-probe a GLIP model",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        description="Train from a YAML/JSON config (see docs/training.md), with dotted key=value overrides:\n"
                    "  glip train tiny_synth schedule.max_iter=50        (a shipped config)\n"
                    "  glip train my_run.yaml optim.lr=2e-4 data.batch_size=4\n"
                    "Fine-tune on a COCO-format dataset without writing a config:\n"
                    "  glip train --coco train.json --images DIR --init glip_tiny_model_o365_goldg_cc_sbu.pth\n"
                    "Running the same command again resumes from the last checkpoint of output_dir; a second run\n"
                    "into an output_dir in use is refused. Annotations the readers drop and missing or unreadable\n"
                    "images are named on stderr, listed in output_dir/skipped.json and make the exit code 1.\n"
                    "Several processes: torchrun --nproc_per_node=N -m glip_train.cli train CONFIG (gloo on CPU,\n"
                    "NCCL on GPU).")
    tr.add_argument("config", nargs="?", metavar="CONFIG", help="a training config (.yaml / .json) or a shipped name")
    tr.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=4")
    tr.add_argument("--coco", metavar="FILE", help="fine-tune on this COCO-format training file (fixed class-order "
                                                   "prompt, the official COCO fine-tuning recipe)")
    tr.add_argument("--images", metavar="DIR", help="image folder of --coco (default: the file's folder)")
    tr.add_argument("--val", metavar="FILE", help="COCO-format validation file for --coco")
    tr.add_argument("--val-images", metavar="DIR", help="image folder of --val")
    tr.add_argument("--init", metavar="WEIGHTS", help="weights to start from (official .pth, model directory, recipe)")
    tr.add_argument("--mode", choices=("full", "prompt_tuning", "linear_probe"), help="what trains [full]")
    tr.add_argument("-o", "--output", metavar="DIR", help="output_dir of the run")
    tr.add_argument("--quiet", action="store_true", help="no progress bar (the settings and the summary are still "
                                                         "printed)")

    ev = sub.add_parser("eval", help="evaluate with an official protocol", epilog=EXIT_CODES_HELP,
                        description="Evaluate a GLIP model with an official protocol; writes detections.json and "
                                    "metrics.json (the metrics and every protocol parameter) and prints a table. "
                                    "See docs/evaluation.md.")
    from .evaluation.cli import add_eval_arguments

    add_eval_arguments(ev)

    pl = sub.add_parser("pseudo-label", help="label caption data with a teacher model (self-training)",
                        epilog=EXIT_CODES_HELP,
                        description="Run a teacher GLIP over caption-only data (JSON Lines, one image and caption "
                                    "per line) and write the caption file glip train reads, with the teacher's "
                                    "boxes and scores per entity. Resumes where it stopped.")
    pl.add_argument("--weights", default=os.environ.get("GLIP_WEIGHTS"), metavar="PATH", help="the teacher weights")
    pl.add_argument("--captions", required=True, metavar="FILE", help="caption lines (JSON Lines)")
    pl.add_argument("--images", metavar="DIR", help="image folder (default: the captions file's folder)")
    pl.add_argument("--out", required=True, metavar="FILE", help="the pseudo-labelled caption file to write")
    pl.add_argument("--threshold", type=_probability, default=0.5, metavar="F",
                    help="keep boxes whose score is above F (official CAPTION_CONF 0.5)")
    pl.add_argument("--nms", type=_probability, default=None, metavar="IOU",
                    help="class-agnostic NMS over the kept boxes of an image at this IoU (default: off, official)")
    pl.add_argument("--min-boxes", type=int, default=1, metavar="N",
                    help="write only captions with at least N kept boxes (official CAPTION_MIN_BOX 1)")
    pl.add_argument("--phrases", choices=("entities", "chunker"), default="entities",
                    help="what to ground: the caption's annotated entities, or noun phrases from the offline chunker")
    pl.add_argument("--max-detections", type=_positive_int, default=100, metavar="N", help="per caption [100]")
    pl.add_argument("--min-size", type=_positive_int, metavar="PX", help="test resize: shorter side [the model's]")
    pl.add_argument("--max-size", type=_positive_int, metavar="PX", help="test resize: longer-side cap [the model's]")
    pl.add_argument("--batch-size", type=_positive_int, default=1, metavar="N")
    pl.add_argument("--device", default="auto")
    pl.add_argument("--grade", metavar="GT_FILE",
                    help="also grade the pseudo-labels against ground-truth boxes (precision / recall at IoU 0.5)")
    pl.add_argument("--quiet", action="store_true")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# shared pieces


def _versions() -> str:
    from importlib import metadata

    parts = []
    for package in ("glip-train", "glip-fusion", "glip-encoders", "glip-data"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _weights(args) -> str:
    if args.weights:
        if not Path(args.weights).exists():
            raise UsageError(f"--weights {args.weights}: no such file or directory")
        return args.weights
    from .shipped import default_model_dir

    shipped = default_model_dir()
    if shipped is None:
        raise UsageError("no weights: pass --weights PATH or set GLIP_WEIGHTS (see `glip detect --help`)")
    return str(shipped)


def _tokenizer_of(weights: str):
    """The tokenizer the model at ``weights`` will use, loaded without its weights (to check prompts early)."""
    from glip_encoders import load_tokenizer

    from .modeling_glip import TOKENIZER_DIR, bundled_tokenizer_dir

    folder = Path(weights)
    if folder.is_dir() and (folder / TOKENIZER_DIR).is_dir():
        return load_tokenizer(folder / TOKENIZER_DIR)
    return load_tokenizer(bundled_tokenizer_dir())


def _load_model(args, weights: str):
    import torch

    from .modeling_glip import GLIP

    device = _device(args.device)
    model = GLIP.from_pretrained(weights, adapter=getattr(args, "adapter", None),
                                 use_ema=getattr(args, "use_ema", False), trust_pickle=args.trust_pickle)
    return model.to(device).eval(), getattr(torch, DTYPES[getattr(args, "dtype", "fp32")])


class OutputFolder:
    """The output folder of an image job: checked before any work, locked against a second run, atomic writes."""

    def __init__(self, path: str | Path, overwrite: bool):
        self.path = Path(path)
        self.overwrite = overwrite
        self._lock = None
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"output {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".glip-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None

    def __enter__(self) -> "OutputFolder":
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent runs are the user's business there
            return self
        self._lock = open(self.path / ".glip-lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise UsageError(f"another glip run is writing to {self.path}; wait for it or choose another -o folder") \
                from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()
            (self.path / ".glip-lock").unlink(missing_ok=True)

    def done(self, stem: str) -> bool:
        return not self.overwrite and (self.path / f"{stem}.json").is_file()

    def write_pair(self, stem: str, record: dict, image: Any, result: dict, draw: bool) -> None:
        """``<stem>.jpg`` then ``<stem>.json``, each written to a temporary file and renamed; the JSON, renamed last,
        marks the result complete (a re-run skips only images whose JSON exists)."""
        from glip_data.io import atomic_write_bytes, atomic_write_text

        if draw:
            import io

            buffer = io.BytesIO()
            draw_detections(image, result, buffer)
            atomic_write_bytes(self.path / f"{stem}.jpg", buffer.getvalue())
        atomic_write_text(self.path / f"{stem}.json", json.dumps(record, indent=2) + "\n")


def label_groups(result: dict, same_box_iou: float = 0.9) -> list[tuple[list[float], int, str]]:
    """``[(box, label of the best score, caption)]``: detections of (nearly) the same box -- GLIP scores every class
    for every anchor, so one object can pass the threshold under several names -- share one box, their names in
    score order (``"square 0.59, triangle 0.53"``), so no caption hides another."""
    import torch
    from torchvision.ops import box_iou

    order = torch.as_tensor(result["scores"]).argsort(descending=True, stable=True).tolist()
    boxes = torch.as_tensor(result["boxes"], dtype=torch.float32).reshape(-1, 4)
    groups: list[tuple[int, list[int]]] = []  # (index of the group's box, members)
    for i in order:
        for anchor, members in groups:
            if box_iou(boxes[anchor:anchor + 1], boxes[i:i + 1]).item() >= same_box_iou:
                members.append(i)
                break
        else:
            groups.append((i, [i]))
    scores, labels = result["scores"], result["labels"]
    return [(boxes[anchor].tolist(), int(labels[anchor]),
             ", ".join(f"{result['text_labels'][i]} {float(scores[i]):.2f}" for i in members))
            for anchor, members in groups]


def draw_detections(image, result: dict, path) -> None:
    """Save ``image`` with the result's boxes and labels drawn (``path``: a file path or a binary stream)."""
    from PIL import ImageDraw, ImageFont

    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(2, round(max(canvas.size) / 400))
    for box, label, caption in label_groups(result):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((box[0], box[1]), caption, font=font)
        y = box[1] - (bottom - top) - 2 if box[1] - (bottom - top) - 2 >= 0 else box[1]
        x = max(0, min(box[0], canvas.width - (right - left) - 4))  # a long caption moves left to stay readable
        draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 2), fill=colour)
        draw.text((x + 2, y), caption, fill=(255, 255, 255), font=font)
    canvas.save(path, format="JPEG", quality=92)


def _collect_images(items: Sequence[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(existing image files, [(missing input, why)])``; folders contribute their image files, sorted."""
    paths: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            missing.append((p, "no such file or folder"))
    return paths, missing


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return stems


def _result_json(path: Path, image, prompt, classes, result, params) -> dict:
    return {
        "image": str(path),
        "width": image.width,
        "height": image.height,
        "exif_orientation": int(image.info.get("exif_orientation", 1)),
        "prompt": prompt,
        "classes": classes,
        "detections": [
            {"box": [round(v, 2) for v in box], "score": round(score, 5), "label": label, "text_label": text}
            for box, score, label, text in zip(result["boxes"].tolist(), result["scores"].tolist(),
                                               result["labels"].tolist(), result["text_labels"])
        ],
        "params": params,
    }


def _run_images(args, weights: str, run_batch: Callable, prompt: str, classes: list[str]) -> int:
    """Shared loop of detect/ground: inputs checked first, then batches; unreadable images skipped and counted."""
    from tqdm import tqdm

    from glip_data import ImageLoadError

    paths, failed = _collect_images(args.images)
    if not paths:
        named = ", ".join(str(p) for p, _ in failed) or " ".join(args.images)
        raise UsageError(f"no images found in {named}")
    folder = OutputFolder(args.output, args.overwrite)
    stems = _unique_stems(paths)
    todo = [(p, s) for p, s in zip(paths, stems) if not folder.done(s)]
    already = len(paths) - len(todo)
    _device(args.device)  # a bad --device fails now, not after loading the model
    params = {k: getattr(args, k) for k in ("threshold", "max_detections", "min_size", "max_size", "dtype", "device",
                                            "batch_size", "pad_text_to_max")}
    params["weights"] = weights
    written = 0
    with folder:
        if todo:
            model, dtype = _load_model(args, weights)
            bar = tqdm(total=len(todo), unit="img", disable=args.quiet or len(todo) < 2)
            for start in range(0, len(todo), args.batch_size):
                batch = []
                for path, stem in todo[start:start + args.batch_size]:
                    try:
                        batch.append((path, stem, model.processor.load_image(path, args.min_size, args.max_size)))
                    except ImageLoadError as exc:
                        failed.append((path, str(exc)))
                        bar.update(1)
                if not batch:
                    continue
                results = run_batch(model, [b[2] for b in batch], dtype)
                for (path, stem, image), result in zip(batch, results):
                    record = _result_json(path, image, prompt, classes, result, params)
                    folder.write_pair(stem, record, image, result, draw=not args.no_draw)
                    written += 1
                    bar.update(1)
            bar.close()
    for path, why in failed:
        print(f"glip {args.command}: skipped {path}: {why}", file=sys.stderr)
    if not args.quiet:
        print(f"glip {args.command}: {written} processed, {already} already done, {len(failed)} skipped -> "
              f"{folder.path}/")
    return EXIT_SKIPPED if failed else EXIT_OK


# ---------------------------------------------------------------------------------------------------------------------
# commands


def _classes_from_args(args) -> list[str] | None:
    if args.classes_file:
        file = Path(args.classes_file)
        if not file.is_file():
            raise UsageError(f"--classes-file {file}: no such file")
        classes = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not classes:
            raise UsageError(f"--classes-file {file} holds no class name")
        return classes
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise UsageError(f"--classes {args.classes!r} holds no class name")
        return classes
    return None


def _cmd_detect(args) -> int:
    from glip_data import detection_prompt

    from .processing_glip import GLIPProcessor

    classes = _classes_from_args(args)
    weights = _weights(args)
    try:  # the prompt must be readable before any model is loaded
        _, names = GLIPProcessor(_tokenizer_of(weights)).detection_queries(
            1, classes, args.prompt, classes_per_prompt=args.classes_per_prompt)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    prompt = args.prompt if args.prompt is not None else detection_prompt(classes)[0]

    def run_batch(model, images, dtype):
        return model.detect(images, classes=classes, prompt=args.prompt, threshold=args.threshold,
                            max_detections=args.max_detections, min_size=args.min_size, max_size=args.max_size,
                            batch_size=args.batch_size, classes_per_prompt=args.classes_per_prompt,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    return _run_images(args, weights, run_batch, prompt, names[0])


def _cmd_ground(args) -> int:
    from glip_data import find_noun_phrases

    from .processing_glip import GLIPProcessor

    if not args.caption.strip():
        raise UsageError("--caption is empty: give the sentence whose phrases to ground")
    phrases = [p.strip() for p in args.phrases.split("|") if p.strip()] if args.phrases else None
    if args.phrases is not None and not phrases:
        raise UsageError(f"--phrases {args.phrases!r} holds no phrase")
    if phrases is None:
        phrases = find_noun_phrases(args.caption)
        if not phrases:
            raise UsageError(f"found no noun phrases in --caption {args.caption!r}; name the phrases to ground with "
                             "--phrases 'a|b' (each must occur in the caption)")
    weights = _weights(args)
    try:
        GLIPProcessor(_tokenizer_of(weights)).grounding_queries([args.caption], [phrases])
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None

    def run_batch(model, images, dtype):
        return model.ground(images, [args.caption] * len(images), [phrases] * len(images),
                            threshold=args.threshold, max_detections=args.max_detections, min_size=args.min_size,
                            max_size=args.max_size, batch_size=args.batch_size,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    return _run_images(args, weights, run_batch, args.caption, phrases)


def _cmd_convert(args) -> int:
    import shutil
    import tempfile

    from .modeling_glip import GLIP

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise UsageError(f"{src}: no such checkpoint file")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"destination {dst} is not empty; pass --overwrite to replace it")
    parent = dst.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=parent))
    except OSError as exc:
        raise UsageError(f"cannot write next to {dst}: {exc.strerror or exc}") from None
    try:
        model = GLIP.from_pretrained(src, use_ema=args.ema, trust_pickle=args.trust_pickle)
        model.save_pretrained(staging)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staging, dst)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    report = getattr(model, "load_report", None)
    if report is not None:
        print(report.summary())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"glip convert: wrote {dst}/ ({model.config.name}, {n_params:,} parameters)")
    return EXIT_OK


def _train_positionals(args, extras: list[str], parser: argparse.ArgumentParser) -> None:
    """``glip train`` takes its ``key=value`` overrides (and its config) anywhere among the options: argparse hands
    the ones after an option back unparsed."""
    for token in extras:
        if "=" in token and not token.startswith("-"):
            args.overrides.append(token)
        elif args.config is None and not token.startswith("-"):
            args.config = token
        else:
            parser.error(f"unrecognized arguments: {token}")


def _cmd_train(args) -> int:
    from glip_data.io import OutputLockedError

    from .training import Trainer, load_train_config
    from .training.finetune import coco_finetune_config

    base = None
    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config:  # only overrides were given
        overrides.insert(0, args.config)
        args.config = None
    if args.coco:
        if not args.init:
            raise UsageError("--coco needs --init WEIGHTS, the model to fine-tune: 'default' (the model shipped with "
                             "glip-train), an official GLIP .pth, or a folder written by glip convert / glip train")
        base = coco_finetune_config(args.coco, images=args.images, val=args.val, val_images=args.val_images,
                                    init=args.init)
    elif args.config is None:
        raise UsageError("pass a training config (glip train CONFIG.yaml, or a shipped name such as tiny_synth) or "
                         "--coco FILE --init WEIGHTS")
    for flag, key in ((args.init, "init"), (args.mode, "mode"), (args.output, "output_dir")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    recipe = load_train_config(args.config, [], base=base)  # what the run's changes are reported against
    config = load_train_config(args.config, overrides, base=base)
    try:
        trainer = Trainer(config, progress=not args.quiet, recipe=recipe)
    except OutputLockedError as exc:  # another run writes there: a usage error, refused before any work
        raise UsageError(str(exc)) from None
    result = trainer.train()
    where = result.model_dir or result.adapter  # None on the other processes of a distributed run
    if where is not None:
        print(result.summary())  # also with --quiet, which only hides the progress bar
        if result.skipped:
            print(f"glip train: {result.skipped.summary()}; all listed in {result.output_dir / 'skipped.json'}",
                  file=sys.stderr)
    return result.skipped.exit_code(EXIT_OK, EXIT_SKIPPED)


def _cmd_eval(args) -> int:
    from .evaluation.cli import load_model, protocol_from_args
    from .evaluation.distributed import init_distributed_from_env
    from .evaluation.runner import evaluate

    if not args.weights:
        args.weights = _weights(args)
    protocol = protocol_from_args(args)
    if not Path(args.annotations).exists():
        raise UsageError(f"--annotations {args.annotations}: no such file or folder")
    init_distributed_from_env()
    model = load_model(args)
    evaluate(model, protocol, args.annotations, args.images, args.out or os.path.join("eval", protocol.name),
             on_bad_image=args.on_bad_image, progress=not args.no_progress, verbose=not args.quiet)
    return EXIT_OK


def _cmd_pseudo_label(args) -> int:
    from .pseudo_label import grade_pseudo_labels, pseudo_label

    weights = _weights(args)
    if not Path(args.captions).is_file():
        raise UsageError(f"--captions {args.captions}: no such file")
    if args.min_boxes < 0:
        raise UsageError(f"--min-boxes must be >= 0, got {args.min_boxes}")
    _device(args.device)
    args.trust_pickle = False
    model, _ = _load_model(args, weights)
    report = pseudo_label(model, args.captions, args.out, images=args.images, threshold=args.threshold,
                          nms=args.nms, min_boxes=args.min_boxes, phrases=args.phrases,
                          max_detections=args.max_detections, min_size=args.min_size, max_size=args.max_size,
                          batch_size=args.batch_size, progress=not args.quiet)
    if not args.quiet:
        print(report.summary())
    if args.grade:
        grade = grade_pseudo_labels(args.out, args.grade)
        print(grade.summary())
    return EXIT_SKIPPED if report.failed else EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "detect": _cmd_detect, "ground": _cmd_ground, "convert": _cmd_convert, "train": _cmd_train, "eval": _cmd_eval,
    "pseudo-label": _cmd_pseudo_label,
}


def _usage_errors() -> tuple[type[BaseException], ...]:
    from glip_data import ImageLoadError, ReaderError

    from .adapters import AdapterError
    from .checkpoint import CheckpointError
    from .evaluation.datasets import EvaluationError
    from .training import ConfigError, ResumeError

    return (UsageError, CheckpointError, AdapterError, ConfigError, ResumeError, ReaderError, ImageLoadError,
            EvaluationError, FileNotFoundError, ValueError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)  # argparse prints usage errors itself and exits 2
    if extras:
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        _train_positionals(args, extras, parser)
    if args.version:
        print(_versions())
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    name = f"glip {args.command}"
    debug = bool(os.environ.get("GLIP_DEBUG"))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one error boundary of the command line
        if debug:
            raise
        usage = isinstance(exc, _usage_errors())
        message = str(exc).strip() or type(exc).__name__
        if not usage and not isinstance(exc, (RuntimeError, OSError, MemoryError)):
            message = f"internal error ({type(exc).__name__}): {message} (rerun with GLIP_DEBUG=1 for the traceback)"
        kind = "error" if usage else "failed"
        print(f"{name}: {kind}: {message}", file=sys.stderr)
        return EXIT_USAGE if usage else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
