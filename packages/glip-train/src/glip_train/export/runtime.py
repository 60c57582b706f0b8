"""Run an exported GLIP network with onnxruntime or OpenVINO Runtime on the CPU: :class:`ExportedGLIP`.

An exported folder (written by :func:`glip_train.export.export_model`, ``glip export``) holds the graph
(``model.onnx`` [+ ``model.onnx.data``], or OpenVINO's ``model.xml`` + ``model.bin``), the model's ``config.json``
and ``tokenizer/``, and ``export.json`` (what was exported and how; the folder is written whole under a temporary
name and renamed into place, so a folder with it is complete). :class:`ExportedGLIP` loads such a folder and has what the processor and the inference loop use
from a :class:`glip_train.GLIP` (``config``, ``tokenizer``, ``processor``, ``device``, ``encode_images``, the call
returning a :class:`~glip_train.GLIPOutput`), so ``detect``, ``ground``, evaluation and pseudo-labelling run it
unchanged.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..box_ops import AnchorGenerator
from ..model_config import GLIPConfig
from ..head import HeadOutput
from ..modeling_glip import CONFIG_NAME, GLIP, TOKENIZER_DIR, GLIPOutput
from .graph import INPUT_NAMES, OUTPUT_GROUPS, output_names

__all__ = ["ExportedGLIP", "ExportError", "EXPORT_INFO_NAME", "MODEL_FILES", "RUNTIMES", "is_exported",
           "resolve_export", "open_session"]

#: what an export writes last: the record of the export (format, file, precision, exporter, check)
EXPORT_INFO_NAME = "export.json"
#: the model file of each format, inside the export folder
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
#: the runtime that runs each format
RUNTIMES = {"onnx": "onnxruntime", "openvino": "OpenVINO Runtime"}
#: the optional extra that installs each format's packages
EXTRAS = {"onnx": "onnx", "openvino": "openvino"}


class ExportError(RuntimeError):
    """An export that cannot be written or read; the message names the file or the missing package."""


def missing_extra(package: str, fmt: str) -> ExportError:
    """The error for a missing optional package (one line, with the install command)."""
    return ExportError(f"the {fmt} format needs the package {package}, which is not installed: "
                       f"pip install 'glip-train[{EXTRAS[fmt]}]'")


def resolve_export(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """``(folder, model file, export record)`` of an exported model named by its folder or its model file.

    Raises:
        ExportError: ``path`` is not an export written by :func:`glip_train.export.export_model` (no
            ``export.json`` beside it, or another file than the one it records).
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    info_file = folder / EXPORT_INFO_NAME
    if not info_file.is_file():
        raise ExportError(f"{path}: not an exported GLIP model (no {EXPORT_INFO_NAME} in {folder}; write one with "
                          "glip export)")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
        fmt, file = info["format"], info["file"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{info_file}: not a valid export record ({exc})") from None
    if fmt not in MODEL_FILES:
        raise ExportError(f"{info_file}: unknown format {fmt!r}; expected one of {sorted(MODEL_FILES)}")
    model_file = folder / file
    if not path.is_dir() and path.resolve() != model_file.resolve():
        raise ExportError(f"{path}: the export in {folder} is {model_file.name}, not {path.name}")
    if not model_file.is_file():
        raise ExportError(f"{model_file}: missing (the export record {info_file} names it)")
    return folder, model_file, info


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` names an exported model (its folder, or its model file with ``export.json`` beside it)."""
    path = Path(path)
    if path.is_dir():
        return (path / EXPORT_INFO_NAME).is_file()
    return path.suffix in (".onnx", ".xml") and (path.parent / EXPORT_INFO_NAME).is_file()


class _OnnxRuntimeSession:
    """An onnxruntime CPU session: ``run(feeds) -> {output name: array}``."""

    def __init__(self, model_file: Path, threads: int | None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_extra("onnxruntime", "onnx") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the runtime's warnings are not the user's business
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ExportError(f"{model_file}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(None, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, values))


class _OpenVINOSession:
    """An OpenVINO Runtime CPU model compiled for float32 inference (no automatic bf16): ``run(feeds)``."""

    def __init__(self, model_file: Path, threads: int | None):
        try:
            import openvino as ov
        except ImportError:
            raise missing_extra("openvino", "openvino") from None
        # float32 unless the weights say otherwise: on CPUs with bf16 units OpenVINO would otherwise run in bf16
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(model_file), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise ExportError(f"{model_file}: OpenVINO cannot load it ({str(exc).splitlines()[0][:200]})") from None
        self.input_names = [_port_name(i, INPUT_NAMES) for i in self.compiled.inputs]
        self.output_names = [_port_name(o, OUTPUT_GROUPS) for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._request.infer({name: feeds[name] for name in self.input_names})
        return {name: np.asarray(result[o]) for name, o in zip(self.output_names, self.compiled.outputs)}


def _port_name(port, wanted: Sequence[str]) -> str:
    """The graph's name of an OpenVINO input or output: the one of its tensor names that is ``wanted`` (or starts
    with a wanted group name). OpenVINO folds no-op nodes into the tensors around them, and a tensor then carries
    their names too (GLIP-T's ``pixel_values`` is also ``pad``, the patch embedding's zero padding), so
    ``get_any_name()`` may return another one."""
    names = port.get_names()
    for name in sorted(names):
        if name in wanted or any(name.startswith(group + "_") for group in wanted):
            return name
    return port.get_any_name()


def open_session(fmt: str, model_file: str | Path, threads: int | None = None):
    """The runtime session of a model file of format ``fmt`` (``"onnx"``: onnxruntime, ``"openvino"``)."""
    sessions = {"onnx": _OnnxRuntimeSession, "openvino": _OpenVINOSession}
    return sessions[fmt](Path(model_file), threads)


class ExportedGLIP:
    """A GLIP network exported by :func:`glip_train.export.export_model`, run by onnxruntime or OpenVINO on the CPU.

    ``detect``, ``ground``, the processor and the inference loop are :class:`glip_train.GLIP`'s own; only the
    network pass runs in the runtime. The graph returns the head's outputs; the anchors are rebuilt here from the
    output sizes. :meth:`encode_images` only carries the pixels (the whole network is one graph, so a prompt round
    runs the image encoder again).

    Attributes:
        config, tokenizer: the exported model's (``config.json``, ``tokenizer/`` of the folder).
        info: the export record (``export.json``: format, precision, exporter, graph forms, the check's errors).
        path: the model file.
    """

    training = False
    # the model API of GLIP, reused as it is: the processor property and the detect / ground compositions only
    # touch config, tokenizer, processor, device, encode_images and the call
    processor = GLIP.processor
    detect = GLIP.detect
    ground = GLIP.ground

    def __init__(self, session: Any, config: GLIPConfig, tokenizer: Any, info: dict[str, Any], path: Path):
        self._session = session
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.path = path
        self._processor = None
        self.anchor_generator = AnchorGenerator(config.anchor_sizes, config.anchor_strides)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, threads: int | None = None) -> "ExportedGLIP":
        """Load an exported model from its folder or its model file (``DIR/model.onnx``, ``DIR/model.xml``).

        Args:
            threads: the runtime's intra-op threads (None: the runtime's default, every core).

        Raises:
            ExportError: not an export, a missing file or runtime package (with the install command).
        """
        from glip_encoders import load_tokenizer

        folder, model_file, info = resolve_export(path)
        try:
            config = GLIPConfig.load(folder / CONFIG_NAME)
        except (OSError, ValueError) as exc:
            raise ExportError(str(exc)) from None
        tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
        return cls(open_session(info["format"], model_file, threads), config, tokenizer, info, model_file)

    @property
    def format(self) -> str:
        """``"onnx"`` or ``"openvino"``."""
        return self.info["format"]

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def eval(self) -> "ExportedGLIP":
        return self

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> "ExportedGLIP":
        """Only the CPU: the runtimes run the graph there."""
        if device is not None and torch.device(device).type != "cpu":
            raise ExportError(f"an exported model runs on the CPU ({RUNTIMES[self.format]}), not on {device}; "
                              "use the PyTorch weights for a GPU")
        return self

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` -> ``[images]``: the "features" the call takes back (the graph encodes them itself)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W); got {tuple(images.shape)}")
        return [images]

    def __call__(self, *args: Any, **kwargs: Any) -> GLIPOutput:
        return self.forward(*args, **kwargs)

    def forward(self, images: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_sizes: Sequence[tuple[int, int]] | None = None,
                *, image_features: Sequence[torch.Tensor] | None = None) -> GLIPOutput:
        """The network pass in the runtime: :meth:`glip_train.GLIP.forward`'s arguments (no training targets).

        Returns a :class:`~glip_train.GLIPOutput` with the head's ``box_regression``, ``centerness`` and
        ``token_logits``, the anchors, the text mask and the image sizes; the intermediate features stay inside the
        graph (``fpn_features`` is empty, the text and ``proj_tokens`` are None).
        """
        if input_ids is None or attention_mask is None:
            raise ValueError("forward needs input_ids and attention_mask (see GLIPProcessor.tokenize)")
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images and image_features")
        pixels = images if image_features is None else image_features[0]
        batch, height, width = pixels.shape[0], pixels.shape[-2], pixels.shape[-1]
        divisor = self.config.size_divisibility
        if height % divisor or width % divisor:
            raise ValueError(f"images of {height}x{width} are not padded to a multiple of {divisor} (the exported "
                             "graph's size unit; GLIPProcessor.preprocess pads them)")
        if input_ids.shape[0] != batch:
            raise ValueError(f"{batch} images but {input_ids.shape[0]} texts")
        if not 2 <= input_ids.shape[1] <= self.config.max_text_len:
            raise ValueError(f"text of {input_ids.shape[1]} tokens: the exported graph takes 2 to "
                             f"{self.config.max_text_len}")
        sizes = [(height, width)] * batch if image_sizes is None else [(int(h), int(w)) for h, w in image_sizes]
        feeds = {
            INPUT_NAMES[0]: np.ascontiguousarray(pixels.detach().cpu().float().numpy()),
            INPUT_NAMES[1]: np.ascontiguousarray(input_ids.detach().cpu().to(torch.int64).numpy()),
            INPUT_NAMES[2]: np.ascontiguousarray(attention_mask.detach().cpu().to(torch.int64).numpy()),
            INPUT_NAMES[3]: np.asarray(sizes, dtype=np.int64).reshape(batch, 2),
        }
        outputs = self._session.run(feeds)
        levels = len(self.config.anchor_strides)
        tensors = [torch.from_numpy(outputs[name]) for name in output_names(levels)]
        box_regression, centerness, token_logits = tensors[:levels], tensors[levels:2 * levels], tensors[2 * levels:]
        anchors = self.anchor_generator([tuple(b.shape[-2:]) for b in box_regression])
        head = HeadOutput(box_regression=box_regression, centerness=centerness, token_logits=token_logits,
                          proj_tokens=None, features=[], lang_hidden=None)
        return GLIPOutput(head=head, fpn_features=[], backbone_features=None, text_hidden=None, text_embedded=None,
                          text_mask=attention_mask.bool(), anchors=anchors, image_sizes=sizes)
