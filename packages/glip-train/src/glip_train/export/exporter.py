"""Write a GLIP network as an ONNX graph or an OpenVINO model: :func:`export_model` (``glip export``).

Exporter: ``torch.onnx.export(..., dynamo=True)``, which traces the network with ``torch.export`` (symbolic sizes:
a Python branch on a size becomes a checked condition instead of a constant baked into the graph, and a size that
would be specialised fails the export rather than producing a graph that breaks at another size) and translates it
with onnxscript. The TorchScript exporter (``dynamo=False``) records every Python int computed from a size as a
constant, so the level sizes of the fusion tower and the Swin padding would be frozen at the traced image size. An
OpenVINO model is converted from the ONNX graph by OpenVINO's own ONNX reader, so both runtimes run the same graph.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from glip_data.io import RunLock, atomic_directory, atomic_write_json

from ..modeling_glip import CONFIG_NAME, TOKENIZER_DIR
from .graph import INPUT_NAMES, NetworkGraph, dynamic_shapes, example_inputs, output_names, portable_network
from .runtime import EXPORT_INFO_NAME, MODEL_FILES, RUNTIMES, ExportedGLIP, ExportError, missing_extra, open_session

__all__ = ["export_model", "check_packages", "check_target", "FORMATS", "QUANTIZATIONS", "DEFAULT_OPSET",
           "CHECK_TOLERANCE"]

#: what ``export_model(format=...)`` writes
FORMATS = tuple(MODEL_FILES)
#: ``quantize=`` choices: None (float32) or "int8"
QUANTIZATIONS = (None, "int8")
#: the ONNX opset of the graph (GridSample: 16, LayerNormalization: 17; 19 allows the DeformConv operator)
DEFAULT_OPSET = 19
#: the largest relative difference (max |exported - eager| / max |eager|, per output) a float32 export may show on
#: the check inputs: float32 rounding of a deep network is ~1e-5; a wrong graph is off by O(1)
CHECK_TOLERANCE = 1e-3


def check_packages(fmt: str) -> None:
    """Raise :class:`ExportError` (with the install command) when a package writing or running ``fmt`` is missing."""
    for package in ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ("onnx", "onnxscript", "openvino"):
        try:
            __import__(package)
        except ImportError:
            raise missing_extra(package, fmt) from None


def check_target(directory: str | Path, overwrite: bool = False) -> None:
    """Whether an export may be written to ``directory``: new, empty, or (with ``overwrite``) an earlier export.

    Raises:
        FileExistsError: ``directory`` is a file, holds something that is not an export (never replaced, so a wrong
            ``-o`` cannot delete a folder of other files), or holds an export and ``overwrite`` is False.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / EXPORT_INFO_NAME).is_file():
        raise FileExistsError(f"{directory} is not empty and holds no exported model: export into a new or empty "
                              "folder")
    if not overwrite:
        raise FileExistsError(f"{directory} already holds an exported model; pass overwrite=True to replace it")


