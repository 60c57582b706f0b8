"""``glip pseudo-label``: a teacher GLIP labels caption data with boxes (self-training).

Two inputs: a caption JSON Lines file (one process, ``--out FILE``: :mod:`glip_train.pseudo_label`), or WebDataset
shards -- or, with a class list, image shards or an image folder -- (any number of ``torchrun`` processes, ``--out
DIR``: :mod:`glip_train.pseudo_label_shards`). Both resume exactly once and lock their output.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glip_data.validators import non_negative_int, positive_int, probability
from ._common import EXIT_CODES_HELP, EXIT_OK, EXIT_SKIPPED, UsageError, skip_report
from ._model import add_model_options, check_model_options, load_model, text_side
from .detect import _classes

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pseudo-label", help="label caption data with a teacher model (self-training)",
                       epilog=EXIT_CODES_HELP,
                       description="Run a teacher GLIP over caption-only data and write the captions glip train "
                                   "reads, with the teacher's boxes and scores per entity. A JSON Lines file (one "
                                   "image and caption per line) gives the caption file OUT plus OUT.report.json; "
                                   "WebDataset shards in img2dataset's layout (a folder, a glob, a brace range, a "
                                   "list file or one .tar), under torchrun with any number of processes, give the "
                                   "folder OUT with one output shard per input shard, its manifest entry and "
                                   "index.json (docs/self_training.md). Running the command again resumes where it "
                                   "stopped, exactly once, whatever the number of processes: no caption is lost or "
                                   "written twice. The inputs are checked before the teacher loads; OUT is locked "
                                   "against a second run.")
    p.add_argument("--captions", required=True, metavar="SOURCE",
                   help="caption lines (a .jsonl file), or WebDataset shards: a folder, a quoted glob or brace range, "
                        "a list file, one .tar; with --classes, also a folder of images")
    p.add_argument("--images", metavar="DIR", help="JSON Lines: image folder (default: the captions file's folder)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="JSON Lines: the pseudo-labelled caption file to write; shards: the output folder")
    shards = p.add_argument_group("shards")
    shards.add_argument("--classes", metavar="A,B,C",
                        help="label image shards or an image folder for these classes (the detection prompt, split "
                             "for long lists) instead of grounding captions")
    shards.add_argument("--classes-file", metavar="FILE", help="as --classes, one class name per line")
    shards.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                        help="--classes over an image folder: images per unit of work (sorted by path) [1000]")
    shards.add_argument("--coco", metavar="FILE",
                        help="--classes: also write a COCO annotation file of every finished shard")
    add_model_options(p, dtype=False)
    g = p.add_argument_group("labelling")
    g.add_argument("--threshold", type=probability, default=0.5, metavar="F",
                   help="keep boxes whose score is at least F, as --threshold of glip detect (official "
                        "CAPTION_CONF 0.5, there exclusive) [0.5]")
    g.add_argument("--nms", type=probability, default=None, metavar="IOU",
                   help="class-agnostic NMS over the kept boxes of an image at this IoU (default: off, official)")
    g.add_argument("--min-boxes", type=non_negative_int, default=1, metavar="N",
                   help="write only captions with at least N kept boxes (official CAPTION_MIN_BOX 1)")
    g.add_argument("--phrases", choices=("entities", "chunker"), default="entities",
                   help="what to ground: the caption's annotated entities, or noun phrases from the offline chunker")
    g.add_argument("--max-detections", type=positive_int, default=100, metavar="N", help="per caption [100]")
    g.add_argument("--min-size", type=positive_int, metavar="PX", help="test resize: shorter side [the model's]")
    g.add_argument("--max-size", type=positive_int, metavar="PX", help="test resize: longer-side cap [the model's]")
    g.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="images per forward pass [1]")
    p.add_argument("--grade", metavar="GT_FILE",
                   help="also grade the pseudo-labels against ground-truth boxes (precision / recall at IoU 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _is_caption_file(source: str) -> bool:
    """A JSON Lines caption file by its name (a missing one is then named as such); anything else is shards."""
    return Path(source).name.lower().endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))


def run(args: argparse.Namespace) -> int:
    from glip_data.io import RunLock

    classes = _classes(args)
    if classes is not None or not _is_caption_file(args.captions):
        return _run_shards(args, classes)
    if args.coco:
        raise UsageError("--coco needs --classes or --classes-file (a class-list job)")

    from ..pseudo_label import grade_pseudo_labels, open_captions, pseudo_label

    choice = check_model_options(args)
    if not Path(args.captions).is_file():
        raise UsageError(f"--captions {args.captions}: no such file")
    if args.grade and not Path(args.grade).is_file():
        raise UsageError(f"--grade {args.grade}: no such file")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the caption file to write")
    skips = skip_report(args.command)
    captions = open_captions(args.captions, args.images, skips=skips)  # read and checked before the teacher loads
    with RunLock.for_output(out, "glip pseudo-label"):
        model = load_model(args, choice)
        report = pseudo_label(model, captions, out, threshold=args.threshold, nms=args.nms,
                              min_boxes=args.min_boxes, phrases=args.phrases, max_detections=args.max_detections,
                              min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
                              progress=not args.quiet, skips=skips)
    if not args.quiet:
        print(report.summary())
    if skips:
        print(f"glip pseudo-label: {skips.summary()} (recorded in {out}.report.json)", file=sys.stderr)
    if args.grade:
        print(grade_pseudo_labels(out, args.grade).summary())
    return skips.exit_code(EXIT_OK, EXIT_SKIPPED)


def _run_shards(args: argparse.Namespace, classes: list[str] | None) -> int:
    """Pseudo-label WebDataset shards (or, with a class list, images) into the folder ``--out``, under torchrun."""
    from glip_data.webdataset import ShardListError

    from ..evaluation.distributed import init_distributed_from_env
    from ..pseudo_label_shards import open_shard_job, write_coco

    if args.images or args.grade:
        raise UsageError(f"{'--images' if args.images else '--grade'} applies to a JSON Lines --captions file; "
                         f"{args.captions} is read as shards")
    if args.coco and classes is None:
        raise UsageError("--coco needs --classes or --classes-file (a class-list job)")
    out = Path(args.out)
    if out.is_file():
        raise UsageError(f"--out {out} is a file; shards are written to a folder")
    choice = check_model_options(args)
    tokenizer, max_text_len = text_side(choice.weights)
    if classes:  # names the teacher cannot read are refused before it loads, as glip detect refuses them
        from ..processing_glip import GLIPProcessor

        try:
            GLIPProcessor(tokenizer).detection_queries(1, classes, None)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
    init_distributed_from_env()
    settings = dict(mode="classes" if classes else "captions", classes=classes, threshold=args.threshold,
                    nms=args.nms, min_boxes=args.min_boxes, phrases=None if classes else args.phrases,
                    max_detections=args.max_detections, min_size=args.min_size, max_size=args.max_size,
                    batch_size=args.batch_size, shard_size=args.shard_size if classes else None)
    try:
        job = open_shard_job(args.captions, out, tokenizer=tokenizer, max_text_len=max_text_len,
                             command="glip pseudo-label", **settings)
    except ShardListError as exc:
        raise UsageError(f"--captions {exc}") from None
    except ValueError as exc:  # labels of other settings in --out
        raise UsageError(str(exc)) from None
    with job:
        model = load_model(args, choice)
        try:
            report = job.run(model, progress=not args.quiet)
        except ValueError as exc:  # another teacher labelled --out
            raise UsageError(str(exc)) from None
        if not job.is_main:
            return EXIT_OK  # rank 0 reports for the job
        if args.coco:
            write_coco(out, args.coco, classes)
    if not args.quiet:
        print(report.summary())
    if report.failed or report.skipped.total:
        print(f"glip pseudo-label: {report.skipped.summary()}; {len(report.failed)} unreadable shards (recorded in "
              f"{out}/index.json and the *_stats.json files; a rerun retries the unreadable shards)", file=sys.stderr)
    return report.exit_code(EXIT_OK, EXIT_SKIPPED)
