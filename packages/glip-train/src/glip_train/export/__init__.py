"""Deploy GLIP outside PyTorch: export the network to ONNX or OpenVINO and run it with onnxruntime or OpenVINO
Runtime on the CPU (``docs/deploy.md``).

* :func:`export_model` (``glip export --weights W --format onnx|openvino -o DIR``) writes the network (inputs: pixel
  values, token ids, attention mask, image sizes; outputs: the head's) with dynamic batch, image size and text
  length, beside the model's config and tokenizer; ``quantize="int8"`` writes an int8 model.
* :class:`ExportedGLIP` (``glip detect/ground/eval --weights DIR/model.onnx``) runs it with the processor, the
  inference loop, ``detect`` and ``ground`` of :class:`glip_train.GLIP`, unchanged.

The packages are optional extras: ``pip install 'glip-train[onnx]'`` (onnx, onnxscript, onnxruntime) and
``'glip-train[openvino]'`` (onnx, onnxscript, openvino); nothing here is imported by the PyTorch path.
"""
from __future__ import annotations

from .exporter import FORMATS, QUANTIZATIONS, export_model
from .runtime import ExportedGLIP, ExportError, is_exported, resolve_export

__all__ = ["export_model", "ExportedGLIP", "ExportError", "is_exported", "resolve_export", "FORMATS",
           "QUANTIZATIONS"]
