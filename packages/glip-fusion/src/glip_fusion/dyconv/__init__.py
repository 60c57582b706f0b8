"""DyConv, GLIP's DyHead block, with its deformable convolution.

* :mod:`.block`: :class:`DyConv` (spatial-, scale- and task-aware attention over the FPN levels) and :class:`DyReLU`;
* :mod:`.dcn`: :class:`ModulatedDeformConv3x3`, the 3x3 DCNv2 layer of the spatial attention, and the choice of its
  implementation (:func:`set_dcn_impl`, ``$GLIP_DCN_IMPL``);
* :mod:`.deform`: :func:`deform_conv2d`, deformable convolution as a row gather plus one GEMM (torchvision's
  semantics, fast on CPU), and :func:`deform_conv2d_grid_sample`, the same as GridSample + MatMul (for exported
  graphs).
"""

from .block import OFFSET_MODES, DyConv, DyReLU
from .dcn import DCN_IMPL_ENV_VAR, DCN_IMPLS, ModulatedDeformConv3x3, dcn_function, resolve_dcn_impl, set_dcn_impl
from .deform import DEFAULT_CHUNK_ELEMENTS, deform_conv2d, deform_conv2d_grid_sample

__all__ = ["DyConv", "DyReLU", "OFFSET_MODES", "ModulatedDeformConv3x3", "DCN_IMPLS", "DCN_IMPL_ENV_VAR",
           "resolve_dcn_impl", "dcn_function", "set_dcn_impl", "deform_conv2d", "deform_conv2d_grid_sample",
           "DEFAULT_CHUNK_ELEMENTS"]
