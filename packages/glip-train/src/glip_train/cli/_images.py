"""The image jobs ``glip detect`` and ``glip ground`` share: their options, the output folder and the loop.

The output folder holds, per image, ``<stem>.jpg`` (boxes drawn) and ``<stem>.json`` (the detections), each written
under a temporary name and renamed, the JSON last: a JSON marks its image done, so a re-run resumes a long folder.
``glip-run.json`` records the last run (its parameters, counts and every skipped input). The folder is locked while a
run writes; leftovers of a killed run are removed when the next one starts.
"""
from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from glip_data.validators import positive_int, probability
from ._common import EXIT_OK, EXIT_SKIPPED, UsageError, skip_report
from ._model import add_model_options, check_model_options, load_model

__all__ = ["IMAGE_SUFFIXES", "RUN_RECORD", "add_image_job_options", "run_images"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
#: the run's record in the output folder; an image with this stem is written as ``glip-run_1``
RUN_RECORD = "glip-run"


def add_image_job_options(p: argparse.ArgumentParser) -> None:
    """The model options plus what detect and ground share: batching, thresholds, sizes, the output folder."""
    add_model_options(p)
    g = p.add_argument_group("inference")
    g.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="images per forward pass [1]")
    g.add_argument("--threshold", type=probability, default=0.5, metavar="F",
                   help="keep detections with final score >= F (a score in [0, 1]; 0 keeps every post-processed "
                        "one) [0.5]")
    g.add_argument("--max-detections", type=positive_int, default=100, metavar="N",
                   help="detections per image at most (>= 1) [100]")
    g.add_argument("--min-size", type=positive_int, metavar="PX",
                   help="test resize: shorter side [the model's; 800 for official checkpoints]")
    g.add_argument("--max-size", type=positive_int, metavar="PX",
                   help="test resize: longer-side cap [the model's; 1333 for official checkpoints]")
    g.add_argument("--pad-text-to-max", action="store_true",
                   help="pad text to 256 tokens as the official code (slower; same results)")
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", default="out", metavar="DIR",
                   help=f"output folder for <stem>.jpg (boxes drawn), <stem>.json and {RUN_RECORD}.json (the run's "
                        "parameters, counts and skipped inputs) [out]")
    o.add_argument("--overwrite", action="store_true",
                   help="redo images whose result is already in the output folder (default: skip them, so a "
                        "re-run resumes a long folder)")
    o.add_argument("--no-draw", action="store_true", help="write only the .json files")
    o.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _collect_images(items: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """``(image files, missing items)``; folders contribute their image files, sorted."""
    paths: list[Path] = []
    missing: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            missing.append(p)
    return paths, missing


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {RUN_RECORD: 1}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return stems


class _OutputFolder:
    """The output folder: checked before any work, locked against a second run, pairs written atomically."""

    def __init__(self, path: str | Path, command: str, overwrite: bool):
        from glip_data.io import RunLock

        self.path = Path(path)
        self.overwrite = overwrite
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"output {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None
        self.lock = RunLock(self.path, f"glip {command}")

    def __enter__(self) -> "_OutputFolder":
        try:
            self.lock.acquire()
        except OSError as exc:
            raise UsageError(f"cannot write to the output folder {self.path}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def done(self, stem: str) -> bool:
        return not self.overwrite and (self.path / f"{stem}.json").is_file()

    def write_pair(self, stem: str, record: dict, image: Any, result: dict, draw: bool) -> None:
        """``<stem>.jpg`` then ``<stem>.json``, each atomically; the JSON, renamed last, marks the image done."""
        from glip_data.io import atomic_write_bytes, atomic_write_json

        if draw:
            from ..drawing import draw_detections

            buffer = io.BytesIO()
            draw_detections(image, result, buffer)
            atomic_write_bytes(self.path / f"{stem}.jpg", buffer.getvalue())
        atomic_write_json(self.path / f"{stem}.json", record)


def _result_json(path: Path, image: Any, prompt: str, classes: list[str], result: dict, params: dict) -> dict:
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


def run_images(args: argparse.Namespace, check_text: Callable[[str], list[str]], run_batch: Callable,
               prompt: str) -> int:
    """The loop of detect / ground. Every input is checked before the model loads: images, model options, the text
    (``check_text(weights)`` reads the prompt with that model's tokenizer and returns the class names or phrases),
    the output folder and its lock. Unreadable images are skipped, named and counted (exit code 1)."""
    from tqdm import tqdm

    from glip_data import ImageLoadError
    from glip_data.io import atomic_write_json

    paths, missing = _collect_images(args.images)
    if not paths:
        raise UsageError(f"no images found in {' '.join(args.images)}")
    skips = skip_report(args.command)
    for item in missing:
        skips.skip("no such file or folder", item)
    choice = check_model_options(args)
    classes = check_text(choice.weights)
    folder = _OutputFolder(args.output, args.command, args.overwrite)
    todo = [(p, s) for p, s in zip(paths, _unique_stems(paths)) if not folder.done(s)]
    params = {k: getattr(args, k) for k in ("threshold", "max_detections", "min_size", "max_size", "dtype", "device",
                                            "batch_size", "pad_text_to_max")}
    params["weights"] = choice.weights
    written = 0
    with folder:
        if todo:
            model = load_model(args, choice)
            bar = tqdm(total=len(todo), unit="img", disable=args.quiet or len(todo) < 2)
            for start in range(0, len(todo), args.batch_size):
                batch = []
                for path, stem in todo[start:start + args.batch_size]:
                    try:
                        batch.append((path, stem, model.processor.load_image(path, args.min_size, args.max_size)))
                    except ImageLoadError as exc:
                        skips.skip("unreadable image", path, str(exc))
                        bar.update(1)
                if not batch:
                    continue
                results = run_batch(model, [b[2] for b in batch], choice.dtype)
                for (path, stem, image), result in zip(batch, results):
                    folder.write_pair(stem, _result_json(path, image, prompt, classes, result, params), image,
                                      result, draw=not args.no_draw)
                    written += 1
                    bar.update(1)
            bar.close()
        counts = {"processed": written, "already_done": len(paths) - len(todo)}
        atomic_write_json(folder.path / f"{RUN_RECORD}.json", {"command": f"glip {args.command}", "params": params,
                                                               **counts, "skipped": skips.to_dict()})
    if not args.quiet:
        print(f"glip {args.command}: {written} processed, {counts['already_done']} already done, {skips.total} "
              f"skipped -> {folder.path}/")
    if skips:
        print(f"glip {args.command}: {skips.summary()}", file=sys.stderr)
    return skips.exit_code(EXIT_OK, EXIT_SKIPPED)
