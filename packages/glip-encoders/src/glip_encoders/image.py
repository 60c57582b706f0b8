"""Image encoder = backbone body (Swin in GLIP's layout, or any timm ``features_only`` model) + GLIP's FPN.

``ImageEncoder.forward(images (B, 3, H, W))`` returns the five pyramid levels P3..P7 (strides 8 ... 128), each
``(B, out_channels, H_l, W_l)``. GLIP feeds BGR x 255 images normalised with its pixel mean/std; the encoder just
takes the tensor.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from . import swin as swin_module
from .fpn import FPN
from .swin import SWIN_CONFIGS, SwinBackbone

__all__ = [
    "ImageEncoder",
    "build_image_encoder",
    "image_checkpoint_filter_fn",
    "image_to_official_state_dict",
    "load_swin_pretrained",
    "load_state_dict_file",
]

# GLIP-L trains with MODEL.BACKBONE.FREEZE_CONV_BODY_AT = 2 (its default), GLIP-T with -1.
_DEFAULT_FROZEN_STAGES = {"swin_tiny": -1, "swin_large": 2}


class ImageEncoder(nn.Module):
    """``body`` (multi-level backbone) followed by ``fpn`` (:class:`~glip_encoders.fpn.FPN`).

    Args:
        body: module mapping ``(B, 3, H, W)`` to a list of NCHW feature maps.
        fpn: the pyramid over three of them.
        body_levels: indices into the body's output list of the maps fed to the FPN (strides 8, 16, 32).
        body_stride: the coarsest body stride (32); smaller images are rejected.
    """

    def __init__(self, body: nn.Module, fpn: FPN, body_levels: Sequence[int] = (0, 1, 2), body_stride: int = 32):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.body_levels = tuple(body_levels)
        self.body_stride = body_stride
        self.out_channels = fpn.out_channels
        self.strides = (8, 16, 32, 64, 128)

    def forward(self, images: torch.Tensor, return_body_features: bool = False):
        """Encode a batch of (padded) images.

        Args:
            images: ``(B, 3, H, W)`` float tensor with ``H, W >= body_stride``.
            return_body_features: also return the body maps fed to the FPN (C3, C4, C5).

        Returns:
            ``[P3, P4, P5, P6, P7]``, or ``([P3..P7], [C3, C4, C5])`` when ``return_body_features``.
        """
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"ImageEncoder expects images of shape (B, 3, H, W), got {shape}")
        if images.shape[1] != 3:
            raise ValueError(f"ImageEncoder expects 3-channel images (B, 3, H, W), got {images.shape[1]} channels "
                             f"(shape {tuple(images.shape)})")
        H, W = images.shape[-2:]
        if H < self.body_stride or W < self.body_stride:
            raise ValueError(f"image size {H}x{W} is smaller than the backbone stride {self.body_stride}; "
                             f"pad or resize images to at least {self.body_stride}x{self.body_stride}")
        feats = self.body(images)
        body_feats = [feats[i] for i in self.body_levels]
        pyramid = self.fpn(body_feats)
        return (pyramid, body_feats) if return_body_features else pyramid


def build_image_encoder(
    name: str = "swin_tiny",
    out_channels: int = 256,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    *,
    frozen_stages: int | None = None,
    drop_path_rate: float | None = None,
    drop_block: bool = True,
    **timm_kwargs,
) -> ImageEncoder:
    """Build an image encoder.

    Args:
        name: ``"swin_tiny"`` / ``"swin_large"`` (GLIP-T / GLIP-L Swin in the official layout), or any timm model
            name whose last three ``features_only`` levels have strides 8, 16, 32 (``"resnet50"``,
            ``"convnext_tiny"``, ...).
        out_channels: FPN width (GLIP: 256).
        pretrained: load backbone weights from ``pretrained_file``. Nothing is ever downloaded: ``pretrained=True``
            without a local file raises.
        pretrained_file: local ``.pth``/``.pt``/``.bin``/``.safetensors`` with backbone weights (for Swin: an
            official Swin / GLIP body checkpoint or a timm Swin checkpoint; for timm models: a timm checkpoint).
            Giving a file implies ``pretrained``.
        frozen_stages: Swin only, official ``FREEZE_CONV_BODY_AT`` semantics; default -1 for swin_tiny, 2 for
            swin_large (GLIP-L freezes the patch embedding and stage 0 during training).
        drop_path_rate: Swin only, overrides 0.2 (tiny) / 0.4 (large); for timm models pass timm's own kwargs.
        drop_block: FPN DropBlock in training (official default on).
        **timm_kwargs: forwarded to ``timm.create_model`` for timm models.

    Returns:
        :class:`ImageEncoder` with children ``body`` and ``fpn``.
    """
    if pretrained_file is not None:
        pretrained = True
        if not Path(pretrained_file).is_file():
            raise FileNotFoundError(f"pretrained_file not found: {pretrained_file}")
    elif pretrained:
        raise ValueError(
            f"build_image_encoder({name!r}, pretrained=True): glip-encoders never downloads weights; pass "
            "pretrained_file=<local checkpoint> (e.g. a Swin/timm checkpoint you downloaded yourself)"
        )

    if name in SWIN_CONFIGS:
        if timm_kwargs:
            raise TypeError(f"build_image_encoder({name!r}) got unexpected keyword arguments {sorted(timm_kwargs)}")
        frozen = _DEFAULT_FROZEN_STAGES[name] if frozen_stages is None else frozen_stages
        body = SwinBackbone(SWIN_CONFIGS[name], out_indices=(1, 2, 3), frozen_stages=frozen,
                            drop_path_rate=drop_path_rate)
        if pretrained_file is not None:
            load_swin_pretrained(body, pretrained_file)
            body._freeze_stages()
        fpn = FPN(body.out_channels, out_channels, drop_block=drop_block)
        return ImageEncoder(body, fpn, body_levels=(0, 1, 2), body_stride=32)

    if frozen_stages is not None:
        raise ValueError(f"frozen_stages is only supported for the Swin encoders {sorted(SWIN_CONFIGS)}, not {name!r}")
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown image encoder {name!r}: use one of {sorted(SWIN_CONFIGS)} or a timm model name")
    if drop_path_rate is not None:
        timm_kwargs["drop_path_rate"] = drop_path_rate
    create_kwargs = dict(features_only=True, **timm_kwargs)
    if pretrained_file is not None:
        # timm reads the local file through the pretrained config (applying the model's own filter), no hub access
        create_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
    body = timm.create_model(name, **create_kwargs)
    reductions = list(body.feature_info.reduction())
    channels = list(body.feature_info.channels())
    if len(reductions) < 3 or reductions[-3:] != [8, 16, 32]:
        raise ValueError(f"timm model {name!r}: its last three feature levels have strides {reductions[-3:]}; the "
                         "GLIP FPN needs strides 8, 16, 32")
    levels = tuple(range(len(reductions) - 3, len(reductions)))
    fpn = FPN(channels[-3:], out_channels, drop_block=drop_block)
    return ImageEncoder(body, fpn, body_levels=levels, body_stride=32)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def image_checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ImageEncoder) -> dict[str, torch.Tensor]:
    """Map official GLIP image-encoder weights (keys relative to ``backbone.``: ``body.*``, ``fpn.*``) onto
    ``model``'s keys, for ``model.load_state_dict(..., strict=True)``.

    Swin bodies go through :func:`glip_encoders.swin.checkpoint_filter_fn` (patch merging re-homed,
    ``relative_position_index`` verified and dropped); other bodies and the FPN keep their names.

    Raises:
        KeyError: listing keys that have no place in the model.
        ValueError: listing shape mismatches.
    """
    body_sd: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("body."):
            body_sd[key[len("body."):]] = value
        else:
            rest[key] = value
    out: dict[str, torch.Tensor] = {}
    if isinstance(model.body, SwinBackbone):
        out.update({f"body.{k}": v for k, v in swin_module.checkpoint_filter_fn(body_sd, model.body).items()})
    else:
        rest.update({f"body.{k}": v for k, v in body_sd.items()})
    ours = model.state_dict()
    unknown = [k for k in rest if k not in ours]
    if unknown:
        raise KeyError(f"image-encoder checkpoint has {len(unknown)} key(s) with no place in the model: {unknown}")
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
           for k, v in rest.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        raise ValueError(f"image-encoder checkpoint shape mismatch(es): {bad}")
    out.update(rest)
    return out


def image_to_official_state_dict(model: ImageEncoder) -> dict[str, torch.Tensor]:
    """``model``'s weights with official keys relative to ``backbone.`` (inverse of
    :func:`image_checkpoint_filter_fn`)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(model.body, SwinBackbone):
        out.update({f"body.{k}": v for k, v in swin_module.to_official_state_dict(model.body).items()})
    else:
        out.update({f"body.{k}": v for k, v in model.body.state_dict().items()})
    out.update({f"fpn.{k}": v for k, v in model.fpn.state_dict().items()})
    return out


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a local weights file (``.safetensors`` or a torch pickle), unwrapping ``"model"``/``"state_dict"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict (expected a mapping of tensors, possibly under 'model')")
    return dict(obj)


