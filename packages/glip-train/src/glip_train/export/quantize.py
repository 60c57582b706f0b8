"""int8 exports (``export_model(quantize="int8")``, ``glip export --int8``): data-free, from the float32 graph.

* onnxruntime: dynamic quantization (``onnxruntime.quantization.quantize_dynamic``) of every matrix product with
  constant weights (``MatMul``, ``Gemm``: the Swin, BERT and fusion-tower linear layers and the deformable
  convolutions' GEMM): int8 weights, activations quantized per call from their own range. Convolutions stay float32
  (onnxruntime's dynamic ``ConvInteger`` is slower than its float32 convolution on CPUs).
* OpenVINO: NNCF's int8 weight compression (``nncf.compress_weights``, INT8_ASYM) of every weight it compresses
  (the matrix products, per output channel): int8 weights with float32 activations, decompressed in the kernels.

No calibration images are needed; the accuracy cost and the speed-up are measured in ``docs/deploy.md``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .runtime import ExportError, missing_extra

__all__ = ["quantize_onnx_int8", "quantize_openvino_int8"]

#: the ONNX operators quantized by onnxruntime's dynamic quantization
ONNX_INT8_OPS = ("MatMul", "Gemm")


def quantize_onnx_int8(source: Path, target: Path) -> dict[str, Any]:
    """Write the int8 model of the float32 graph ``source`` to ``target`` (one file); returns its record."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    try:
        quantize_dynamic(onnx.load(str(source)), str(target), op_types_to_quantize=list(ONNX_INT8_OPS),
                         weight_type=QuantType.QInt8, per_channel=False)
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; one message names the failure
        raise ExportError(f"onnxruntime's int8 quantization failed: {str(exc).strip().splitlines()[-1][:300]}") \
            from None
    return {"method": "onnxruntime dynamic quantization (quantize_dynamic)", "operators": list(ONNX_INT8_OPS),
            "weights": "int8, one scale per tensor", "activations": "uint8, range measured per call"}


def quantize_openvino_int8(ov_model: Any) -> tuple[Any, dict[str, Any]]:
    """NNCF's int8 weight compression of an OpenVINO model; returns ``(model, record)``."""
    try:
        import nncf
    except ImportError:
        raise missing_extra("nncf", "openvino") from None
    try:
        compressed = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    except Exception as exc:  # noqa: BLE001 - NNCF raises many types; one message names the failure
        raise ExportError(f"NNCF's int8 weight compression failed: {str(exc).strip().splitlines()[-1][:300]}") \
            from None
    return compressed, {"method": "NNCF weight compression (nncf.compress_weights, INT8_ASYM)",
                        "weights": "int8 with a scale and zero point per output channel",
                        "activations": "float32"}
