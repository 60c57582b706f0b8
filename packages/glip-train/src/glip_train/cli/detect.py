"""``glip detect``: zero-shot detection of classes (or a prompt's phrases) in images."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_CODES_HELP, UsageError
from ._images import add_image_job_options, run_images

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("detect", help="zero-shot detection of classes or prompt phrases", epilog=EXIT_CODES_HELP,
                       description="Detect the given classes in every image. Writes DIR/<stem>.jpg with boxes and "
                                   "labels drawn and DIR/<stem>.json with the detections (both atomically). "
                                   "Unreadable images are named, skipped, and make the exit code 1; images already "
                                   "done are skipped unless --overwrite.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="a detection prompt; its '.'-separated phrases are the classes, "
                                                       "e.g. 'person. bicycle. a red umbrella.'")
    what.add_argument("--classes", metavar="A,B,C", help="comma-separated class names, e.g. person,bicycle,car")
    what.add_argument("--classes-file", metavar="FILE", help="a text file with one class name per line")
    p.add_argument("--classes-per-prompt", type=int, default=40, metavar="N",
                   help="long class lists are split into prompts of at most N classes (and 256 tokens); 0: only the "
                        "token limit (the official COCO protocol runs 80 classes as one prompt) [40]")
    add_image_job_options(p)
    return p


def _classes(args: argparse.Namespace) -> list[str] | None:
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


def run(args: argparse.Namespace) -> int:
    from glip_data import detection_prompt

    from ..processing_glip import GLIPProcessor
    from ._model import text_side

    classes = _classes(args)

    def check_prompt(weights: str) -> list[str]:
        try:
            _, names = GLIPProcessor(text_side(weights)[0]).detection_queries(
                1, classes, args.prompt, classes_per_prompt=args.classes_per_prompt)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        return names[0]

    def run_batch(model, images, dtype):
        return model.detect(images, classes=classes, prompt=args.prompt, threshold=args.threshold,
                            max_detections=args.max_detections, min_size=args.min_size, max_size=args.max_size,
                            batch_size=args.batch_size, classes_per_prompt=args.classes_per_prompt,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    prompt = args.prompt if args.prompt is not None else detection_prompt(classes)[0]
    return run_images(args, check_prompt, run_batch, prompt)
