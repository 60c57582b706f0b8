"""``glip pseudo-label``: a teacher GLIP labels caption data with boxes (self-training)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from glip_data.validators import non_negative_int, positive_int, probability
from ._common import EXIT_CODES_HELP, EXIT_OK, EXIT_SKIPPED, UsageError, skip_report
from ._model import add_model_options, check_model_options, load_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("pseudo-label", help="label caption data with a teacher model (self-training)",
                       epilog=EXIT_CODES_HELP,
                       description="Run a teacher GLIP over caption-only data (JSON Lines, one image and caption per "
                                   "line) and write the caption file glip train reads, with the teacher's boxes and "
                                   "scores per entity, plus OUT.report.json (counts, skipped inputs, parameters). "
                                   "Running the command again resumes where it stopped, exactly once: no caption is "
                                   "lost or written twice, however the run was stopped. The captions file is read "
                                   "and checked before the teacher loads; OUT is locked against a second run.")
    p.add_argument("--captions", required=True, metavar="FILE", help="caption lines (JSON Lines)")
    p.add_argument("--images", metavar="DIR", help="image folder (default: the captions file's folder)")
    p.add_argument("--out", required=True, metavar="FILE", help="the pseudo-labelled caption file to write")
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


def run(args: argparse.Namespace) -> int:
    from glip_data.io import RunLock

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