def export_model(
    model: Any,
    directory: str | Path,
    format: str = "onnx",
    *,
    quantize: str | None = None,
    deform: str = "grid_sample",
    opset: int = DEFAULT_OPSET,
    optimize: bool = True,
    overwrite: bool = False,
    check: bool = True,
    source: str | None = None,
) -> Path:
    """Export the network of ``model`` to ``directory``.

    Writes ``model.onnx`` (+ ``model.onnx.data``, the weights) or ``model.xml`` + ``model.bin`` (OpenVINO), the
    model's ``config.json`` and ``tokenizer/``, and last ``export.json``. Inputs: :data:`~.graph.INPUT_NAMES`, with
    dynamic batch, image height and width (multiples of the size divisibility) and text length; outputs: the head's
    (:func:`~.graph.output_names`). The processor stays in Python: load the folder with
    :class:`~glip_train.export.ExportedGLIP` (``glip detect --weights DIR/model.onnx``).

    Args:
        model: a :class:`glip_train.GLIP` (adapters included: load them first), or a float32 ONNX export
            (:class:`~glip_train.export.ExportedGLIP`) to convert to OpenVINO or to int8 without tracing again.
        format: "onnx" (run by onnxruntime) or "openvino" (OpenVINO Runtime).
        quantize: None (float32) or "int8" (:mod:`glip_train.export.quantize`: int8 weights of the matrix
            products, data-free).
        deform: the deformable convolution in the graph (:data:`~.graph.DEFORM_CHOICES`): "grid_sample" (plain
            ops, every runtime) or "torchvision" (the ONNX ``DeformConv`` operator, onnxruntime only).
        opset: the ONNX opset.
        optimize: run the ONNX exporter's graph optimizer (constant folding, fewer shape operations; the runtimes
            optimize the graph again when they load it, so it changes the file, not the speed).
        overwrite: replace an export already in ``directory``.
        check: run the written model once on the trace inputs and compare it with the source (the eager network, or
            the ONNX export converted from); float32: every output within :data:`CHECK_TOLERANCE` relative, else
            :class:`ExportError`. The errors go to ``export.json`` either way.
        source: what the weights were (recorded in ``export.json``).

    Returns:
        the model file (``directory / "model.onnx"`` or ``directory / "model.xml"``).

    Raises:
        ExportError: a missing optional package (with the install command), a graph the runtime cannot load, or a
            failed check. FileExistsError: see :func:`check_target`.
        glip_data.io.OutputLockedError: another export writes to ``directory``.
    """
    from ..modeling_glip import GLIP

    if isinstance(model, ExportedGLIP):
        if model.format != "onnx" or model.info.get("precision") != "fp32":
            raise ValueError(f"{model.path}: only a float32 ONNX export converts to another format or precision; "
                             "export the PyTorch weights instead")
    elif not isinstance(model, GLIP):
        raise TypeError(f"export_model exports a glip_train.GLIP or a float32 ONNX export; got "
                        f"{type(model).__name__}")
    elif model.device.type != "cpu":
        raise ValueError(f"the model is on {model.device}: export from the CPU (model.to('cpu'))")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {format!r}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS}; got {quantize!r}")
    if format == "openvino" and deform != "grid_sample":
        raise ValueError("OpenVINO cannot read the ONNX DeformConv operator: export it with deform='grid_sample'")
    check_packages(format)
    directory = Path(directory)
    # the lock file lies beside the folder, which is written whole under a temporary name and renamed into place:
    # a killed export leaves the folder as it was (the next export removes the leftovers)
    with RunLock.for_output(directory.resolve(), "glip export"):
        check_target(directory, overwrite)
        with atomic_directory(directory, overwrite=True) as staging:
            info = _write(model, staging, format, quantize, deform, opset, optimize, check)
            info["source"] = source
            atomic_write_json(staging / EXPORT_INFO_NAME, info)
    return directory / MODEL_FILES[format]


