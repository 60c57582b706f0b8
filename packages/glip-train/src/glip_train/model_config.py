"""Typed, validated configuration of a GLIP model: the official variants (GLIP-T, GLIP-T(A), GLIP-L) and small ones.

A :class:`GLIPConfig` is plain data (JSON round-trippable through :meth:`GLIPConfig.to_dict` /
:meth:`GLIPConfig.from_dict`): it is what ``save_pretrained`` writes as ``config.json``. Every field is checked when
the config is built — an unknown field, an enum-like string outside its allowed values or an inconsistent size fails
at once, naming the field, before any weight is allocated. ``config.json`` files written before the fusion and
post-processing settings became nested dataclasses still load (their flat keys are migrated).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from glip_fusion import FusionConfig

__all__ = ["GLIPConfig", "PostProcessConfig", "BERT_BASE_CONFIG", "NUM_LEVELS"]

#: ``BertConfig()`` defaults = the bert-base-uncased architecture (official text encoder of every GLIP model).
BERT_BASE_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}
_TEXT_REQUIRED = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                  "max_position_embeddings")

#: GLIP predicts on five FPN levels (P3..P7): five anchor sizes, strides and box-regression scales
NUM_LEVELS = 5


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class PostProcessConfig:
    """From head outputs to detections (official test defaults; ``docs/official_model.md#post-processing``).

    Attributes:
        candidate_threshold: minimum token-mean class probability of a candidate, before centerness (0.05).
        pre_nms_top_n: candidates kept per level and image (1000).
        nms_threshold: per-class NMS IoU threshold, inclusive-pixel IoU (0.6).
        detections_per_image: the cap after NMS (100; LVIS 300); the official rule keeps every score >= the k-th
            largest, so ties can keep a few more. None = no cap.
        min_box_size: drop boxes narrower or lower than this, with ``+1`` widths (0 keeps all).
    """

    candidate_threshold: float = 0.05
    pre_nms_top_n: int = 1000
    nms_threshold: float = 0.6
    detections_per_image: Optional[int] = 100
    min_box_size: float = 0.0

    def __post_init__(self) -> None:
        _check(isinstance(self.candidate_threshold, (int, float)) and 0.0 <= self.candidate_threshold < 1.0,
               f"PostProcessConfig.candidate_threshold must be in [0, 1); got {self.candidate_threshold!r}")
        _check(_is_int(self.pre_nms_top_n) and self.pre_nms_top_n >= 1,
               f"PostProcessConfig.pre_nms_top_n must be a positive integer; got {self.pre_nms_top_n!r}")
        _check(isinstance(self.nms_threshold, (int, float)) and 0.0 < self.nms_threshold <= 1.0,
               f"PostProcessConfig.nms_threshold must be in (0, 1]; got {self.nms_threshold!r}")
        _check(self.detections_per_image is None
               or (_is_int(self.detections_per_image) and self.detections_per_image >= 1),
               "PostProcessConfig.detections_per_image must be a positive integer or None (no cap); "
               f"got {self.detections_per_image!r}")
        _check(isinstance(self.min_box_size, (int, float)) and math.isfinite(self.min_box_size)
               and self.min_box_size >= 0,
               f"PostProcessConfig.min_box_size must be a finite number >= 0; got {self.min_box_size!r}")

    def replace(self, **changes: Any) -> "PostProcessConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PostProcessConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown PostProcessConfig fields {unknown}; known fields: {sorted(known)}")
        if data.get("detections_per_image") == 0:  # older configs wrote 0 for "no cap"
            data["detections_per_image"] = None
        return cls(**data)


def fusion_for_text(text_encoder: dict[str, Any], **fields: Any) -> FusionConfig:
    """A :class:`FusionConfig` whose text sizes (width, head BERT layers) follow ``text_encoder``."""
    return FusionConfig(**{
        "lang_dim": int(text_encoder["hidden_size"]),
        "bert_num_heads": int(text_encoder["num_attention_heads"]),
        "bert_intermediate_size": int(text_encoder["intermediate_size"]),
        "bert_layer_norm_eps": float(text_encoder.get("layer_norm_eps", 1e-12)),
        **fields,
    })


@dataclass(frozen=True)
class GLIPConfig:
    """Everything needed to build a :class:`~glip_train.GLIP` network and its processor.

    Attributes:
        name: a label ("glip_t", "glip_t_a", "glip_l", or anything for custom models).
        image_encoder: "swin_tiny" / "swin_large" (GLIP layout) or any timm model name.
        image_encoder_kwargs: extra keyword arguments of ``glip_encoders.build_image_encoder``.
        fpn_channels: FPN width (the fusion tower's width).
        text_encoder: the BERT-family ``transformers`` config (a dict with at least the architecture sizes).
        max_text_len: the longest text GLIP feeds the text encoder (256).
        fusion: the deep-fusion tower (:class:`glip_fusion.FusionConfig`); its text sizes must match
            ``text_encoder`` and its width ``fpn_channels``.
        fused_text_for_logits: the word-region logits use the fused text (every fused official model) rather than
            the BERT output (GLIP-T(A)); needs ``fusion.early_fusion``.
        batch_invariant: mask image padding in the X-MHA text-direction softmax (off for parity with the official
            weights, which attend to padding: ``docs/official_model.md#quirks`` item 1).
        num_cls_logits: channels of the frozen, unused ``cls_logits`` conv (80 in every official checkpoint).
        prior_prob: initial foreground probability of the token bias (0.01 -> bias -ln 99).
        anchor_sizes, anchor_strides: one square anchor per location on each of the five levels.
        size_divisibility: batches are zero-padded to a multiple of this (32).
        test_min_size, test_max_size: the test-time resize (shorter side, longer-side cap) that ``detect``,
            ``ground``, evaluation and pseudo-labelling use unless told otherwise (official: 800, 1333; a model
            trained on small images records its own).
        tokenizer: a local tokenizer directory, or None for the bundled bert-base-uncased vocabulary.
        postprocess: :class:`PostProcessConfig`.
    """

    name: str = "glip_t"
    image_encoder: str = "swin_tiny"
    image_encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    fpn_channels: int = 256
    text_encoder: dict[str, Any] = field(default_factory=lambda: dict(BERT_BASE_CONFIG))
    max_text_len: int = 256
    fusion: FusionConfig = field(default_factory=FusionConfig.glip_t)
    fused_text_for_logits: bool = True
    batch_invariant: bool = False
    num_cls_logits: int = 80
    prior_prob: float = 0.01
    anchor_sizes: tuple[float, ...] = (64, 128, 256, 512, 1024)
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    size_divisibility: int = 32
    test_min_size: int = 800
    test_max_size: int = 1333
    tokenizer: Optional[str] = None
    postprocess: PostProcessConfig = field(default_factory=PostProcessConfig)

    def __post_init__(self) -> None:
        # accept plain dicts/lists for the nested fields (JSON), store typed values
        if isinstance(self.fusion, dict):
            object.__setattr__(self, "fusion", FusionConfig.from_dict(self.fusion))
        if isinstance(self.postprocess, dict):
            object.__setattr__(self, "postprocess", PostProcessConfig.from_dict(self.postprocess))
        object.__setattr__(self, "anchor_sizes", tuple(self.anchor_sizes))
        object.__setattr__(self, "anchor_strides", tuple(self.anchor_strides))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", str(self.tokenizer))
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), f"GLIPConfig.name must be a non-empty string")
        _check(isinstance(self.image_encoder, str) and bool(self.image_encoder),
               f"GLIPConfig.image_encoder must be a backbone name; got {self.image_encoder!r}")
        _check(isinstance(self.image_encoder_kwargs, dict),
               f"GLIPConfig.image_encoder_kwargs must be a dict; got {type(self.image_encoder_kwargs).__name__}")
        _check(_is_int(self.fpn_channels) and self.fpn_channels > 0,
               f"GLIPConfig.fpn_channels must be a positive integer; got {self.fpn_channels!r}")
        _check(isinstance(self.text_encoder, dict), "GLIPConfig.text_encoder must be a transformers config dict")
        missing = [k for k in _TEXT_REQUIRED if k not in self.text_encoder]
        _check(not missing, f"GLIPConfig.text_encoder lacks {missing} (a transformers config dict, e.g. the "
                            "config.json of a BERT-family model)")
        _check(_is_int(self.max_text_len) and 2 < self.max_text_len <= int(self.text_encoder["max_position_embeddings"]),
               f"GLIPConfig.max_text_len must be in (2, {self.text_encoder['max_position_embeddings']}] "
               f"(the text encoder's positions); got {self.max_text_len!r}")
        _check(isinstance(self.fusion, FusionConfig), "GLIPConfig.fusion must be a glip_fusion.FusionConfig")
        text_dim = int(self.text_encoder["hidden_size"])
        _check(self.fusion.lang_dim == text_dim,
               f"GLIPConfig.fusion.lang_dim ({self.fusion.lang_dim}) must equal the text encoder's hidden_size "
               f"({text_dim}); build it with glip_train.model_config.fusion_for_text(text_encoder, ...)")
        _check(self.fusion.channels == self.fpn_channels and self.fusion.in_channels in (None, self.fpn_channels),
               f"GLIPConfig.fusion.channels / in_channels ({self.fusion.channels} / {self.fusion.in_channels}) must "
               f"equal fpn_channels ({self.fpn_channels})")
        _check(not (self.fused_text_for_logits and not self.fusion.early_fusion),
               "GLIPConfig.fused_text_for_logits=True needs fusion.early_fusion=True (without deep fusion there is "
               "no fused text; GLIP-T(A) sets both to False)")
        for name in ("anchor_sizes", "anchor_strides"):
            values = getattr(self, name)
            _check(len(values) == NUM_LEVELS and all(isinstance(v, (int, float)) and v > 0 for v in values),
                   f"GLIPConfig.{name} must hold {NUM_LEVELS} positive numbers (P3..P7); got {values!r}")
        _check(all(_is_int(s) for s in self.anchor_strides),
               f"GLIPConfig.anchor_strides must be integers; got {self.anchor_strides!r}")
        _check(_is_int(self.size_divisibility) and self.size_divisibility >= 1,
               f"GLIPConfig.size_divisibility must be a positive integer; got {self.size_divisibility!r}")
        _check(_is_int(self.test_min_size) and _is_int(self.test_max_size)
               and 1 <= self.test_min_size <= self.test_max_size,
               f"GLIPConfig.test_min_size / test_max_size must be positive integers with min <= max; got "
               f"{self.test_min_size!r} / {self.test_max_size!r}")
        _check(_is_int(self.num_cls_logits) and self.num_cls_logits >= 1,
               f"GLIPConfig.num_cls_logits must be a positive integer; got {self.num_cls_logits!r}")
        _check(isinstance(self.prior_prob, (int, float)) and 0.0 < self.prior_prob < 1.0,
               f"GLIPConfig.prior_prob must be in (0, 1); got {self.prior_prob!r}")
        _check(isinstance(self.postprocess, PostProcessConfig),
               "GLIPConfig.postprocess must be a PostProcessConfig")

    # ---- presets -------------------------------------------------------------------------------------------------
    @classmethod
    def glip_t(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-T (B), (C) and the released GLIP-T: Swin-T, 6 fusion blocks."""
        return cls(**{"name": "glip_t", **overrides})

    @classmethod
    def glip_t_a(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-T (A): Swin-T, no deep fusion (6 DyConv blocks), logits from the BERT output."""
        return cls(**{"name": "glip_t_a", "fusion": FusionConfig.glip_t_a(), "fused_text_for_logits": False,
                      **overrides})

    @classmethod
    def glip_l(cls, **overrides: Any) -> "GLIPConfig":
        """GLIP-L: Swin-L (window 12), 8 fusion blocks."""
        return cls(**{"name": "glip_l", "image_encoder": "swin_large", "fusion": FusionConfig.glip_l(), **overrides})

    @classmethod
    def small(cls, text_encoder_dir: str | Path, image_encoder: str = "resnet18", fusion_layers: int = 2,
              early_fusion: bool = True, fpn_channels: int = 256, dropout: float | None = None,
              **overrides: Any) -> "GLIPConfig":
        """A small model for tests and experiments: any timm backbone, a local BERT-family text encoder.

        Args:
            text_encoder_dir: a local Hugging Face model directory (its config.json is read; its tokenizer is used).
            image_encoder: a timm model name.
            fusion_layers: fusion blocks; early_fusion: X-MHA + BERT layers in them (False: DyConv only, like
                GLIP-T(A)).
            fpn_channels: FPN and tower width.
            dropout: one probability for every dropout (text encoder, X-MHA, head BERT layers) and the FPN
                DropBlock on/off; None keeps each default (0 makes training deterministic given the data).
            overrides: other GLIPConfig fields; ``fusion`` may be a dict of FusionConfig fields to change.
        """
        config_file = Path(text_encoder_dir) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"GLIPConfig.small: {config_file} not found (a local Hugging Face model directory)")
        text_cfg = json.loads(config_file.read_text())
        fusion_changes = overrides.pop("fusion", {})
        if isinstance(fusion_changes, FusionConfig):
            fusion_changes = fusion_changes.to_dict()
        if dropout is not None:
            text_cfg.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
            fusion_changes = {"dropout": dropout, "bert_dropout": dropout, **fusion_changes}
            overrides["image_encoder_kwargs"] = {"drop_block": dropout > 0, **overrides.get("image_encoder_kwargs", {})}
        fusion = fusion_for_text(text_cfg, num_blocks=fusion_layers, early_fusion=early_fusion, embed_dim=256,
                                 channels=fpn_channels, **fusion_changes)
        return cls(**{
            "name": "small",
            "image_encoder": image_encoder,
            "text_encoder": text_cfg,
            "fpn_channels": fpn_channels,
            "fusion": fusion,
            "fused_text_for_logits": early_fusion,
            "tokenizer": str(text_encoder_dir),
            **overrides,
        })

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return int(self.text_encoder["hidden_size"])

    @property
    def early_fusion(self) -> bool:
        return self.fusion.early_fusion

    @property
    def uses_fused_text(self) -> bool:
        """Whether the word-region logits read the fused text (else the BERT output)."""
        return self.fusion.early_fusion and self.fused_text_for_logits

    def replace(self, **changes: Any) -> "GLIPConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def updated(self, **overrides: Any) -> "GLIPConfig":
        """A copy with ``overrides`` applied; ``fusion`` / ``postprocess`` may be partial dicts (merged field by
        field) and the older flat fusion keys are accepted, as in :meth:`from_dict`."""
        return GLIPConfig.from_dict(merge_config_dicts(self.to_dict(), overrides))

    # ---- (de)serialisation ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["anchor_sizes"] = list(self.anchor_sizes)
        d["anchor_strides"] = list(self.anchor_strides)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GLIPConfig":
        """Build from a dict (``config.json``); nested ``fusion`` / ``postprocess`` may be dicts or partial dicts.

        Raises ``ValueError`` naming unknown fields. Older flat keys (``fusion_layers``, ``fusion_embed_dim``,
        ``dyconv_offset_mode``, ``fusion_backend``, ...) are migrated into ``fusion``.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a GLIP config must be a JSON object; got {type(data).__name__}")
        data = dict(data)
        legacy = {key: data.pop(key) for key in list(data) if key in _LEGACY_FUSION_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown GLIPConfig fields {unknown}; known fields: {sorted(known)}")
        text = data.get("text_encoder", BERT_BASE_CONFIG)
        fusion = data.get("fusion")
        if isinstance(fusion, FusionConfig):
            fusion = fusion.to_dict()
        if fusion is None or legacy:
            base = fusion_for_text(text) if fusion is None else FusionConfig.from_dict(fusion)
            changes = {_LEGACY_FUSION_KEYS[k]: v for k, v in legacy.items() if v is not None}
            if "fpn_channels" in data:
                changes.setdefault("channels", data["fpn_channels"])
            data["fusion"] = base.replace(**changes)
        if "fused_text_for_logits" not in data and "early_fusion" in legacy:
            data["fused_text_for_logits"] = bool(legacy["early_fusion"])
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "GLIPConfig":
        """Read a ``config.json``; errors name the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid JSON config ({exc})") from None
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None


def merge_config_dicts(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; the nested ``fusion`` and ``postprocess`` dicts merge field by field."""
    merged = dict(base)
    for key, value in overrides.items():
        if key in ("fusion", "postprocess") and isinstance(merged.get(key), dict):
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            if isinstance(value, dict):
                merged[key] = {**merged[key], **value}
                continue
        merged[key] = value
    return merged


#: flat keys of config.json files written before ``fusion`` became a FusionConfig -> its field names
_LEGACY_FUSION_KEYS = {
    "fusion_layers": "num_blocks",
    "early_fusion": "early_fusion",
    "fusion_embed_dim": "embed_dim",
    "fusion_heads": "num_heads",
    "fusion_dropout": "dropout",
    "fusion_bert_heads": "bert_num_heads",
    "fusion_bert_intermediate": "bert_intermediate_size",
    "dyconv_offset_mode": "offset_mode",
    "fusion_backend": "backend",
    "gradient_checkpointing": "gradient_checkpointing",
}
