"""The ``glip-data`` command line: inspect, convert, shard and synthesise grounding data.

Run ``glip-data COMMAND --help`` for every option of a command. Exit codes (as ``glip``'s):

    0  success
    1  finished, but some records or images were skipped (``--errors drop``): each named on stderr, all counted
    2  usage error: a bad option value, a missing or malformed input (named with its record), an output another run
       is writing
    3  runtime failure: the work started and could not finish
  130  interrupted

Every command that writes locks its output against a second run and writes under temporary names renamed into
place; the leftovers of a killed run are removed when the next one starts.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from glip_data.report import EXIT_CODES_HELP, EXIT_OK, EXIT_SKIPPED, SkipReport, UsageError, run_command
from glip_data.validators import non_negative_int, positive_int, probability

READER_FORMATS = ("auto", "coco", "o365", "lvis", "mdetr", "odvg", "captions", "shards")
HIST_BINS = (32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------------------------------
# format detection and readers


def detect_format(path: str | Path) -> str:
    """Guess the format of an annotation file or shard folder from its content (not its extension)."""
    from glip_data.readers.base import ReaderError, iter_jsonl, read_json

    path = Path(path)
    if path.is_dir() or path.name == "index.json" or path.name.endswith((".tar", ".tar.gz")):
        return "shards"
    try:
        data = read_json(path)
    except ReaderError:
        data = None  # several JSON values: JSON Lines
    if isinstance(data, dict) and "images" in data:
        images = data.get("images") or [{}]
        if any("caption" in img for img in images[:50]):
            return "mdetr"
        cats = data.get("categories") or [{}]
        if "frequency" in cats[0] or ("coco_url" in images[0] and "file_name" not in images[0]):
            return "lvis"
        if any("objects365" in str(img.get("file_name", "")) for img in images[:50]):
            return "o365"
        return "coco"
    if isinstance(data, dict) and ("filename" in data or "image" in data):
        first = data  # a JSON Lines file with one line
    elif data is None:
        first = next((rec for _, rec in iter_jsonl(path)), None)
    else:
        first = None
    if isinstance(first, dict):
        if "filename" in first or "detection" in first or "grounding" in first:
            return "odvg"
        if "caption" in first and "image" in first:
            return "captions"
    raise ValueError(f"{path}: cannot tell the format (COCO/LVIS/O365/MDETR json, ODVG or captions jsonl, shards); "
                     "pass --format")


def _synth_image_root(path: str | Path) -> str | None:
    from glip_data.synth import world_image_root

    root = world_image_root(path)
    return None if root is None else str(root)


def make_reader(path: str | Path, fmt: str = "auto", *, images: str | None = None, label_map: str | None = None,
                box_convention: str = "official", errors: str = "raise", score_threshold: float = 0.5,
                min_boxes: int = 1, load_image: bool = False, skips: SkipReport | None = None) -> Any:
    """Build the reader for ``path`` (``fmt="auto"``: :func:`detect_format`). Shards give a :class:`ShardedStream`.
    ``skips`` names every record dropped with ``errors="drop"``."""
    from glip_data import readers
    from glip_data.shards import ShardedStream

    fmt = detect_format(path) if fmt == "auto" else fmt
    if images is None:
        images = _synth_image_root(path)
    common = {"load_image": load_image, "box_convention": box_convention, "errors": errors, "skips": skips}
    if fmt == "coco":
        return readers.COCODetection(path, images, **common)
    if fmt == "o365":
        return readers.Objects365Detection(path, images, **common)
    if fmt == "lvis":
        return readers.LVISDetection(path, images, **common)
    if fmt == "mdetr":
        return readers.MDETRGrounding(path, images, **common)
    if fmt == "odvg":
        from glip_data.convert import default_label_map_path

        if label_map is None and default_label_map_path(path).is_file():
            label_map = str(default_label_map_path(path))
        return readers.ODVGReader(path, images, label_map=label_map, **common)
    if fmt == "captions":
        return readers.CaptionReader(path, images, score_threshold=score_threshold, min_boxes=min_boxes, **common)
    if fmt == "shards":
        return ShardedStream(path, load_image=load_image, image_root=images)
    raise ValueError(f"unknown format {fmt!r}; expected one of {READER_FORMATS}")


# ---------------------------------------------------------------------------------------------------------------------
# inspect


def _histogram(lengths: list[int], bins: tuple[int, ...] = HIST_BINS) -> list[tuple[str, int]]:
    rows, lo = [], 0
    for hi in bins:
        rows.append((f"{lo + 1:>4}-{hi:<4}", sum(lo < n <= hi for n in lengths)))
        lo = hi
    rows.append((f" >{bins[-1]:<7}", sum(n > bins[-1] for n in lengths)))
    return rows


def inspect_data(args: argparse.Namespace, out=None, skips: SkipReport | None = None) -> dict[str, Any]:
    """``glip-data inspect``: counts, prompt-length histogram (with a tokenizer) and rendered examples."""
    out = out or sys.stdout
    from tqdm import tqdm

    if args.render and not args.out:
        raise UsageError("--render needs --out DIR")
    reader = make_reader(args.path, args.format, images=args.images, label_map=args.label_map,
                         box_convention=args.box_convention, errors=args.errors,
                         score_threshold=args.score_threshold, min_boxes=args.min_boxes, skips=skips)
    samples = list(tqdm(reader, desc="reading", unit="sample", disable=args.quiet)) \
        if not hasattr(reader, "__len__") else None
    n = len(samples) if samples is not None else len(reader)

    def get(i: int) -> Any:
        return samples[i] if samples is not None else reader[i]

    boxes_per, tasks, captions = [], Counter(), Counter()
    label_counts: Counter = Counter()
    for i in tqdm(range(n), desc="counting", unit="sample", disable=args.quiet):
        s = get(i)
        boxes_per.append(s.num_boxes)
        tasks[s.metadata.get("task", "?")] += 1
        captions[s.caption] += 1
        if s.metadata.get("task") == "detection":
            label_counts.update(s.labels.tolist())
    result: dict[str, Any] = {
        "path": str(args.path),
        "reader": type(reader).__name__,
        "samples": n,
        "boxes": sum(boxes_per),
        "tasks": dict(tasks),
        "max_boxes_per_sample": max(boxes_per, default=0),
        "samples_without_boxes": sum(b == 0 for b in boxes_per),
        "distinct_captions": len(captions),
    }
    print(f"{result['reader']} over {args.path}", file=out)
    if hasattr(reader, "report"):
        print(reader.report(), file=out)
    print(f"samples: {n}   boxes: {result['boxes']}   (mean {result['boxes'] / max(n, 1):.2f}, max "
          f"{result['max_boxes_per_sample']}, {result['samples_without_boxes']} without boxes)", file=out)
    print(f"tasks: {dict(tasks)}   distinct captions: {len(captions)}", file=out)
    categories = getattr(reader, "categories", {}) or {}
    if categories:
        print(f"categories: {len(categories)}", file=out)
        common = ", ".join(f"{categories.get(lab, lab)}={c}" for lab, c in label_counts.most_common(10))
        if common:
            print(f"most frequent: {common}", file=out)
    if args.tokenizer:
        from glip_data.positive_map import spans_to_tokens
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
        lengths: list[int] = []
        over = 0
        unmapped = 0
        cache: dict[str, int] = {}
        for caption, count in tqdm(captions.items(), desc="tokenizing", unit="caption", disable=args.quiet):
            if caption not in cache:
                cache[caption] = len(tokenizer(caption, truncation=False, verbose=False)["input_ids"])
            lengths.extend([cache[caption]] * count)
            over += count * (cache[caption] > args.max_text_len)
        for i in range(n):
            s = get(i)
            if s.num_boxes and cache[s.caption] > args.max_text_len:
                tokens = spans_to_tokens(tokenizer, s.caption, s.tokens_positive, max_length=args.max_text_len,
                                         warn=False)
                unmapped += sum(1 for t in tokens if not t)
        result["prompt_lengths"] = dict(_histogram(lengths))
        result["captions_over_max_len"] = over
        result["boxes_unmapped_by_truncation"] = unmapped
        print(f"prompt length in tokens ([CLS]/[SEP] included), max_text_len={args.max_text_len}:", file=out)
        peak = max((c for _, c in _histogram(lengths)), default=1) or 1
        for label, count in _histogram(lengths):
            print(f"  {label} {count:>8}  {'#' * round(40 * count / peak)}", file=out)
        print(f"  {over} samples exceed {args.max_text_len} tokens; {unmapped} of their boxes lose their tokens "
              "(chunk the prompt or sample fewer negatives)", file=out)
    if args.render:
        result["rendered"] = _render(reader, get, n, args, out)
    if args.json:
        print(json.dumps(result, indent=1), file=out)
    return result


def _render(reader: Any, get: Any, n: int, args: argparse.Namespace, out: Any) -> list[str]:
    """``--render N``: pictures of N random samples in ``--out`` (locked; each picture written atomically)."""
    import numpy as np
    from tqdm import tqdm

    from glip_data.images import load_image
    from glip_data.io import RunLock, atomic_write_bytes
    from glip_data.render import render_sample

    outdir = Path(args.out)
    picks = sorted(int(i) for i in np.random.default_rng(args.seed).choice(n, min(args.render, n), replace=False))
    written = []
    with RunLock(outdir, "glip-data inspect"):
        for j, i in enumerate(tqdm(picks, desc="rendering", disable=args.quiet)):
            s = get(i)
            if s.image is None:
                if hasattr(reader, "load_image"):
                    reader.load_image(s)
                else:
                    s.image = load_image(s.image_path)
            dst = outdir / f"{j:03d}_{Path(s.metadata.get('file_name', s.image_path)).stem}.jpg"
            buffer = io.BytesIO()
            render_sample(s).save(buffer, format="JPEG", quality=90)
            atomic_write_bytes(dst, buffer.getvalue())
            written.append(str(dst))
    print(f"rendered {len(written)} examples to {outdir}", file=out)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# the other commands


def convert_cmd(args: argparse.Namespace, out=None, skips: SkipReport | None = None) -> list[Path]:
    out = out or sys.stdout
    from glip_data.convert import convert

    written = convert(args.src, args.dst, args.src_format, args.dst_format, label_map=args.label_map,
                      dst_label_map=args.dst_label_map, progress=not args.quiet)
    for p in written:
        print(f"wrote {p}", file=out)
    return written


def shard_cmd(args: argparse.Namespace, out=None, skips: SkipReport | None = None) -> dict[str, Any]:
    out = out or sys.stdout
    from glip_data.shards import write_shards

    reader = make_reader(args.src, args.format, images=args.images, label_map=args.label_map,
                         box_convention=args.box_convention, errors=args.errors, skips=skips)
    if not hasattr(reader, "__len__"):
        raise UsageError(f"{args.src} is already shards")
    index = write_shards(reader, args.out, kind=args.kind, samples_per_shard=args.per_shard, compress=args.gzip,
                         image_root=args.images if args.kind == "jsonl" and args.relative_paths else None,
                         progress=not args.quiet)
    print(f"wrote {len(index['shards'])} {args.kind} shards, {index['num_samples']} samples, to {args.out}", file=out)
    return index


def synth_cmd(args: argparse.Namespace, out=None, skips: SkipReport | None = None) -> Any:
    """``glip-data synth``: the world is generated in a folder beside ``--out`` and renamed into place when complete
    (``--out`` locked meanwhile)."""
    out = out or sys.stdout
    from glip_data.io import RunLock, atomic_directory
    from glip_data.synth import SynthConfig, generate_world

    fields = {"num_detection", "num_grounding", "num_captions", "num_val", "min_size", "max_size", "max_objects",
              "captions_per_image", "image_format", "background"}
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if args.detection_shapes:
        overrides["detection_shapes"] = tuple(s.strip() for s in args.detection_shapes.split(",") if s.strip())
    cfg = SynthConfig(seed=args.seed, **overrides)
    target = Path(args.out)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {target} is not empty; pass --overwrite to replace it")
    with RunLock.for_output(target.resolve(), "glip-data synth"), \
            atomic_directory(target, overwrite=args.overwrite) as staging:
        world = generate_world(staging, config=cfg, progress=not args.quiet)
    print(f"synthetic world (seed {args.seed}) in {target}", file=out)
    for k, v in world.counts.items():
        print(f"  {k}: {v}", file=out)
    return world


# ---------------------------------------------------------------------------------------------------------------------
# parser


def _reader_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=READER_FORMATS,
                   help="annotation format (default: auto, detected from the content): coco, o365 (Objects365 "
                        "v1/v2), lvis (LVIS v1), mdetr (Flickr30k/GoldG), odvg (jsonl + label map), captions "
                        "(pseudo-labelled jsonl), shards (a folder written by 'glip-data shard')")
    p.add_argument("--images", metavar="DIR", default=None,
                   help="image root the file's image paths are relative to (default: the file's folder)")
    p.add_argument("--label-map", metavar="FILE", default=None,
                   help="ODVG label map json {\"0\": \"name\", ...} (default: <stem>_label_map.json next to the file, "
                        "else inferred from the 'category' fields)")
    p.add_argument("--box-convention", default="official", choices=("official", "exact"),
                   help="official: GLIP's inclusive-pixel boxes (x2 = x + w - 1, clip to W-1); exact: x2 = x + w")
    p.add_argument("--errors", default="raise", choices=("raise", "drop"),
                   help="on a malformed record: raise an error naming it (default), or drop and count it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glip-data",
        description="Inspect, convert, shard and synthesise grounding data for GLIP (COCO, Objects365, LVIS, MDETR, "
                    "ODVG, pseudo-labelled captions).",
        epilog=f"{EXIT_CODES_HELP}. Every command that writes locks its output against a second run and writes "
               "under temporary names renamed into place. Run `glip-data COMMAND --help` for its options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", epilog=EXIT_CODES_HELP, help="counts, prompt-length histogram, rendered examples",
                       description="Read a dataset and print what it holds: samples, boxes, drops by reason, "
                                   "categories; with --tokenizer the prompt-length histogram; with --render N "
                                   "pictures of N random samples with their boxes and phrases.")
    p.add_argument("path", help="annotation file, or shard folder")
    _reader_options(p)
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="local Hugging Face tokenizer folder: print the prompt-length histogram in tokens")
    p.add_argument("--max-text-len", type=positive_int, default=256,
                   help="the model's text length; longer prompts are counted and their lost boxes reported "
                        "(default 256)")
    p.add_argument("--render", type=non_negative_int, default=0, metavar="N",
                   help="render N random samples (needs --out)")
    p.add_argument("--out", metavar="DIR", default=None, help="folder for the rendered pictures")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the random choice of samples to render (default 0)")
    p.add_argument("--score-threshold", type=probability, default=0.5,
                   help="captions: keep boxes with score > this (default 0.5)")
    p.add_argument("--min-boxes", type=non_negative_int, default=1,
                   help="captions: leave out lines with fewer kept boxes (default 1; 0 keeps caption-only lines)")
    p.add_argument("--json", action="store_true", help="also print the counts as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=inspect_data)

    p = sub.add_parser("convert", epilog=EXIT_CODES_HELP, help="convert between COCO, MDETR and ODVG",
                       description="Convert an annotation file between COCO, MDETR and ODVG without loss: ids, "
                                   "boxes, categories, captions and spans survive a round trip (see "
                                   "glip_data.convert for how detection and grounding content map across formats).")
    p.add_argument("src", help="source annotation file")
    p.add_argument("dst", help="destination file (ODVG: the jsonl; its label map goes next to it)")
    p.add_argument("--from", dest="src_format", required=True, choices=("coco", "odvg", "mdetr"),
                   help="format of SRC")
    p.add_argument("--to", dest="dst_format", required=True, choices=("coco", "odvg", "mdetr"), help="format of DST")
    p.add_argument("--label-map", metavar="FILE", default=None,
                   help="label map of an ODVG source (default: <stem>_label_map.json next to it)")
    p.add_argument("--dst-label-map", metavar="FILE", default=None,
                   help="where to write the label map of an ODVG destination (default: <stem>_label_map.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=convert_cmd)

    p = sub.add_parser("shard", epilog=EXIT_CODES_HELP, help="write a dataset as tar or jsonl shards for streaming",
                       description="Turn any readable dataset into shards (tar: images inside, WebDataset-style; "
                                   "jsonl: image paths) plus an index.json, for glip_data.shards.ShardedStream.")
    p.add_argument("src", help="annotation file")
    p.add_argument("out", help="output folder")
    _reader_options(p)
    p.add_argument("--kind", default="tar", choices=("tar", "jsonl"), help="shard kind (default tar)")
    p.add_argument("--per-shard", type=positive_int, default=1000,
                   help="samples per shard (default 1000); write at least "
                   "world_size x workers shards")
    p.add_argument("--gzip", action="store_true", help="gzip the shards")
    p.add_argument("--relative-paths", action="store_true",
                   help="jsonl: store image paths relative to --images instead of absolute")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=shard_cmd)

    p = sub.add_parser("synth", epilog=EXIT_CODES_HELP, help="generate the synthetic grounding world",
                       description="Generate seeded images of coloured shapes with COCO detection, MDETR grounding, "
                                   "caption-only, COCO evaluation and LVIS evaluation files (see glip_data.synth). "
                                   "The same seed gives byte-identical files.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of everything (default 0)")
    p.add_argument("--num-detection", type=non_negative_int, default=None,
                   help="detection training images (default 200)")
    p.add_argument("--num-grounding", type=non_negative_int, default=None,
                   help="grounding training images (default 200)")
    p.add_argument("--num-captions", type=non_negative_int, default=None, help="caption-only images (default 64)")
    p.add_argument("--num-val", type=non_negative_int, default=None, help="evaluation images (default 96)")
    p.add_argument("--min-size", type=positive_int, default=None, help="smallest image side in pixels (default 128)")
    p.add_argument("--max-size", type=positive_int, default=None, help="largest image side in pixels (default 320)")
    p.add_argument("--max-objects", type=positive_int, default=None, help="most objects per image (default 4)")
    p.add_argument("--captions-per-image", type=positive_int, default=None,
                   help="grounding sentences per image (default 2)")
    p.add_argument("--detection-shapes", default=None, metavar="A,B,...",
                   help="shapes labelled in the detection set (default circle,square,triangle,star,hexagon; the "
                        "others appear only in captions and evaluation)")
    p.add_argument("--image-format", default=None, choices=("jpg", "png"), help="image format (default jpg)")
    p.add_argument("--background", default=None, choices=("varied", "plain"),
                   help="varied textures/gradients (default) or plain colour backgrounds")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=synth_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    from glip_data.images import ImageLoadError
    from glip_data.io import OutputLockedError
    from glip_data.readers.base import ReaderError

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage errors itself and exits 2
    name = f"glip-data {args.command}"
    skips = SkipReport(name)

    def work() -> int:
        args.func(args, skips=skips)
        if skips:
            print(f"{name}: {skips.summary()}", file=sys.stderr)
        return skips.exit_code(EXIT_OK, EXIT_SKIPPED)

    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    return run_command(name, work, usage_errors=(ReaderError, ImageLoadError, OutputLockedError), parser=command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
