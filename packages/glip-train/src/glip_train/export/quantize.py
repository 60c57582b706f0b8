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
    """Write the int8 model of the float32 graph ``source`` to ``target`` (one file); returns its record.

    The graph's constants are folded first (onnxruntime's own graph optimizer, ``quant_pre_process``): an export
    written without the exporter's optimizer feeds most weights through a ``Transpose`` (a linear layer is traced as
    transpose + matmul), and the quantizer only quantizes a matrix product whose weight is a constant (unfolded,
    GLIP-T kept 339 of its 400 matrix products in float32).
    """
    import tempfile

    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise missing_extra("onnxruntime", "onnx") from None
    source, target = Path(source), Path(target)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            folded = Path(scratch) / "folded.onnx"
            quant_pre_process(str(source), str(folded), skip_optimization=False, skip_onnx_shape=True,
                              skip_symbolic_shape=True, save_as_external_data=True, all_tensors_to_one_file=True,
                              external_data_location="folded.onnx.data")
            graph = onnx.load(str(folded))
            constant_products = _constant_weight_products(graph)
            quantize_dynamic(graph, str(target), op_types_to_quantize=list(ONNX_INT8_OPS),
                             weight_type=QuantType.QInt8, per_channel=False)
    except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; one message names the failure
        raise ExportError(f"onnxruntime's int8 quantization failed: {str(exc).strip().splitlines()[-1][:300]}") \
            from None
    return {"method": "onnxruntime dynamic quantization (quantize_dynamic) after constant folding",
            "operators": list(ONNX_INT8_OPS), "matrix_products_with_constant_weights": constant_products,
            "weights": "int8, one scale per tensor", "activations": "uint8, range measured per call"}


def _constant_weight_products(graph: Any) -> int:
    """How many ``MatMul`` / ``Gemm`` nodes of an ONNX graph multiply by a constant (an initializer or a
    ``Constant`` node's output): the ones dynamic quantization turns into int8."""
    constants = {i.name for i in graph.graph.initializer}
    constants |= {out for node in graph.graph.node if node.op_type == "Constant" for out in node.output}
    return sum(1 for node in graph.graph.node
               if node.op_type in ONNX_INT8_OPS and len(node.input) > 1 and node.input[1] in constants)


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
