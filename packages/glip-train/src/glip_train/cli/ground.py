"""``glip ground``: phrase grounding of a caption in images."""
from __future__ import annotations

import argparse

from ._common import EXIT_CODES_HELP, UsageError
from ._images import add_image_job_options, run_images

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ground", help="phrase grounding of a caption", epilog=EXIT_CODES_HELP,
                       description="Locate the phrases of a caption in images (each phrase at its first occurrence). "
                                   "Without --phrases, noun phrases are extracted from the caption. Writes the same "
                                   "files as glip detect.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders (the caption applies to each)")
    p.add_argument("--caption", required=True, metavar="TEXT", help="the caption (not empty)")
    p.add_argument("--phrases", metavar="A|B", help="'|'-separated phrases of the caption to ground")
    add_image_job_options(p)
    return p


def run(args: argparse.Namespace) -> int:
    from glip_data import find_noun_phrases

    from ..processing_glip import GLIPProcessor
    from ._model import text_side

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

    def check_phrases(weights: str) -> list[str]:
        try:
            GLIPProcessor(text_side(weights)[0]).grounding_queries([args.caption], [phrases])
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        return phrases

    def run_batch(model, images, dtype):
        return model.ground(images, [args.caption] * len(images), [phrases] * len(images),
                            threshold=args.threshold, max_detections=args.max_detections, min_size=args.min_size,
                            max_size=args.max_size, batch_size=args.batch_size,
                            pad_text_to_max=args.pad_text_to_max, dtype=dtype)

    return run_images(args, check_phrases, run_batch, args.caption)