def _write(model, staging: Path, fmt: str, quantize: str | None, deform: str, opset: int, optimize: bool,
           check: bool) -> dict[str, Any]:
    """Fill ``staging`` with the model file(s), config and tokenizer; return the export record."""
    levels = len(model.config.anchor_strides)
    inputs = example_inputs(model)
    graph_dir = staging / "onnx"  # the float32 ONNX graph, whatever the format written
    graph_dir.mkdir()
    if isinstance(model, ExportedGLIP):
        reference = _run(model._session, inputs, levels)
        for item in model.path.parent.glob(model.path.name + "*"):  # model.onnx and model.onnx.data
            shutil.copy2(item, graph_dir / item.name)
        graph = graph_dir / model.path.name
        forms = {key: model.info.get(key) for key in ("attention", "deformable_convolution", "opset", "exporter")}
    else:
        graph = graph_dir / MODEL_FILES["onnx"]
        with torch.no_grad():
            training = model.training
            try:  # the model's own settings, in eval mode: what users run
                reference = list(NetworkGraph(model.eval())(*inputs))
            finally:
                model.train(training)
            with portable_network(model, deform) as attention:
                trace_onnx(NetworkGraph(model), inputs, dynamic_shapes(model), graph, opset, output_names(levels),
                           optimize)
        forms = {"attention": attention, "deformable_convolution": deform, "opset": opset,
                 "exporter": f"torch.onnx.export(dynamo=True, optimize={optimize}), torch {torch.__version__}"}
    quantization = None
    if fmt == "openvino":
        with quiet():
            quantization = _convert_openvino(graph, staging / MODEL_FILES["openvino"], quantize)
    elif quantize == "int8":
        from .quantize import quantize_onnx_int8

        with quiet():
            quantization = quantize_onnx_int8(graph, staging / MODEL_FILES["onnx"])
    else:
        for item in graph_dir.iterdir():
            os.replace(item, staging / item.name.replace(graph.name, MODEL_FILES["onnx"], 1))
    shutil.rmtree(graph_dir)
    model.tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
    model.config.replace(tokenizer=None).save(staging / CONFIG_NAME)  # the folder's own tokenizer/ wins
    errors = _compare(open_session(fmt, staging / MODEL_FILES[fmt]), inputs, reference)
    if check and quantize is None and max(errors.values()) > CHECK_TOLERANCE:
        worst = max(errors, key=errors.get)
        raise ExportError(f"the exported graph differs from its source: {worst} relative error "
                          f"{errors[worst]:.2e} > {CHECK_TOLERANCE:g} on the check inputs")
    from .. import __version__

    return {
        "format": fmt,
        "file": MODEL_FILES[fmt],
        "runtime": RUNTIMES[fmt],
        "precision": quantize or "fp32",
        "quantization": quantization,
        "inputs": list(INPUT_NAMES),
        "outputs": output_names(levels),
        "dynamic_axes": {"batch": "pixel_values:0", "height": "pixel_values:2 (multiple of the size divisibility)",
                         "width": "pixel_values:3", "text_length": "input_ids:1 (2 .. max_text_len)"},
        **forms,
        "adapter": _adapter_record(model),
        "check_relative_error": errors,
        "glip_train": __version__,
        "date": _dt.date.today().isoformat(),
    }


def _adapter_record(model) -> Any:
    if isinstance(model, ExportedGLIP):
        return model.info.get("adapter")
    info = getattr(model, "adapter_info", None)
    return None if info is None else {k: info.get(k) for k in ("kind", "base", "base_fingerprint")}


@contextlib.contextmanager
def quiet():
    """Keep the tools' progress lines, log records and warnings (exporter, quantizers, OpenVINO) from the user's
    terminal: a failure still raises, and the caller turns it into one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def trace_onnx(graph: torch.nn.Module, inputs: tuple[torch.Tensor, ...], shapes: dict, path: Path,
               opset: int, outputs: list[str], optimize: bool = True) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``graph`` with the weights beside it (``<path>.data``), quietly: the
    exporter's progress lines and warnings are kept for the error message only."""
    try:
        with quiet():
            torch.onnx.export(graph, inputs, str(path), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=outputs,
                              external_data=True, optimize=optimize, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; one message names the failure
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ExportError(f"torch.onnx.export failed: {last[:300]}") from exc


def _convert_openvino(onnx_file: Path, xml_file: Path, quantize: str | None):
    """OpenVINO's reading of the ONNX graph, saved with float32 weights (``model.xml`` + ``model.bin``); int8 through
    :func:`glip_train.export.quantize.quantize_openvino_int8`. Returns the quantization record (None for fp32)."""
    import openvino as ov

    try:
        ov_model = ov.convert_model(str(onnx_file))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise ExportError(f"OpenVINO cannot convert the ONNX graph: {str(exc).strip().splitlines()[-1][:300]}") \
            from None
    record = None
    if quantize == "int8":
        from .quantize import quantize_openvino_int8

        ov_model, record = quantize_openvino_int8(ov_model)
    ov.save_model(ov_model, str(xml_file), compress_to_fp16=False)  # the default would halve the weights
    return record


def _run(session, inputs, levels: int) -> list[torch.Tensor]:
    """A runtime session's outputs on the trace inputs, in :func:`output_names` order."""
    result = session.run({name: tensor.numpy() for name, tensor in zip(INPUT_NAMES, inputs)})
    return [torch.from_numpy(result[name]) for name in output_names(levels)]


def _compare(session, inputs, reference: list[torch.Tensor]) -> dict[str, float]:
    """Per output, ``max |exported - reference| / max |reference|`` on the trace inputs."""
    from ..testing import relative_error

    names = output_names(len(reference) // 3)
    ours = _run(session, inputs, len(reference) // 3)
    return {name: float(relative_error(a, b)) for name, a, b in zip(names, ours, reference)}
