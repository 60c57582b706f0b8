"""The ``glip`` command line: detect, ground, convert, train, eval, pseudo-label, export -- one module per command.

Run ``glip COMMAND --help`` for every option. Exit codes (also in ``glip --help``): 0 success; 1 finished, but some
inputs were skipped (each named on stderr and counted in the outputs); 2 usage error (a bad option value, a missing
or unusable input, an output another run is writing), reported before any model is loaded whenever it can be;
3 runtime failure; 130 interrupted.

Every error is one line naming the file, key or value (``GLIP_DEBUG=1`` adds the traceback); warnings of the libraries
are one line too. Every command that writes locks its output, writes files under temporary names and renames them,
and cleans the leftovers of a killed run when it starts. Nothing heavy is imported until a command runs, so ``glip
--help`` is instant.

Modules: ``_common`` (exit codes, the error boundary), ``_model`` (the model options and the one model loader),
``_images`` (what detect and ground share), and one module per command.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import convert, detect, export, ground, pseudo_label, train
from . import eval as eval_command
from ._common import (EXIT_CODES_HELP, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_SKIPPED, EXIT_USAGE, UsageError,
                      run_command)

__all__ = ["main", "build_parser", "UsageError", "EXIT_OK", "EXIT_SKIPPED", "EXIT_USAGE", "EXIT_FAILURE",
           "EXIT_INTERRUPTED"]

#: the commands in ``glip --help`` order: name -> (module, one-line summary)
COMMANDS = {
    "detect": (detect, "detect the given classes (or a prompt's phrases) in images"),
    "ground": (ground, "ground the phrases of a caption in images"),
    "convert": (convert, "convert an official .pth checkpoint into a safetensors model directory"),
    "train": (train, "train, fine-tune, prompt-tune or linear-probe (one process, or many with torchrun)"),
    "eval": (eval_command, "evaluate with an official protocol (coco, lvis-minival, flickr30k, odinw, custom)"),
    "pseudo-label": (pseudo_label, "label caption data with a teacher model (self-training)"),
    "export": (export, "export the network as ONNX or OpenVINO, for onnxruntime / OpenVINO Runtime on the CPU"),
}


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<13} {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="glip",
        description="GLIP: zero-shot detection and phrase grounding with the official GLIP checkpoints; training and "
                    "evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"commands:\n{listing}\n\n{EXIT_CODES_HELP}\n"
               "Every command that writes locks its output against a second run and writes files under temporary "
               "names, renamed when complete.\n"
               "Run `glip COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="store_true", help="print the versions of the glip packages and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, _ in COMMANDS.values():
        module.add_parser(sub)
    return parser


def _versions() -> str:
    from importlib import metadata

    parts = []
    for package in ("glip-train", "glip-fusion", "glip-encoders", "glip-data"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)  # argparse prints usage errors itself and exits 2
    if extras:  # only glip train takes its overrides anywhere on the line
        if args.command != "train":
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        train.take_unparsed(args, extras, parser)
    if args.version:
        print(_versions())
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    module = COMMANDS[args.command][0]
    command_parser = parser._subparsers._group_actions[0].choices[args.command]
    return run_command(f"glip {args.command}", lambda: module.run(args), command_parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
