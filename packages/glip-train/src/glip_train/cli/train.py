"""``glip train``: train, fine-tune, prompt-tune or linear-probe (the command line of :mod:`glip_train.training`)."""
from __future__ import annotations

import argparse

import sys

from ._common import EXIT_CODES_HELP, EXIT_OK, EXIT_SKIPPED, UsageError

__all__ = ["add_parser", "run", "take_unparsed"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="train, fine-tune, prompt-tune or linear-probe a GLIP model",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES_HELP,
        description="Train from a YAML/JSON config (see docs/training.md), with dotted key=value overrides:\n"
                    "  glip train tiny_synth schedule.max_iter=50        (a shipped config)\n"
                    "  glip train my_run.yaml optim.lr=2e-4 data.batch_size=4 ema=none\n"
                    "Values read as in YAML: none/null, true/false, numbers (1e-4), 'quoted text', [lists].\n"
                    "Fine-tune on a COCO-format dataset without writing a config:\n"
                    "  glip train --coco train.json --images DIR --val val.json --val-images DIR --init default\n"
                    "--init names the model to start from: default (the model shipped with glip-train), an official\n"
                    "GLIP .pth, or a folder written by glip convert / glip train. The run's length, warm-up and\n"
                    "training sizes fit your data unless given; the model keeps its test size; the settings that\n"
                    "differ from the recipe are printed at the start. Overrides may go anywhere on the line.\n"
                    "Running the same command again resumes from the last checkpoint of output_dir; a second run\n"
                    "into an output_dir in use is refused. Annotations the readers drop and missing or unreadable images are named on stderr,\n"
                    "listed in output_dir/skipped.json and make the exit code 1. Several processes:\n"
                    "  torchrun --nproc_per_node=N -m glip_train.cli train CONFIG (gloo on CPU, NCCL on GPU).")
    p.add_argument("config", nargs="?", metavar="CONFIG", help="a training config (.yaml / .json) or a shipped name")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=4")
    p.add_argument("--coco", metavar="FILE", help="fine-tune on this COCO-format training file (fixed class-order "
                                                  "prompt, the official COCO fine-tuning recipe)")
    p.add_argument("--images", metavar="DIR", help="image folder of --coco (default: the file's folder)")
    p.add_argument("--val", metavar="FILE", help="COCO-format validation file for --coco")
    p.add_argument("--val-images", metavar="DIR", help="image folder of --val")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="weights to start from (official .pth, model directory, recipe, or 'default': the shipped "
                        "model)")
    p.add_argument("--mode", choices=("full", "prompt_tuning", "linear_probe"), help="what trains [full]")
    p.add_argument("-o", "--output", metavar="DIR", help="output_dir of the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar (the settings and the summary are still "
                                                        "printed)")
    p.add_argument("--monitor", type=int, metavar="N",
                   help="every N steps, log what drifts when training becomes unstable to output_dir/metrics.jsonl "
                        "('event': 'stability': per-part gradient and update norms, fusion attention logits, layer "
                        "scales, token-logit bias, text activations; docs/training.md). The weights are unchanged")
    return p


def take_unparsed(args: argparse.Namespace, extras: list[str], parser: argparse.ArgumentParser) -> None:
    """``glip train`` takes its ``key=value`` overrides (and its config) anywhere among the options: argparse hands
    the ones after an option back unparsed."""
    for token in extras:
        if "=" in token and not token.startswith("-"):
            args.overrides.append(token)
        elif args.config is None and not token.startswith("-"):
            args.config = token
        else:
            parser.error(f"unrecognized arguments: {token}")


def run(args: argparse.Namespace) -> int:
    from ..training import Trainer, load_train_config
    from ..training.finetune import coco_finetune_config
    from ..training.monitor import StabilityMonitor

    if args.monitor is not None and args.monitor < 1:
        raise UsageError(f"--monitor {args.monitor}: give a number of steps >= 1")
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
    hooks = [StabilityMonitor(every=args.monitor)] if args.monitor else []
    result = Trainer(config, progress=not args.quiet, recipe=recipe, hooks=hooks).train()
    where = result.model_dir or result.adapter  # None on the other processes of a distributed run
    if where is not None:
        print(result.summary())  # also with --quiet, which only hides the progress bar
        if result.skipped:
            print(f"glip train: {result.skipped.summary()}; all listed in {result.output_dir / 'skipped.json'}",
                  file=sys.stderr)
    return result.skipped.exit_code(EXIT_OK, EXIT_SKIPPED)
