"""DyConv's spatial attention: the 3x3 modulated deformable convolution layer (DCNv2) and the choice of its
implementation (the gather + GEMM op or the GridSample + MatMul op of :mod:`glip_fusion.dyconv.deform`, or
torchvision's, imported only when chosen).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from .deform import deform_conv2d, deform_conv2d_grid_sample

__all__ = ["ModulatedDeformConv3x3", "DCN_IMPLS", "DCN_IMPL_ENV_VAR", "resolve_dcn_impl", "dcn_function",
           "set_dcn_impl"]

#: implementations a :class:`ModulatedDeformConv3x3` can use (``"auto"`` picks one):
#: ``"gather"`` (:func:`deform_conv2d`), ``"torchvision"``, ``"grid_sample"`` (:func:`deform_conv2d_grid_sample`)
DCN_IMPLS = ("gather", "torchvision", "grid_sample")
#: environment variable that forces the implementation chosen by ``impl="auto"``
DCN_IMPL_ENV_VAR = "GLIP_DCN_IMPL"


class ModulatedDeformConv3x3(nn.Module):
    """3x3 modulated deformable convolution (DCNv2), the spatial attention of :class:`~glip_fusion.DyConv`.

    ``weight (C_out, C_in, 3, 3)``, ``bias (C_out,)``, padding 1, one deformable group. Offsets ``(B, 18, Ho, Wo)``
    are (dy, dx) per tap, taps row-major; ``mask (B, 9, Ho, Wo)`` in [0, 1]. Like the official op (which is
    ``custom_fwd(cast_inputs=float32)``) it runs in float32 under autocast. Init: uniform(±1/sqrt(C_in*9)), bias 0.

    ``impl`` (an attribute, also settable on a whole model with :func:`glip_fusion.set_dcn_impl`):
    ``"gather"`` (:func:`glip_fusion.deform_conv2d`: row gather + GEMM, several times faster on CPU, forward and
    backward), ``"torchvision"`` (:func:`torchvision.ops.deform_conv2d`), ``"grid_sample"``
    (:func:`glip_fusion.dyconv.deform.deform_conv2d_grid_sample`: plain ONNX ops, what exported graphs use) or
    ``"auto"`` (default: ``$GLIP_DCN_IMPL`` if set, else ``"gather"`` on CPU and ``"torchvision"`` on other devices).
    All compute the same function.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, impl: str = "auto"):
        super().__init__()
        if impl != "auto" and impl not in DCN_IMPLS:
            raise ValueError(f"impl must be 'auto' or one of {DCN_IMPLS}; got {impl!r}")
        self.stride = stride
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1] * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=3, stride={self.stride}, padding=1, "
                f"impl={self.impl!r}")

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        op = dcn_function(resolve_dcn_impl(self.impl, x.device))
        if _autocast_enabled(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return op(x.float(), offset.float(), self.weight.float(), self.bias.float(),
                          stride=self.stride, padding=1, mask=mask.float())
        return op(x, offset, self.weight, self.bias, stride=self.stride, padding=1, mask=mask)


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)`` (torch >= 2.4) with a fallback for older torch."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def resolve_dcn_impl(impl: str, device: torch.device) -> str:
    """The implementation (one of :data:`DCN_IMPLS`) for an ``impl`` setting and the device of the data.

    ``"auto"``: ``$GLIP_DCN_IMPL`` if set, else ``"gather"`` on CPU (measured faster there) and ``"torchvision"``
    on other devices (its native kernels; the gather path runs there too but has not been measured).
    """
    if impl == "auto":
        env = os.environ.get(DCN_IMPL_ENV_VAR, "").strip()
        if env and env != "auto":
            if env not in DCN_IMPLS:
                raise ValueError(f"${DCN_IMPL_ENV_VAR}={env!r} is not a DCN implementation; expected one of "
                                 f"{DCN_IMPLS} or 'auto'")
            return env
        return "gather" if device.type == "cpu" else "torchvision"
    if impl not in DCN_IMPLS:
        raise ValueError(f"DCN impl must be 'auto' or one of {DCN_IMPLS}; got {impl!r}")
    return impl


def dcn_function(impl: str):
    """The function of an implementation name of :data:`DCN_IMPLS` (all with torchvision's signature)."""
    if impl == "torchvision":
        from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

        return torchvision_deform_conv2d
    functions = {"gather": deform_conv2d, "grid_sample": deform_conv2d_grid_sample}
    if impl not in functions:
        raise ValueError(f"DCN impl must be one of {DCN_IMPLS}; got {impl!r}")
    return functions[impl]


def set_dcn_impl(module: nn.Module, impl: str) -> int:
    """Set ``impl`` on every deformable convolution inside ``module`` (e.g. a whole GLIP model); returns how many.

    ``impl``: ``"auto"`` or one of :data:`DCN_IMPLS`.
    """
    if impl != "auto" and impl not in DCN_IMPLS:
        raise ValueError(f"DCN impl must be 'auto' or one of {DCN_IMPLS}; got {impl!r}")
    count = 0
    for sub in module.modules():
        if isinstance(sub, ModulatedDeformConv3x3):
            sub.impl = impl
            count += 1
    return count
