"""``glip eval``: the official evaluation protocols from the command line (also ``python -m
glip_train.evaluation``).

    glip eval --protocol NAME --weights W --annotations FILE [--images DIR] [--out DIR] [options]

Before the model loads, the protocol options, the model options, the annotation files (every record, every class
name against the model's tokenizer) and the output folder (locked against a second run) are checked. Under
``torchrun --nproc_per_node N`` every process evaluates a shard of the images on its own GPU; rank 0 writes
``detections.json`` and ``metrics.json`` and prints the table. Skipped images (``--on-bad-image skip``) are named on
stderr, counted in ``metrics.json`` and make the exit code 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glip_data.validators import non_negative_int, optional_positive_int, positive_int
from ._common import EXIT_CODES_HELP, EXIT_OK, EXIT_SKIPPED, UsageError, run_command
from ._model import add_model_options, check_model_options, load_model, text_side

__all__ = ["add_arguments", "add_parser", "build_parser", "main", "protocol_from_args", "run"]

DESCRIPTION = ("Evaluate a GLIP model with an official protocol; writes detections.json and metrics.json (the "
               "metrics, every protocol parameter, the skipped inputs and the checksum of the detections.json they "
               "were computed from) and prints a table. metrics.json is removed when a run starts and written last, "
               "so the two files always come from one run. See docs/evaluation.md.")
# protocol options spelled as flags -> protocol fields
_FLAGS = {"batch_size": "batch_size", "min_size": "min_size", "max_size": "max_size",
          "classes_per_prompt": "classes_per_prompt", "max_detections_per_prompt": "max_detections_per_prompt",
          "prompt_file": "class_names", "sentences_dir": "sentences_dir"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``glip eval``."""
    from ..evaluation.protocols import PROTOCOLS

    p.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS),
                   help="coco | lvis-minival, lvis-val-fixed (Fixed AP) | lvis-val (300 per image) | flickr30k | "
                        "odinw | custom")
    p.add_argument("--annotations", required=True, metavar="FILE",
                   help="COCO / LVIS / MDETR-format json; for odinw a folder, a manifest or a .txt list")
    p.add_argument("--images", metavar="DIR", help="image folder (default: next to the annotations)")
    p.add_argument("--out", metavar="DIR", help="output folder for detections.json and metrics.json "
                                                "[eval/<protocol>]")
    add_model_options(p, dtype=False)
    g = p.add_argument_group("protocol parameters (default: the protocol's official values)")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help="images per forward pass (official: 1)")
    g.add_argument("--min-size", type=positive_int, metavar="PX",
                   help="test resize, shorter side (default: the model's; official checkpoints 800)")
    g.add_argument("--max-size", type=positive_int, metavar="PX",
                   help="test resize, longer-side cap (default: the model's; official checkpoints 1333)")
    g.add_argument("--classes-per-prompt", type=non_negative_int, metavar="N",
                   help="chunk size; 0: only the 256-token limit")
    g.add_argument("--max-detections", type=optional_positive_int, metavar="N|none", default=argparse.SUPPRESS,
                   help="per image after merging prompts; none: no cap")
    g.add_argument("--max-detections-per-prompt", type=positive_int, metavar="N", help="cap of each prompt's output")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="class-name overrides (JSON {id: name}, [{id, name}], or one name per line; for odinw "
                        "{dataset: overrides})")
    g.add_argument("--sentences-dir", metavar="DIR", help="flickr30k: Flickr30k Entities Sentences/ (phrase types)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other protocol parameter, e.g. --set fixed_ap=true --set max_detections=none; values "
                        "read as in YAML (none, true/false, 1e-4, 'text', [1, 5, 10]) (repeatable)")
    p.add_argument("--on-bad-image", choices=("raise", "skip"), default="raise",
                   help="unreadable image: stop with an error, or skip it (named on stderr, counted in metrics.json, "
                        "scored without detections, exit code 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate with an official protocol", epilog=EXIT_CODES_HELP,
                       description=DESCRIPTION)
    add_arguments(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m glip_train.evaluation`` (the same options as ``glip eval``)."""
    p = argparse.ArgumentParser(prog="glip eval", description=DESCRIPTION, epilog=EXIT_CODES_HELP)
    add_arguments(p)
    return p


def protocol_from_args(args: argparse.Namespace) -> Any:
    """The protocol of the parsed options: the preset, then the explicit flags, then ``--set``."""
    from ..evaluation.protocols import get_protocol, parse_overrides

    base = get_protocol(args.protocol)
    fields = set(base.to_dict())
    overrides: dict[str, Any] = {}
    for flag, field in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if field not in fields:
                raise UsageError(f"--{flag.replace('_', '-')} does not apply to the {args.protocol} protocol")
            overrides[field] = value
    if "max_detections" in vars(args):  # absent unless given (None is a value: no cap)
        overrides["max_detections"] = args.max_detections
    overrides.update(parse_overrides(base, args.set))
    return get_protocol(base, **overrides)


def _check_readable(data: Any, protocol: Any, weights: str) -> None:
    """Every class name of a detection dataset and every phrase of a grounding one must be readable by the model's
    tokenizer (:func:`glip_data.check_phrases`), checked before the model loads."""
    from ..evaluation.runner import check_class_tokens, check_phrase_tokens

    tokenizer, max_text_len = text_side(weights)
    if data.kind == "flickr":
        check_phrase_tokens(tokenizer, data.datasets[0], max_text_len)
        return
    for dataset in data.datasets:
        check_class_tokens(tokenizer, dataset, protocol.classes_per_prompt, max_text_len)


def run(args: argparse.Namespace) -> int:
    """Run ``glip eval`` for parsed options; returns the exit code."""
    from glip_data.io import RunLock

    from ..evaluation.distributed import dist_info, init_distributed_from_env
    from ..evaluation.runner import evaluate, load_eval_data

    protocol = protocol_from_args(args)
    choice = check_model_options(args)
    if not Path(args.annotations).exists():
        raise UsageError(f"--annotations {args.annotations}: no such file or folder")
    data = load_eval_data(protocol, args.annotations, args.images)
    _check_readable(data, protocol, choice.weights)
    out = Path(args.out or os.path.join("eval", protocol.name))
    init_distributed_from_env()
    lock = RunLock(out, "glip eval") if dist_info().is_main else None
    if lock is not None:
        lock.acquire()
    try:
        model = load_model(args, choice)
        result = evaluate(model, protocol, data, out_dir=out, on_bad_image=args.on_bad_image,
                          progress=not args.no_progress, verbose=not args.quiet)
    finally:
        if lock is not None:
            lock.release()
    if result is not None and result.skipped.get("total"):
        from glip_data.report import SkipReport

        summary = SkipReport("glip eval", stream=None).merge(result.skipped).summary()
        print(f"glip eval: {summary} (recorded in {out / 'metrics.json'})", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m glip_train.evaluation``: the same command, options, checks and exit codes as ``glip eval``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command = "eval"
    return run_command("glip eval", lambda: run(args), parser)
