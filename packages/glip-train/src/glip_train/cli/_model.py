"""The one way every command that runs a model (detect, ground, eval, pseudo-label, export) finds, checks and loads it.

* ``--weights``: a path; ``default`` (the model shipped with glip-train); absent: ``$GLIP_WEIGHTS``, else the shipped
  model. The same fallback for every command and for ``python -m glip_train.evaluation``. A model written by
  ``glip export`` (its folder, ``DIR/model.onnx`` or ``DIR/model.xml``) loads as a
  :class:`glip_train.export.ExportedGLIP`, run by onnxruntime / OpenVINO Runtime on the CPU.
* ``--adapter``, ``--use-ema``, ``--trust-pickle``: passed to :meth:`glip_train.GLIP.from_pretrained`.
* ``--device``: ``auto`` is ``cuda:$LOCAL_RANK`` (0 outside ``torchrun``) when CUDA is available, else ``cpu``;
  ``--dtype``: the autocast precision where a command offers it.

:func:`check_model_options` resolves and checks all of them without loading anything, so a command can check every
input before :func:`load_model` spends the time.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._common import UsageError

__all__ = ["DTYPES", "ModelChoice", "add_model_options", "check_model_options", "choose_device", "load_model",
           "resolve_weights", "text_side"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
WEIGHTS_HELP = (
    "model weights: an official GLIP .pth (GLIP-T, GLIP-T(A), GLIP-L), a directory written by `glip convert` / "
    "`glip train` / save_pretrained, a weights-recipe .json (synthetic weights: meaningless boxes), or 'default' "
    "(the small model shipped with glip-train, which knows only glip-data's synthetic shapes), or a model written by "
    "`glip export` (DIR/model.onnx, or the OpenVINO DIR: run on the CPU by its runtime). "
    "Default: $GLIP_WEIGHTS, else 'default'"
)


def add_model_options(p: argparse.ArgumentParser, *, dtype: bool = True, device: bool = True) -> None:
    """The options of loading a model (one group in ``--help``)."""
    g = p.add_argument_group("model")
    g.add_argument("--weights", metavar="PATH", help=WEIGHTS_HELP)
    g.add_argument("--adapter", metavar="FILE",
                   help="a prompt-tuning / linear-probe adapter trained on --weights (glip train --mode ...)")
    g.add_argument("--use-ema", action="store_true", help="official .pth only: load the 'model_ema' weights")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in a .pth (only for files you trust: unpickling runs code)")
    if device:
        g.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N, or auto (cuda when available; under torchrun cuda:LOCAL_RANK; an "
                            "exported model: cpu) [auto]")
    if dtype:
        g.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                       help="compute precision (autocast); post-processing always runs in fp32 [fp32]")


def resolve_weights(spec: str | None) -> str:
    """The weights ``--weights`` names (see the module doc), checked to exist."""
    from ..shipped import SHIPPED_NAME, default_model_dir

    spec = spec or os.environ.get("GLIP_WEIGHTS") or SHIPPED_NAME
    if spec == SHIPPED_NAME:
        shipped = default_model_dir()
        if shipped is None:
            raise UsageError("this installation has no shipped model: pass --weights PATH or set GLIP_WEIGHTS")
        return str(shipped)
    if not Path(spec).exists():
        raise UsageError(f"--weights {spec}: no such file or directory")
    return spec


def choose_device(name: str) -> Any:
    """The ``torch.device`` of ``--device`` (see the module doc), checked against this machine."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class ModelChoice:
    """The resolved model options: what :func:`load_model` will load, where, in which precision."""

    weights: str
    device: Any
    dtype: Any
    #: ``weights`` is a model written by ``glip export`` (run by its runtime, on the CPU)
    exported: bool = False


def check_model_options(args: argparse.Namespace) -> ModelChoice:
    """Resolve and check the model options without loading anything (a usage error names the option)."""
    import torch

    from ..export.runtime import is_exported

    weights = resolve_weights(args.weights)
    adapter = getattr(args, "adapter", None)
    dtype = getattr(args, "dtype", "fp32")
    if is_exported(weights):
        _export_folder(weights)  # a damaged export is reported now, before any other work
        if adapter or getattr(args, "use_ema", False):
            raise UsageError(f"--weights {weights} is an exported model, which holds the weights it was exported "
                             f"with: pass {'--adapter' if adapter else '--use-ema'} to glip export instead")
        if dtype != "fp32":
            raise UsageError(f"--dtype {dtype}: an exported model runs in the precision it was exported with; "
                             "drop --dtype (or export with --int8)")
        if getattr(args, "device", "cpu") not in ("auto", "cpu"):
            raise UsageError(f"--device {args.device}: an exported model runs on the CPU (its runtime); use the "
                             "PyTorch weights for a GPU")
        return ModelChoice(weights, torch.device("cpu"), torch.float32, exported=True)
    if adapter and not Path(adapter).is_file():
        raise UsageError(f"--adapter {adapter}: no such file")
    device = choose_device(getattr(args, "device", "cpu"))
    return ModelChoice(weights, device, getattr(torch, DTYPES[dtype]))


def _export_folder(weights: str) -> Path:
    """The folder of an exported model (its config and tokenizer), checked; a usage error names what is wrong."""
    from ..export.runtime import ExportError, resolve_export

    try:
        return resolve_export(weights)[0]
    except ExportError as exc:
        raise UsageError(str(exc)) from None


def load_model(args: argparse.Namespace, choice: ModelChoice) -> Any:
    """The model of ``choice`` on its device, in eval mode (an :class:`~glip_train.export.ExportedGLIP` for an
    exported model)."""
    from ..modeling_glip import GLIP

    if choice.exported:
        from ..export.runtime import ExportedGLIP, ExportError

        try:  # a missing runtime package or a graph the runtime cannot read: the input's fault, one line
            return ExportedGLIP.from_pretrained(choice.weights)
        except ExportError as exc:
            raise UsageError(str(exc)) from None

    model = GLIP.from_pretrained(choice.weights, adapter=getattr(args, "adapter", None),
                                 use_ema=getattr(args, "use_ema", False), trust_pickle=args.trust_pickle,
                                 map_location=choice.device)
    return model.to(choice.device).eval()


def text_side(weights: str) -> tuple[Any, int]:
    """``(tokenizer, max_text_len)`` of the model at ``weights``, read without its weights (to check prompts and class
    names before the model loads)."""
    from glip_encoders import load_tokenizer

    from ..export.runtime import is_exported
    from ..modeling_glip import CONFIG_NAME, TOKENIZER_DIR, bundled_tokenizer_dir

    folder = _export_folder(weights) if is_exported(weights) else Path(weights)
    max_text_len = 256  # the official checkpoints'
    if folder.is_dir() and (folder / CONFIG_NAME).is_file():
        try:
            max_text_len = int(json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("max_text_len", 256))
        except (ValueError, TypeError, AttributeError):
            pass  # a damaged config is reported, with its file, when the model loads
    if folder.is_dir() and (folder / TOKENIZER_DIR).is_dir():
        return load_tokenizer(folder / TOKENIZER_DIR), max_text_len
    return load_tokenizer(bundled_tokenizer_dir()), max_text_len
