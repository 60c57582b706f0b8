"""Swin Transformer backbone with GLIP's official semantics, built from timm's Swin building blocks.

The module reproduces the Swin used by the official GLIP code (the Swin-Transformer-Object-Detection variant):

* patch embedding: the input is zero-padded at the right/bottom to a multiple of the patch size (4);
* every block zero-pads its LayerNorm-ed input at the right/bottom to a multiple of the window size **after**
  ``norm1`` and **before** the cyclic shift; the window is never shrunk to the feature size (a 5x7 map still uses
  7x7 windows, padded);
* shifted blocks add a -100 mask between the regions of the padded, rolled map (not -inf);
* patch merging zero-pads to even H/W and concatenates the sub-grids (even row, even col), (odd row, even col),
  (even row, odd col), (odd row, odd col) before LayerNorm(4C) and Linear(4C -> 2C, no bias);
* the pre-downsample output of stage ``i`` passes an output norm ``norm{i}`` (``norm0`` is an Identity in GLIP).

timm 1.0 differs in exactly the place that matters for non-window-multiple inputs: its ``SwinTransformerBlock``
rolls *then* pads, so the padding ends up in other windows than in the official model. :class:`SwinBlock` keeps
timm's sub-modules (``norm1``, ``attn`` = timm ``WindowAttention``, ``mlp``, ``drop_path``) and restates only the
block's forward in the official order. :class:`PatchMerging` likewise keeps timm's ``norm``/``reduction`` and states
the official padding and sub-grid order explicitly (some timm 1.0.x releases swap the H/W padding).

Parameter layout (timm style): the patch merging that the official checkpoint stores at the *end* of stage ``s``
(``layers.{s}.downsample``) lives at the *start* of stage ``s+1`` here (``layers.{s+1}.downsample``);
:func:`checkpoint_filter_fn` and :func:`to_official_state_dict` convert between the two.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import PatchMerging as TimmPatchMerging
from timm.models.swin_transformer import (
    SwinTransformerBlock,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import nn

__all__ = [
    "SwinConfig",
    "SWIN_CONFIGS",
    "SwinBlock",
    "PatchMerging",
    "SwinStage",
    "SwinBackbone",
    "shifted_window_mask",
    "WindowPlan",
    "window_plan",
    "checkpoint_filter_fn",
    "to_official_state_dict",
]


@dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin backbone (official GLIP names in comments)."""

    embed_dim: int = 96  # MODEL.SWINT.EMBED_DIM
    depths: tuple[int, ...] = (2, 2, 6, 2)  # MODEL.SWINT.DEPTHS
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # MODEL.SWINT.NUM_HEADS
    window_size: int = 7  # MODEL.SWINT.WINDOW_SIZE
    drop_path_rate: float = 0.2  # MODEL.SWINT.DROP_PATH_RATE
    mlp_ratio: float = 4.0
    patch_size: int = 4

    @property
    def dims(self) -> tuple[int, ...]:
        """Channels of every stage, ``embed_dim * 2**s``."""
        return tuple(self.embed_dim * 2**s for s in range(len(self.depths)))


SWIN_CONFIGS: dict[str, SwinConfig] = {
    # GLIP-T: configs/pretrain/glip_Swin_T_O365_GoldG.yaml
    "swin_tiny": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    # GLIP-L: configs/pretrain/glip_Swin_L.yaml
    "swin_large": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=12, drop_path_rate=0.4),
}


