"""``glip export``: the network as an ONNX graph or an OpenVINO model (:func:`glip_train.export.export_model`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import EXIT_CODES_HELP, EXIT_OK, UsageError
from ._model import add_model_options, check_model_options, load_model

__all__ = ["add_parser", "run"]

DESCRIPTION = (
    "Export the network of --weights (an adapter included) as an ONNX graph (run by onnxruntime) or an OpenVINO model "
    "(OpenVINO Runtime), with dynamic batch, image size and text length; the image and text processing stay in "
    "Python. Writes DIR/model.onnx (+ model.onnx.data) or DIR/model.xml + model.bin, with the model's config.json, "
    "tokenizer/ and export.json (what was exported, and the check of the written model against its source). Run it "
    "with `glip detect/ground/eval --weights DIR/model.onnx` (or the OpenVINO DIR). DIR is written whole under a "
    "temporary name and renamed when complete, and locked against a second writer; an export of the same weights, "
    "format and precision already in DIR is left as it is, another one is replaced only with --overwrite. "
    "Needs the optional packages: pip install 'glip-train[onnx]' or 'glip-train[openvino]'."
)


#: the help of the export options
OPTION_HELP = {
    "int8": "int8 weights of the matrix products (onnxruntime dynamic quantization; OpenVINO: NNCF weight "
            "compression); faster, with the accuracy cost measured in docs/deploy.md",
    "deform": "the deformable convolution in the graph: GridSample + MatMul (every runtime) or ONNX's DeformConv "
              "operator (onnxruntime only) [grid_sample]",
    "no_optimize": "skip the ONNX exporter's graph optimizer (half the export time; the runtimes optimize the graph "
                   "when they load it, so the speed is the same)",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="ONNX / OpenVINO model for onnxruntime / OpenVINO Runtime",
                       epilog=EXIT_CODES_HELP, description=DESCRIPTION)
    p.add_argument("--format", required=True, choices=("onnx", "openvino"), help="the model format")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the export folder (new, empty, or an export)")
    p.add_argument("--int8", action="store_true", help=OPTION_HELP["int8"])
    p.add_argument("--deform", choices=("grid_sample", "torchvision"), default="grid_sample",
                   help=OPTION_HELP["deform"])
    p.add_argument("--no-optimize", action="store_true", help=OPTION_HELP["no_optimize"])
    p.add_argument("--overwrite", action="store_true", help="replace another export already in DIR")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    add_model_options(p, dtype=False, device=False)
    return p


def _source(args: argparse.Namespace, weights: str) -> str:
    """What the weights are, as ``export.json`` records it (and an earlier export is compared by)."""
    parts = [str(Path(weights).resolve())]
    if args.adapter:
        parts.append(f"adapter {Path(args.adapter).resolve()}")
    if args.use_ema:
        parts.append("model_ema")
    return " + ".join(parts)


def _same_export(folder: Path, wanted: dict) -> bool:
    """Whether ``folder`` holds an export of what ``wanted`` describes (format, precision, source, graph form)."""
    from ..export.runtime import EXPORT_INFO_NAME

    try:
        info = json.loads((folder / EXPORT_INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(info.get(key) == value for key, value in wanted.items())


def run(args: argparse.Namespace) -> int:
    from ..export.exporter import check_packages, check_target, export_model
    from ..export.runtime import EXPORT_INFO_NAME, ExportError

    if args.format == "openvino" and args.deform != "grid_sample":
        raise UsageError("--deform torchvision: OpenVINO cannot read ONNX's DeformConv; use --deform grid_sample")
    try:
        check_packages(args.format)
    except ExportError as exc:
        raise UsageError(str(exc)) from None
    choice = check_model_options(args)
    folder = Path(args.output)
    wanted = {"format": args.format, "precision": "int8" if args.int8 else "fp32",
              "source": _source(args, choice.weights)}
    if not choice.exported:  # converting an export keeps its graph forms
        wanted["deformable_convolution"] = args.deform
    if folder.is_dir() and _same_export(folder, wanted) and not args.overwrite:
        if not args.quiet:
            print(f"glip export: {folder}/ already holds this export (pass --overwrite to write it again)")
        return EXIT_OK
    check_target(folder, args.overwrite)  # before the model loads; checked again under the lock
    model = load_model(args, choice)
    written = export_model(model, folder, args.format, quantize="int8" if args.int8 else None, deform=args.deform,
                           optimize=not args.no_optimize, overwrite=args.overwrite, source=wanted["source"])
    if not args.quiet:
        errors = json.loads((folder / EXPORT_INFO_NAME).read_text(encoding="utf-8"))["check_relative_error"]
        print(f"glip export: wrote {written} ({args.format}, {wanted['precision']}; largest relative difference "
              f"from the source on the check inputs {max(errors.values()):.1e})")
    return EXIT_OK
