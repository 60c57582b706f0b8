"""``glip convert``: an official .pth checkpoint -> a safetensors model directory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ._common import EXIT_CODES_HELP, EXIT_OK, UsageError

__all__ = ["add_parser", "run"]


DESCRIPTION = ("Read an official GLIP checkpoint (its 'model' weights, or 'model_ema' with --ema), map it strictly "
               "onto glip's modules, and write DST_DIR with config.json, model.safetensors and the tokenizer. DST_DIR "
               "is written under a temporary name beside it and renamed when complete (a killed run leaves DST_DIR as "
               "it was; the next run removes the leftovers), and locked against a second writer. Reports what was "
               "dropped.")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="official .pth -> safetensors model directory", epilog=EXIT_CODES_HELP,
                       description=DESCRIPTION)
    p.add_argument("src", metavar="SRC.pth", help="the official checkpoint (or a weights-recipe .json)")
    p.add_argument("dst", metavar="DST_DIR", help="the output directory (must not exist, or be empty)")
    p.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights instead of 'model'")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in the .pth (only for files you trust: unpickling runs code)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST_DIR")
    return p


def run(args: argparse.Namespace) -> int:
    from glip_data.io import RunLock, atomic_directory

    from ..modeling_glip import GLIP

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise UsageError(f"{src}: no such checkpoint file")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise UsageError(f"destination {dst} is not empty; pass --overwrite to replace it")
    try:
        lock = RunLock.for_output(dst.resolve(), "glip convert").acquire()
    except OSError as exc:
        raise UsageError(f"cannot write next to {dst}: {exc.strerror or exc}") from None
    try:
        model = GLIP.from_pretrained(src, use_ema=args.ema, trust_pickle=args.trust_pickle)
        with atomic_directory(dst, overwrite=args.overwrite) as staging:
            model.save_pretrained(staging)
    finally:
        lock.release()
    report = getattr(model, "load_report", None)
    if report is not None:
        print(report.summary())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"glip convert: wrote {dst}/ ({model.config.name}, {n_params:,} parameters)")
    return EXIT_OK