def padded_to_windows(size: int, window_size: int) -> int:
    """``size`` rounded up to a whole number of windows: the official zero padding before the cyclic shift.

    Written ``(n + w - 1) // w * w`` for export: traced, ``-(-n // w) * w`` becomes ONNX's truncating ``Div`` of a
    negative size (one window short), and ``n + (w - n % w) % w`` leaves nested remainders that ``torch.export``'s
    symbolic arithmetic spent minutes per block simplifying; this form divides by ``w`` to a plain symbol.
    """
    return (size + window_size - 1) // window_size * window_size


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """The additive attention mask of a shifted-window block for a padded ``(height, width)`` map.

    ``height`` and ``width`` must be multiples of ``window_size`` (the map is padded before the shift). Tokens that
    came from different regions of the rolled map get -100 (official value, not -inf), others 0.

    Returns:
        ``(num_windows, window_size**2, window_size**2)``.
    """
    # a token's region along one axis: 0 before the last window, 1 in it before the shift, 2 in the shift; the nine
    # regions are numbered row-major. Built by comparisons rather than by filling slices, so that a traced graph
    # (export) keeps the sizes symbolic without guards on the sizes of the slices
    def band(size: int) -> torch.Tensor:
        index = torch.arange(size, device=device)
        return (index >= size - window_size).to(dtype) + (index >= size - shift_size).to(dtype)

    labels = (3 * band(height)[:, None] + band(width)[None, :])[None, :, :, None]  # (1, height, width, 1)
    windows = window_partition(labels, (window_size, window_size)).reshape(-1, window_size * window_size)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


#: tokens per chunk of the fused inference path: the chunk's activations stay in the cache (L2/L3). Measured on the
#: GLIP-T Swin body at 800x1216 with the oneDNN linears: 1024..16384 within 5% of each other (8192-16384 best, 1 and
#: 2 threads, CPU time), the map-wide path 1.3x slower; with the machine oversubscribed (2 threads, load 10) small
#: chunks are 2x slower (many short parallel regions wait for descheduled threads), 16384 is not
FUSED_CHUNK_TOKENS = 8192


@dataclass(frozen=True)
class WindowChunk:
    """A run of windows of the fused path, in window-token order (``n`` windows of ``w*w`` tokens).

    ``gather``: ``(n*w*w,)`` row of every window token in the flattened ``(B*H*W, C)`` map (padding tokens read
    row 0 and are zeroed after ``norm1``); ``padding`` / ``keep``: positions of the padding / map tokens in the
    chunk (None when there is no padding); ``scatter``: the map rows of the kept tokens; ``mask``:
    ``(n, 1, w*w, w*w)`` shift mask of windows that straddle regions of the rolled map (None: all-zero)."""

    gather: torch.Tensor
    padding: torch.Tensor | None
    keep: torch.Tensor | None
    scatter: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class WindowPlan:
    """How the fused path reads a ``(B, H, W)`` map window by window: the chunks (see :class:`WindowChunk`)."""

    chunks: tuple[WindowChunk, ...]