# classification-only entries of ImageNet Swin checkpoints, and buffers, that a detection body does not hold
_SWIN_CLASSIFIER_KEYS = re.compile(r"^(head\..*|norm\.(weight|bias)|.*attn_mask|absolute_pos_embed)$")


def load_swin_pretrained(body: SwinBackbone, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load Swin backbone weights from a local file into ``body``.

    Accepted layouts: official Swin (classification or detection: ``layers.{s}.downsample`` at the end of stage
    ``s``; GLIP checkpoints with a ``module.``/``backbone.body.`` prefix included) and timm (``layers.{s+1}``).
    The classification head, the final ``norm`` and ``attn_mask`` buffers are ignored; GLIP's output norms
    ``norm1..3`` are absent from ImageNet checkpoints and keep their initialisation.

    Returns:
        ``{"ignored": [...], "missing": [...]}``.

    Raises:
        KeyError / ValueError as :func:`glip_encoders.swin.checkpoint_filter_fn` (unknown keys, shape mismatch).
    """
    sd = load_state_dict_file(path)
    for prefix in ("module.", "backbone.body.", "body."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    ignored = sorted(k for k in sd if _SWIN_CLASSIFIER_KEYS.match(k))
    sd = {k: v for k, v in sd.items() if k not in ignored}
    official_layout = "layers.0.downsample.reduction.weight" in sd
    if official_layout:
        mapped = swin_module.checkpoint_filter_fn(sd, body)
    else:  # timm layout: only verify and drop the structural index buffers
        index_keys = {k: v for k, v in sd.items() if k.endswith(".relative_position_index")}
        mapped = swin_module.checkpoint_filter_fn(index_keys, body)
        mapped.update({k: v for k, v in sd.items() if k not in index_keys})
    result = body.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"{path}: keys with no place in the Swin body: {result.unexpected_keys}")
    missing = [k for k in result.missing_keys if not re.match(r"^norm\d\.", k)]
    if missing:
        raise KeyError(f"{path}: Swin checkpoint lacks {len(missing)} backbone key(s): {missing}")
    return {"ignored": ignored, "missing": result.missing_keys}
