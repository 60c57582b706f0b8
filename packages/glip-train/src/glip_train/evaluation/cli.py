"""``glip eval``: the evaluation protocols from the command line (also ``python -m glip_train.evaluation``).

    glip eval --protocol NAME --weights W --annotations FILE [--images DIR] [--out DIR] [options]

Under ``torchrun --nproc_per_node N`` every process evaluates a shard of the images on its own GPU; rank 0 writes
``detections.json`` and ``metrics.json`` and prints the table.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from .protocols import PROTOCOLS, get_protocol, parse_overrides

__all__ = ["add_eval_arguments", "build_parser", "protocol_from_args", "load_model", "run", "main"]


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``glip eval`` (for the ``glip`` command line to mount as a sub-command)."""
    p.add_argument("--protocol", required=True, choices=sorted(PROTOCOLS),
                   help="coco | lvis-minival, lvis-val-fixed (Fixed AP) | lvis-val (300 per image) | flickr30k | "
                        "odinw | custom")
    p.add_argument("--weights", default=os.environ.get("GLIP_WEIGHTS"), metavar="PATH",
                   help="official .pth, a save_pretrained directory or a weights-recipe .json [$GLIP_WEIGHTS]")
    p.add_argument("--adapter", metavar="FILE",
                   help="a prompt-tuning / linear-probe adapter trained on --weights (glip train --mode ...)")
    p.add_argument("--annotations", required=True, metavar="FILE",
                   help="COCO / LVIS / MDETR-format json; for odinw a folder, a manifest or a .txt list")
    p.add_argument("--images", metavar="DIR", help="image folder (default: next to the annotations)")
    p.add_argument("--out", metavar="DIR", help="output folder for detections.json and metrics.json "
                                                "[eval/<protocol>]")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto [auto; under torchrun cuda:LOCAL_RANK]")
    p.add_argument("--use-ema", action="store_true", help="official .pth only: evaluate the 'model_ema' weights")
    p.add_argument("--trust-pickle", action="store_true", help="allow arbitrary pickled objects in a .pth")
    g = p.add_argument_group("protocol parameters (default: the protocol's official values)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass (official: 1)")
    g.add_argument("--min-size", type=int, metavar="PX",
                   help="test resize, shorter side (default: the model's; official checkpoints 800)")
    g.add_argument("--max-size", type=int, metavar="PX",
                   help="test resize, longer-side cap (default: the model's; official checkpoints 1333)")
    g.add_argument("--classes-per-prompt", type=int, metavar="N", help="chunk size; 0: only the 256-token limit")
    g.add_argument("--max-detections", type=_optional_int, metavar="N|none", default=argparse.SUPPRESS,
                   help="per image after merging prompts; none: no cap")
    g.add_argument("--max-detections-per-prompt", type=int, metavar="N", help="cap of each prompt's output")
    g.add_argument("--prompt-file", metavar="FILE",
                   help="class-name overrides (JSON {id: name}, [{id, name}], or one name per line; for odinw "
                        "{dataset: overrides})")
    g.add_argument("--sentences-dir", metavar="DIR", help="flickr30k: Flickr30k Entities Sentences/ (phrase types)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other protocol parameter, e.g. --set fixed_ap=true (repeatable)")
    p.add_argument("--on-bad-image", choices=("raise", "skip"), default="raise",
                   help="unreadable image: stop with an error, or skip it (counted, scored without detections)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="do not print the table")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glip eval", description="Evaluate a GLIP model with an official protocol; "
                                "writes detections.json and metrics.json and prints a table.")
    add_eval_arguments(p)
    return p


_FLAGS = {"batch_size": "batch_size", "min_size": "min_size", "max_size": "max_size",
          "classes_per_prompt": "classes_per_prompt", "max_detections_per_prompt": "max_detections_per_prompt",
          "prompt_file": "class_names", "sentences_dir": "sentences_dir"}


def protocol_from_args(args: argparse.Namespace) -> Any:
    """The protocol of the parsed options: the preset, then the explicit flags, then ``--set``."""
    from .datasets import EvaluationError

    base = get_protocol(args.protocol)
    fields = set(base.to_dict())
    overrides: dict[str, Any] = {}
    for flag, field in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            if field not in fields:
                raise EvaluationError(f"--{flag.replace('_', '-')} does not apply to the {args.protocol} protocol")
            overrides[field] = value
    if "max_detections" in vars(args):  # absent unless given (None is a value: no cap)
        overrides["max_detections"] = args.max_detections
    overrides.update(parse_overrides(base, args.set))
    return get_protocol(base, **overrides)


def load_model(args: argparse.Namespace) -> Any:
    """The model of ``--weights`` on the device, in eval mode."""
    import torch

    from glip_train import GLIP

    from .datasets import EvaluationError

    if not args.weights:
        raise EvaluationError("no weights: pass --weights PATH or set GLIP_WEIGHTS")
    device = args.device
    if device == "auto":
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        else:
            device = "cpu"
    if args.adapter and not os.path.isfile(args.adapter):
        raise EvaluationError(f"--adapter {args.adapter}: no such file")
    return GLIP.from_pretrained(args.weights, adapter=args.adapter, use_ema=args.use_ema,
                                trust_pickle=args.trust_pickle, map_location=device).eval()


def run(args: argparse.Namespace) -> int:
    """Run ``glip eval`` for parsed options; returns the exit code."""
    from ..cli import _tokenizer_of
    from .datasets import EvaluationError
    from .distributed import init_distributed_from_env
    from .runner import evaluate

    try:
        protocol = protocol_from_args(args)
        init_distributed_from_env()
        # the model loads only after every class name / phrase passed the readability check with its tokenizer
        evaluate(lambda: load_model(args), protocol, args.annotations, args.images,
                 args.out or os.path.join("eval", protocol.name),
                 tokenizer=_tokenizer_of(args.weights) if args.weights else None,
                 on_bad_image=args.on_bad_image, progress=not args.no_progress, verbose=not args.quiet)
    except (EvaluationError, ValueError, FileNotFoundError) as exc:
        print(f"glip eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