@functools.lru_cache(maxsize=64)
def window_plan(batch: int, height: int, width: int, window_size: int, shift_size: int, device: torch.device,
                dtype: torch.dtype = torch.float32, chunk_tokens: int = FUSED_CHUNK_TOKENS) -> WindowPlan:
    """The official window layout of a block (LN1 -> zero-pad to window multiples -> roll by ``-shift`` ->
    partition) as index maps of the unpadded map, cached per size.

    Window ``(wy, wx)`` token ``(iy, ix)`` sits at ``(py, px) = (wy*w + iy, wx*w + ix)`` of the padded, rolled map,
    i.e. at ``((py + s) % Hp, (px + s) % Wp)`` of the padded map (``torch.roll(x, -s)[p] = x[(p + s) % n]``); it is
    padding when that is outside ``(H, W)``. Windows without mask entries come first, then the masked ones, so a
    chunk is either unmasked or carries its windows' masks.
    """
    w, s = window_size, shift_size
    Hp, Wp = padded_to_windows(height, w), padded_to_windows(width, w)
    nwh, nww = Hp // w, Wp // w
    rows = ((torch.arange(Hp) + s) % Hp).view(nwh, 1, w, 1).expand(nwh, nww, w, w)
    cols = ((torch.arange(Wp) + s) % Wp).view(1, nww, 1, w).expand(nwh, nww, w, w)
    valid = ((rows < height) & (cols < width)).reshape(nwh * nww, w * w)
    index = (rows * width + cols).reshape(nwh * nww, w * w)
    if s > 0:
        mask = shifted_window_mask(Hp, Wp, w, s, dtype=dtype)
        masked = (mask != 0).flatten(1).any(1)
    else:
        mask, masked = None, torch.zeros(nwh * nww, dtype=torch.bool)
    per_chunk = max(1, chunk_tokens // (w * w))
    hw = height * width
    chunks = []
    for group in (torch.nonzero(~masked).flatten(), torch.nonzero(masked).flatten()):
        for b in range(batch):
            for start in range(0, len(group), per_chunk):
                win = group[start:start + per_chunk]
                ok = valid[win].reshape(-1)
                rows_b = index[win].reshape(-1) + b * hw
                padded = not bool(ok.all())
                chunks.append(WindowChunk(
                    gather=torch.where(ok, rows_b, 0).to(device),
                    padding=torch.nonzero(~ok).flatten().to(device) if padded else None,
                    keep=torch.nonzero(ok).flatten().to(device) if padded else None,
                    scatter=rows_b[ok].to(device),
                    mask=None if mask is None or not bool(masked[win[0]]) else mask[win].unsqueeze(1).to(device),
                ))
    return WindowPlan(tuple(chunks))


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear(x: torch.Tensor, linear: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``linear(x)`` (then exact GELU) for inference, no autograd: on CPU float32 outside autocast, oneDNN's inner
    product with the bias and GELU applied in the kernel. oneDNN runs AVX-512 kernels where MKL's sgemm may not
    (AMD EPYC, one core: 100-110 vs 90-100 GFLOP/s on the fused Swin chunk shapes; the Swin body 5% faster);
    equal to float rounding."""
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):  # no ONNX op for it
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")
    y = linear(x)
    return F.gelu(y) if gelu else y


class SwinBlock(SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` with the official GLIP forward order (LN1 -> pad -> roll -> W-MSA).

    The window size is fixed (``always_partition``): it is never reduced to the feature size.
    Parameter names are timm's = official: ``norm1``, ``attn.{qkv,proj,relative_position_bias_table}``, ``norm2``,
    ``mlp.{fc1,fc2}``.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0):
        super().__init__(
            dim=dim,
            input_resolution=(window_size, window_size),  # unused: windows are fixed and masks built per input
            num_heads=num_heads,
            window_size=window_size,
            shift_size=shift_size,
            always_partition=True,  # official: never shrink the window or drop the shift for small maps
            dynamic_mask=True,  # no mask buffer tied to a fixed input size
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path=drop_path,
        )

    @property
    def window(self) -> int:
        return self.window_size[0]

    @property
    def shift(self) -> int:
        return self.shift_size[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One block.

        Args:
            x: ``(B, H, W, C)`` tokens.
            attn_mask: ``(num_windows, w*w, w*w)`` mask of the padded map for shifted blocks (see
                :func:`shifted_window_mask`); built here when omitted.

        Returns:
            ``(B, H, W, C)``.
        """
        B, H, W, C = x.shape
        w, s = self.window, self.shift
        shortcut = x
        x = self.norm1(x)
        # official: pad the normalised map to window multiples *before* the cyclic shift
        Hp, Wp = padded_to_windows(H, w), padded_to_windows(W, w)
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if s > 0:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            if attn_mask is None:
                attn_mask = shifted_window_mask(Hp, Wp, w, s, device=x.device, dtype=x.dtype)
        else:
            attn_mask = None
        windows = window_partition(x, (w, w)).reshape(-1, w * w, C)  # (B*nW, w*w, C)
        windows = self.attn(windows, mask=attn_mask)
        x = window_reverse(windows.reshape(-1, w, w, C), (w, w), Hp, Wp)  # (B, Hp, Wp, C)
        if s > 0:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        x = x[:, :H, :W, :]
        x = shortcut + self.drop_path1(x)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none" and isinstance(mlp.norm, nn.Identity):
            return _linear(_linear(x, mlp.fc1, gelu=True), mlp.fc2)
        return mlp(x)

    def fused_forward(self, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
        """:meth:`forward` for inference (eval mode, no autograd), equal to float rounding: window by window
        instead of map-wide passes.

        A chunk of windows is gathered from the map in one index (pad + roll + partition), then norm1, W-MSA (one
        ``scaled_dot_product_attention`` with the relative position bias and shift mask as additive mask), the
        residual, norm2, MLP and its residual run while the chunk is in the cache, and the chunk's map tokens are
        written back in one index (reverse + roll back + crop). Proj and MLP skip the padding tokens (their output
        is cropped away).

        Args:
            x: ``(B, H, W, C)`` tokens.
            plan: :func:`window_plan` of ``(B, H, W)`` for this block's window and shift.

        Returns:
            ``(B, H, W, C)``, a new tensor.
        """
        B, H, W, C = x.shape
        attn = self.attn
        heads, tokens = attn.num_heads, self.window**2
        bias = attn._get_rel_pos_bias()  # (1, heads, w*w, w*w)
        src = x.reshape(B * H * W, C)
        out = torch.empty_like(src)
        for chunk in plan.chunks:
            rows = src.index_select(0, chunk.gather)  # (n*w*w, C)
            h = self.norm1(rows)
            if chunk.padding is not None:
                h.index_fill_(0, chunk.padding, 0.0)  # official: zero padding after norm1
            n = rows.shape[0] // tokens
            q, k, v = _linear(h, attn.qkv).view(n, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            mask = bias if chunk.mask is None else bias + chunk.mask
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)  # (n, heads, w*w, D)
            o = o.transpose(1, 2).reshape(n * tokens, C)  # free: the CPU kernel writes (n, w*w, heads, D)
            if chunk.keep is not None:
                o, rows = o.index_select(0, chunk.keep), rows.index_select(0, chunk.keep)
            rows += _linear(o, attn.proj)
            rows += self._mlp(self.norm2(rows))
            out.index_copy_(0, chunk.scatter, rows)
        return out.view(B, H, W, C)


class PatchMerging(TimmPatchMerging):
    """timm's ``PatchMerging`` (``norm`` = LayerNorm(4C), ``reduction`` = Linear(4C -> 2C, no bias)) with the
    official forward stated explicitly: zero-pad to even H/W, then concatenate the sub-grids (even row, even col),
    (odd row, even col), (even row, odd col), (odd row, odd col).

    (timm's own forward has the same order in 1.0.31 but swapped the H/W padding in some 1.0.x releases.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), out_dim)``."""
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        if torch.compiler.is_compiling():  # traced (export): the slicing form, whose sizes stay plainly symbolic
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        else:
            H2, W2 = (H + 1) // 2, (W + 1) // 2
            # (B, H2, dy, W2, dx, C) -> (B, H2, W2, dx, dy, C): the four sub-grids in the official order, one copy
            x = x.view(B, H2, 2, W2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H2, W2, 4 * C)
        x = self.norm(x)
        return self.reduction(x) if torch.is_grad_enabled() else _linear(x, self.reduction)


class SwinStage(nn.Module):
    """``downsample`` (:class:`PatchMerging` or Identity for stage 0) followed by ``blocks``.

    Blocks alternate shift 0 / ``window_size // 2``. The shifted-window mask is built once per stage and input size.
    In eval mode without autograd on float32 (``fused_inference``, default on) the blocks run
    :meth:`SwinBlock.fused_forward` with the cached :func:`window_plan` of the input size.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int, downsample: bool,
                 mlp_ratio: float = 4.0, drop_path: Sequence[float] = ()):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.downsample = PatchMerging(in_dim, out_dim=dim) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else self.shift_size, mlp_ratio, drop_path[j])
            for j in range(depth)
        )
        self.grad_checkpointing = False
        self.fused_inference = True

    def _fused(self, x: torch.Tensor) -> bool:
        # not when traced (export): the window plans are cached per concrete size, which a traced graph keeps symbolic
        return (self.fused_inference and not self.training and not torch.is_grad_enabled()
                and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
                and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in)`` -> ``(B, H', W', C)`` (H' = ceil(H/2) when downsampling)."""
        x = self.downsample(x)
        if self._fused(x):
            B, H, W, _ = x.shape
            plans = {s: window_plan(B, H, W, self.window_size, s, x.device) for s in {b.shift for b in self.blocks}}
            for block in self.blocks:
                x = block.fused_forward(x, plans[block.shift])
            return x
        mask = None
        if len(self.blocks) > 1 and self.shift_size > 0:
            w = self.window_size
            Hp, Wp = padded_to_windows(x.shape[1], w), padded_to_windows(x.shape[2], w)
            mask = shifted_window_mask(Hp, Wp, w, self.shift_size, device=x.device, dtype=x.dtype)
        for block in self.blocks:
            block_mask = mask if block.shift > 0 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, block_mask, use_reentrant=False)
            else:
                x = block(x, block_mask)
        return x


class SwinBackbone(nn.Module):
    """Swin Transformer feature extractor in GLIP's layout.

    Args:
        config: the architecture (:data:`SWIN_CONFIGS` holds GLIP-T and GLIP-L).
        out_indices: stages whose (pre-downsample) outputs are returned; default (1, 2, 3) = C3, C4, C5.
        frozen_stages: official ``FREEZE_CONV_BODY_AT`` semantics: -1 nothing; >= 0 the patch embedding;
            k >= 2 additionally stages ``0 .. k-2`` *including the patch merging that ends them*. Frozen parts get
            ``requires_grad=False`` and stay in eval mode (no drop-path) even under ``train()``.
        drop_path_rate: overrides the config's value (linearly spaced over all blocks).

    Children: ``patch_embed`` (timm ``PatchEmbed``: ``proj``, ``norm``), ``layers.{s}`` (:class:`SwinStage`),
    ``norm{i}`` for ``i`` in ``out_indices`` (``norm0`` is an Identity as in GLIP, others LayerNorm).

    ``forward(images (B, 3, H, W))`` -> list of ``(B, C_i, ceil(H / 2**(i+2)), ...)`` maps, NCHW.
    """

    def __init__(self, config: SwinConfig = SWIN_CONFIGS["swin_tiny"], out_indices: Sequence[int] = (1, 2, 3),
                 frozen_stages: int = -1, drop_path_rate: float | None = None, in_chans: int = 3):
        super().__init__()
        self.config = config
        self.out_indices = tuple(out_indices)
        num_stages = len(config.depths)
        if len(config.num_heads) != num_stages:
            raise ValueError(f"SwinConfig: depths {config.depths} and num_heads {config.num_heads} differ in length")
        if not self.out_indices or any(not 0 <= i < num_stages for i in self.out_indices):
            raise ValueError(f"out_indices {self.out_indices} must be stage indices in [0, {num_stages})")
        if frozen_stages < -1 or frozen_stages > num_stages + 1:
            raise ValueError(f"frozen_stages={frozen_stages} must be in [-1, {num_stages + 1}]")
        self.frozen_stages = frozen_stages
        dims = config.dims
        self.out_channels = [dims[i] for i in self.out_indices]
        self.strides = [config.patch_size * 2**i for i in self.out_indices]

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=config.patch_size, in_chans=in_chans, embed_dim=config.embed_dim,
            norm_layer=nn.LayerNorm, output_fmt="NHWC", strict_img_size=False,
            dynamic_img_pad=True,  # official: pad right/bottom to a multiple of the patch size
        )
        rate = config.drop_path_rate if drop_path_rate is None else drop_path_rate
        dpr = torch.linspace(0, rate, sum(config.depths), device="cpu").tolist()  # official rule (cpu: meta-safe)
        self.layers = nn.ModuleList()
        start = 0
        for s in range(num_stages):
            depth = config.depths[s]
            self.layers.append(SwinStage(
                in_dim=dims[max(s - 1, 0)], dim=dims[s], depth=depth, num_heads=config.num_heads[s],
                window_size=config.window_size, downsample=s > 0, mlp_ratio=config.mlp_ratio,
                drop_path=dpr[start:start + depth],
            ))
            start += depth
        for i in self.out_indices:
            # GLIP ("...-RETINANET" backbones): no norm on the stride-4 output
            self.add_module(f"norm{i}", nn.Identity() if i == 0 else nn.LayerNorm(dims[i]))
        self._init_weights()
        self._freeze_stages()

    def _init_weights(self) -> None:
        # official init: trunc-normal(0.02) Linear weights, zero biases, unit LayerNorms
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def frozen_modules(self) -> list[nn.Module]:
        """The modules ``frozen_stages`` freezes (official semantics, see the class docstring)."""
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods.append(self.patch_embed)
        for s in range(0, max(self.frozen_stages - 1, 0)):
            mods.append(self.layers[s].blocks)
            if s + 1 < len(self.layers):
                mods.append(self.layers[s + 1].downsample)  # official stage s ends with this patch merging
        return mods

    def _freeze_stages(self) -> None:
        for m in self.frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()  # frozen parts stay in eval mode, as in the official backbone
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def set_fused_inference(self, enable: bool = True) -> None:
        """Whether eval-mode, no-grad float32 forwards take :meth:`SwinBlock.fused_forward` (default on)."""
        for stage in self.layers:
            stage.fused_inference = enable

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images (B, 3, H, W)`` -> the NCHW outputs of ``out_indices`` (after their output norms)."""
        x = self.patch_embed(images)  # (B, ceil(H/4), ceil(W/4), C0)
        outs = []
        last = max(self.out_indices)
        for s, stage in enumerate(self.layers):
            x = stage(x)
            if s in self.out_indices:
                outs.append(getattr(self, f"norm{s}")(x).permute(0, 3, 1, 2).contiguous())
            if s == last:
                break
        return outs


# ---------------------------------------------------------------------------------------------------------------
# official <-> ours key mapping

_OFFICIAL_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.*)$")
_REL_INDEX_SUFFIX = ".attn.relative_position_index"


def _rel_index_owner(model: SwinBackbone, key: str) -> nn.Module | None:
    """The WindowAttention an official ``layers.s.blocks.j.attn.relative_position_index`` key belongs to."""
    try:
        return model.get_submodule(key[: -len(".relative_position_index")])
    except AttributeError:
        return None


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: SwinBackbone) -> dict[str, torch.Tensor]:
    """Map an official GLIP Swin state dict (keys without ``backbone.body.``) onto ``model``'s keys.

    * ``layers.{s}.downsample.*`` (end of stage s) -> ``layers.{s+1}.downsample.*`` (start of stage s+1);
    * ``*.attn.relative_position_index`` buffers are structural: their values are checked against the index of
      our window size and dropped (timm keeps them non-persistent);
    * everything else keeps its name.

    Raises:
        KeyError: listing every key that has no place in ``model``.
        ValueError: listing every shape mismatch, or a ``relative_position_index`` that differs from ours.
    """
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    bad_shapes: list[str] = []
    bad_index: list[str] = []
    for key, value in state_dict.items():
        if key.endswith(_REL_INDEX_SUFFIX):
            attn = _rel_index_owner(model, key)
            if attn is None or not hasattr(attn, "window_size"):
                unknown.append(key)
                continue
            expected = get_relative_position_index(*attn.window_size)
            if tuple(value.shape) != tuple(expected.shape) or not torch.equal(value.cpu().long(), expected):
                bad_index.append(f"{key} (shape {tuple(value.shape)}, expected window {attn.window_size})")
            if key in ours:  # a timm version that keeps the buffer persistent
                out[key] = value
            continue
        match = _OFFICIAL_DOWNSAMPLE.match(key)
        new_key = f"layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}" if match else key
        if new_key not in ours:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(ours[new_key].shape):
            bad_shapes.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[new_key].shape)}")
            continue
        out[new_key] = value
    if unknown:
        raise KeyError(f"official Swin checkpoint has {len(unknown)} key(s) with no place in the model: {unknown}")
    if bad_shapes:
        raise ValueError(f"official Swin checkpoint shape mismatch(es): {bad_shapes}")
    if bad_index:
        raise ValueError(f"relative_position_index differs from the model's structural index: {bad_index}")
    return out


def to_official_state_dict(model: SwinBackbone) -> dict[str, torch.Tensor]:
    """``model``'s weights in the official GLIP layout (keys without ``backbone.body.``), the inverse of
    :func:`checkpoint_filter_fn`: patch merging re-homed to the end of the previous stage and the
    ``relative_position_index`` buffers added."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        match = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        if match:
            key = f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}"
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            attn = model.get_submodule(key[: -len(".relative_position_bias_table")])
            index = get_relative_position_index(*attn.window_size)
            out[key[: -len("relative_position_bias_table")] + "relative_position_index"] = (
                index if value.is_meta else index.to(value.device)
            )
    return out
